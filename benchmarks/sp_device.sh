#!/bin/bash
# Issue 11 on a 2-GPU device call (kind nvidia-h200-x2 since session 25; carry .device/whl and .device/shared): the transport, the
# sequence-parallel Pro stream (--optimized against 1 GPU in the same run, Chrome traces of a 4-chunk stream),
# then the GPU equivalence test for Pro with that split. About 7 minutes. Results in $OUT. A2A=0 skips the transport,
# TEST=0 the GPU test, A2A_ONLY=1 everything after the transport; A2A_SETTINGS: NCCL settings to time, '|' between.
#   bash benchmarks/sp_device.sh             # Ulysses (the default split of self-attention); parts time every split
#   bash benchmarks/sp_device.sh kv_gather   # the KV-gather split for the whole stream
#   bash benchmarks/sp_device.sh x_gather    # the X-gather split (block input gathered, projections split by heads)
#   COMPARE=x_gather SP_TIMEOUT=540 bash benchmarks/sp_device.sh   # Ulysses, then X gather, against the same 1 GPU
#   PRIORITY=1 NO_PARTS=1 bash benchmarks/sp_device.sh   # also Ulysses on high-priority NCCL streams; no parts
#   NCCL_ENV="NCCL_PROTO=LL128" NO_PARTS=1 bash benchmarks/sp_device.sh   # also on a group made under those settings
#   SPEEDS=optimized,optimized_ahead NO_PARTS=1 bash benchmarks/sp_device.sh   # --optimized, then with launch_ahead
#   CODE=1 ...: also keep Inductor's generated code of the sequence-parallel blocks ($OUT/code.tgz)
#   BENCH=0 bash benchmarks/sp_device.sh: only the GPU test (TEST_TIMEOUT, default 400 s)
#   NO_ONE_GPU=1 ...: no 1-GPU stream (the splits against each other only: a shorter run)
#   AUDIO_SECONDS=10 ...: a longer timed stream (steady FPS: a chunk per period from the first hand-out to the last)
set -uo pipefail
ATTENTION=${1:-ulysses}
OUT=${OUT:-/tmp/sp-out}
mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
nvidia-smi topo -m | head -4
SETTINGS=${A2A_SETTINGS:-"|NCCL_P2P_NCHANNELS=32 NCCL_MIN_P2P_NCHANNELS=32"}  # NCCL's default p2p channels, then more
IFS='|' read -ra SETTING_LIST <<< "$SETTINGS"
[ "${A2A:-1}" = 1 ] && for setting in "${SETTING_LIST[@]}"; do
    name="$OUT/a2a-$(echo "${setting:-default}" | tr -c 'A-Za-z0-9_\n' '_').json"
    env $setting timeout 90 torchrun --nproc-per-node 2 benchmarks/a2a_bench.py --json "$name" > /dev/null 2>&1
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['nccl_env'], {k: v.get('error') or (v['ms'], v['gb_per_s_sent']) for k, v in d['cases'].items()})" "$name"
done
[ "${A2A_ONLY:-0}" = 1 ] && exit 0
if [ "${BENCH:-1}" = 1 ]; then
timeout "${SP_TIMEOUT:-420}" torchrun --nproc-per-node 2 benchmarks/sp_bench.py --model pro --speeds "${SPEEDS:-optimized}" --budget 360 \
    --seconds "${AUDIO_SECONDS:-6}" \
    --attention "$ATTENTION" ${COMPARE:+--compare-attention "$COMPARE"} ${PRIORITY:+--compare-priority} ${NO_PARTS:+--no-parts} \
    ${NO_ONE_GPU:+--no-one-gpu} \
    ${NCCL_ENV:+--compare-nccl-env "$NCCL_ENV"} \
    --trace "$OUT/traces" --audio .device/shared/media/audio/speech_en_two_speakers_16k_30s.wav --json "$OUT/sp.json" \
    > "$OUT/sp.log" 2>&1
echo "sp_bench rc=$?"
python3 - "$OUT/sp.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["models"]["pro"]
print({k: v for k, v in d.get("parts", {}).items() if not k.startswith("profile")})
for speed in [k for k in d if k.startswith("optimized")]:
    runs = {k: v for k, v in d.get(speed, {}).items() if k.startswith("gpus_")}
    for gpus, entry in runs.items():
        print(speed, gpus, {k: v for k, v in entry.items() if k not in ("profile_stream", "trace")})
    one = runs.get("gpus_1", {}).get("chunk_ms")
    for gpus, entry in runs.items():
        if one and gpus != "gpus_1" and entry.get("chunk_ms"):
            print(f"{speed} {gpus}: {entry['chunk_ms']} ms per chunk against {one} on 1 GPU = {one / entry['chunk_ms']:.3f}x;"
                  f" 1.7x needs <= {one / 1.7:.1f} ms")
PY
for trace in "$OUT"/traces/*.json.gz; do  # what paced each chunk: DiT-to-DiT periods, the loop's waits, long host calls
    [ -f "$trace" ] && python3 benchmarks/trace_stages.py "$trace" 2>/dev/null \
        | python3 -c "import json,sys; print(sys.argv[1], json.dumps(json.load(sys.stdin)['pacing']))" "$(basename "$trace")"
done
fi
if [ "${CODE:-0}" = 1 ]; then  # Inductor's generated code of the graphs with all-to-alls (the sequence-parallel blocks)
    grep -l "all_to_all_single" /tmp/torchinductor_*/*/*.py 2>/dev/null | head -20 | tar czf "$OUT/code.tgz" -T -
fi
if [ "${TEST:-1}" = 1 ]; then  # (an `if`, so that TEST=0 does not end the script with status 1)
    timeout "${TEST_TIMEOUT:-400}" python3 -m pytest -x -q -p no:cacheprovider tests/parallel/test_gpu_sp.py -k "pro-$ATTENTION or pro-None" 2>&1 | tail -3
fi
