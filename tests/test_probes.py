"""Probes: cadence and forgetting bookkeeping against hand-computed numbers; downstream scoring against
log-probs computed by hand from the logits; `cpt probe` against the probe records of a trained run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import on_two_simulated_ranks  # tests/ is on sys.path (pytest's rootdir conftest)

from cpt import downstream as ds
from cpt.probes import ForgettingTracker, HeldOutLoss, probe_due, probe_indices, probe_losses

# ------------------------------------------------------------------------------------------ cadence


@pytest.mark.parametrize("before, after, due", [
    (0, 100, False), (900, 1000, True), (1000, 1100, False), (1950, 2050, True),  # every 1000 from token 0
    (0, 2500, True),  # a step over several multiples: one probe
])
def test_probe_due_regular(before, after, due):
    assert probe_due(before, after, stage_start=0, every=1000, dense_every=None, dense_for=None) is due


@pytest.mark.parametrize("before, after, due", [
    # stage starts at 5000; dense every 100 tokens for 300 tokens: due at 5100 and 5200, not 5300
    (5000, 5050, False), (5050, 5100, True), (5100, 5150, False), (5150, 5250, True),
    (5250, 5300, False),  # 5300 lies outside [5000, 5300)
    (5400, 5500, False),
    (5950, 6000, True),  # the regular cadence (every 1000) still applies
    (4900, 5000, True),  # regular multiple 5000
])
def test_probe_due_dense_window_counts_from_stage_start(before, after, due):
    assert probe_due(before, after, stage_start=5000, every=1000, dense_every=100, dense_for=300) is due


def test_probe_due_dense_offset_and_no_cadence():
    # stage start 130 is not a multiple of 100: dense multiples are 230, 330 (counted from the start)
    due = [t for t in range(130, 1000, 10) if probe_due(t, t + 10, 130, None, 100, 250)]
    assert due == [220, 320]  # steps ending at 230 and 330; 430 is past 130 + 250
    assert not any(probe_due(t, t + 10, 0, None, None, None) for t in range(0, 1000, 10))


# --------------------------------------------------------------------------------------- forgetting


def test_forgetting_tracker_by_hand():
    t = ForgettingTracker(["en", "de", "code"], new_domains=["code"])
    t.start_stage({"en": 3.0, "de": 4.0, "code": 6.0}, tokens=1000)
    m = t.update(2000, {"en": 3.5, "de": 3.9, "code": 5.0})
    assert m == pytest.approx({
        "probe/en/delta": 0.5, "probe/en/forgetting": 0.5, "probe/en/max_forgetting": 0.5,
        "probe/en/max_forgetting_tokens": 2000,
        "probe/de/delta": -0.1, "probe/de/forgetting": -0.1, "probe/de/max_forgetting": 0.0,
        "probe/de/max_forgetting_tokens": 1000,  # only improved: the worst point is the stage start
        "probe/code/delta": -1.0, "probe/code/adaptation": 1.0,
    })
    m = t.update(3000, {"en": 3.25, "de": 4.25, "code": 6.5})
    assert m["probe/en/forgetting"] == pytest.approx(0.25)
    assert (m["probe/en/max_forgetting"], m["probe/en/max_forgetting_tokens"]) == (pytest.approx(0.5), 2000)
    assert (m["probe/de/max_forgetting"], m["probe/de/max_forgetting_tokens"]) == (pytest.approx(0.25), 3000)
    assert m["probe/code/adaptation"] == pytest.approx(-0.5)  # re-warming pushed the new domain up first
    t.update(4000, {"en": 3.1, "de": 4.0, "code": 4.5})
    assert t.end_stage() == pytest.approx({
        "stage_end/en/forgetting": 0.1, "stage_end/en/max_forgetting": 0.5, "stage_end/en/max_forgetting_tokens": 2000,
        "stage_end/de/forgetting": 0.0, "stage_end/de/max_forgetting": 0.25, "stage_end/de/max_forgetting_tokens": 3000,
        "stage_end/code/adaptation": 1.5, "stage_end/code/min_adaptation": -0.5,
        "stage_end/code/min_adaptation_tokens": 3000,
    })
    with pytest.raises(RuntimeError):
        t.update(5000, {"en": 3.0, "de": 4.0, "code": 6.0})


def test_forgetting_tracker_next_stage_resume_and_errors():
    t = ForgettingTracker(["a", "b"], new_domains=["b"])
    t.start_stage({"a": 2.0, "b": 5.0}, tokens=0)
    t.update(100, {"a": 2.5, "b": 4.0})
    t.end_stage()
    # stage 2: b is old now, its baseline is where stage 1 left it
    t.start_stage({"a": 2.5, "b": 4.0}, tokens=100, new_domains=[])
    assert t.update(200, {"a": 2.25, "b": 4.75}) == pytest.approx({
        "probe/a/delta": -0.25, "probe/a/forgetting": -0.25, "probe/a/max_forgetting": 0.0,
        "probe/a/max_forgetting_tokens": 100,
        "probe/b/delta": 0.75, "probe/b/forgetting": 0.75, "probe/b/max_forgetting": 0.75,
        "probe/b/max_forgetting_tokens": 200,
    })
    # a resumed run restores the stage in progress from the (JSON) trainer state
    restored = ForgettingTracker(["a", "b"])
    restored.load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert restored.update(300, {"a": 2.0, "b": 4.5}) == t.update(300, {"a": 2.0, "b": 4.5})
    assert restored.end_stage() == t.end_stage()
    # a diverged loss is the worst point
    t.start_stage({"a": 1.0, "b": 1.0}, tokens=0)
    t.update(10, {"a": float("nan"), "b": 1.0})
    t.update(20, {"a": float("nan"), "b": 1.0})
    end = t.end_stage()
    assert math.isnan(end["stage_end/a/max_forgetting"]) and end["stage_end/a/max_forgetting_tokens"] == 10
    with pytest.raises(ValueError, match="new domains c are not probe domains"):
        ForgettingTracker(["a", "b"], new_domains=["c"])
    with pytest.raises(ValueError, match="baseline lacks probe domains b"):
        t.start_stage({"a": 1.0}, tokens=0)


def test_probe_losses_reads_a_probe_record():
    rec = {"step": 3, "tokens": 30, "probe/en/loss": 2.5, "probe/en/ppl": 12.2, "probe/seconds": 0.1,
           "probe/code/loss": 4.0, "probe/en/forgetting": 0.2}
    assert probe_losses(rec) == {"en": 2.5, "code": 4.0}


# --------------------------------------------------------------------------------------- downstream


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from cpt.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_lm(tok):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def manual_logprob(model, tok, context: str, continuation: str) -> tuple[float, int]:
    """Sum of log p(continuation token | everything before it), straight from one forward's logits."""
    ctx = [tok.bos_token_id] + tok(context, add_special_tokens=False)["input_ids"]
    full = [tok.bos_token_id] + tok(context + continuation, add_special_tokens=False)["input_ids"]
    assert full[:len(ctx)] == ctx  # a boundary without a merge, so the split is unambiguous
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([full])).logits[0].log_softmax(-1)
    return sum(logp[t - 1, full[t]].item() for t in range(len(ctx), len(full))), len(full) - len(ctx)


