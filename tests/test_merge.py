"""cpt merge: coefficients against numbers worked out by hand, then merges of tiny Llamas saved as HF dirs
(exact one-hot, the mean, logits of the loaded dir, bf16, tied embeddings, refusals), the CLI, and merges
of real training checkpoints (full and LoRA)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from cpt import checkpoint as ckpt_lib
from cpt.cli import main
from cpt.errors import CptError
from cpt.merge import MERGE_FILE, WSM_SHAPES, merge_checkpoints, merge_coefficients, resolve_inputs
from cpt.schedules import SHAPES

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def tiny_model(tokenizer_dir: Path, out: Path, seed: int, cls=LlamaConfig, dtype=torch.float32, **over) -> Path:
    """A tiny causal LM with seeded random weights, saved as an HF dir (safetensors + config + tokenizer)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = cls(**{**SMALL, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                    "eos_token_id": tok.eos_token_id, "tie_word_embeddings": False, **over})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def three(tokenizer_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("three")
    return [tiny_model(tokenizer_dir, root / f"m{i}", seed=i) for i in range(3)]


# ------------------------------------------------------------------------------------------ coefficients


def test_coefficients_by_hand():
    n = 4
    assert merge_coefficients("uniform", n) == [0.25] * 4
    assert merge_coefficients("2,1,1,0", n) == [0.5, 0.25, 0.25, 0.0]  # normalised to sum 1
    assert merge_coefficients("1,0,0", 3) == [1.0, 0.0, 0.0]
    # EMA started at the first checkpoint: newest 1-d, k older d^k(1-d), the first d^3 (the remainder)
    assert merge_coefficients("ema:0.5", n) == pytest.approx([0.125, 0.125, 0.25, 0.5], abs=1e-12)
    assert merge_coefficients("ema:0.9", n) == pytest.approx([0.729, 0.081, 0.09, 0.1], abs=1e-12)
    assert merge_coefficients("ema:0", n) == [0.0, 0.0, 0.0, 1.0]
    # WSM: c_j = f(j/4) - f((j+1)/4) of the decay factor f (1 -> 0); linear decay = the plain mean
    assert merge_coefficients("wsm:linear", n) == pytest.approx([0.25, 0.25, 0.25, 0.25], abs=1e-12)
    # cosine f = (1 + cos(pi p)) / 2: 1, 0.8535534, 0.5, 0.1464466, 0
    assert merge_coefficients("wsm:cosine", n) == pytest.approx(
        [0.1464466094, 0.3535533906, 0.3535533906, 0.1464466094], abs=1e-9)
    # 1-sqrt f = 1 - sqrt(p): 1, 0.5, 0.2928932, 0.1339746, 0
    assert merge_coefficients("wsm:1-sqrt", n) == pytest.approx(
        [0.5, 0.2071067812, 0.1589186226, 0.1339745962], abs=1e-9)
    # rex f = (1 - p) / (0.5 + 0.5 (1 - p)): 1, 6/7, 2/3, 0.4, 0
    assert merge_coefficients("wsm:rex", n) == pytest.approx([1 / 7, 4 / 21, 4 / 15, 0.4], abs=1e-12)
    for spec in ("uniform", "ema:0.7", *(f"wsm:{s}" for s in WSM_SHAPES)):
        assert sum(merge_coefficients(spec, 7)) == pytest.approx(1, abs=1e-12)
        assert merge_coefficients(spec, 1) == pytest.approx([1.0])
    assert set(WSM_SHAPES) <= set(SHAPES)  # the shapes are cpt.schedules' own


@pytest.mark.parametrize("spec, message", [
    ("1,2", "2 weights for 3 checkpoints"),
    ("1,-1,1", "must be >= 0"),
    ("0,0,0", "all weights are zero"),
    ("1,inf,1", "'inf' is not finite"),
    ("1,x,1", "'x' is not a number"),
    ("ema:1", "the decay must be in [0, 1)"),
    ("ema:", "'' is not a number"),
    ("wsm:exponential", "unknown decay shape (expected one of linear, cosine, 1-sqrt, rex)"),
    ("average", "expected uniform, w1,w2,..."),
])
def test_bad_weights_are_one_line(spec, message):
    with pytest.raises(CptError) as e:
        merge_coefficients(spec, 3)
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ merging


def test_one_hot_weights_give_the_first_checkpoint_bit_exactly(three, tmp_path):
    out = merge_checkpoints(three, merge_coefficients("1,0,0", 3), tmp_path / "first")
    merged, first = tensors(out), tensors(three[0])
    assert merged.keys() == first.keys()
    assert all(torch.equal(merged[k], first[k]) and merged[k].dtype == first[k].dtype for k in first)
    # config and tokenizer are the last checkpoint's, byte for byte; nothing else is left around
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (three[-1] / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first"]


def test_uniform_is_the_mean_and_the_dir_loads_with_its_logits(three, tmp_path):
    out = merge_checkpoints(three, merge_coefficients("uniform", 3), tmp_path / "mean", method="uniform")
    sources = [tensors(p) for p in three]
    merged = tensors(out)
    for k, t in merged.items():
        assert torch.allclose(t, sum(s[k] for s in sources) / 3, atol=1e-6, rtol=0), k
    # from_pretrained loads it; its logits are those of a model whose state dict was averaged by hand
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    models = [AutoModelForCausalLM.from_pretrained(p) for p in three]
    by_hand = AutoModelForCausalLM.from_config(models[0].config).eval()
    states = [m.state_dict() for m in models]
    by_hand.load_state_dict({k: sum(s[k] for s in states) / 3 for k in states[0]})
    ids = torch.randint(0, loaded.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, by_hand(ids).logits, atol=1e-5, rtol=0)
    record = json.loads((out / MERGE_FILE).read_text())
    assert record["method"] == "uniform" and record["coefficients"] == pytest.approx([1 / 3] * 3)
    assert [e["path"] for e in record["inputs"]] == [str(p.resolve()) for p in three]
    assert AutoTokenizer.from_pretrained(out)("merged text").input_ids  # the tokenizer came along


def test_bf16_stays_bf16_and_tied_embeddings_stay_tied(tokenizer_dir, tmp_path):
    srcs = [tiny_model(tokenizer_dir, tmp_path / f"b{i}", seed=10 + i, dtype=torch.bfloat16, tie_word_embeddings=True)
            for i in range(2)]
    assert "lm_head.weight" not in tensors(srcs[0])  # save_pretrained stores a tied head once
    out = merge_checkpoints(srcs, merge_coefficients("ema:0.5", 2), tmp_path / "bf16")
    merged = tensors(out)
    assert merged.keys() == tensors(srcs[-1]).keys()
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    a, b = tensors(srcs[0]), tensors(srcs[1])
    for k in merged:  # bf16 -> float32 (exact), 0.5 a + 0.5 b, back to bf16
        assert torch.equal(merged[k], (0.5 * a[k].float() + 0.5 * b[k].float()).to(torch.bfloat16)), k
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.tie_word_embeddings and loaded.dtype == torch.bfloat16
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # an explicit dtype writes that dtype and says so in the config
    wide = merge_checkpoints(srcs, [0.5, 0.5], tmp_path / "fp32", dtype="float32")
    assert all(t.dtype == torch.float32 for t in tensors(wide).values())
    assert json.loads((wide / "config.json").read_text())["dtype"] == "float32"


def test_sharded_inputs_merge_into_the_last_ones_layout(three, tmp_path):
    sharded = []
    for p in three[1:]:
        AutoModelForCausalLM.from_pretrained(p).save_pretrained(tmp_path / p.name, max_shard_size="40KB")
        shutil.copy(p / "tokenizer.json", tmp_path / p.name)
        shutil.copy(p / "tokenizer_config.json", tmp_path / p.name)
        sharded.append(tmp_path / p.name)
    assert len(list(sharded[-1].glob("model-*.safetensors"))) > 1
    out = merge_checkpoints([three[0], *sharded], [0.5, 0.25, 0.25], tmp_path / "merged")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((sharded[-1] / "model.safetensors.index.json").read_text())["weight_map"]
    merged = {}
    for f in sorted(set(index["weight_map"].values())):
        merged.update(load_file(out / f))
    sources = [tensors(p) for p in three]
    assert merged.keys() == sources[0].keys()
    for k, t in merged.items():
        assert torch.allclose(t, 0.5 * sources[0][k] + 0.25 * sources[1][k] + 0.25 * sources[2][k], atol=1e-6), k
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_other_architectures_tokenizers_and_pickles_are_refused(three, tokenizer_dir, tmp_path):
    def refused(paths, match, **kw):
        with pytest.raises(CptError, match=match) as e:
            merge_checkpoints(paths, [1 / len(paths)] * len(paths), tmp_path / "out", **kw)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "out").exists() and not (tmp_path / ".tmp-out").exists()

    wide = tiny_model(tokenizer_dir, tmp_path / "wide", seed=0, hidden_size=64)
    refused([three[0], wide], r"different models: config head_dim: 8 vs 16; hidden_size: 32 vs 64")
    qwen = tiny_model(tokenizer_dir, tmp_path / "qwen", seed=0, cls=Qwen2Config)
    refused([three[0], qwen], r"different models: config architectures: \[\"LlamaForCausalLM\"\] vs "
                              r"\[\"Qwen2ForCausalLM\"\]")
    # same config, a tensor missing
    cut = tmp_path / "cut"
    shutil.copytree(three[1], cut)
    state = tensors(cut)
    state.pop("model.norm.weight")
    save_file(state, cut / "model.safetensors", metadata={"format": "pt"})
    refused([three[0], cut], r"different tensors: only in the first \['model.norm.weight'\]")
    # same model, another tokenizer (one added special token)
    other_tok = tmp_path / "other-tok"
    shutil.copytree(three[1], other_tok)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|merge|>"]})
    tok.save_pretrained(other_tok)
    refused([three[0], other_tok], "their tokenizers differ")
    # pickled weights only: refused before anything is unpickled
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(three[1] / "config.json", pickled)
    torch.save(tensors(three[1]), pickled / "pytorch_model.bin")
    refused([three[0], pickled], r"weights are pickled \(pytorch_model.bin\).*safetensors only")
    # NaN weights, the same input twice, out of step order, the output over an input
    nan = tmp_path / "nan"
    shutil.copytree(three[1], nan)
    state = tensors(nan)
    state["model.norm.weight"][0] = float("nan")
    save_file(state, nan / "model.safetensors", metadata={"format": "pt"})
    refused([three[0], nan], "tensor model.norm.weight holds NaN or inf")
    refused([three[0], three[0]], "is given twice")
    run = tmp_path / "run" / "checkpoints"
    for step in (4, 2):
        shutil.copytree(three[0], run / f"step-{step:08d}")
    refused([run / "step-00000004", run / "step-00000002"], "give the checkpoints of a run oldest first")
    with pytest.raises(CptError, match="would overwrite the input"):
        merge_checkpoints(three, [1 / 3] * 3, three[2], overwrite=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(CptError, match="exists and is not empty"):
        merge_checkpoints(three, [1 / 3] * 3, tmp_path / "full")
    assert merge_checkpoints(three, [1 / 3] * 3, tmp_path / "full", overwrite=True).joinpath(MERGE_FILE).is_file()
    with pytest.raises(CptError, match="sum to 1"):
        merge_checkpoints(three, [1, 1, 1], tmp_path / "sum")


def test_cli_bad_spec_is_one_line_exit_2(three, tmp_path):
    cmd = [sys.executable, "-m", "cpt.cli", "merge", *map(str, three), "--out", str(tmp_path / "o"),
           "--weights", "ema:1.5"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "cpt: error: merge weights 'ema:1.5': the decay must be in [0, 1)"
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------- real training checkpoints


def test_merges_the_last_two_checkpoints_of_a_training_run(make_recipe, tmp_path, capsys):
    from cpt.train.loop import train

    r = make_recipe("ckpts", train__tokens=3 * 1024, checkpoint__every=1024, checkpoint__keep_last=3,
                    schedule__warmup=1024)
    train(r)
    run_dir = Path(r.run.output_dir)
    ckpts = ckpt_lib.checkpoint_dirs(run_dir)
    assert [c.name for c in ckpts] == ["step-00000001", "step-00000002", "step-00000003"]
    assert resolve_inputs([run_dir], last=2) == ckpts[1:]
    out = tmp_path / "merged"
    assert main(["merge", str(run_dir), "--last", "2", "--weights", "3,1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(normalised to sum 1)" in printed and f"0.750000  {ckpts[1]}" in printed
    assert f"0.250000  {ckpts[2]}" in printed and f"merged: {out}" in printed
    a, b, merged = tensors(ckpts[1]), tensors(ckpts[2]), tensors(out)
    assert merged.keys() == a.keys()
    for k in merged:
        assert torch.allclose(merged[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-6, rtol=0), k
    record = json.loads((out / MERGE_FILE).read_text())
    assert [(e["step"], e["tokens"]) for e in record["inputs"]] == [(2, 2048), (3, 3072)]
    assert not (out / "optimizer.bin").exists() and not (out / "trainer_state.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.tensor([[1, 2, 3]])).logits).all()
    # the run's final/ (an HF dir, written as the last checkpoint) merges with its checkpoints
    both = merge_checkpoints([ckpts[2], run_dir / "final"], [0.5, 0.5], tmp_path / "with-final")
    assert all(torch.equal(t, b[k]) for k, t in tensors(both).items())


def test_lora_checkpoints_merge_through_their_merged_weights(make_recipe, tmp_path):
    from cpt.model import load_causal_lm
    from cpt.train.loop import train

    r = make_recipe("lora", train__tokens=2 * 1024, checkpoint__every=1024, schedule__warmup=1024, peft={"r": 4})
    train(r)
    ckpts = ckpt_lib.checkpoint_dirs(r.run.output_dir)
    assert len(ckpts) == 2 and all((c / "adapter").is_dir() for c in ckpts)
    out = merge_checkpoints(ckpts, [0.5, 0.5], tmp_path / "lora-merged")
    states = [load_causal_lm(c).state_dict() for c in ckpts]
    merged = tensors(out)
    assert not any(k.startswith("base_model.") for k in merged)
    for k, t in merged.items():
        assert torch.allclose(t, (states[0][k] + states[1][k]) / 2, atol=1e-6, rtol=0), k
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # scratch removed


def test_a_merge_block_merges_each_stages_last_checkpoints_and_probes_them(make_recipe, tmp_path):
    """merge: {last: 3, weights: uniform, at_probes: true}: at each probe the stage's last checkpoints so far
    are merged and probed; at the end of the run's one stage merged/<stage>/ is the mean of its last 3
    checkpoints, probed as probe_merge/en/loss with the same probe as the weights; the weights themselves
    are put back exactly (final/ = the last checkpoint)."""
    from cpt.data.source import TokenSource
    from cpt.probes import HeldOutLoss
    from cpt.tracking import read_metrics
    from cpt.train.loop import train
    from cpt.train.loss import PlainLoss

    r = make_recipe("merged", train__tokens=5 * 1024, checkpoint__every=1024, checkpoint__keep_last=3,
                    schedule={"kind": "constant", "max_lr": 3e-3, "warmup": 0},
                    probes__every=2 * 1024, merge={"last": 3, "weights": "uniform", "at_probes": True})
    assert train(r).completed
    run = Path(r.run.output_dir)
    merged = tensors(run / "merged" / r.run.name)
    ckpts = [tensors(run / "checkpoints" / f"step-{s:08d}") for s in (3, 4, 5)]
    for k in merged:
        torch.testing.assert_close(merged[k], sum(c[k] for c in ckpts) / 3, rtol=0, atol=1e-6)
    assert all(torch.equal(tensors(run / "final")[k], ckpts[-1][k]) for k in ckpts[-1])
    events = [x for x in read_metrics(run / "metrics.jsonl") if x.get("event") == "merge"]
    # at_probes: at the probes of steps 2 and 4 the last checkpoints so far (into merged/<stage>-latest)
    assert [(x["step"], x["merge/checkpoints"]) for x in events[:2]] == [
        (2, ["step-00000001", "step-00000002"]), (4, ["step-00000002", "step-00000003", "step-00000004"])]
    assert all(x["merge/path"].endswith("-latest") and "probe_merge/en/loss" in x for x in events[:2])
    record = events[-1]
    assert len(events) == 3 and record["merge/path"] == str(run / "merged" / r.run.name)
    assert record["merge/checkpoints"] == ["step-00000003", "step-00000004", "step-00000005"]
    assert record["merge/coefficients"] == pytest.approx([1 / 3] * 3)
    probe = HeldOutLoss({"en": TokenSource(r.probes.sets["en"])}, r.probes.max_sequences, 4, loss=PlainLoss())
    model = AutoModelForCausalLM.from_pretrained(run / "merged" / r.run.name)
    by_hand = probe(model, type("Acc", (), {"device": torch.device("cpu"), "reduce": staticmethod(lambda t, reduction: t)}))
    assert record["probe_merge/en/loss"] == pytest.approx(by_hand["probe/en/loss"], abs=1e-5)
    final_probe = [x for x in read_metrics(run / "metrics.jsonl") if "probe/en/loss" in x][-1]["probe/en/loss"]
    assert abs(record["probe_merge/en/loss"] - final_probe) > 1e-4  # another model than the last weights


def test_a_merge_block_needs_the_checkpoints_it_merges(make_recipe):
    with pytest.raises(CptError, match="merge: needs checkpoint.every"):
        make_recipe("m1", merge={"last": 3})
    with pytest.raises(CptError, match="checkpoint.keep_last = 2: merge.last = 3 checkpoints must be kept"):
        make_recipe("m2", checkpoint__every=1024, checkpoint__keep_last=2, merge={"last": 3})
    with pytest.raises(CptError, match="merge.weights: .*wsm:nope"):
        make_recipe("m3", checkpoint__every=1024, merge={"last": 3, "weights": "wsm:nope"})
