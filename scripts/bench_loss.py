"""Peak memory and time of one forward + backward through the loss at a large vocabulary on CPU:
the model's own loss (full logits, fp32) vs cpt's chunked loss (train.loss: chunked, cpt/train/loss.py).

Each configuration runs in a fresh subprocess (so peaks do not mix): build a Llama-shaped model, note the
resident memory, run ``--steps`` forward + backward passes, report the peak resident memory above that
baseline (ru_maxrss, the high-water mark of all passes incl. a warm-up one) and the median time per pass. Configurations alternate (model, chunked, model, ...)
for ``--rounds`` rounds. Prints measured numbers and ratios from this one run.

    python scripts/bench_loss.py                     # vocab 128K, hidden 256, seq 2048, batch 1
    python scripts/bench_loss.py --vocab 32768 --batch 4
    python scripts/bench_loss.py --vocab 49152 --hidden 576 --seq 512 --precision bf16 --steps 5 --rounds 3   # SmolLM2's head
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def one(mode: str, vocab: int, hidden: int, layers: int, seq: int, batch: int, steps: int, precision: str) -> dict:
    import resource
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt.train.loss import PlainLoss, choose_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                         attn_implementation="sdpa"))
    bf16 = precision == "bf16"  # fp32 weights, the forward under bf16 autocast (as accelerate wraps it)
    if bf16:
        model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    dt = torch.bfloat16 if bf16 else None
    loss_fn = PlainLoss(dt) if mode == "model" else choose_loss("chunked", model, False, vocab, dt)[0]
    ids = torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: the model built, no pass yet
    loss_fn(model, {"input_ids": ids, "labels": ids}).backward()  # warm-up pass (allocates .grad), untimed
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = loss_fn(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "peak_above_base_mib": (peak - base) / 1024, "peak_mib": peak / 1024,
            "seconds": statistics.median(times), "loss": losses[-1],
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def interleaved(script: str, modes: list[str], rounds: int) -> dict[str, list[dict]]:
    """``script --one MODE`` (with this command line's arguments) in a fresh subprocess per mode, the modes
    alternating for ``rounds`` rounds: each mode's JSON results, in order."""
    results: dict[str, list[dict]] = {m: [] for m in modes}
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    for _ in range(rounds):
        for mode in modes:
            out = subprocess.run([sys.executable, script, "--one", mode, *sys.argv[1:]], env=env,
                                 capture_output=True, text=True, check=True)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = (args.vocab, args.hidden, args.layers, args.seq, args.batch, args.steps, args.precision)
    if args.one:
        print(json.dumps(one(args.one, *shape)))
        return
    results = interleaved(__file__, ["model", "chunked"], args.rounds)
    first = results["model"][0]
    print(f"Llama {first['params_m']:.1f}M params (vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers), "
          f"batch {args.batch} x seq {args.seq}, {args.precision}, {args.steps} passes x {args.rounds} rounds, "
          f"logits {args.batch * args.seq * args.vocab * 4 / 2**20:.0f} MiB in fp32")
    print(f"{'loss':<10} {'peak above the model, MiB':>28} {'peak RSS, MiB':>14} {'s / pass':>9} {'loss':>9}")
    summary = {}
    for mode, rs in results.items():
        peak = statistics.median(r["peak_above_base_mib"] for r in rs)
        total = statistics.median(r["peak_mib"] for r in rs)
        sec = statistics.median(r["seconds"] for r in rs)
        summary[mode] = (peak, total, sec)
        print(f"{mode:<10} {peak:>28.0f} {total:>14.0f} {sec:>9.3f} {rs[-1]['loss']:>9.5f}")
    (pm, tm, sm), (pc, tc, sc) = summary["model"], summary["chunked"]
    print(f"chunked / model: peak above base {pc / pm:.3f}, peak RSS {tc / tm:.3f}, time {sc / sm:.3f}")


if __name__ == "__main__":
    main()
