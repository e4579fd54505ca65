#!/bin/bash
# flashhead-tiny (issue #6) on one GPU, one phase per device call of under 9 minutes (docs/tiny-model.md).
# benchmarks/tiny_payload.py installs this file as .device/tiny/run.sh next to its data.tar.xz:
#
#   bash .device/tiny/run.sh vae      # call 1: the VAE (recipe budget vae.max_minutes=4.5)
#   bash .device/tiny/run.sh stage1   # call 2: latent cache + Stage 1 (stops after STAGE1_MINUTES; call again
#                                     #         to continue until the recipe's total_steps are done)
#   bash .device/tiny/run.sh stage2   # call 3: teacher export + Stage-2 distillation (STAGE2_MINUTES per call)
#   bash .device/tiny/run.sh eval     # call 4: float16 export of the student + evaluation (student and teacher)
#   bash .device/tiny/run.sh stage1 --set stage1.optim.total_steps=8000   # extra arguments: recipe overrides
#                                     (give the same overrides to every call of a run)
#
# Carry [".device"]. The run folder survives only while the machine stays warm: every call leaves what the
# next phase needs in $OUT as state.tar.part-* (<= 8 files of 15 MiB); after a cold start, put them in
# .device/tiny/state/ and the run folder is rebuilt from them (the cache is rebuilt in about a minute).
# Environment: OUT (results; /tmp/tiny-out), RUN (work folder; runs/tiny), STATE (.device/tiny/state),
# STAGE1_MINUTES (6), STAGE2_MINUTES (7), SITE (/tmp/site), SKIP_WHEELS=1 (diffusers and soxr already installed: a CPU dry run).
# Leaves in $OUT: log.txt, state parts, and after eval dit.safetensors + vae.safetensors (float16),
# flashhead-tiny-configs.tar (the pipeline folder's JSON files), eval.json, curves.png, stage1_metrics.jsonl,
# stage2_metrics.jsonl. A Stage-2 run cut by its budget resumes only on a warm machine (its checkpoint, three
# networks with Adam states, is too large for the state parts).
set -euo pipefail
PHASE=${1:?usage: run.sh vae|cache|stage1|stage2|eval [--set key=value ...]}
shift
case "$PHASE" in vae|cache|stage1|stage2|eval) ;;
    *) echo "error: phase must be vae, cache, stage1, stage2 or eval, got '$PHASE'" >&2; exit 2 ;; esac
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/tiny-out}
RUN=${RUN:-runs/tiny}
STATE=${STATE:-$HERE/state}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT" "$RUN"
if [ "${SKIP_WHEELS:-0}" != 1 ]; then  # the device lacks diffusers and soxr (cp312 wheels); no PyAV there: OpenCV decodes
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$HERE"/../whl/*.whl
fi
export PYTHONPATH="$SITE:src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null || echo "no GPU: running on the CPU"
log() { tr '\r' '\n' | grep --line-buffered -v -e '^\s*$' -e 'it/s\]$' -e 's/it\]$' | tee -a "$OUT/log.txt"; }

if [ ! -f "$RUN/data/DONE" ]; then
    rm -rf "$RUN/data" && mkdir -p "$RUN/data"
    tar xJf "$HERE/data.tar.xz" -C "$RUN/data" && touch "$RUN/data/DONE"
fi
if [ ! -d "$RUN/out" ] && compgen -G "$STATE/state.tar.part-*" > /dev/null; then
    echo "== restoring the run folder from $STATE" | tee -a "$OUT/log.txt"
    cat "$STATE"/state.tar.part-* | tar xf - -C "$RUN"
fi

SETS=(--set "eval.portrait_dir=$RUN/data/eval/portraits" --set "eval.audio=$RUN/data/eval/speech.wav")
[ "$PHASE" = stage1 ] && SETS+=(--set "stage1.optim.max_minutes=${STAGE1_MINUTES:-6}")
[ "$PHASE" = stage2 ] && SETS+=(--set "stage2.distill.max_minutes=${STAGE2_MINUTES:-7}")
echo "== $PHASE $(date +%T)" | tee -a "$OUT/log.txt"
python3 -m flashhead.train tiny --data "$RUN/data/procedural" --data "$RUN/data/portrait" --data "$RUN/data/real" \
    --out "$RUN/out" --until "$PHASE" "${SETS[@]}" "$@" 2>&1 | log

# What the next phase needs (never the cache: rebuilt from the data and the VAE).
cd "$RUN"
keep=(out/vae/vae out/vae/metrics.jsonl)
if [ -f out/stage2/DONE ]; then
    keep+=(out/stage1/DONE out/stage1/metrics.jsonl out/teacher out/stage2/DONE out/stage2/export
           out/stage2/metrics.jsonl)
elif [ -f out/stage1/DONE ]; then
    keep+=(out/stage1/DONE out/stage1/export out/stage1/metrics.jsonl out/stage1/config.yaml)
elif [ -f out/stage1/checkpoints/latest ]; then
    keep+=(out/stage1/checkpoints/latest "out/stage1/checkpoints/$(cat out/stage1/checkpoints/latest)"
           out/stage1/metrics.jsonl)
fi
existing=()
for f in "${keep[@]}"; do [ -e "$f" ] && existing+=("$f"); done
rm -f "$OUT"/state.tar.part-*
tar cf - "${existing[@]}" | split -b 15M -d -a 2 - "$OUT/state.tar.part-"
cd - > /dev/null
parts=$(ls "$OUT"/state.tar.part-* | wc -l)
echo "== state: $parts part(s) of <= 15 MiB ($(du -ch "$OUT"/state.tar.part-* | tail -1 | cut -f1))" | tee -a "$OUT/log.txt"
[ "$parts" -le 8 ] || echo "warning: $parts state parts (more than 8)" | tee -a "$OUT/log.txt"

if [ "$PHASE" = eval ]; then
    cp "$RUN/out/flashhead-tiny/dit/diffusion_pytorch_model.safetensors" "$OUT/dit.safetensors"
    cp "$RUN/out/flashhead-tiny/vae/diffusion_pytorch_model.safetensors" "$OUT/vae.safetensors"
    (cd "$RUN/out" && find flashhead-tiny -name '*.json' | sort | tar cf "$OUT/flashhead-tiny-configs.tar" -T -)
    cp "$RUN/out/eval.json" "$RUN/out/curves.png" "$OUT/"
    cp "$RUN/out/stage1/metrics.jsonl" "$OUT/stage1_metrics.jsonl"
    [ -f "$RUN/out/stage2/metrics.jsonl" ] && cp "$RUN/out/stage2/metrics.jsonl" "$OUT/stage2_metrics.jsonl"
    rm -f "$OUT"/state.tar.part-*  # nothing left to resume
fi
echo "== done $(date +%T)" | tee -a "$OUT/log.txt"
ls -la "$OUT"