def test_downstream_logprob_equals_manual_computation(tiny_lm, tok):
    lp, n = manual_logprob(tiny_lm, tok, "The kernel maintains a list of", " devices and drivers.")
    out = ds.score(tiny_lm, tok, [{"context": "The kernel maintains a list of", "target": " devices and drivers."}])
    assert out["cloze_items"] == 1
    assert out["cloze_logprob"] == pytest.approx(lp, abs=1e-5)
    assert out["cloze_logprob_per_token"] == pytest.approx(lp / n, abs=1e-6)
    # trailing whitespace of the context is scored as part of the continuation, from the same prefix
    lp2, _ = manual_logprob(tiny_lm, tok, "def f(x):", "\n    return x")
    out2 = ds.score(tiny_lm, tok, [{"context": "def f(x):\n", "target": "    return x"}])
    assert out2["cloze_logprob"] == pytest.approx(lp2, abs=1e-5)


def test_downstream_batching_padding_and_sharding_do_not_change_scores(tiny_lm, tok):
    items = [
        {"context": "Linux device drivers\n====\n", "choices": ["The PCI bus", "import os", "x"], "answer": 0},
        {"context": "for i in range(10):\n", "choices": ["    print(i)", "Die Datei"], "answer": 0},
        {"context": "Hello", "target": " world, this is a much longer continuation than the others"},
    ]
    one = ds.score(tiny_lm, tok, items, batch_size=1)
    padded = ds.score(tiny_lm, tok, items, batch_size=8)
    assert padded == pytest.approx(one, abs=1e-5)
    # two simulated processes (threads) whose reduce is an all-reduce (sum) through a barrier
    results = on_two_simulated_ranks(lambda rank, reduce: ds.score(tiny_lm, tok, items, batch_size=2, rank=rank,
                                                                   world_size=2, reduce=reduce))
    assert results[0] == results[1] == pytest.approx(one, abs=1e-5)
    assert one["mc_items"] == 2 and one["cloze_items"] == 1


