"""What each rank holds under DDP, FSDP2 and DeepSpeed ZeRO-3: 2 gloo processes on CPU, one `cpt train` run
each on scripts/bench_gpu.py's 85M Llama (seq 512, micro-batch 1, activation checkpointing, fp32, AdamW).

After every step each rank counts the bytes of the CPU tensor storages alive in it (weights, AdamW moments,
DDP's buckets, ZeRO's flat buffers: everything torch holds, each storage once) and reads its peak RSS.
The tensor bytes are what sharding divides; the RSS also holds the interpreter and libraries, the whole
model each rank builds before it is sharded, and what the allocator keeps after a step's transients.

    python scripts/bench_gpu.py prepare --work /tmp/shard --vocab 8192 --seq-len 512    # once
    python scripts/shard_memory.py --work /tmp/shard
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

LAUNCHES = {"ddp": ["--multi_gpu"], "fsdp2": ["--config_file", str(REPO / "recipes/accelerate/fsdp2.yaml")],
            "zero3": ["--multi_gpu"]}


def tensor_gib() -> float:
    """GiB of the distinct CPU tensor storages the garbage collector can reach (DTensors: the local shard)."""
    import torch
    from torch.distributed.tensor import DTensor

    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor):
            continue
        t = obj.to_local() if isinstance(obj, DTensor) else obj
        if t.device.type != "cpu" or t.is_meta:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total / 2**30


def child(recipe_path: str, out: str) -> None:
    """Inside `accelerate launch`: train, recording each rank's memory after every step."""
    import cpt.train.loop as loop
    from cpt.recipe import load_recipe

    log_step = loop._log_step

    def measured(run, at, *args):
        log_step(run, at, *args)
        record = {"rank": run.accelerator.process_index, "step": at.step, "tensor_gib": tensor_gib(),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        with open(f"{out}.rank{run.accelerator.process_index}", "a") as f:
            f.write(json.dumps(record) + "\n")

    loop._log_step = measured
    loop.train(load_recipe(recipe_path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="a folder scripts/bench_gpu.py prepare wrote")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("RECIPE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    from bench_gpu import recipe

    work = Path(args.work)
    rows = {}
    for name, how in LAUNCHES.items():
        ds = str(REPO / "recipes/deepspeed/zero3.json") if name == "zero3" else None
        path = recipe(work, f"mem-{name}", "85m", args.steps, 1, 2, False, True, ds, True)
        out = work / f"mem-{name}.jsonl"
        for f in work.glob(f"mem-{name}.jsonl.rank*"):
            f.unlink()
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2", "--num_machines",
               "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__, "--work", str(work),
               "--child", str(path), str(out)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name}: {done.stderr.strip().splitlines()[-1]}")
        per_rank = [[json.loads(line) for line in f.read_text().splitlines()]
                    for f in sorted(work.glob(f"mem-{name}.jsonl.rank*"))]
        rows[name] = {"tensor_gib": max(r[-1]["tensor_gib"] for r in per_rank),
                      "peak_rss_gib": max(r[-1]["peak_rss_gib"] for r in per_rank)}
    base = rows["ddp"]
    print(f"{'launch':<7} {'tensors GiB/rank':>17} {'vs DDP':>7} {'peak RSS GiB/rank':>18} {'vs DDP':>7}")
    for name, r in rows.items():
        print(f"{name:<7} {r['tensor_gib']:>17.3f} {r['tensor_gib'] / base['tensor_gib']:>7.2f} "
              f"{r['peak_rss_gib']:>18.2f} {r['peak_rss_gib'] / base['peak_rss_gib']:>7.2f}")


if __name__ == "__main__":
    main()
