"""Merging back (cpt/merge_tasks.py, cpt merge --toward / --task-arithmetic / --ties / --dare): every merge
against tensors computed by hand from the inputs' state dicts, TIES and DARE on hand-built tensors whose
result is known, the merged dirs loaded by transformers with the logits of a model built by hand, the
streaming safetensors reader/writer against safetensors' own, refusals in one line, and the CLI with probes."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_merge import tensors, tiny_model  # tests/ is on sys.path (pytest's rootdir conftest)
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.cli import main
from cpt.errors import CptError
from cpt.merge import MERGE_FILE
from cpt.merge_tasks import (
    dare_generator,
    interpolate,
    interpolation_weights,
    merge_task_vectors,
    trim,
    weight_dir,
)
from cpt.tensorfile import TensorFile, TensorWriter


@pytest.fixture(scope="module")
def trio(tokenizer_dir, tmp_path_factory) -> list[Path]:
    """base, and two 'fine-tuned' models near it (base + small seeded noise), as HF dirs."""
    root = tmp_path_factory.mktemp("trio")
    base = tiny_model(tokenizer_dir, root / "base", seed=0)
    out = [base]
    for i, name in enumerate(("cpt", "instruct")):
        shutil.copytree(base, root / name)
        state = tensors(base)
        g = torch.Generator().manual_seed(100 + i)
        moved = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        save_file(moved, root / name / "model.safetensors", metadata={"format": "pt"})
        out.append(root / name)
    return out


def logits_of(state: dict[str, torch.Tensor], like: Path) -> torch.Tensor:
    """Logits on fixed ids of a model whose state dict is ``state`` (built by hand), config from ``like``."""
    model = AutoModelForCausalLM.from_pretrained(like).eval()
    model.load_state_dict(state, strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def loaded_logits(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------- tensor files


def test_the_streaming_writer_writes_what_safetensors_reads_and_the_reader_reads_it_back(tmp_path):
    items = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5, -2.0]).bfloat16(),
             "c": torch.tensor([3, 4, 5], dtype=torch.int64), "d": torch.ones(0, 4), "e": torch.tensor(7.0)}
    with TensorWriter(tmp_path / "x.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in items.items()]) as w:
        for k, v in items.items():
            w.write(k, v)
    theirs = load_file(tmp_path / "x.safetensors")
    assert theirs.keys() == items.keys()
    assert all(torch.equal(theirs[k], v) and theirs[k].dtype == v.dtype for k, v in items.items())
    save_file(items, tmp_path / "y.safetensors")
    with TensorFile(tmp_path / "y.safetensors") as f:
        assert sorted(f.keys()) == sorted(items) and f.dtype("b") == "BF16" and f.shape("a") == (2, 3)
        assert all(torch.equal(f.read(k), v) for k, v in items.items())
    # a file cut short, or a writer given the wrong tensor: one line each
    raw = (tmp_path / "y.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-3])
    with pytest.raises(CptError, match=r"cut\.safetensors: not a readable safetensors file \(.*cut short"):
        TensorFile(tmp_path / "cut.safetensors")
    with pytest.raises(CptError, match="written where a"), TensorWriter(tmp_path / "z", [("a", torch.float32, (2,))]) as w:
        w.write("a", torch.zeros(3))


# -------------------------------------------------------------------------------------------- interpolation


def test_interpolation_is_1_minus_a_base_plus_a_final_per_tensor_and_loads_with_those_logits(trio, tmp_path):
    base, final = trio[0], trio[1]
    weights = interpolation_weights("0.25,0.5,0,1")
    outs = interpolate(final, base, weights, tmp_path / "wise")
    assert outs == [weight_dir(tmp_path / "wise", a) for a in weights] == [tmp_path / "wise" / n
                                                                           for n in ("0.25", "0.5", "0", "1")]
    b, f = tensors(base), tensors(final)
    for a, out in zip(weights, outs, strict=True):
        merged = tensors(out)
        assert merged.keys() == f.keys()
        for k in f:
            torch.testing.assert_close(merged[k], (1 - a) * b[k] + a * f[k], rtol=0, atol=1e-7)
        record = json.loads((out / MERGE_FILE).read_text())
        assert record["method"] == "interpolate" and record["weight"] == a
        assert [(e["role"], e["coefficient"]) for e in record["inputs"]] == [("base", 1 - a), ("final", a)]
    assert all(torch.equal(tensors(outs[3])[k], f[k]) for k in f)  # a = 1: the CPT model bit for bit
    assert all(torch.equal(tensors(outs[2])[k], b[k]) for k in b)  # a = 0: the base bit for bit
    state = {k: 0.75 * b[k] + 0.25 * f[k] for k in b}
    torch.testing.assert_close(loaded_logits(outs[0]), logits_of(state, base), rtol=0, atol=1e-5)
    assert (outs[0] / "tokenizer.json").read_bytes() == (final / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("spec, message", [("0.5,1.5", "1.5 is outside [0, 1]"), ("0.5,x", "'x' is not a number"),
                                           ("0.5,0.5", "0.5 is given twice"), ("nan", "nan is outside")])
def test_bad_interpolation_weights_are_one_line(spec, message):
    with pytest.raises(CptError, match=re.escape(message)) as e:
        interpolation_weights(spec)
    assert "\n" not in str(e.value)


# -------------------------------------------------------------------------------------------- task vectors


def test_task_arithmetic_is_base_plus_weighted_deltas_and_takes_files_from_the_chosen_input(trio, tmp_path):
    base, cpt_model, instruct = trio
    (instruct / "chat_template.jinja").write_text("{{ messages }}")  # what an instruct model's files carry
    out = merge_task_vectors(base, [cpt_model, instruct], [1.0, 0.5], tmp_path / "ta")
    b, c, i = tensors(base), tensors(cpt_model), tensors(instruct)
    merged = tensors(out)
    state = {k: b[k] + 1.0 * (c[k] - b[k]) + 0.5 * (i[k] - b[k]) for k in b}
    for k in b:
        torch.testing.assert_close(merged[k], state[k], rtol=0, atol=1e-7)
    torch.testing.assert_close(loaded_logits(out), logits_of(state, base), rtol=0, atol=1e-5)
    assert (out / "chat_template.jinja").is_file()  # the last donor's files by default
    record = json.loads((out / MERGE_FILE).read_text())
    assert record["method"] == "task_arithmetic" and record["weights"] == [1.0, 0.5]
    assert [e["role"] for e in record["inputs"]] == ["base", "donor", "donor"]
    # a negative weight subtracts a delta; the files from the base when asked
    neg = merge_task_vectors(base, [cpt_model], [-1.0], tmp_path / "neg", files_from=base)
    for k in b:
        torch.testing.assert_close(tensors(neg)[k], 2 * b[k] - c[k], rtol=0, atol=1e-7)
    assert not (neg / "chat_template.jinja").exists()
    (instruct / "chat_template.jinja").unlink()


def test_ties_trims_elects_the_sign_and_takes_the_disjoint_mean_on_hand_built_tensors(tmp_path, tokenizer_dir):
    # trim: the ceil(0.5 * 4) = 2 largest magnitudes of each delta survive
    assert torch.equal(trim(torch.tensor([0.1, -3.0, 2.0, -0.5]), 0.5), torch.tensor([0.0, -3.0, 2.0, 0.0]))
    assert torch.equal(trim(torch.tensor([1.0, -1.0, 1.0, 0.2]), 0.25), torch.tensor([1.0, -1.0, 1.0, 0.0]))  # ties kept
    base = tiny_model(tokenizer_dir, tmp_path / "base", seed=0)
    b = tensors(base)
    name = "model.norm.weight"  # 32 entries: the first 4 hand-built, the rest 0 deltas
    d1 = torch.zeros(32)
    d2 = torch.zeros(32)
    d1[:4] = torch.tensor([1.0, -2.0, 0.5, 3.0])
    d2[:4] = torch.tensor([3.0, 1.0, -4.0, -1.0])
    donors = []
    for j, d in enumerate((d1, d2)):
        shutil.copytree(base, tmp_path / f"d{j}")
        state = dict(b)
        state[name] = b[name] + d
        save_file(state, tmp_path / f"d{j}" / "model.safetensors", metadata={"format": "pt"})
        donors.append(tmp_path / f"d{j}")
    out = merge_task_vectors(base, donors, [1.0, 1.0], tmp_path / "ties", method="ties", density=4 / 32)
    # trimmed (4 of 32 kept) = as built; signs: sum = [4, -1, -3.5, 2] -> +, -, -, +;
    # agreeing: e0 both (mean 2), e1 d1 (-2), e2 d2 (-4), e3 d1 (3); the zeros stay 0
    expected = torch.zeros(32)
    expected[:4] = torch.tensor([2.0, -2.0, -4.0, 3.0])
    merged = tensors(out)
    torch.testing.assert_close(merged[name] - b[name], expected, rtol=0, atol=1e-6)
    assert all(torch.equal(merged[k], b[k]) for k in b if k != name)  # zero deltas give the base
    # weights: elected by the weighted sum, the mean weighted: w = (1, 3): e0 (1*1 + 3*3) / 4 = 2.5, e1 sum
    # -2 + 3 = +1 -> d2's +1 alone; e2 -> -4; e3 -3 + 3 = 0 -> no sign -> 0
    weighted = merge_task_vectors(base, donors, [1.0, 3.0], tmp_path / "ties-w", method="ties", density=4 / 32)
    expected[:4] = torch.tensor([2.5, 1.0, -4.0, 0.0])
    torch.testing.assert_close(tensors(weighted)[name] - b[name], expected, rtol=0, atol=1e-6)


def test_dare_drops_the_expected_share_rescales_and_repeats_with_its_seed(trio, tmp_path):
    base, cpt_model, instruct = trio
    b, c = tensors(base), tensors(cpt_model)
    ta = tensors(merge_task_vectors(base, [cpt_model, instruct], [1.0, 0.5], tmp_path / "ta"))
    p0 = tensors(merge_task_vectors(base, [cpt_model, instruct], [1.0, 0.5], tmp_path / "p0", method="dare", drop=0.0))
    assert all(torch.equal(p0[k], ta[k]) for k in ta)  # drop 0 is task arithmetic exactly
    runs = [tensors(merge_task_vectors(base, [cpt_model], [1.0], tmp_path / f"dare{j}", method="dare", drop=0.7,
                                       seed=s)) for j, s in enumerate((5, 5, 6))]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in b)  # the same seed: the same model
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in b)  # another seed: other drops
    kept = total = 0
    for k in b:
        delta, got = c[k] - b[k], runs[0][k] - b[k]
        mask = torch.rand(delta.shape, generator=dare_generator(5, 0, k)) >= 0.7
        torch.testing.assert_close(got, torch.where(mask, delta / 0.3, 0.0), rtol=0, atol=1e-6)
        kept += int(((got != 0) & (delta != 0)).sum())
        total += int((delta != 0).sum())
    share = kept / total  # ~30% kept; binomial sd over ~19K entries is ~0.003
    assert abs(share - 0.3) < 0.02, share


def test_tied_embeddings_stay_tied_through_ties_and_dare(tokenizer_dir, tmp_path):
    base = tiny_model(tokenizer_dir, tmp_path / "base", seed=1, tie_word_embeddings=True)
    donor = tmp_path / "donor"
    shutil.copytree(base, donor)
    b = tensors(base)
    assert "lm_head.weight" not in b
    g = torch.Generator().manual_seed(3)
    save_file({k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in b.items()}, donor / "model.safetensors",
              metadata={"format": "pt"})
    d = tensors(donor)
    for method in ("ties", "dare"):
        out = merge_task_vectors(base, [donor], [1.0], tmp_path / method, method=method, density=0.5, drop=0.5)
        merged = tensors(out)
        assert merged.keys() == b.keys()  # the head still stored once
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.config.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        torch.testing.assert_close(loaded_logits(out), logits_of(merged, base), rtol=0, atol=1e-5)
        if method == "ties":  # one donor: its trimmed delta alone
            k = "model.embed_tokens.weight"
            torch.testing.assert_close(merged[k], b[k] + trim(d[k] - b[k], 0.5), rtol=0, atol=1e-7)


def test_incompatible_inputs_and_bad_requests_are_refused_in_one_line(trio, tokenizer_dir, tmp_path):
    base, cpt_model, _ = trio

    def refused(match, donors, **kw):
        with pytest.raises(CptError, match=match) as e:
            merge_task_vectors(base, donors, kw.pop("weights", [1.0] * len(donors)), tmp_path / "out", **kw)
        assert "\n" not in str(e.value) and not (tmp_path / "out").exists()

    wide = tiny_model(tokenizer_dir, tmp_path / "wide", seed=0, intermediate_size=96)
    refused(r"different models: config intermediate_size: 64 vs 96", [wide])
    other = tmp_path / "other-vocab"
    shutil.copytree(cpt_model, other)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|x|>"]})
    tok.save_pretrained(other)
    refused("their tokenizers differ", [other])
    shaped = tmp_path / "shaped"
    shutil.copytree(cpt_model, shaped)
    state = tensors(shaped)
    state["model.norm.weight"] = torch.ones(31)
    save_file(state, shaped / "model.safetensors", metadata={"format": "pt"})
    refused(r"tensor model.norm.weight has shape \[32\] vs \[31\]", [shaped])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(cpt_model / "config.json", pickled)
    torch.save(tensors(cpt_model), pickled / "pytorch_model.bin")
    refused("weights are pickled", [pickled])
    refused("donor weights must be > 0", [cpt_model], method="ties", weights=[-1.0])
    refused(r"--density 0 must be in \(0, 1\]", [cpt_model], method="ties", density=0.0)
    refused(r"--drop 1 must be in \[0, 1\)", [cpt_model], method="dare", drop=1.0)
    refused("2 weights for 1 donors", [cpt_model], weights=[1.0, 1.0])
    refused("not one of the inputs", [cpt_model], files_from=wide)
    with pytest.raises(CptError, match="weight 1.5 is outside"):
        interpolate(cpt_model, base, [1.5], tmp_path / "o")


# ---------------------------------------------------------------------------------------------- the CLI


def test_cli_toward_writes_each_weight_and_probes_base_weights_and_final(trio, prepared, tmp_path, capsys):
    base, final, _ = trio
    out = tmp_path / "back"
    sets = [f"en={prepared['en']['validation']}", f"de={prepared['de']['validation']}"]
    assert main(["merge", str(final), "--toward", str(base), "--weight", "0.5,0.25", "--out", str(out),
                 "--sets", *sets, "--max-sequences", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"merged: {out / '0.5'}  = 0.5 * {base} + 0.5 * {final}" in printed
    result = json.loads((out / "probe.json").read_text())
    assert [m["label"] for m in result["models"]] == ["0 (base)", "0.25", "0.5", "1 (final)"]
    assert [m["model"] for m in result["models"]] == [str(base), str(out / "0.25"), str(out / "0.5"), str(final)]
    from cpt.probe_cmd import run_probe

    by_hand = run_probe(out / "0.25", {"en": str(prepared["en"]["validation"])}, {}, max_sequences=4)
    assert result["models"][1]["sets"]["en"]["loss"] == pytest.approx(by_hand["sets"]["en"]["loss"], abs=1e-6)
    assert all(math.isfinite(m["sets"]["de"]["loss"]) for m in result["models"])
    assert "0 (base)" in printed and f"probes: {out / 'probe.json'}" in printed


def test_cli_task_methods_and_their_refusals(trio, tmp_path, capsys):
    base, cpt_model, instruct = trio
    out = tmp_path / "chat-vector"
    assert main(["merge", "--task-arithmetic", "--base", str(base), "--donor", f"{cpt_model}:1",
                 "--donor", f"{instruct}:1", "--out", str(out)]) == 0
    b, c, i = tensors(base), tensors(cpt_model), tensors(instruct)
    for k in b:
        torch.testing.assert_close(tensors(out)[k], i[k] + (c[k] - b[k]), rtol=0, atol=1e-6)
    assert f"= {base} + 1 * ({cpt_model} - base) + 1 * ({instruct} - base)" in capsys.readouterr().out
    assert main(["merge", "--dare", "--drop", "0.5", "--seed", "3", "--base", str(base), "--donor", f"{cpt_model}:1",
                 "--out", str(tmp_path / "dare")]) == 0
    assert json.loads((tmp_path / "dare" / MERGE_FILE).read_text())["seed"] == 3
    for argv, message in [
        (["--ties", "--base", str(base), "--out", "x"], "give --base BASE and --donor PATH:WEIGHT"),
        (["--ties", "--base", str(base), "--donor", str(cpt_model), "--out", "x"], "expected PATH:WEIGHT"),
        (["--ties", str(cpt_model), "--base", str(base), "--donor", f"{cpt_model}:1", "--out", "x"],
         "CKPT (use --donor) do not go with it"),
        ([str(cpt_model), "--toward", str(base), "--out", "x"], "give --weight"),
        ([str(cpt_model), str(instruct), "--toward", str(base), "--weight", "0.5", "--out", "x"], "give one CPT model"),
        ([str(cpt_model), "--weight", "0.5", "--out", "x"], "--weight (for --toward) do not go with it"),
        (["--out", "x"], "give the checkpoints to average"),
        ([str(cpt_model), "--toward", str(base), "--weight", "0.5", "--out", "x", "--sets", "en=/nowhere"],
         "probe set en: /nowhere is not a prepared dir"),
    ]:
        with pytest.raises(CptError, match=re.escape(message)):
            from cpt.cli import build_parser

            ns = build_parser().parse_args(["merge", *argv])
            ns.func(ns)
    assert not Path("x").exists()


def test_probe_takes_a_runs_or_recipes_probe_sets_and_max_sequences(make_recipe, tmp_path):
    from cpt.merge_cmd import probe_sets

    r = make_recipe("probed", probes__max_sequences=5)
    run_dir = tmp_path / "a-run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(r.to_yaml())
    sets, n = probe_sets([], run_dir, None)
    assert sets == dict(r.probes.sets) and n == 5
    assert probe_sets([], run_dir / "recipe.yaml", 7) == (dict(r.probes.sets), 7)  # the file; --max-sequences wins
    other = str(next(iter(r.probes.sets.values())))
    assert probe_sets([f"extra={other}"], run_dir, None)[0] == {**r.probes.sets, "extra": other}
    assert probe_sets([f"x={other}"], None, None) == ({"x": other}, 64)
    with pytest.raises(CptError, match="neither a run dir with a recipe.yaml nor a recipe file"):
        probe_sets([], tmp_path, None)


def test_the_merge_back_verdicts_of_reproduce_py_on_numbers_worked_by_hand():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from reproduce import back_verdict

    mean = {"a = 0: start": (5.0, 7.0), "a = 0.5": (5.2, 6.0), "a = 1: final": (6.0, 5.0), "replay": (5.1, 5.9)}
    lines = back_verdict(mean)
    # forgetting 1.0, gain 2.0: a = 0.5 undoes 0.8 of it and keeps 1.0 of the gain
    assert lines[0] == ("- a = 0.5: recovers 80% of the English forgetting (-0.800 vs final) and keeps 50% of the "
                        "German gain (+1.000).")
    assert lines[1].startswith("- German loss falls with a at every step: yes. English loss is lowest at a = 0: start")
    assert lines[2] == "- Lowest mean of both domains on the frontier: a = 1: final, 5.500 (final 5.500, start 6.000)."
    assert lines[3] == ("- vs replay (English 5.100, German 5.900): no weight beats it on both domains. At about its "
                        "German loss (a = 0.5: 6.000) the merge's English loss is 5.200 (+0.100).")
    mean["a = 0.5"] = (4.9, 5.8)
    assert "beaten on both domains by a = 0.5." in back_verdict(mean)[3]
    assert "below both ends" in back_verdict(mean)[1]
