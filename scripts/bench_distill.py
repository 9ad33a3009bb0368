"""Time and peak memory of one training pass (forward + backward through the chunked loss) with and without
mitigate.distill on CPU: what the teacher's forward and the KL cost per step.

Configurations, each in a fresh subprocess (so peaks do not mix), run interleaved for ``--rounds`` rounds:
``off`` (the loss alone), ``full`` (distill over the full vocabulary, every position), ``top64`` (the teacher's
top 64 tokens), ``pos25`` (a quarter of the positions, full vocabulary). Each builds the model (a Llama from
config, or ``--model DIR``, an HF dir, in fp32), makes the teacher copy where distilling, notes the resident
memory, runs a warm-up and ``--steps`` timed passes; it reports the median seconds per pass, the peak resident
memory above that baseline, and the teacher's weights (the copy's bytes, held for the whole run). Prints the
numbers and the ratios to ``off`` from this one run.

    python scripts/bench_distill.py                                  # Llama vocab 32K, hidden 256, 4 layers
    python scripts/bench_distill.py --model /tmp/smol/hf --seq 512   # SmolLM2-135M (vocab 49152)
"""

from __future__ import annotations

import argparse
import json
import statistics

from bench_loss import interleaved  # scripts/ is on sys.path when a script in it runs

MODES = {"off": None, "full": {}, "top64": {"top_k": 64}, "pos25": {"positions": 0.25}}


def one(mode: str, args) -> dict:
    import resource
    import time

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from cpt.mitigate.distill import Distill
    from cpt.train.loss import choose_loss
    from cpt.train.weights import Weights

    torch.manual_seed(0)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                             intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                                             num_attention_heads=max(1, args.hidden // 64)))
    model.train()
    vocab = model.get_input_embeddings().num_embeddings
    distill = None
    if MODES[mode] is not None:
        distill = Distill(1.0, seed=0, **MODES[mode])
        distill.before_optimizer(model)
        distill.attach(Weights(model, lambda: None))
    loss_fn = choose_loss("chunked", model, False, vocab)[0]
    ids = torch.randint(vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: model (and teacher) built

    def step() -> float:
        loss, seen = loss_fn.with_outputs(model, inputs)
        for w, term in (distill.loss_terms(inputs, seen).values() if distill else ()):
            loss = loss + w * term
        loss.backward()
        return loss.item()

    step()  # warm-up (allocates .grad), untimed
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "seconds": statistics.median(times), "peak_above_base_mib": (peak - base) / 1024,
            "teacher_mib": sum(p.numel() * p.element_size() for p in distill.teacher.parameters()) / 2**20
            if distill else 0.0, "vocab": vocab,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="an HF model dir (fp32); default a Llama built from the shape below")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    results = interleaved(__file__, ["off", *[m for m in args.modes if m != "off"]], args.rounds)
    first = results["off"][0]
    print(f"{args.model or 'Llama'}: {first['params_m']:.1f}M params, vocab {first['vocab']}, batch {args.batch} x seq "
          f"{args.seq}, fp32, chunked loss, {args.steps} passes x {args.rounds} rounds (interleaved)")
    print(f"{'mode':<7} {'s / pass':>9} {'x off':>6} {'peak above base, MiB':>21} {'teacher weights, MiB':>21}")
    off = statistics.median(r["seconds"] for r in results["off"])
    for mode, rs in results.items():
        sec = statistics.median(r["seconds"] for r in rs)
        peak = statistics.median(r["peak_above_base_mib"] for r in rs)
        teacher = statistics.median(r["teacher_mib"] for r in rs)
        print(f"{mode:<7} {sec:>9.3f} {sec / off:>6.2f} {peak:>21.0f} {teacher:>21.0f}")


if __name__ == "__main__":
    main()
