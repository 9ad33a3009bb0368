# cpt on NVIDIA GPUs (and on CPUs: leave out --gpus). Build from the repository root:
#   docker build -t cpt:gpu .
# Run from the repository root. The image's working directory is /work, holding recipes/ and scripts/;
# the host's data/ and runs/ are mounted at /work/data and /work/runs, so the recipes' relative paths
# (data/..., runs/...) are the host's. --user: files in the mounts belong to you (the image's own user,
# cpt, uid 1000, is the default); mkdir first, or Docker creates the missing mount points as root.
# The demo (README), on a GPU:
#   mkdir -p data runs
#   docker run --rm --gpus all --ipc=host --user "$(id -u):$(id -g)" \
#     -v "$PWD/data:/work/data" -v "$PWD/runs:/work/runs" cpt:gpu python scripts/demo.py
# Several GPUs of one machine, `accelerate launch`: the demo's first stage again, on 2 GPUs, from the data
# the demo built (its batch of 32 sequences of 8 takes 1, 2 or 4 processes); the same line resumes it after
# a stop (docker stop -t 300: every rank checkpoints at the same step, then exits):
#   docker run --rm --gpus all --ipc=host --user "$(id -u):$(id -g)" \
#     -v "$PWD/data:/work/data" -v "$PWD/runs:/work/runs" cpt:gpu \
#     accelerate launch --multi_gpu --num_processes 2 -m cpt.cli train recipes/demo/pretrain-english.yaml \
#     run.output_dir=runs/demo/pretrain-english-2gpu --resume auto
# Any cpt command: docker run ... cpt:gpu cpt train RECIPE (no entrypoint: the command is whole, as in a shell).
# --ipc=host (or --shm-size=16g): NCCL and DataLoader workers use /dev/shm, which Docker limits to 64 MB.
# Across nodes (host networking, srun with a container, Apptainer): docs/multinode.md, "Containers".
#
# CUDA: the PyPI wheel of torch==2.13.0 for Linux x86-64 carries its CUDA 13.0 runtime (cuDNN, NCCL, cuBLAS
# as nvidia-* wheels, pinned by torch), so a slim Python base is enough and the image holds one CUDA, the
# one torch was built against. The driver comes from the host (NVIDIA Container Toolkit, --gpus) and must
# be R580 or newer for CUDA 13.0; for an older driver, install torch from PyTorch's index for an older CUDA
# (e.g. https://download.pytorch.org/whl/cu126) instead of PyPI, without the three CUDA pins that close
# scripts/docker/constraints.txt. build-essential: Triton (torch.compile) and DeepSpeed's JIT-built ops compile C
# at run time. There is no CUDA toolkit (nvcc): DeepSpeed ops that compile CUDA code (e.g. CPU Adam for
# ZeRO offload) need an nvidia/cuda devel base instead; the shipped ZeRO configs do not use them.
#
# Every Python package is pinned: scripts/docker/constraints.txt holds the versions of the environment the tests
# passed in (written by scripts/docker/constraints.py), plus what PyPI resolved for torch's CUDA wheel.
#
# The Hugging Face Hub: offline by default (HF_HUB_OFFLINE=1). Recipes that name local model dirs (the
# demo, and a cluster whose nodes have no internet) then never wait on the network, and a model missing
# from the cache fails at once, naming it, instead of every rank of a multi-node run downloading it.
# Models from the hub: mount a cache that holds them (-v "$HOME/.cache/huggingface:/home/cpt/.cache/huggingface"),
# or let it download: docker run -e HF_HUB_OFFLINE=0 (-e HF_TOKEN for gated models), or build with
# --build-arg HF_HUB_OFFLINE=0.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG HF_HUB_OFFLINE=1
ARG UID=1000
ARG GID=1000
# PET_SIGNALS_TO_HANDLE: torchrun (inside accelerate launch) passes these on to its workers (torch's list
# lacks SIGUSR1, SLURM's usual warning signal, and USR1 would kill the launcher); it waits
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (torch's default 30) for them to checkpoint before it kills them.
# HOME and USER: for caches (Triton, matplotlib, HF) and getpass, under --user with any uid too.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=${HF_HUB_OFFLINE} \
    PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300 \
    HOME=/home/cpt USER=cpt

# DL3008 (pin apt versions): the package versions come from the Debian release the base image names
# (bookworm), which changes only by security and bug fixes; an exact version pin breaks the build as soon
# as such a fix replaces that version on the mirrors.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid "$GID" cpt \
    && useradd --uid "$UID" --gid "$GID" --create-home --shell /bin/bash cpt \
    && chmod 1777 /home/cpt

WORKDIR /work
COPY scripts/docker/constraints.txt /tmp/cpt-src/constraints.txt
RUN pip install --no-cache-dir -c /tmp/cpt-src/constraints.txt "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /tmp/cpt-src/
COPY cpt /tmp/cpt-src/cpt
RUN pip install --no-cache-dir -c /tmp/cpt-src/constraints.txt "/tmp/cpt-src[deepspeed]" \
    && rm -rf /tmp/cpt-src
COPY recipes ./recipes
COPY scripts ./scripts
# data/ and runs/: the mount points, writable by any uid where nothing is mounted
RUN mkdir -p data runs && chmod 1777 data runs

USER ${UID}:${GID}
CMD ["cpt", "--help"]
