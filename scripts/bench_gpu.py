"""Throughput, MFU and peak memory of `cpt train` runs: the numbers of the GPU check (a ~1B Llama-shaped
model), and on CPU the activation-checkpointing memory measurement.

One `cpt train` run per configuration on real text (English prose and Python code from the interpreter's
stdlib, a 32K-token BPE trained here), bf16 autocast, attention auto (flash-attention 2 where installed,
else sdpa), fused AdamW, optionally torch.compile and activation checkpointing; single GPU, or several
through `accelerate launch` with FSDP2 or DeepSpeed ZeRO-3. Each run's tokens/s and MFU are the medians
of its logged steps after --warmup; peak memory is torch's max allocated on rank 0 (GPU), the peak
resident memory of the launched process as the kernel reports it (os.wait4: for a launcher, the largest
of it and its ranks), and on CPU rank 0's own peak RSS (train/peak_rss_gib). Results are appended as
JSON lines to WORK/results.jsonl and printed as one table by `table`.

    python scripts/bench_gpu.py prepare --work /tmp/gpu            # corpora, tokenizer, shards (once)
    python scripts/bench_gpu.py run --work /tmp/gpu --name 1b-compile --compile
    python scripts/bench_gpu.py run --work /tmp/gpu --name fsdp2 --launch fsdp2
    python scripts/bench_gpu.py table --work /tmp/gpu

`--cpu` runs the same code paths on CPU in fp32 (the GPU check's dry run with `--model toy`; the memory
measurement with `--model 20m`):

    python scripts/bench_gpu.py prepare --work /tmp/mem --vocab 4096 --seq-len 2048
    python scripts/bench_gpu.py run --work /tmp/mem --name plain --model 20m --cpu --steps 3 --warmup 1
    python scripts/bench_gpu.py run --work /tmp/mem --name ac --model 20m --cpu --steps 3 --warmup 1 --activation-checkpointing

Per-rank memory of the sharding backends on CPU (2 gloo processes, 85M, activation checkpointing):

    python scripts/bench_gpu.py prepare --work /tmp/shard --vocab 8192 --seq-len 512
    for l in ddp fsdp2 zero3; do python scripts/bench_gpu.py run --work /tmp/shard --name $l --model 85m --cpu \
        --steps 3 --warmup 1 --micro-batch-size 1 --activation-checkpointing --launch $l --processes 2; done
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

MODELS = {
    # llama-1b preset (hidden 2048, 16 layers, GQA 32/8, intermediate 8192) with a 32K vocabulary: ~1.1B
    "1b": {"preset": "llama-1b", "config": {"max_position_embeddings": 4096}},
    "20m": {"preset": "small-llama", "config": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6,
                                                "num_attention_heads": 8, "num_key_value_heads": 8,
                                                "max_position_embeddings": 4096}},
    "toy": {"preset": "tiny-llama", "config": {"max_position_embeddings": 4096}},
    # scripts/bench_trainer.py's 85M (hidden 768, 10 layers, MLP 2048): per-rank memory of DDP / FSDP2 / ZeRO-3
    "85m": {"preset": "small-llama", "config": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 10,
                                                "num_attention_heads": 12, "num_key_value_heads": 12,
                                                "max_position_embeddings": 4096}},
}


def prepare_data(work: Path, vocab: int, seq_len: int) -> None:
    from cpt.data.prepare import prepare
    from cpt.data.tokenizer import train_tokenizer
    from scripts.demo_corpora import build

    build(work / "raw")
    files = [work / "raw/english/train.jsonl", work / "raw/code/train.jsonl"]
    tok = train_tokenizer(files, work / "tok", vocab_size=vocab, overwrite=True)
    prepare(files, tok, work / "data", seq_len=seq_len, progress=False, overwrite=True)
    (work / "setup.json").write_text(json.dumps({"seq_len": seq_len, "vocab": vocab}))


def recipe(work: Path, name: str, model: str, steps: int, micro: int, world: int, compile_: bool,
           checkpointing: bool, deepspeed: str | None, cpu: bool) -> Path:
    setup = json.loads((work / "setup.json").read_text())
    seq_len = setup["seq_len"]
    r = {
        "run": {"name": name, "output_dir": str(work / "runs" / name), "seed": 1},
        "model": {**MODELS[model], "tokenizer": str(work / "tok")},
        "data": {"seq_len": seq_len, "sources": {"text": str(work / "data")}, "mixture": {"text": 1.0},
                 "warn_epochs": 1000},
        "train": {"tokens": steps * micro * world * seq_len, "global_batch_tokens": micro * world * seq_len,
                  "micro_batch_size": micro, "precision": "fp32" if cpu else "bf16", "compile": compile_,
                  "activation_checkpointing": checkpointing, "deepspeed": deepspeed},
        "schedule": {"kind": "constant", "max_lr": 3e-4, "warmup": 0},
        "checkpoint": {"every": None, "keep_last": 1},
        "tracking": {"progress": False},
    }
    path = work / f"{name}.json"
    path.write_text(json.dumps(r))  # JSON is YAML
    return path


def run(args) -> None:
    work = Path(args.work)
    world = args.processes if args.launch else 1
    ds = str(REPO / "recipes/deepspeed/zero3.json") if args.launch == "zero3" else None
    path = recipe(work, args.name, args.model, args.steps, args.micro_batch_size, world, args.compile,
                  args.activation_checkpointing, ds, args.cpu)
    if args.launch:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(world),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if args.launch == "fsdp2":
            cmd += ["--config_file", str(REPO / "recipes/accelerate/fsdp2.yaml")]
        else:
            cmd += ["--multi_gpu"]
        cmd += ["-m", "cpt.cli", "train", str(path)]
    else:
        cmd = [sys.executable, "-m", "cpt.cli", "train", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this process's own peak RSS (KiB on Linux)
    record = {"name": args.name, "model": args.model, "launch": args.launch or "single", "processes": world,
              "compile": args.compile, "activation_checkpointing": args.activation_checkpointing}
    record["peak_rss_mib"] = usage.ru_maxrss / 1024
    if status != 0:
        record["error"] = (stderr.strip().splitlines() or ["?"])[-1][:300]
    else:
        steps = [json.loads(line) for line in (work / "runs" / args.name / "metrics.jsonl").read_text().splitlines()]
        steps = [s for s in steps if "train/tokens_per_s" in s][args.warmup:]

        def med(key):
            return statistics.median(s[key] for s in steps) if steps and key in steps[0] else None

        record |= {"tokens_per_s": med("train/tokens_per_s"), "mfu": med("train/mfu"),
                   "peak_mem_gib": max((s.get("train/peak_mem_gib", 0) for s in steps), default=None),
                   "rank0_rss_gib": max((s.get("train/peak_rss_gib", 0) for s in steps), default=None),
                   "steps_measured": len(steps), "losses": [s["train/loss"] for s in steps]}
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


def table(args) -> None:
    rows = [json.loads(line) for line in (Path(args.work) / "results.jsonl").read_text().splitlines()]
    print(f"{'run':<20} {'model':<5} {'launch':<7} {'procs':>5} {'tokens/s/proc':>14} {'MFU':>7} {'GPU GiB':>8} "
          f"{'RSS MiB':>8} {'rank-0 RSS GiB':>15}  note")
    for r in rows:
        head = f"{r['name']:<20} {r['model']:<5} {r['launch']:<7} {r['processes']:>5}"
        if "error" in r or not r.get("tokens_per_s"):
            print(f"{head} {'-':>14} {'-':>7} {'-':>8} {r['peak_rss_mib']:>8.0f} {'-':>15}  "
                  f"{r.get('error', 'no step past --warmup')}")
            continue
        per = r["tokens_per_s"] / r["processes"]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] else "-"
        rank0 = f"{r['rank0_rss_gib']:.2f}" if r.get("rank0_rss_gib") else "-"
        print(f"{head} {per:>14,.0f} {mfu:>7} {mem:>8} {r['peak_rss_mib']:>8.0f} {rank0:>15}  compile={r['compile']} "
              f"ac={r['activation_checkpointing']} steps={r['steps_measured']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work", required=True)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=4096)
    r = sub.add_parser("run")
    r.add_argument("--work", required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--model", default="1b", choices=sorted(MODELS))
    r.add_argument("--steps", type=int, default=12)
    r.add_argument("--warmup", type=int, default=4, help="steps left out of the medians (compile, allocator)")
    r.add_argument("--micro-batch-size", type=int, default=2)
    r.add_argument("--compile", action="store_true")
    r.add_argument("--activation-checkpointing", action="store_true")
    r.add_argument("--launch", choices=["ddp", "fsdp2", "zero3"], default=None)
    r.add_argument("--processes", type=int, default=1)
    r.add_argument("--cpu", action="store_true", help="on CPU in fp32 (the dry run; memory on CPU)")
    t = sub.add_parser("table")
    t.add_argument("--work", required=True)
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare_data(Path(args.work), args.vocab, args.seq_len)
    elif args.cmd == "run":
        run(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
