# NeuroMF trainer image: CUDA PyTorch + neuromf. The base is a build argument, so it can follow the cluster's driver:
#   docker build -t neuromf .
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime -t neuromf .
#   container/local_base.sh && docker build --build-arg BASE_IMAGE=neuromf-base:local -t neuromf .   # no Docker Hub
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
# TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR: torch.compile's caches, in a folder anyone can write (mount a volume on
# /cache to keep them). Where it is not writable (a read-only image, Apptainer), the trainer uses a per-user folder
# under /tmp; an explicit paths.cache_dir in the run-spec wins over both. The entry point gives a user without a
# passwd entry (docker run --user 1000:1000) a USER and a writable HOME.
# NEUROMF_PIP_FREEZE: the exact package versions of this image, printed by `neuromf --version` (`pip list
# --format=freeze`: unlike `pip freeze`, a version even for a package installed from a wheel file).
ENV PYTHONNOUSERSITE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_MODE=offline \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton \
    NEUROMF_PIP_FREEZE=/opt/neuromf/pip-freeze.txt

# torch.compile compiles at run time: Triton a small C launcher (GPU), Inductor C++ kernels (CPU). Both need a C/C++
# compiler and Python's headers, which the runtime base images lack (python3-dev where the base's Python has none).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && include=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])") \
    && { [ -f "$include/Python.h" ] || apt-get install -y --no-install-recommends python3-dev; } \
    && [ -f "$include/Python.h" ] \
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
    && pip list --format=freeze > "$NEUROMF_PIP_FREEZE" \
    && neuromf --help >/dev/null

# Run-specs, tests, the container scripts and recipes, so `docker run IMAGE pytest` and the shipped run-specs work.
COPY runspecs/ runspecs/
COPY tests/ tests/
COPY container/ container/
COPY Dockerfile apptainer.def .dockerignore ./
RUN chmod 0755 container/*.sh

ENTRYPOINT ["/opt/neuromf/container/entrypoint.sh"]
CMD ["--help"]
