#!/bin/bash
# Issue 10 on one GPU (kind nvidia-h200 since session 25; carry .device/whl, .device/shared, .device/fa3): the next
# device calls, each under 10 minutes. Results in $OUT. On a fresh checkout make .device/ first:
# benchmarks/device_payload.sh.
#   bash benchmarks/speed_device.sh decode   # compiled Wan decode, whole and strip, recompile limit 8 vs 128,
#                                            # the graph breaks Dynamo reports, the kernels by kind (~4 min)
#   bash benchmarks/speed_device.sh equiv 1  # the GPU equivalence test for Pro, the switches without compile (~9 min)
#   bash benchmarks/speed_device.sh equiv 2  # ... the compiled ones, all together, FP8, decode_new_only (~6 min)
#   bash benchmarks/speed_device.sh matrix   # the speed matrix, Lite + Pro, with the cold starts (~8 min)
#   bash benchmarks/speed_device.sh ttff     # Pro --optimized with and without early_first_frames (time to the first
#                                            # frame, steady FPS), then the equivalence test of that switch (~9 min)
#   bash benchmarks/speed_device.sh blocks   # one compiled DiT block (Lite, Pro) by Inductor mode, with and without
#                                            # the fused GELU; the compiled colour correction by variant (~5 min)
#   bash benchmarks/speed_device.sh ab lite "compile_mode=max-autotune-no-cudagraphs"
#                                            # `bench --optimized` without and with the switches (~2 x 3 min)
#   bash benchmarks/speed_device.sh streams lite 24  # `bench --optimized --streams 24`: batched rounds by stage
#                                            # (SWITCHES=fp8=on: with more switches)
#   bash benchmarks/speed_device.sh batched lite 20  # one block at batch 1 and 20, then `streams lite 20` with the
#                                            # batched round's trace split by stage, kernel by kernel (<= 9 min)
#   bash benchmarks/speed_device.sh audio    # wav2vec2 alone: float32, TF32, float32 from a CUDA graph (~1 min)
#   bash benchmarks/speed_device.sh convs    # the Wan decode's convolutions one by one, cuDNN's first 10 algorithms
#                                            # against all of them (two processes, ~1.5 min)
#   bash benchmarks/speed_device.sh upsample # the Wan decoder's upsampling layers, stock against sub-pixel, alone and
#                                            # in three compiled decodes, with their kernels (~4 min)
#   bash benchmarks/speed_device.sh convout  # the decoder's 96 -> 3 output convolution, cuDNN against the GEMM + tap
#                                            # sum, alone and in two compiled decodes; then, with EQUIV_K, those GPU
#                                            # equivalence cases (~4 min + the tests)
#   bash benchmarks/speed_device.sh fa3      # build FlashAttention-3 (forward, head dim 128, bf16, sm_90a) from the
#                                            # carried sources, check it, time it against cuDNN; the built folder
#                                            # comes back in $OUT/fa3 (carry it as .device/fa3/built later; ~5 min?)
#   bash benchmarks/speed_device.sh norms    # one compiled Pro DiT block with Inductor's reductions and with the
#                                            # 1,536-channel norms persistent (block_bench --persistent-rows; ~2 min;
#                                            # NORM_HINTS=inner,default: a third run, other reduction hints too)
#   bash benchmarks/speed_device.sh rope     # one compiled Pro block with the float64 and the float32 (rope_fp32)
#                                            # RoPE rotation, its kernels (~2 min)
#   bash benchmarks/speed_device.sh qkrope   # the fused q / k norm + RoPE kernel: its GPU test (values, one kernel,
#                                            # time against Inductor's), one compiled block with and without it (Lite
#                                            # batch 20, Pro batch 1), then the GPU equivalence cases (<= 9 min)
#   bash benchmarks/speed_device.sh fold     # cross_attn_fold: one compiled block with and without it (Lite batch
#                                            # 20, Pro 1), its GPU equivalence cases, then `ab pro` (NO_AB=1: not)
#   bash benchmarks/speed_device.sh cutlass  # the Wan decode's convolutions, cuDNN (first 32 algorithms) against every
#                                            # tile of the carried CUTLASS library (.device/conv3d), with their errors
#   bash benchmarks/speed_device.sh serve_cold pro  # the server's cold start end to end (serve_cold_start.py): a
#                                            # fresh `flashhead serve --optimized` to the first frame at a WebSocket
#                                            # client, twice (the second with the first's compile artefacts); carry
#                                            # .device/serve_whl (device_env.sh); the portrait uncropped (no
#                                            # MediaPipe there); MAX_BATCH (default 1) batch sizes warmed (<= 9 min)
#   bash benchmarks/speed_device.sh cold pro # cold start of --optimized: a fresh process with empty compile
#                                            # caches, then one with the caches it left (lite or pro, <= 9 min);
#                                            # COLD_VARIANTS adds warm-cache ones (switches changed, or profile)
set -uo pipefail
WHAT=${1:?usage: speed_device.sh decode|equiv|matrix|ttff|blocks|ab|streams|batched|audio|convs|cutlass|upsample|convout|fa3|norms|rope|qkrope|fold|cold|serve_cold}
OUT=${OUT:-/tmp/speed-out}
mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"