class Bigram(torch.nn.Module):
    """A 'model' that puts logit 20 on the bigrams of given token sequences: it knows the answers."""

    def __init__(self, vocab: int, sequences: list[list[int]]):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab))
        for seq in sequences:
            for a, b in zip(seq, seq[1:], strict=False):
                self.table.data[a, b] = 20.0
        self.config = SimpleNamespace(max_position_embeddings=512)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_downstream_forced_model_gets_everything_right(tok):
    items = [
        {"context": "The interpreter reads", "choices": [" a banana", " the next line", " purple"], "answer": 1},
        {"context": "import", "choices": [" sys", " Tabelle"], "answer": 0},
        {"context": "Memory is", "target": " allocated in blocks"},
    ]
    known = [[tok.bos_token_id] + tok(it["context"] + (it["choices"][it["answer"]] if "choices" in it
                                                        else it["target"]), add_special_tokens=False)["input_ids"]
             for it in items]
    # the premise: past the BOS no token is followed by two different tokens, so the table is certain
    successors = {}
    for seq in known:
        for a, b in zip(seq[1:], seq[2:], strict=False):
            successors.setdefault(a, set()).add(b)
    assert all(len(s) == 1 for s in successors.values()), "pick items whose tokens do not collide"
    out = ds.score(Bigram(len(tok), known), tok, items)
    assert out["acc"] == 1.0 and out["acc_norm"] == 1.0
    assert out["correct_logprob_per_token"] > -1e-3 and out["cloze_logprob_per_token"] > -1e-3


def test_downstream_bad_items_are_named(tmp_path):
    from cpt.errors import CptError

    f = tmp_path / "bad.jsonl"
    f.write_text('{"context": "a", "choices": ["x", "y"], "answer": 0}\n{"context": "a", "choices": ["x"], "answer": 0}\n')
    with pytest.raises(CptError, match=r"bad.jsonl:2: 'choices' must be a list of at least 2"):
        ds.load_items(f)
    f.write_text('{"context": "a", "choices": ["x", "y"], "answer": 2}\n')
    with pytest.raises(CptError, match=r"bad.jsonl:1: 'answer' must be an index"):
        ds.load_items(f)


def test_shipped_downstream_sets_are_valid():
    root = Path(__file__).resolve().parents[1] / "recipes" / "probes"
    for name in ("kernel_next_line.jsonl", "python_next_line.jsonl"):
        items = ds.load_items(root / name)
        assert len(items) == 50 and all(len(it["choices"]) == 4 for it in items)


# ------------------------------------------------------------------------------------ probe sample


def test_probe_indices_spread_evenly_over_the_set():
    """N of a larger set: every (size / N)-th sequence, from the first; the whole set when it is small."""
    assert probe_indices(100, 8) == [0, 12, 25, 37, 50, 62, 75, 87]
    assert probe_indices(5, 8) == probe_indices(5, 5) == [0, 1, 2, 3, 4]
    assert probe_indices(0, 8) == []
    for size in range(1, 300, 7):
        for n in (1, 2, 3, 8, 64):
            sample = probe_indices(size, n)
            assert len(sample) == min(size, n) and sample == sorted(set(sample)) and sample[0] == 0
            assert sample[-1] >= size - math.ceil(size / len(sample))  # reaches the set's last stride
    with pytest.raises(ValueError):
        probe_indices(10, 0)


