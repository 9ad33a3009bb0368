# cpt on a CUDA machine. The PyPI torch==2.13.0 wheel for Linux x86-64 carries its CUDA runtime, so
# a slim Python base is enough; the NVIDIA driver comes from the host (docker run --gpus all).
#   docker build -t cpt .
#   docker run --gpus all -v $PWD/runs:/work/runs cpt train recipes/demo/pretrain-english.yaml
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