# One compiled block (the preset's norms and RoPE: block_bench --rope-fp32 BASE_FLAGS) without and with FLAG, at Lite
# batch 20 and Pro batch 1; KEY: the JSON field that names the switch, SUFFIX: the JSON files' name for "with".
block_ab() {
    local flag=$1 key=$2 suffix=$3 top=$4 base=${5:-}
    for case in "lite 20" "pro 1"; do
        set -- $case
        for with in "" "$flag"; do
            timeout 150 python3 benchmarks/block_bench.py --model "$1" --batch "$2" --persistent-rows 2048 \
                --persistent-hints inner,default --rope-fp32 $base $with 2>>"$OUT/block.err" | tail -1 \
                | tee "$OUT/block_$1_b$2${with:+_$suffix}.json" | python3 -c "import json,sys; d=json.load(sys.stdin); print({k: d[k] for k in ('model', 'batch', '$key', 'block_ms_in_cuda_graph', 'mfu_in_cuda_graph')}, d['kernels_us'][:$top])"
        done
    done
}

# The GPU equivalence cases matching the -k expression $1 (EQUIV_K overrides it), within EQUIV_TIMEOUT or $2 seconds.
equiv_cases() {
    timeout "${EQUIV_TIMEOUT:-$2}" python3 -m pytest -q -s -rA -p no:cacheprovider tests/pipeline/test_gpu_speed.py \
        -k "${EQUIV_K:-$1}" > "$OUT/equiv.log" 2>&1
    echo "equiv rc=$?"
    grep -oE '\{"model".*|^(PASSED|FAILED|SKIPPED|E ).*|[0-9]+ (passed|failed).*' "$OUT/equiv.log" | tail -20
}

case "$WHAT" in
decode)
    TORCH_LOGS=graph_breaks timeout 540 python3 benchmarks/wan_decode_bench.py --variants stock --compiled --profile \
        --json "$OUT/wan_decode.json" > "$OUT/decode.log" 2>&1
    echo "rc=$?"
    grep -E "^stock|^compiled" "$OUT/decode.log"
    python3 -c "import json,sys; c=json.load(open(sys.argv[1]))['compiled']; [print(k, json.dumps(c[k])) for k in c if k.startswith('profile')]" "$OUT/wan_decode.json"
    # Each distinct graph-break reason once, with its place in the code.
    grep -A4 "Graph break" "$OUT/decode.log" | grep -E "Reason|File" | sed 's/.*\] //' | sort | uniq -c | sort -rn | head -20
    ;;
