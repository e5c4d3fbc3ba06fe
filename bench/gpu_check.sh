#!/usr/bin/env bash
# The one prepared GPU check, for the `device` tool (15 minutes of device time in all, so one
# run must leave room for a rerun): at most CHECK_BUDGET_S (400) seconds, wheel installs
# included.
#   bash bench/gpu_wheels.sh                  # here, once: wheels the GPU image lacks (.whl/)
#   device run: command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 420
#   dry run here: bash bench/gpu_check.sh --device cpu   (tiny shape, small counts, same steps)
#
# Sections run in priority order, each under its own time limit, and none starts when less
# than 20 s of the budget is left. $OUT/gpu-check.json is rewritten after every section: its
# exit code, seconds, limit, and what really ran there (the summarizer class and compute type
# each backend loaded, read back from the section's own JSON). Nothing falls back silently:
# a backend that cannot run on CUDA fails its section, and the probe says why.
#
#   probe            torch CUDA, cuBLAS 12 for ctranslate2 (nvidia-cublas-cu12 or the system's),
#                    ctranslate2's CUDA devices and compute types, one CUDA translate
#   tiny             both backends on the device, tiny checkpoint: agreement and what ran
#   model-greedy     bart-large-cnn shape, fp16, greedy, summarize() at batch 256 and 512;
#                    then ctranslate2 with 1, 2 and 4 workers sharing one translator
#   model-beam       the same, beam 4 / no-repeat 3 / length penalty 2, batch 128
#   worker-*-greedy  through GPUWorker (bench/engine.py): layout a (replicas as the plan
#                    allows, at most 8) and b (one replica), batch 256, per backend
#   worker-*-beam    through GPUWorker, layout b, beam 4 at batch 128, per backend
#   worker-ctranslate2-calibrated   layout c (calibration, token budget), if budget is left
#
# GPU_STATIC_CACHE is left out: its compiled shapes are not bucketed, so it would recompile
# per batch shape inside the budget. Copy the figures into BENCHMARKS.md with the device, the
# commit and these command lines.
set -uo pipefail
DEVICE=cuda
if [[ "${1:-}" == "--device" ]]; then DEVICE=${2:?--device cuda|cpu}; fi
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-out}
BUDGET=${CHECK_BUDGET_S:-400}
START=$SECONDS
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[[ -x .venv/bin/python && -z "${PYTHON:-}" && "$DEVICE" == cpu ]] && PY=.venv/bin/python
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CACHE=$(mktemp -d /tmp/gpu-check-ct2.XXXXXX)  # conversions shared by the sections

if [[ "$DEVICE" == cuda ]]; then
  SHAPE=bart-large-cnn SRC=512 NEW=64
  G_BATCHES=256,512 G_ITEMS=1024 B_BATCH=128 B_ITEMS=256
  W_BATCH=256 W_ITEMS=2048 WB_ITEMS=512 TYPES=float16 TINY_TYPES=float32,float16 WORKERS=1,2,4
else
  SHAPE=tiny SRC=64 NEW=8
  G_BATCHES=8,16 G_ITEMS=32 B_BATCH=8 B_ITEMS=16
  W_BATCH=8 W_ITEMS=32 WB_ITEMS=16 TYPES=int8 TINY_TYPES=float32,int8 WORKERS=1,2
fi

record() {  # record NAME RC SECONDS LIMIT: merge one section's outcome into gpu-check.json
  "$PY" - "$OUT" "$@" "$DEVICE" "$BUDGET" "$((SECONDS - START))" <<'PY'
import json, pathlib, subprocess, sys
out, name, rc, seconds, limit, device, budget, elapsed = sys.argv[1:]
path = pathlib.Path(out) / "gpu-check.json"
report = json.loads(path.read_text()) if path.exists() else {
    "device": device, "budget_s": int(budget), "sections": {},
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip() or None}
entry = {"rc": int(rc), "seconds": int(seconds), "limit_s": int(limit),
         "timed_out": rc in ("124", "137"), "skipped": rc == "skipped"} if rc != "skipped" \
    else {"skipped": True, "why": "budget spent"}
data = pathlib.Path(out) / f"{name}.json"
if data.exists():
    try:
        found = json.loads(data.read_text())
    except ValueError:
        found = {}
    if "ran" in found:  # bench/backends.py and the probe: what really loaded
        entry["ran"] = found["ran"]
    for key, section in (found.get("sections") or {}).items():  # bench/backends.py figures
        entry.setdefault("items_per_second", {})[key] = section.get(
            "items_per_second", section.get("error"))
    for gen, section in (found.get("fixed") or {}).items():  # bench/engine.py
        check = section.get("generation_check", {})
        entry.setdefault("ran", {})[gen] = {
            "class": check.get("backend"),
            "layouts": {k: v.get("items_per_second") for k, v in section["layouts"].items()}}
    if "error" in found:
        entry["error"] = found["error"]
report["sections"][name] = entry
report["elapsed_s"] = int(elapsed)
path.write_text(json.dumps(report, indent=2) + "\n")
PY
}

section() {  # section NAME LIMIT_S COMMAND...: run under min(limit, budget left), then record
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if (( left < 20 )); then
    echo "== $name: skipped, $left s of the budget left" | tee -a "$OUT/check.log"
    record "$name" skipped 0 0
    return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit $limit s, $((SECONDS - START)) s in)" | tee -a "$OUT/check.log"
  local began=$SECONDS
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 4 "$OUT/$name.log" | cut -c1-400 | tee -a "$OUT/check.log"
  record "$name" "$rc" $((SECONDS - began)) "$limit"
}

