# syntax=docker/dockerfile:1
# NeuroMF trainer image: CUDA PyTorch + neuromf. The base is a build argument, so it can follow the cluster's driver:
#   docker build -t neuromf .
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime -t neuromf .
#   docker run --rm neuromf validate runspecs/demo.yaml         # any neuromf verb
#   docker run --rm neuromf pytest -q -m "not slurm"            # the test suite, inside the image
#   docker run --rm --gpus all -v $PWD/runs:/opt/neuromf/runs -v neuromf-cache:/cache neuromf train runspecs/demo.yaml
# container/build_sif.sh turns this image into trainer.sif (apptainer.def).
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG BASE_IMAGE
LABEL org.opencontainers.image.title="neuromf" \
      org.opencontainers.image.description="Trainer for one-step latent MeanFlow (iMF) models of 3D brain MRI" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# PYTHONNOUSERSITE: a user's ~/.local (bound into Apptainer containers with $HOME) must not shadow the image's packages.
# WANDB_MODE: compute nodes have no internet; runs are synced later with `wandb sync`.
# TORCHINDUCTOR_CACHE_DIR: torch.compile's cache, in a folder anyone can write (mount a volume on /cache to keep it).
ENV PYTHONNOUSERSITE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_MODE=offline \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton \
    MPLCONFIGDIR=/tmp/matplotlib

# Triton (torch.compile on GPU) compiles a small C launcher at run time: the runtime base images lack a compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /cache/torchinductor /cache/triton \
    && chmod -R 1777 /cache

WORKDIR /opt/neuromf

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when the dependencies change, not on every
# source edit. A stub package lets pip resolve them; the base image's torch already satisfies "torch>=2.4".
COPY pyproject.toml ./
RUN mkdir neuromf \
    && touch neuromf/__init__.py \
    && pip install ".[test]" \
    && pip uninstall -y neuromf \
    && rm -rf neuromf build ./*.egg-info

# The package itself (no dependency resolution: they are all in the layer above).
COPY neuromf/ neuromf/
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && neuromf --help >/dev/null

# Run-specs, tests, the container scripts and recipes, so `docker run IMAGE pytest` and the shipped run-specs work.
COPY runspecs/ runspecs/
COPY tests/ tests/
COPY container/ container/
COPY Dockerfile apptainer.def .dockerignore ./
RUN chmod 0755 container/*.sh

ENTRYPOINT ["/opt/neuromf/container/entrypoint.sh"]
CMD ["--help"]