convs)
    # CONV_INDUCTOR=N: the last run also times Inductor's max-autotune choice (Triton templates against cuDNN) for
    # the N convolutions with the most time per chunk and the narrow conv_out (CONV_LIMITS=0 for that run alone).
    for limit in ${CONV_LIMITS:-10 0}; do
        extra=""; [ "$limit" = 0 ] && [ -n "${CONV_INDUCTOR:-}" ] && extra="--inductor $CONV_INDUCTOR"
        [ -n "${CONV_SEARCH_ONLY:-}" ] && extra="--search-only"  # CONV_LIMITS="10 16 24 32 0": the search's cost
        timeout "${CONV_TIMEOUT:-200}" python3 benchmarks/conv_algos.py --limit $limit $extra --json "$OUT/conv$limit.json" \
            > "$OUT/conv$limit.log" 2>&1
        echo "benchmark_limit $limit rc=$?"
        grep '"inductor_ms"' "$OUT/conv$limit.log" | cut -c1-400
        tail -1 "$OUT/conv$limit.log"
    done
    [ -f "$OUT/conv10.json" ] && python3 benchmarks/plot_conv_algos.py "$OUT/conv10.json" "$OUT/conv0.json" \
        --out "$OUT/wan-decode-convs.png"
    ;;
cutlass)
    [ -n "${FLASHHEAD_CONV3D_LIB:-}" ] || { echo "error: carry .device/conv3d with the built library" >&2; exit 2; }
    timeout "${CONV_TIMEOUT:-300}" python3 benchmarks/conv_algos.py --limit 32 --search-only --cutlass \
        --json "$OUT/conv_cutlass.json" > "$OUT/conv_cutlass.log" 2>&1
    echo "rc=$?"
    python3 -c "
import json, sys
for r in json.load(open(sys.argv[1]))['convolutions']:
    print(r['weight'], r['input'], r['count'], 'cudnn', r['ms'], r['tflops'], 'cutlass', r.get('cutlass_best'), r.get('cutlass_ms'),
          r.get('cutlass_tflops'), 'err', '%.2e' % r.get('cudnn_max_err_vs_fp32', 0), {n: round(t['ms'], 3) for n, t in r.get('cutlass_tiles', {}).items()})
" "$OUT/conv_cutlass.json" 2>&1 | cut -c1-400
    tail -1 "$OUT/conv_cutlass.log" | cut -c1-1200
    # The tuning's choice kept in the choices file and taken by the next process without timing (~10 s).
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/models/test_gpu_cutlass_conv.py 2>&1 | tail -3
    ;;
upsample)
    timeout "${UPSAMPLE_TIMEOUT:-400}" python3 benchmarks/upsample_bench.py --profile --json "$OUT/upsample.json" > "$OUT/upsample.log" 2>&1
    echo "rc=$?"
    grep -E "^\{|^per chunk|^off|^transpose|^phases" "$OUT/upsample.log" | cut -c1-400
    ;;
convout)
    timeout "${CONVOUT_TIMEOUT:-300}" python3 benchmarks/conv_out_bench.py --profile --json "$OUT/conv_out.json" > "$OUT/conv_out.log" 2>&1
    echo "rc=$?"
    grep -E "^\{|^per chunk|^(off|on) " "$OUT/conv_out.log" | cut -c1-600
    if [ -n "${EQUIV_K:-}" ]; then
        timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -q -s -rA -p no:cacheprovider tests/pipeline/test_gpu_speed.py \
            -k "$EQUIV_K" > "$OUT/equiv.log" 2>&1
        echo "equiv rc=$?"
        grep -oE '\{"model".*|^(PASSED|FAILED|SKIPPED|E ).*|[0-9]+ (passed|failed).*' "$OUT/equiv.log" | tail -20
    fi
    ;;
fa3)
    nvcc --version | tail -2
    timeout "${FA3_TIMEOUT:-540}" python3 benchmarks/build_fa3.py --src /tmp/fa3src --dest "$OUT/fa3" --json "$OUT/fa3.json" \
        > "$OUT/fa3.log" 2>&1
    echo "rc=$?"
    grep -E "error|Error|^built|^(pro|lite)_" "$OUT/fa3.log" | head -40
    ls -la "$OUT/fa3" "$OUT/fa3/flash_attn_3" 2>/dev/null
    ;;
