#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (Python 3.12 there) into .whl/ (ignored).
# The GPU image has torch, transformers, tokenizers, safetensors and prometheus-client.
# ctranslate2 (43 MB) fits the device tool's 64 MiB carry; nvidia-cublas-cu12 (the `gpu`
# extra, 581 MB) does not, so on the device ctranslate2 finds cuBLAS 12 only if the image has
# one: bench/gpu_check.sh's probe says which, and its ctranslate2 sections fail without it.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  aiokafka==0.14.0 orjson pydantic pydantic-core pydantic-settings python-dotenv \
  annotated-types typing-inspection ctranslate2==4.8.5 pyyaml
ls -1 .whl
