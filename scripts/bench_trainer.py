"""cpt's training throughput against a bare PyTorch loop, and the sampler against the trainer.

Same tiny Llama (tiny-llama preset: hidden 128, 2 layers, vocab 4096), same seq_len, batch, data and
threads. Each side runs N1 and N2 steps, alternating cpt / bare, for several rounds; the per-step time
is (T(N2) - T(N1)) / (N2 - N1) of the whole call, so setup (model build, accelerate init, export) cancels
and everything inside cpt's loop (logging, progress bar, sampler, LR writes) is counted. Prints measured
numbers and ratios from this one run.

    python scripts/bench_trainer.py [--data ../shared/data/en_kernel_docs/train.jsonl.gz] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from cpt.data.mixture import MixtureSampler  # noqa: E402
from cpt.data.prepare import prepare  # noqa: E402
from cpt.data.source import TokenSource, read_batch  # noqa: E402
from cpt.data.tokenizer import (
    load_tokenizer,  # noqa: E402
    train_tokenizer,  # noqa: E402
)
from cpt.model import build_model  # noqa: E402
from cpt.recipe import validate_recipe  # noqa: E402
from cpt.train.loop import train  # noqa: E402
from cpt.train.step import make_optimizer  # noqa: E402

SEQ, MICRO = 256, 8


def bare_loop(recipe, tokenizer, source: TokenSource, steps: int) -> float:
    """The loop everyone writes first: random batches from the memmap, forward, backward, clip, step."""
    t0 = time.perf_counter()
    model = build_model(recipe.model, tokenizer, seed=0)
    opt = make_optimizer(model, recipe.train.optimizer, 1e-3, "cpu")
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(source), (MICRO,), generator=gen).tolist()
        ids = torch.from_numpy(source.batch(idx))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    return time.perf_counter() - t0


def cpt_loop(base: dict, out: Path, steps: int) -> float:
    data = {**base, "run": {**base["run"], "output_dir": str(out)},
            "train": {**base["train"], "tokens": steps * SEQ * MICRO}}
    recipe = validate_recipe(data)
    t0 = time.perf_counter()
    train(recipe)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/en_kernel_docs/train.jsonl.gz"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, nargs=2, default=(10, 40))
    args = ap.parse_args()
    n1, n2 = args.steps
    work = Path(tempfile.mkdtemp(prefix="cpt-bench-"))
    tok = train_tokenizer([args.data], work / "tok", vocab_size=4096, max_documents=1500)
    prepare([args.data], tok, work / "prep", seq_len=SEQ, max_documents=1500)
    base = {
        "run": {"name": "bench", "output_dir": "", "seed": 0},
        "model": {"preset": "tiny-llama", "tokenizer": str(tok)},
        "data": {"seq_len": SEQ, "sources": {"en": str(work / "prep")}, "mixture": {"en": 1.0}},
        "train": {"tokens": 0, "global_batch_tokens": SEQ * MICRO, "micro_batch_size": MICRO},
        "schedule": {"kind": "cosine", "max_lr": 1e-3, "warmup": 0.1},
        "tracking": {"progress": True},
    }
    recipe = validate_recipe({**base, "train": {**base["train"], "tokens": SEQ * MICRO}})
    tokenizer = load_tokenizer(tok)
    source = TokenSource(work / "prep")

    per_step = {"cpt": [], "bare": []}
    run_id = 0
    for r in range(-1, args.rounds):  # round -1 warms caches and allocators up and is not counted
        times = {}
        for n in (n1, n2):
            run_id += 1
            times[("cpt", n)] = cpt_loop(base, work / f"run{run_id}", n)
            times[("bare", n)] = bare_loop(recipe, tokenizer, source, n)
        ms = {side: (times[(side, n2)] - times[(side, n1)]) / (n2 - n1) for side in per_step}
        print(f"round {r}: cpt {ms['cpt'] * 1e3:.1f} ms/step, bare {ms['bare'] * 1e3:.1f} ms/step"
              + (" (warm-up, not counted)" if r < 0 else ""))
        if r >= 0:
            for side in per_step:
                per_step[side].append(ms[side])

    tokens_per_step = SEQ * MICRO
    cpt_tps = tokens_per_step / statistics.median(per_step["cpt"])
    bare_tps = tokens_per_step / statistics.median(per_step["bare"])
    ratios = [b / c for c, b in zip(per_step["cpt"], per_step["bare"], strict=True)]

    # sampler: draw + read of the same batches the trainer consumes, as fast as it can go
    sampler = MixtureSampler({"en": len(source)}, {"en": 1.0}, seed=0)
    sources = {"en": source}
    n_batches = 2000
    t0 = time.perf_counter()
    for _ in range(n_batches):
        read_batch(sources, sampler.draw(MICRO))
    sampler_tps = n_batches * tokens_per_step / (time.perf_counter() - t0)

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, tiny-llama, seq {SEQ}, batch {MICRO}, "
          f"steps {n1}->{n2}, {args.rounds} rounds after a warm-up round")
    print(f"cpt trainer:  {cpt_tps:,.0f} tokens/s (median)")
    print(f"bare loop:    {bare_tps:,.0f} tokens/s (median)")
    print(f"ratio cpt/bare: median {statistics.median(ratios):.3f}, per round {', '.join(f'{x:.3f}' for x in ratios)}")
    print(f"sampler draw+read: {sampler_tps:,.0f} tokens/s = {sampler_tps / cpt_tps:,.0f}x the trainer's consumption")


if __name__ == "__main__":
    main()
