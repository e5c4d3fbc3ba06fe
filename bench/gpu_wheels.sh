#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (Python 3.12 there) into .whl/ (ignored).
# The GPU image has torch, transformers, tokenizers, safetensors and prometheus-client.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  aiokafka==0.14.0 orjson pydantic pydantic-core pydantic-settings python-dotenv \
  annotated-types typing-inspection
ls -1 .whl