if compgen -G ".whl/*.whl" > /dev/null; then
  section wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
fi
if [[ "$DEVICE" == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
fi

section probe 45 "$PY" - "$DEVICE" "$OUT/probe.json" <<'PY'
import json, sys, time
device, target = sys.argv[1:]
ran, report = {}, {"ran": {}}
def save():
    open(target, "w").write(json.dumps(report, indent=2) + "\n")
import torch
report["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                   "cuda_available": torch.cuda.is_available()}
save()
from streamproc.summarize.ct2 import preload_cublas
report["cublas12"] = preload_cublas() if device == "cuda" else "not needed on the CPU"
import ctranslate2
report["ctranslate2"] = {"version": ctranslate2.__version__,
                         "cuda_devices": ctranslate2.get_cuda_device_count()}
kind = "cuda" if device == "cuda" else "cpu"
try:
    report["ctranslate2"]["compute_types"] = sorted(ctranslate2.get_supported_compute_types(kind))
except Exception as exc:
    report["ctranslate2"]["compute_types"] = f"{type(exc).__name__}: {exc}"
save()
if device == "cuda":  # the n-gram blocking that the transformers backend runs on the device
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor
    from streamproc.summarize.ngram import DeviceNoRepeatNGram
    ids = torch.randint(0, 12, (64, 40), device="cuda")
    scores = torch.randn(64, 12, device="cuda")
    ref = NoRepeatNGramLogitsProcessor(3)(ids.cpu(), scores.cpu().clone())
    report["ran"]["device_ngram_matches_hf"] = bool(
        torch.equal(ref, DeviceNoRepeatNGram(3)(ids, scores.clone()).cpu()))
    save()
import tempfile
from streamproc.testing.tiny_model import build_tiny_model
from streamproc.summarize.ct2 import CT2Summarizer
with tempfile.TemporaryDirectory() as tmp:
    started = time.perf_counter()
    try:
        model = CT2Summarizer(str(build_tiny_model(tmp + "/tiny")), f"{kind}:0" if kind == "cuda"
                              else "cpu", cache_dir=tmp + "/ct2")
        model.summarize(["One short story about the harbour."])
        report["ran"]["ctranslate2_translate"] = {"device": kind, "compute_type":
                                                  model.compute_type, "ok": True}
    except Exception as exc:
        report["ran"]["ctranslate2_translate"] = {"device": kind, "ok": False,
                                                  "error": f"{type(exc).__name__}: {exc}"}
    report["ran"]["ctranslate2_translate"]["seconds"] = time.perf_counter() - started
save()
print(json.dumps(report))
sys.exit(0 if report["ran"]["ctranslate2_translate"]["ok"] else 3)
PY

BACKENDS=("$PY" bench/backends.py --device "$DEVICE" --ct2-cache "$CACHE" --rounds 1)
section tiny 60 "${BACKENDS[@]}" --shape tiny --gen greedy,checkpoint --lengths fixed \
  --batch 8 --items 16 --compute-types "$TINY_TYPES" --json "$OUT/tiny.json"
section model-greedy 150 "${BACKENDS[@]}" --shape "$SHAPE" --gen greedy --lengths fixed \
  --batch "$G_BATCHES" --items "$G_ITEMS" --source-tokens "$SRC" --new-tokens "$NEW" \
  --compute-types "$TYPES" --workers "$WORKERS" --json "$OUT/model-greedy.json"
section model-beam 60 "${BACKENDS[@]}" --shape "$SHAPE" --gen checkpoint --lengths fixed \
  --batch "$B_BATCH" --items "$B_ITEMS" --source-tokens "$SRC" --new-tokens "$NEW" \
  --compute-types "$TYPES" --json "$OUT/model-beam.json"
for backend in ctranslate2 transformers; do
  section "worker-$backend-greedy" 60 "$PY" bench/engine.py --shape "$SHAPE" --device "$DEVICE" \
    --backend "$backend" --compute-type auto --ct2-cache "$CACHE" --gen greedy --layouts a,b \
    --batch "$W_BATCH" --items "$W_ITEMS" --source-tokens "$SRC" --new-tokens "$NEW" \
    --rounds 1 --no-mixed --no-bare --json "$OUT/worker-$backend-greedy.json"
done
for backend in ctranslate2 transformers; do
  section "worker-$backend-beam" 45 "$PY" bench/engine.py --shape "$SHAPE" --device "$DEVICE" \
    --backend "$backend" --compute-type auto --ct2-cache "$CACHE" --gen checkpoint --layouts b \
    --batch "$B_BATCH" --items "$WB_ITEMS" --source-tokens "$SRC" --new-tokens "$NEW" \
    --rounds 1 --no-mixed --no-bare --json "$OUT/worker-$backend-beam.json"
done
# Last, when budget is left: layout c (streamproc's defaults), so that calibration on mixed
# lengths, the token budget and the replica comparison (up to 4 translator workers) run on
# CUDA at least once.
section worker-ctranslate2-calibrated 150 env MODEL_POOL_MAX_INSTANCES=4 \
  "$PY" bench/engine.py --shape "$SHAPE" \
  --device "$DEVICE" --backend ctranslate2 --compute-type auto --ct2-cache "$CACHE" \
  --gen greedy --layouts c --items "$W_ITEMS" --source-tokens "$SRC" --new-tokens "$NEW" \
  --rounds 1 --no-mixed --no-bare --json "$OUT/worker-ctranslate2-calibrated.json"
rm -rf "$CACHE"
echo "== done in $((SECONDS - START)) s of $BUDGET; $OUT/gpu-check.json" | tee -a "$OUT/check.log"