def test_held_out_loss_measures_the_strided_sample_on_one_or_two_ranks(tiny_lm, prepared):
    """The probe's loss is the mean per-sequence loss over probe_indices' rows (by hand from the logits),
    not over the first N; 2 ranks (a weight-0 padding row on rank 1) give the 1-rank numbers."""
    from cpt.data.source import TokenSource

    src = TokenSource(prepared["en"]["validation"])
    n = 5
    assert len(src) > 3 * n  # a set the sample has to spread over
    sample = probe_indices(len(src), n)
    one_rank = SimpleNamespace(device=torch.device("cpu"), reduce=lambda t, reduction: t)
    out = HeldOutLoss({"en": src}, n, 2)(tiny_lm, one_rank)

    def by_hand(rows):
        ids = torch.from_numpy(src.batch(rows)).long()
        with torch.no_grad():
            logp = tiny_lm(input_ids=ids).logits.double().log_softmax(-1)
        nll = -logp[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
        return nll.mean(dim=1).mean().item()

    assert out["probe/en/loss"] == pytest.approx(by_hand(sample), rel=1e-5)
    assert sample == [0, 27, 54, 81, 108]  # of 135 sequences of 128 tokens
    assert out["probe/en/loss"] != pytest.approx(by_hand(list(range(n))), rel=1e-5)  # not the first n

    def work(rank, reduce):
        acc = SimpleNamespace(device=torch.device("cpu"), reduce=lambda t, reduction: reduce(t))
        probe = HeldOutLoss({"en": src}, n, 2, rank=rank, world_size=2)
        return probe.shards["en"], probe(tiny_lm, acc)

    results = on_two_simulated_ranks(work)
    assert results[0][0] == (sample[:3], [1.0] * 3) and results[1][0][0][:2] == sample[3:]
    assert results[1][0][1] == [1.0, 1.0, 0.0]
    for r in (0, 1):
        assert results[r][1]["probe/en/loss"] == pytest.approx(out["probe/en/loss"], rel=1e-6)
        assert results[r][1]["probe/en/bpb"] == pytest.approx(out["probe/en/bpb"], rel=1e-6)


# -------------------------------------------------------------------------------------- cpt probe


def test_cpt_probe_matches_the_runs_last_probe(tmp_path, tokenizer_dir, prepared, capsys):
    from cpt import checkpoint as ckpt_lib
    from cpt.cli import main
    from cpt.recipe import validate_recipe
    from cpt.tracking import read_metrics
    from cpt.train.loop import train

    run = tmp_path / "run"
    recipe = validate_recipe({
        "run": {"name": "probe-me", "output_dir": str(run), "seed": 3},
        "model": {"preset": "tiny-llama", "tokenizer": str(tokenizer_dir),
                  "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 4}},
        "data": {"seq_len": 128, "sources": {"en": str(prepared["en"]["train"])}, "mixture": {"en": 1.0}},
        "train": {"tokens": 3 * 1024, "global_batch_tokens": 1024, "micro_batch_size": 8},
        "schedule": {"kind": "constant", "max_lr": 3e-3},
        "probes": {"sets": {"en": str(prepared["en"]["validation"])}, "max_sequences": 8},
        "tracking": {"progress": False},
    })
    train(recipe)
    last = [r for r in read_metrics(run / "metrics.jsonl") if "probe/en/loss" in r][-1]
    assert last["step"] == 3
    # a checkpoint carries final/'s generation defaults (transformers' save_pretrained writes them there)
    gen = ckpt_lib.latest_checkpoint(run) / "generation_config.json"
    assert json.loads(gen.read_text()) == json.loads((run / "final" / "generation_config.json").read_text())
    items = tmp_path / "mc.jsonl"
    items.write_text(json.dumps({"context": "The driver", "choices": [" loads", " Datei"], "answer": 0}) + "\n")

    # a checkpoint without config.json / tokenizer (older layout) borrows them from the run's final/
    bare = tmp_path / "bare-run" / "checkpoints" / "step-00000003"
    shutil.copytree(ckpt_lib.latest_checkpoint(run), bare,
                    ignore=shutil.ignore_patterns("config.json", "tokenizer*", "optimizer*"))
    shutil.copytree(run / "final", bare.parent.parent / "final")

    results = {}
    for what, path in (("final", run / "final"), ("checkpoint", ckpt_lib.latest_checkpoint(run)),
                       ("bare checkpoint", bare)):
        out = tmp_path / f"{what.replace(' ', '-')}.json"
        rc = main(["probe", str(path), "--sets", f"en={prepared['en']['validation']}",
                   "--downstream", f"mc={items}", "--max-sequences", "8", "--out", str(out)])
        assert rc == 0
        results[what] = json.loads(out.read_text())
    for r in results.values():
        assert r["sets"]["en"]["loss"] == pytest.approx(last["probe/en/loss"], abs=1e-5)
        assert r["sets"]["en"]["sequences"] == 8
        assert r["sets"]["en"]["ppl"] == pytest.approx(math.exp(r["sets"]["en"]["loss"]))
        assert r["sets"]["en"]["bpb"] == pytest.approx(last["probe/en/bpb"], rel=1e-5)  # the run logs bpb too
        assert r["downstream"]["mc"]["mc_items"] == 1 and r["seconds"] > 0
    for what in ("checkpoint", "bare checkpoint"):
        assert results[what]["downstream"]["mc"] == pytest.approx(results["final"]["downstream"]["mc"], abs=1e-5)
    printed = capsys.readouterr().out
    assert "en" in printed and f"{last['probe/en/loss']:.4f}" in printed
    assert main(["probe", str(run / "final"), "--sets", "en"]) == 2  # NAME=PATH expected: a one-line error


def test_forgetting_in_bits_per_byte_beside_the_loss_and_old_states_load():
    from cpt.probes import Forgetting

    f = Forgetting(["en", "de"], new_domains=["de"])
    f.start_stage({"probe/en/loss": 3.0, "probe/en/bpb": 1.2, "probe/de/loss": 5.0, "probe/de/bpb": 2.0}, 0)
    out = f.update(100, {"probe/en/loss": 3.5, "probe/en/bpb": 1.4, "probe/de/loss": 4.0, "probe/de/bpb": 1.5,
                         "probe_ema/en/loss": 9.0})
    assert out["probe/en/forgetting"] == pytest.approx(0.5) and out["probe/en/forgetting_bpb"] == pytest.approx(0.2)
    assert out["probe/de/adaptation"] == pytest.approx(1.0) and out["probe/de/adaptation_bpb"] == pytest.approx(0.5)
    assert out["probe/en/max_forgetting_tokens_bpb"] == 100
    end = f.end_stage()
    assert end["stage_end/en/forgetting_bpb"] == pytest.approx(0.2) and end["stage_end/de/adaptation"] == 1.0
    # sets prepared before byte counts: the loss alone, no bpb keys
    g = Forgetting(["en"])
    g.start_stage({"probe/en/loss": 3.0}, 0)
    assert set(g.update(10, {"probe/en/loss": 2.5})) == {"probe/en/delta", "probe/en/forgetting",
                                                          "probe/en/max_forgetting", "probe/en/max_forgetting_tokens"}
    # a checkpoint written before bpb holds the loss tracker's state alone
    old = ForgettingTracker(["en"])
    old.start_stage({"en": 3.0}, 0)
    old.update(10, {"en": 3.4})
    h = Forgetting(["en"])
    h.load_state_dict(old.state_dict())
    assert h.stage_start == 0 and list(h.trackers) == ["loss"]
    assert h.update(20, {"probe/en/loss": 3.2, "probe/en/bpb": 1.0})["probe/en/max_forgetting"] == pytest.approx(0.4)


def test_cpt_probe_precision_bf16_runs_under_autocast_near_fp32(tiny_lm, tok, prepared, tmp_path):
    """--precision bf16: the forwards under bf16 autocast (another number than fp32, within 1e-2 of it on a
    tiny model); auto is fp32 on a CPU; the CLI passes the option; an unknown precision is refused."""
    from cpt.cli import main
    from cpt.errors import CptError
    from cpt.probe_cmd import run_probe

    model_dir = tmp_path / "tiny"
    tiny_lm.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    sets = {"en": str(prepared["en"]["validation"])}
    items = tmp_path / "mc.jsonl"
    items.write_text(json.dumps({"context": "The driver", "choices": [" loads", " Datei"], "answer": 0}) + "\n")
    runs = {p: run_probe(model_dir, sets, {"mc": str(items)}, max_sequences=8, micro_batch_size=4, precision=p)
            for p in ("fp32", "bf16", "auto")}
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert [r["precision"] for r in runs.values()] == ["fp32", "bf16", "bf16" if gpu_bf16 else "fp32"]
    fp32, bf16 = runs["fp32"]["sets"]["en"], runs["bf16"]["sets"]["en"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], abs=1e-2) and bf16["loss"] != fp32["loss"]
    assert bf16["bpb"] == pytest.approx(fp32["bpb"], rel=1e-2)
    assert runs["bf16"]["downstream"]["mc"]["correct_logprob_per_token"] == pytest.approx(
        runs["fp32"]["downstream"]["mc"]["correct_logprob_per_token"], abs=5e-2)
    assert runs["auto"]["sets"]["en"] == (bf16 if gpu_bf16 else fp32)
    with pytest.raises(CptError, match="--precision 'fp16'"):
        run_probe(model_dir, sets, {}, precision="fp16")

    out = tmp_path / "bf16.json"
    assert main(["probe", str(model_dir), "--sets", f"en={sets['en']}", "--max-sequences", "8",
                 "--micro-batch-size", "4", "--precision", "bf16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["precision"] == "bf16" and result["sets"]["en"]["loss"] == pytest.approx(bf16["loss"], abs=1e-6)
    with pytest.raises(SystemExit):  # argparse: not a choice
        main(["probe", str(model_dir), "--sets", f"en={sets['en']}", "--precision", "fp16"])
