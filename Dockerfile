# streamproc: Kafka -> GPU summarization service.
#
#   docker build -t streamproc .
#   docker run --gpus all --env-file .env -p 9108:9108 streamproc
#
# torch from PyPI ships its own CUDA libraries; the host driver must be new
# enough for them. To pin a CUDA flavour of torch, pass e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/streamproc/.cache/huggingface

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip

WORKDIR /app

# Dependencies first (better layer caching), then the package itself.
COPY pyproject.toml README.md ./
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch; fi
COPY streamproc/ ./streamproc/
RUN pip install ".[gpu]" \
    && python -c "import streamproc"

RUN groupadd --system --gid 10001 streamproc \
    && useradd --system --uid 10001 --gid streamproc --create-home \
       --home-dir /home/streamproc --shell /usr/sbin/nologin streamproc \
    && mkdir -p /home/streamproc/.cache/huggingface \
    && chown -R streamproc:streamproc /home/streamproc

USER streamproc
WORKDIR /home/streamproc

EXPOSE 9108
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=5 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://localhost:9108/healthz', timeout=5).status == 200 else 1)"]

ENTRYPOINT ["streamproc"]
CMD ["run"]
