#!/bin/bash
# Issue 7 on one GPU in one call of under 9 minutes: distil flashhead-tiny (configs/stage2_tiny_distill.yaml,
# 5 min budget), then compare the student with the 4-step teacher over 60-s rollouts of held-out clips.
# benchmarks/distill_payload.py installs this file as .device/distill/run.sh next to its data.tar.xz:
#
#   bash .device/distill/run.sh                                  # the experiment (carry [".device"])
#   bash .device/distill/run.sh --set distill.regression_weight=1.0   # a variant: Stage-2 overrides
#
# Environment: OUT (results; default /tmp/distill-out), RUN (work folder; runs/distill), EVAL_SECONDS (60),
# EVAL_CLIPS (3), SITE (/tmp/site), SKIP_WHEELS=1 (a machine that has diffusers and soxr already).
# Leaves in $OUT (8 files): results.md/.json/.png, student_dit.safetensors (float16) + student_dit_config.json,
# metrics.jsonl + summary.json of the training run, log.txt.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/distill-out}
SITE=${SITE:-/tmp/site}
RUN=${RUN:-runs/distill}
mkdir -p "$OUT"
if [ "${SKIP_WHEELS:-0}" != 1 ]; then  # the device lacks diffusers and soxr (cp312 wheels); a CPU dry run skips this
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$HERE"/../whl/*.whl
fi
export PYTHONPATH="$SITE:src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null || echo "no GPU: running on the CPU"

rm -rf "$RUN" && mkdir -p "$RUN/data"
tar xJf "$HERE/data.tar.xz" -C "$RUN/data"

log() { tr '\r' '\n' | grep --line-buffered -v -e '^\s*$' -e 'it/s\]$' | tee -a "$OUT/log.txt"; }
echo "== train $(date +%T)" | tee -a "$OUT/log.txt"
python3 -m flashhead.train stage2 configs/stage2_tiny_distill.yaml --set "data.roots=[$RUN/data/train]" \
    --set "teacher.path=$RUN/data/teacher" \
    --set "output_dir=$RUN/exp/run" "$@" 2>&1 | log
cp "$RUN/exp/run/metrics.jsonl" "$RUN/exp/run/summary.json" "$OUT/"
# The student in float16 now: if the evaluation overruns the call, the trained model is already in $OUT.
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from distill_experiment import export_student_dit; export_student_dit(Path(sys.argv[1]), Path(sys.argv[2]))" \
    "$RUN/exp/run/export" "$RUN/exp/student-dit-fp16"
cp "$RUN/exp/student-dit-fp16/diffusion_pytorch_model.safetensors" "$OUT/student_dit.safetensors"
cp "$RUN/exp/student-dit-fp16/config.json" "$OUT/student_dit_config.json"

echo "== evaluate $(date +%T)" | tee -a "$OUT/log.txt"
# results.md/.json/.png go straight to $OUT and are rewritten after every clip (a cut-short run keeps its part)
python3 benchmarks/distill_experiment.py --config configs/stage2_tiny_distill.yaml \
    --teacher "$RUN/data/teacher" --data "$RUN/data/train" --eval-data "$RUN/data/eval" \
    --out "$RUN/exp" --results "$OUT" --seconds "${EVAL_SECONDS:-60}" --eval-clips "${EVAL_CLIPS:-3}" 2>&1 | log
echo "== done $(date +%T)" | tee -a "$OUT/log.txt"
ls -la "$OUT"
