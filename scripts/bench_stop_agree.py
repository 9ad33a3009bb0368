"""What the run-wide stop decision costs: one all-reduce of one integer after every step
(cpt.train.signals.StopFlag.agree), against a training step of the tests' tiny model, both measured here on
2 gloo processes of this machine, interleaved.

    python scripts/bench_stop_agree.py [--rounds 5] [--calls 500]

Prints per round the microseconds of an agree call, of a step of a 2-layer Llama (hidden 64, 8 sequences of
128 tokens per process, AdamW, DDP all-reduce of its gradients), and their ratio. Results: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, port: int, rounds: int, calls: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt.train.signals import StopFlag

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 512, (8, 128))
    stop = StopFlag()
    acc = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    results = []
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            stop.agree(acc)
        agree_us = (time.perf_counter() - t0) / calls * 1e6
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(5):
            ddp(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        step_us = (time.perf_counter() - t0) / 5 * 1e6
        results.append((agree_us, step_us))
    stop.restore()
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, args.rounds, args.calls, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = out.get()
    for p in procs:
        p.join()
    print("round  agree_us  step_us  agree/step")
    for i, (a, s) in enumerate(results):
        print(f"{i:5d}  {a:8.1f}  {s:7.0f}  {a / s:.5f}")
    a, s = statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)
    print(f"median {a:8.1f}  {s:7.0f}  {a / s:.5f}")


if __name__ == "__main__":
    main()
