"""Shared fixtures: real text from the repository itself, a small trained tokenizer, prepared token shards.

Session-scoped so that every test module (data, trainer, probes, CLI) reuses one tokenizer and one
set of prepared shards. Without the offline switches a hub id takes ~50 s to fail, so they are set
before anything imports `transformers` or `datasets`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
TOKENIZER_DOCS = 300  # per domain, train split
PREPARED_SEQ_LEN = 128
PREPARED_DOCS = {"train": 400, "validation": 60}


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """``{"en"|"de"|"code": {"train"|"validation": Path}}``: three real-text domains, JSONL files.

    English prose and Python code are built from the running interpreter's standard library (as the
    demo builds them); German is the MPL-2.0 LibreOffice help sample in ``tests/data`` (see its
    README). Nothing outside the repository is read.
    """
    from scripts.demo_corpora import build

    raw = tmp_path_factory.mktemp("corpora")
    build(raw)
    german = DATA / "de_libreoffice_help"
    return {
        "en": {s: raw / "english" / f"{s}.jsonl" for s in ("train", "validation")},
        "de": {s: german / f"{s}.jsonl.gz" for s in ("train", "validation")},
        "code": {s: raw / "code" / f"{s}.jsonl" for s in ("train", "validation")},
    }


@pytest.fixture(scope="session")
def tokenizer_dir(corpora, tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 2048, eos ``<|endoftext|>``) trained on the three domains."""
    from cpt.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer") / "bpe-2048"
    inputs = [splits["train"] for splits in corpora.values()]
    return train_tokenizer(inputs, out, vocab_size=2048, max_documents_per_input=TOKENIZER_DOCS)


@pytest.fixture(scope="session")
def prepared(corpora, tokenizer_dir: Path, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """``{"en"|"de"|"code": {"train"|"validation": Path}}``: token shards at seq_len 128.

    Train splits hold the first 400 documents of each domain, validation splits the first 60 (or all
    the domain has, if fewer).
    """
    from cpt.data.prepare import prepare

    root = tmp_path_factory.mktemp("prepared")
    out: dict[str, dict[str, Path]] = {}
    for domain, splits in corpora.items():
        out[domain] = {}
        for split, n_docs in PREPARED_DOCS.items():
            path = root / domain / split
            prepare([splits[split]], tokenizer_dir, path, seq_len=PREPARED_SEQ_LEN, max_documents=n_docs,
                    progress=False)
            out[domain][split] = path
    return out


# Shared by the trainer and stage tests: a 0.34M-parameter Llama on real English and German text.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4}


@pytest.fixture
def make_recipe(tmp_path, tokenizer_dir, prepared):
    """Build a validated tiny-run recipe; ``a__b=value`` keyword overrides set nested keys."""
    from cpt.recipe import validate_recipe

    def make(name="run", **over):
        data = {
            "run": {"name": name, "output_dir": str(tmp_path / name), "seed": 3},
            "model": {"preset": "tiny-llama", "tokenizer": str(tokenizer_dir), "config": TINY},
            "data": {"seq_len": 128,
                     "sources": {"en": str(prepared["en"]["train"]), "de": str(prepared["de"]["train"])},
                     "mixture": {"en": 0.5, "de": 0.5}},
            "train": {"tokens": 12 * 1024, "global_batch_tokens": 1024, "micro_batch_size": 4},
            "schedule": {"kind": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 2048},
            "probes": {"sets": {"en": str(prepared["en"]["validation"])}, "max_sequences": 8},
            "tracking": {"progress": False},
        }
        return validate_recipe(with_overrides(data, over))
    return make


def with_overrides(data: dict, over: dict) -> dict:
    """Set ``a__b=value`` keyword overrides as nested keys of ``data`` (in place); returns ``data``."""
    for key, value in over.items():
        node = data
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return data


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (long reproductions)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    marker = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(marker)


# Shared by the 2-process tests (DDP, ZeRO, LoRA): accelerate launch on CPU with gloo.
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(run_dir, key="train/loss"):
    """The values of ``key`` in a run's metrics.jsonl, in order."""
    from cpt.tracking import read_metrics

    return [r[key] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if key in r]


def logits(model_dir):
    """The logits of an HF model dir on a fixed input (loaded as a user would)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.arange(3, 40).view(1, -1)).logits


def launch(recipe_path, *args, port=None, extra_env=None, config=None):
    """`accelerate launch` 2 gloo processes of `cpt train RECIPE ARGS` on CPU (``config``: an accelerate
    config file instead of --multi_gpu); asserts success."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    how = ["--config_file", str(config)] if config else ["--multi_gpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port or free_port()), "-m", "cpt.cli", "train", str(recipe_path), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture
