"""Where a training step's time goes: torch.profiler over cpt's own loop, the ops' self time in groups.

    python scripts/profile_step.py --model /tmp/smol/hf --seq 512 --micro 2 --precision bf16
    python scripts/profile_step.py --model /tmp/smol/hf --seq 512 --micro 2 --precision fp32 --steps 3

Trains ``--warmup + --steps`` steps of cpt.train.loop.train (a recipe that starts from --model's weights,
constant LR, AdamW, clip 1.0, the model's own tokenizer on stdlib prose from scripts/demo_corpora.py) and
profiles the last ``--steps`` (the profiler steps with a wrapper put in place of
cpt.train.loop.train_step, the name the loop calls, as scripts/bench_trainer.py takes its baton). Every
op's self CPU time (its own, not its children's) is put in one group:

  LM head + loss   an op with the vocabulary size among its input shapes (the head's matmuls, the
                   chunked loss's log-softmax and gather), forward and backward
  embeddings       embedding lookups and their backward
  attention        the scaled-dot-product kernel, forward and backward
  other matmuls    the remaining mm / addmm / bmm: attention projections and the MLP
  optimizer        AdamW (fused) and its foreach helpers; grad clip is its own group
  casts            dtype copies (under bf16 autocast: the weights cast for every matmul, the grads back)
  rest             norms, RoPE, activations, elementwise, the loop's own work
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GROUPS = ["LM head + loss", "embeddings", "attention", "other matmuls", "optimizer", "grad clip", "casts", "rest"]


def group_of(name: str, shapes: list, vocab: int) -> str:
    n = name.lower()
    if "embedding" in n:
        return "embeddings"
    if any(isinstance(s, list) and vocab in s for s in shapes):
        return "LM head + loss"
    if "scaled_dot_product" in n or "attention" in n:
        return "attention"
    if n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        return "other matmuls"
    if "adam" in n or (n.startswith("aten::_foreach") and "norm" not in n) or "optimizer" in n:
        return "optimizer"
    if "_foreach_norm" in n or "clip" in n:
        return "grad clip"
    if n in ("aten::_to_copy", "aten::copy_", "aten::to"):
        return "casts"
    return "rest"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an HF model dir (e.g. cpt import gguf's output)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--steps", type=int, default=3, help="steps profiled")
    ap.add_argument("--warmup", type=int, default=1, help="steps run first, not profiled")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    import cpt.train.loop as loop
    from cpt.data.prepare import prepare
    from cpt.recipe import validate_recipe

    sys.path.insert(0, str(ROOT / "scripts"))
    from demo_corpora import build

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="cpt-profile-"))
    build(work / "raw")
    prepare([work / "raw/english/train.jsonl"], args.model, work / "prep", seq_len=args.seq, progress=False,
            max_documents=200)
    steps = args.warmup + args.steps
    tokens = args.seq * args.micro
    recipe = validate_recipe({
        "run": {"name": "profile", "output_dir": str(work / "run"), "seed": 0},
        "init_from": {"path": args.model, "load": {"weights": True}},
        "data": {"seq_len": args.seq, "sources": {"en": str(work / "prep")}, "mixture": {"en": 1.0}},
        "train": {"tokens": steps * tokens, "global_batch_tokens": tokens, "micro_batch_size": args.micro,
                  "precision": args.precision, "grad_clip": 1.0},
        "schedule": {"kind": "constant", "max_lr": 1e-4, "warmup": 0},
        "tracking": {"progress": False},
    })
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    inner = loop.train_step
    clock: list[float] = []

    def stepped(*a, **kw):  # the profiler runs from the end of the warm-up to the end of the last step
        if len(clock) == args.warmup:
            prof.start()
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        clock.append(time.perf_counter() - t0)
        if len(clock) == steps:
            prof.stop()
        return out

    loop.train_step = stepped
    try:
        loop.train(recipe)
    finally:
        loop.train_step = inner
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    totals: dict[str, float] = defaultdict(float)
    ops: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for ev in prof.key_averages(group_by_input_shape=True):
        g = group_of(ev.key, ev.input_shapes, vocab)
        totals[g] += ev.self_cpu_time_total / 1e6
        shown = ev.key + (str([x for x in ev.input_shapes if x]) if ev.key in ("aten::mm", "aten::addmm") else "")
        ops[g][shown] += ev.self_cpu_time_total / 1e6
    total = sum(totals.values())
    step_s = sum(clock[args.warmup:]) / args.steps
    print(f"\n{args.model}: seq {args.seq} x micro {args.micro} = {tokens} tokens/step, {args.precision}, "
          f"{args.threads} threads; {args.steps} steps profiled, {step_s:.2f} s/step in train_step "
          f"({tokens / step_s:,.0f} tokens/s under the profiler); ops' self time {total / args.steps:.2f} s/step")
    print("| group | s/step | share | top ops |\n|---|---|---|---|")
    for g in GROUPS:
        top = sorted(ops[g].items(), key=lambda kv: -kv[1])[:3]
        print(f"| {g} | {totals[g] / args.steps:.3f} | {totals[g] / total:.1%} | "
              + ", ".join(f"{k.replace('aten::', '')} {v / total:.1%}" for k, v in top) + " |")


if __name__ == "__main__":
    main()
