#!/usr/bin/env bash
# The project's one GPU check (issue 14). On a machine with NVIDIA GPU(s), from the repository root:
#   bash scripts/gpu_check.sh                 # install, the test suite on CUDA, then the 1B benchmarks
#   bash scripts/gpu_check.sh --cpu-dry-run   # the same steps on CPU with a toy model: checks the plumbing
# Prints one table (tokens/s per GPU, MFU, peak memory) for: a ~1B Llama-shaped model at seq 4096 in bf16
# with attention auto (flash-attention 2 where installed, else sdpa) and fused AdamW, eager and
# torch.compile, with activation checkpointing, and over all GPUs with DDP, FSDP2 and DeepSpeed ZeRO-3.
# Then cpt against transformers.Trainer in lockstep on one GPU (scripts/bench_trainer.py --device cuda).
# References: OLMo-core 1B ~40% MFU on H100; llm-foundry 1B 40.6%; torchtitan Llama 3.1 8B 33-39% bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
dry=""
[[ "${1:-}" == "--cpu-dry-run" ]] && dry="--cpu"
work="${GPU_CHECK_WORK:-$(mktemp -d)/gpu-check}"
mkdir -p "$work"

python3 -m pip install -q torch==2.13.0 && python3 -m pip install -q -e ".[dev,deepspeed,eval]"
if [[ -z "$dry" ]]; then
  python3 -m pip install -q flash-attn --no-build-isolation || echo "gpu_check: flash-attn not installed: sdpa"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -m pytest -q -x                       # cpt picks CUDA by itself: the suite runs on the GPU
  gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
  model=1b; seq=4096; steps=12; micro=2
else
  gpus=2; model=toy; seq=256; steps=6; micro=2
fi

python3 scripts/bench_gpu.py prepare --work "$work" --seq-len "$seq" $([[ -n "$dry" ]] && echo "--vocab 2048")
bench() { python3 scripts/bench_gpu.py run --work "$work" --model "$model" --steps "$steps" \
            --micro-batch-size "$micro" $dry "$@" || true; }
bench --name single-eager
bench --name single-compile --compile
bench --name single-compile-ac --compile --activation-checkpointing
if (( gpus > 1 )); then
  bench --name ddp --launch ddp --processes "$gpus"
  bench --name fsdp2 --launch fsdp2 --processes "$gpus"  # on CPU: FSDP2 over gloo (cpt.train.backend)
  bench --name zero3 --launch zero3 --processes "$gpus"
fi
python3 scripts/bench_gpu.py table --work "$work"
# issue 19: cpt against transformers.Trainer and a bare loop, each with its own defaults, in lockstep on one
# GPU (bf16 autocast, the same ~1.1B model, batch and AdamW settings): tokens/s, ratios, MFU
if [[ -z "$dry" ]]; then
  python3 scripts/bench_trainer.py --device cuda --sizes 1B --seq 4096 --micro 2 --rounds 3 --per-round 4 \
    --warmup 3 --work "$work/bench-trainer" || true
fi
echo "gpu_check: results in $work/results.jsonl"