def two_proc_recipe(tmp_path, tokenizer_dir, prepared):
    """A tiny 2-process-friendly recipe written to YAML: (recipe, path)."""
    from cpt.recipe import validate_recipe

    def make(name, peft=None, tokens=6144, data=None, mitigate=None, extra=None, **train):
        r = validate_recipe({
            "run": {"name": name, "output_dir": str(tmp_path / name), "seed": 5},
            "model": {"preset": "tiny-llama", "tokenizer": str(tokenizer_dir),
                      "config": {"hidden_size": 64, "intermediate_size": 128}},
            "data": {"seq_len": 128, "sources": {"en": str(prepared["en"]["train"]),
                                                 "de": str(prepared["de"]["train"])},
                     "mixture": {"en": 0.25, "de": 0.75}, **(data or {})},
            "train": {"tokens": tokens, "global_batch_tokens": 1024, "micro_batch_size": 2, **train},
            "schedule": {"kind": "cosine", "max_lr": 3e-3, "warmup": 2048},
            "probes": {"sets": {"en": str(prepared["en"]["validation"])}, "max_sequences": 7},
            "tracking": {"progress": False},
            "peft": peft,
            **({"mitigate": mitigate} if mitigate else {}),
            **(extra or {}),
        })
        path = tmp_path / f"{name}.yaml"
        path.write_text(r.to_yaml())
        return r, path
    return make


def check_mitigations_on_two_processes(two_proc_recipe, name, tol, config=None, **train):
    """The stateful mitigations on a sharded backend (``config``: an accelerate config; ``train``: e.g.
    deepspeed=...), checked against 1 process: mitigate.l2_init and mitigate.ema with frozen parameters and
    an LR multiplier (several optimizer groups), and the merged weights lent for a probe. The curve,
    probe_ema and probe_merge are the 1-process run's to ``tol``; the pull shows (the curve is not the
    plain run's); the lent weights show (probe_ema and probe_merge are not probe); final_ema/ gives the
    1-process logits; the gathered mitigation state in a checkpoint resumes the run exactly (1e-6)."""
    import pytest
    import torch

    from cpt.train.loop import train as train_run

    shape = {"freeze": [r"layers\.0\.mlp"], "lr_multipliers": {r"layers\.1\.": 0.5}}  # optimizer groups only
    both = {**shape, "l2_init": 100.0, "ema": {"decay": 0.5, "every": 1}}  # lr x c up to 0.3
    merge = {"checkpoint": {"every": 1024}, "merge": {"last": 2, "weights": "uniform"}}
    one, _ = two_proc_recipe(f"{name}-one", mitigate=both, tokens=4096, extra=merge)
    train_run(one)
    plain, _ = two_proc_recipe(f"{name}-none", mitigate=shape, tokens=4096)
    train_run(plain)
    whole, path = two_proc_recipe(name, mitigate=both, tokens=4096, extra=merge, **train)
    launch(path, config=config)
    ran, ref = whole.run.output_dir, one.run.output_dir
    assert len(metric(ran, "probe_merge/en/loss")) == 1
    for key in ("train/loss", "probe/en/loss", "probe_ema/en/loss", "probe_merge/en/loss"):
        assert metric(ran, key) == pytest.approx(metric(ref, key), abs=tol), key
    assert abs(metric(ref)[-1] - metric(plain.run.output_dir)[-1]) > 1e-3  # the pull shows
    raw = metric(ran, "probe/en/loss")[-1]
    assert min(abs(metric(ran, k)[-1] - raw) for k in ("probe_ema/en/loss", "probe_merge/en/loss")) > 1e-3
    assert torch.allclose(logits(Path(ran) / "final_ema"), logits(Path(ref) / "final_ema"), atol=1e-4)

    split, split_path = two_proc_recipe(f"{name}-split", mitigate=both, tokens=4096, **train)
    launch(split_path, "--max-steps", "2", config=config)
    launch(split_path, "--resume", config=config)
    for key in ("train/loss", "probe_ema/en/loss"):
        assert metric(split.run.output_dir, key) == pytest.approx(metric(ran, key), abs=1e-6), key


def on_two_simulated_ranks(work):
    """Run ``work(rank, all_reduce)`` for ranks 0 and 1 in two threads whose ``all_reduce(tensor)`` sums
    across them through a barrier (a 2-process reduce without processes); returns {rank: result}."""
    import threading

    parts, barrier, results = {}, threading.Barrier(2), {}

    def all_reduce(rank, t):
        parts[rank] = t.clone()
        barrier.wait()
        return parts[0] + parts[1]

    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, work(r, lambda t: all_reduce(r, t))))
               for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    return results


def save_bos_tokenizer(docs, vocab_size: int, out: Path) -> Path:
    """A Llama-style tokenizer (not cpt's) trained on ``docs``: byte-level BPE with <s> / </s> / <pad>,
    a BOS added to every text; saved to ``out`` (an HF tokenizer dir)."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False)
    bpe._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.save_pretrained(out)
    return out

