"""lm-evaluation-harness probes (cpt/lm_eval.py): lm-eval's result dict flattened by hand; on a tiny Llama
in memory, the shipped local task (tests/data/lm_eval: 30 next-line items of the German LibreOffice help)
gives, item by item, the log-likelihoods, picks and accuracies of cpt's own scorer (cpt/downstream.py) on
the same items; `cpt probe --lm-eval` on the saved model gives the same; one-line errors for an unknown
task and a missing lm_eval. Fully offline (conftest sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""

from __future__ import annotations

import copy
import gzip
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA, save_bos_tokenizer  # tests/ is on sys.path (pytest's rootdir conftest)

from cpt import downstream as ds
from cpt.lm_eval import flatten_results, format_metrics

ROOT = Path(__file__).resolve().parents[1]
TASKS = DATA / "lm_eval"
TASK = "de_help_next_line"
ITEMS = TASKS / TASK / "items.jsonl"


def test_flatten_results_by_hand():
    results = {  # the shape lm-eval 0.4 returns (trimmed)
        "results": {
            "mmlu": {"alias": "mmlu", "acc,none": 0.25, "acc_stderr,none": 0.01},
            "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
                      "exact_match,flexible-extract": 0.75, "exact_match_stderr,flexible-extract": "N/A"},
            "tiny": {"alias": "tiny", "acc,none": 1, "acc_norm,none": 0.5, "acc_norm_stderr,none": "N/A",
                     "sample_len": 7},
        },
        "n-samples": {"gsm8k": {"original": 1319, "effective": 4}, "tiny": {"original": 7, "effective": 7}},
        "configs": {"tiny": {"task": "tiny"}},
        "versions": {"tiny": 1.0},
    }
    assert flatten_results(results) == {
        "lm_eval/mmlu/acc": 0.25, "lm_eval/mmlu/acc_stderr": 0.01,
        "lm_eval/gsm8k/exact_match,strict-match": 0.5, "lm_eval/gsm8k/exact_match_stderr,strict-match": 0.1,
        "lm_eval/gsm8k/exact_match,flexible-extract": 0.75,
        "lm_eval/tiny/acc": 1.0, "lm_eval/tiny/acc_norm": 0.5,
        "lm_eval/gsm8k/items": 4.0, "lm_eval/tiny/items": 7.0,
    }
    assert all(type(v) is float for v in flatten_results(results).values())
    table = format_metrics(flatten_results(results))
    assert "exact_match,strict-match 0.5000 (± 0.1000)" in table and "acc 0.2500 (± 0.0100)" in table
    assert "exact_match,flexible-extract 0.7500," not in table  # no stderr: none printed


def test_shipped_task_is_valid_for_both_scorers():
    items = ds.load_items(ITEMS)
    assert len(items) == 30 and all(len(it["choices"]) == 4 for it in items)
    assert sum(not c.isascii() for it in items for c in it["choices"]) > 30  # characters != bytes here
    yaml_text = (TASKS / TASK / f"{TASK}.yaml").read_text()
    assert f"tests/data/lm_eval/{TASK}/items.jsonl" in yaml_text  # data_files: from the repository root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama and a Llama-style (BOS) tokenizer trained on the German sample, saved and loaded back
    as a user would: (model dir, model, tokenizer)."""
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    out = tmp_path_factory.mktemp("lm-eval-model")
    with gzip.open(DATA / "de_libreoffice_help" / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f][:200]
    save_bos_tokenizer(docs, 1024, out)
    tok = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out, AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), tok


def cpt_logprobs(model, tok, items) -> list[list[float]]:
    """cpt's summed log-prob of every choice of every item (one cloze item per choice)."""
    return [[ds.score(model, tok, [{"context": it["context"], "target": c}])["cloze_logprob"] for c in it["choices"]]
            for it in items]


def argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)


def test_lm_eval_equals_cpts_scorer_item_by_item(tiny, monkeypatch):
    from cpt.lm_eval import evaluate, lm_eval_probe

    _, model, tok = tiny
    monkeypatch.chdir(ROOT)  # the task's data_files are relative to the repository root
    items = ds.load_items(ITEMS)
    assert max(len(tok(it["context"] + c)["input_ids"]) for it in items for c in it["choices"]) < 512  # no truncation
    mine = cpt_logprobs(model, tok, items)
    model.train()
    rng = torch.get_rng_state()
    res = evaluate(model, tok, [TASK], include_path=TASKS, log_samples=True, batch_size=8)
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # train mode back, global RNG untouched
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(len(items)))
    for s, it, lps in zip(samples, items, mine, strict=True):
        theirs = [float(r[0]) for r in s["filtered_resps"]]
        assert theirs == pytest.approx(lps, abs=1e-4)  # bitwise equal on CPU here; other batches, other BLAS
        assert argmax(theirs) == argmax(lps)
        assert s["acc"] == float(argmax(lps) == it["answer"])
        # acc_bytes: log-prob per UTF-8 byte of the choice, cpt's acc_norm; acc_norm: per character
        per_byte = [lp / len(c.encode()) for lp, c in zip(lps, it["choices"], strict=True)]
        per_char = [lp / len(c) for lp, c in zip(lps, it["choices"], strict=True)]
        assert s["acc_bytes"] == float(argmax(per_byte) == it["answer"])
        assert s["acc_norm"] == float(argmax(per_char) == it["answer"])
    flat = flatten_results(res)
    model.eval()
    ref = ds.score(model, tok, items)
    assert flat[f"lm_eval/{TASK}/items"] == 30
    assert flat[f"lm_eval/{TASK}/acc"] == pytest.approx(ref["acc"], abs=1e-9)
    assert flat[f"lm_eval/{TASK}/acc_bytes"] == pytest.approx(ref["acc_norm"], abs=1e-9)
    assert flat[f"lm_eval/{TASK}/acc_stderr"] == pytest.approx(math.sqrt(ref["acc"] * (1 - ref["acc"]) / 29))

    # a LoRA model (peft, B = 0 at init: the base model's function) is scored as it is, in memory
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    got = lm_eval_probe(lora, tok, [TASK], include_path=TASKS, limit=10)
    assert got[f"lm_eval/{TASK}/items"] == 10
    assert got[f"lm_eval/{TASK}/acc"] == pytest.approx(ds.score(model, tok, items[:10])["acc"], abs=1e-9)
    assert tok.pad_token == "<pad>" and len(tok) == 1024  # the caller's tokenizer is not modified