equiv)
    # "pro-" and not "pro": -k matches substrings, and "approximate" holds "pro".
    COMPILED="compile_dit or compile_vae or all or decode_new_only or fp8"
    case "${2:-1}" in 1) K="pro- and not ($COMPILED)" ;; *) K="pro- and ($COMPILED)" ;; esac
    K=${EQUIV_K:-$K}  # or any -k expression
    timeout 570 python3 -m pytest -q -s -rA -p no:cacheprovider tests/pipeline/test_gpu_speed.py -k "$K" > "$OUT/equiv.log" 2>&1
    echo "rc=$?"
    grep -oE '\{"model".*|^(PASSED|FAILED|SKIPPED|E ).*|[0-9]+ (passed|failed).*' "$OUT/equiv.log" | tail -40
    ;;
qkrope)
    timeout 120 python3 -m pytest -q -s -rA -p no:cacheprovider tests/models/test_gpu_qk_norm_rope.py > "$OUT/qkrope_test.log" 2>&1
    echo "kernel test rc=$?"
    grep -oE '\{"shape".*\}|^(PASSED|FAILED|E ).*|[0-9]+ (passed|failed).*' "$OUT/qkrope_test.log" | cut -c1-400 | tail -12
    block_ab --fused-qk-rope fused_qk_rope fused 6
    equiv_cases fused_qk_rope 300
    ;;
fold)
    # cross_attn_fold: one compiled block (the preset's norms and RoPE) with and without it (Lite batch 20, Pro
    # batch 1), then its GPU equivalence cases, then the Pro stream without and with it (BENCH_TIMEOUT each).
    block_ab --cross-attn-fold cross_attn_fold fold 8 --fused-qk-rope
    equiv_cases cross_attn_fold 240
    [ -n "${NO_AB:-}" ] || BENCH_TIMEOUT=${BENCH_TIMEOUT:-200} bash "$0" ab pro cross_attn_fold=on
    ;;
matrix)
    timeout 570 python3 benchmarks/speed_matrix.py --out "$OUT" --audio .device/shared/media/audio/speech_en_two_speakers_16k_30s.wav \
        2>&1 | tail -40
    ;;
ttff)
    # A new stream's first frame with its chunk decoded in two pieces, against the whole decode, in one machine's run.
    AUDIO=${AUDIO:-.device/shared/media/audio/speech_en_two_speakers_16k_30s.wav}
    for early in on off; do
        timeout "${BENCH_TIMEOUT:-240}" python3 -m flashhead.cli bench --model pro --optimized --switches "early_first_frames=$early" \
            --audio "$AUDIO" --seconds 10 --json "$OUT/pro_early_$early.json" > "$OUT/pro_early_$early.log" 2>&1
        echo "early_first_frames=$early rc=$?"
        python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['environment'].get('gpu'), {k: d.get(k) for k in ('steady_fps', 'time_to_first_frame_ms', 'stage_ms_per_chunk', 'dit_mfu', 'warmup_seconds', 'peak_gpu_memory_gib')})" "$OUT/pro_early_$early.json"
    done
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -s -rA -p no:cacheprovider tests/pipeline/test_gpu_speed.py \
        -k "${EQUIV_K:-pro- and (early_first_frames or vae_cuda_graphs)}" > "$OUT/equiv.log" 2>&1
    echo "equiv rc=$?"
    grep -oE '\{"model".*|^(PASSED|FAILED|SKIPPED|E ).*|[0-9]+ (passed|failed).*' "$OUT/equiv.log" | tail -20
    ;;
blocks)
    for model in lite pro; do
        for args in "" "--mode max-autotune-no-cudagraphs" "--mode max-autotune-no-cudagraphs --no-fused-gelu"; do
            timeout "${BLOCK_TIMEOUT:-150}" python3 benchmarks/block_bench.py --model $model $args 2>"$OUT/block.err" | tail -1
            echo "block $model $args rc=$?"
        done
    done
    timeout 120 python3 benchmarks/color_bench.py
    ;;
