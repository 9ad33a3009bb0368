# cpt on a CUDA machine. The PyPI torch==2.13.0 wheel for Linux x86-64 carries its CUDA runtime (the
# nvidia-* wheels), so a slim Python base is enough; the NVIDIA driver comes from the host (docker run
# --gpus all). build-essential: torch.compile (Triton) and DeepSpeed's JIT-built ops need a C compiler.
# There is no CUDA toolkit (nvcc): DeepSpeed ops that compile CUDA code (e.g. CPU Adam for ZeRO offload)
# need a devel CUDA base instead; the shipped ZeRO configs do not use them.
#   docker build -t cpt .
#   docker run --gpus all --ipc=host -v $PWD/runs:/work/runs cpt train recipes/demo/pretrain-english.yaml
# Several GPUs (--ipc=host: NCCL needs more /dev/shm than Docker's 64 MB default):
#   docker run --gpus all --ipc=host -v $PWD/runs:/work/runs --entrypoint accelerate cpt \
#     launch --multi_gpu --num_processes 8 -m cpt.cli train recipes/demo/pretrain-english.yaml
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
RUN apt-get update && apt-get install -y --no-install-recommends git build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /work
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY cpt ./cpt
RUN pip install ".[deepspeed]"
COPY recipes ./recipes
COPY scripts ./scripts
ENTRYPOINT ["cpt"]
CMD ["--help"]