def test_cpt_probe_lm_eval_on_a_saved_model(tiny, tmp_path, monkeypatch, capsys):
    from cpt.cli import main

    model_dir, model, tok = tiny
    monkeypatch.chdir(ROOT)
    out = tmp_path / "probe.json"
    assert main(["probe", str(model_dir), "--lm-eval", TASK, "--lm-eval-include", str(TASKS), "--limit", "12",
                 "--downstream", f"same={ITEMS}", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    ref = ds.score(model, tok, ds.load_items(ITEMS)[:12])
    assert r["lm_eval"][f"lm_eval/{TASK}/items"] == 12
    assert r["lm_eval"][f"lm_eval/{TASK}/acc"] == pytest.approx(ref["acc"], abs=1e-9)
    assert r["lm_eval"][f"lm_eval/{TASK}/acc_bytes"] == pytest.approx(ref["acc_norm"], abs=1e-9)
    printed = capsys.readouterr().out
    assert "lm-eval task" in printed and f"{TASK}     12  acc {ref['acc']:.4f}" in printed

    # an unknown task: one line naming it and the closest names, before the model is loaded
    assert main(["probe", str(model_dir), "--lm-eval", "de_help_nextline", "--lm-eval-include", str(TASKS)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cpt: error: lm-eval task 'de_help_nextline' not found (did you mean 'de_help_next_line'")
    assert "\n" not in err
    assert main(["probe", str(model_dir), "--downstream", f"same={ITEMS}", "--limit", "3"]) == 2
    assert "--limit and --lm-eval-include go with --lm-eval TASK" in capsys.readouterr().err


def test_without_lm_eval_installed_one_line_names_the_install(tiny, monkeypatch, capsys):
    from cpt.cli import main

    model_dir, _, _ = tiny
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError, as when not installed
    assert main(["probe", str(model_dir), "--lm-eval", TASK]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cpt: error: lm-eval tasks need lm-evaluation-harness") and "\n" not in err
    assert err.endswith('pip install -e ".[eval]" (or pip install lm_eval)')


def test_in_training_lm_eval_probes_log_and_leave_training_alone(make_recipe, monkeypatch):
    """probes.lm_eval: at the stage start (baseline), every N tokens and at the end, logged as
    lm_eval/<task>/<metric>; the run's losses equal those of the same run without it (no RNG touched)."""
    from cpt.tracking import read_metrics
    from cpt.train.loop import train

    monkeypatch.chdir(ROOT)  # the task's data_files are relative to the repository root
    plain = make_recipe("plain")
    probed = make_recipe("probed", probes__lm_eval={"tasks": [TASK], "include": str(TASKS), "limit": 6,
                                                    "every": 4 * 1024, "batch_size": 8})
    train(plain)
    train(probed)
    rec = list(read_metrics(Path(probed.run.output_dir) / "metrics.jsonl"))
    lm = [r for r in rec if f"lm_eval/{TASK}/acc" in r]
    assert [r["step"] for r in lm] == [0, 4, 8, 12]
    assert all(r[f"lm_eval/{TASK}/items"] == 6.0 and 0.0 <= r[f"lm_eval/{TASK}/acc"] <= 1.0 for r in lm)
    losses = [r["train/loss"] for r in rec if "train/loss" in r]
    assert len(losses) == 12 and losses == [r["train/loss"] for r in read_metrics(Path(plain.run.output_dir) / "metrics.jsonl")
                      if "train/loss" in r]


def test_in_training_lm_eval_refuses_an_unknown_task_before_training(make_recipe, monkeypatch):
    from cpt.errors import CptError
    from cpt.train.loop import train

    monkeypatch.chdir(ROOT)
    r = make_recipe("typo", probes__lm_eval={"tasks": ["de_help_next_lin"], "include": str(TASKS)})
    with pytest.raises(CptError, match="probes.lm_eval: lm-eval task 'de_help_next_lin' not found \\(did you mean "
                                       "'de_help_next_line'"):
        train(r)
    assert not (Path(r.run.output_dir) / "checkpoints").exists()