norms)
    # NORM_HINTS=inner,default: a third run with reductions of those hints persistent too (the JSON's "reductions"
    # lists every decision: which norm stays looped, and why).
    for rows in 0 2048 ${NORM_HINTS:+2048h}; do
        hints=inner; [ "$rows" = 2048h ] && { rows=2048; hints=$NORM_HINTS; }
        timeout "${BLOCK_TIMEOUT:-150}" python3 benchmarks/block_bench.py --model "${2:-pro}" --persistent-rows $rows \
            --persistent-hints "$hints" 2>"$OUT/norms.err" | tail -1 | tee "$OUT/norms_${rows}_${hints/,/_}.json" | cut -c1-2500
        echo "persistent-rows $rows hints $hints rc=$?"
    done
    ;;
rope)
    # One compiled Pro block (the preset's norms) with the float64 RoPE rotation and with rope_fp32's float32 one.
    for dtype in fp64 fp32; do
        flag=""; [ $dtype = fp32 ] && flag=--rope-fp32
        timeout "${BLOCK_TIMEOUT:-150}" python3 benchmarks/block_bench.py --model "${2:-pro}" --persistent-rows 2048 \
            --persistent-hints inner,default $flag 2>"$OUT/rope.err" | tail -1 | tee "$OUT/rope_$dtype.json" | cut -c1-2500
        echo "rope $dtype rc=$?"
    done
    ;;
ab)
    # The same model's `bench --optimized` as it is and with each switch set given after the model (one run each),
    # one machine, one call: e.g. `ab pro persistent_norms=off attention=fa3`.
    MODEL=${2:?model}
    : "${3:?switches}"
    AUDIO=${AUDIO:-.device/shared/media/audio/speech_en_two_speakers_16k_30s.wav}
    n=0
    for SW in "" "${@:3}"; do
        name=${MODEL}_base; [ -n "$SW" ] && { n=$((n + 1)); name=${MODEL}_switched$n; }
        timeout "${BENCH_TIMEOUT:-280}" python3 -m flashhead.cli bench --model "$MODEL" --optimized ${SW:+--switches "$SW"} \
            --audio "$AUDIO" --seconds 10 ${BENCH_ARGS:-} --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
        echo "$name ${SW:-(optimized)} rc=$?"
        python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['environment'].get('gpu'), {k: d.get(k) for k in ('steady_fps', 'time_to_first_frame_ms', 'stage_ms_per_chunk', 'dit_ms_per_step', 'dit_mfu', 'warmup_seconds', 'peak_gpu_memory_gib', 'steady_peak_gpu_memory_gib', 'gpu_memory_reserved_gib', 'gpu_memory_held_gib', 'streams')})" "$OUT/$name.json"
    done
    ;;
streams)
    # `bench --optimized --streams N` of one model: one stream, then N batched streams with each batched round's
    # stages and DiT MFU (each batch size compiles its own graphs: one N per call, e.g. `streams lite 24`);
    # SWITCHES: on top of the preset, e.g. SWITCHES=fp8=on (float8 GEMMs at batch 24 are 30,720 tokens long).
    MODEL=${2:?model}; N=${3:?streams}
    AUDIO=${AUDIO:-.device/shared/media/audio/speech_en_two_speakers_16k_30s.wav}
    timeout "${BENCH_TIMEOUT:-540}" python3 -m flashhead.cli bench --model "$MODEL" --optimized --streams "$N" \
        ${SWITCHES:+--switches "$SWITCHES"} --audio "$AUDIO" --seconds 10 --json "$OUT/${MODEL}_streams$N.json" \
        > "$OUT/${MODEL}_streams$N.log" 2>&1
    echo "rc=$?"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['environment'].get('gpu'), {k: d.get(k) for k in ('steady_fps', 'time_to_first_frame_ms', 'time_to_first_frame_more_audio_ms', 'session_open_ms', 'stage_ms_per_chunk', 'dit_mfu', 'warmup_seconds', 'gpu_memory_held_gib')}); print(json.dumps(d.get('streams')))" "$OUT/${MODEL}_streams$N.json"
    ;;
batched)
    # Where a batched round's time goes, kernel by kernel: one compiled block (the preset's norms and RoPE) at batch 1
    # and N (time, MFU, top kernels), then `bench --optimized --streams N --trace`, whose batched round's trace
    # trace_stages.py splits by stage with each stage's biggest kernels (e.g. `batched lite 20`, <= 9 min).
    MODEL=${2:?model}; N=${3:?streams}
    AUDIO=${AUDIO:-.device/shared/media/audio/speech_en_two_speakers_16k_30s.wav}
    for b in 1 "$N"; do
        timeout "${BLOCK_TIMEOUT:-150}" python3 benchmarks/block_bench.py --model "$MODEL" --batch "$b" \
            --persistent-rows 2048 --persistent-hints inner,default --rope-fp32 2>"$OUT/block.err" | tail -1 \
            | tee "$OUT/block_${MODEL}_b$b.json" | cut -c1-1800
        echo "block $MODEL batch $b rc=$?"
    done
    timeout "${BENCH_TIMEOUT:-420}" python3 -m flashhead.cli bench --model "$MODEL" --optimized --streams "$N" \
        --audio "$AUDIO" --seconds 10 --json "$OUT/${MODEL}_streams$N.json" --trace "$OUT/${MODEL}.json.gz" \
        > "$OUT/${MODEL}_streams$N.log" 2>&1
    echo "rc=$?"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['environment'].get('gpu'), {k: d.get(k) for k in ('steady_fps', 'stage_ms_per_chunk', 'dit_mfu')}); print(json.dumps(d.get('streams')))" "$OUT/${MODEL}_streams$N.json"
    for t in "$OUT/${MODEL}.json.gz" "$OUT/${MODEL}.streams$N.json.gz"; do
        python3 benchmarks/trace_stages.py "$t" > "${t%.json.gz}.stages.json" 2>&1
        python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], json.dumps({k: d[k] for k in ('gpu_ms_by_stage', 'devices', 'top_by_stage') if k in d}))" "${t%.json.gz}.stages.json" | cut -c1-6000
    done
    rm -f "$OUT/${MODEL}.json.gz"  # the 4-chunk stream's trace: only its split comes back
    ;;
audio)
    # wav2vec2 alone over the 8 s cache: float32, TF32 GEMMs, float32 replayed from a CUDA graph.
    timeout 90 python3 benchmarks/audio_precision.py .device/shared/media/audio/speech_en_two_speakers_16k_30s.wav \
        2>/dev/null | tail -1
    ;;
serve_cold)
    python3 -c "import fastapi, uvicorn, websockets" 2>/dev/null || { echo "error: carry .device/serve_whl" >&2; exit 2; }
    MODEL=${2:-pro}
    timeout "${SERVE_TIMEOUT:-540}" python3 benchmarks/serve_cold_start.py --model "$MODEL" --random-weights --optimized \
        --device cuda --max-batch "${MAX_BATCH:-1}" --no-crop --timeout 420 --out "$OUT/serve_cold_$MODEL.json" \
        --plot "$OUT/serve_cold_$MODEL.png" --log-dir "$OUT/serve_logs" > "$OUT/serve_cold.log" 2> "$OUT/serve_cold.err"
    echo "rc=$?"
    tail -5 "$OUT/serve_cold.err"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print({k: v for k, v in r.items() if k != 'log_tail'}) for r in d['runs']]" \
        "$OUT/serve_cold_$MODEL.json"
    ;;
cold)
    # The pipeline's cold start (the device image lacks the server's packages: FastAPI, uvicorn, PyAV, mediapipe).
    # COLD_VARIANTS="profile cudnn_search_limit=0": more warm-cache starts after the two (speed_matrix --cold-variants).
    timeout 570 python3 benchmarks/speed_matrix.py --models "${2:-pro}" --cold-only --deadline 540 --out "$OUT" \
        ${COLD_VARIANTS:+--cold-variants $COLD_VARIANTS} 2>&1 | tail -8
    ;;
*) echo "error: decode, equiv, matrix, ttff, blocks, ab, streams, audio, convs, cutlass, upsample, convout, fa3, norms, qkrope, fold, cold or serve_cold, got '$WHAT'" >&2; exit 2 ;;
esac
