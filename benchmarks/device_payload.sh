#!/bin/bash
# Makes the ignored .device/ folder that the device calls carry (speed_device.sh, sp_device.sh; device_env.sh reads
# it), on a fresh checkout, in one go. Each part is skipped where it is already there.
#   bash benchmarks/device_payload.sh                       # wheels + the slim copy of ../shared
#   FA3_SRC=DIR bash benchmarks/device_payload.sh           # + FlashAttention-3's sources, from a flash-attention
#                                                           #   checkout with csrc/cutlass (or a folder holding
#                                                           #   hopper/ and cutlass/include/)
#   CONV3D=1 bash benchmarks/device_payload.sh              # + the CUTLASS convolution library (nvcc and the
#                                                           #   nvidia-cutlass wheel; ~15 min on 2 cores)
# Carry [".device/whl", ".device/shared", ".device/fa3", ".device/conv3d"] (~25 MB with the tree's ~26 MB: under the
# 64 MiB a call takes). FlashAttention-3 is then built on the device (`speed_device.sh fa3`, ~90 s) and its $OUT/fa3
# copied to .device/fa3/built (add an empty flash_attn_3/__init__.py: empty files do not come back).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
mkdir -p .device

# The device image has torch and transformers but not these (Python 3.12 wheels; the versions this repo is tested with).
if ! ls .device/whl/diffusers-*.whl >/dev/null 2>&1; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        -d .device/whl "diffusers==${DIFFUSERS:-0.42.1}" "soxr==${SOXR:-1.1.0}" "torchao==${TORCHAO:-0.17.0}"
fi

# What the benchmarks and GPU tests read from ../shared (which does not travel): the speech and the portraits.
if [ ! -d .device/shared/media/audio ]; then
    [ -d "$SHARED/media/audio" ] || { echo "error: no shared media at $SHARED (set SHARED)" >&2; exit 2; }
    mkdir -p .device/shared/media
    cp -r "$SHARED/media/audio" "$SHARED/media/portraits" .device/shared/media/
    chmod -R u+w .device/shared
fi

# FlashAttention-3's hopper/ and CUTLASS's include/ (the submodule's commit), xz-packed (~1.1 MB).
if [ -n "${FA3_SRC:-}" ] && [ ! -f .device/fa3/fa3src.tar.xz ]; then
    cutlass="$FA3_SRC/csrc/cutlass/include"; [ -d "$cutlass" ] || cutlass="$FA3_SRC/cutlass/include"
    [ -d "$FA3_SRC/hopper" ] && [ -d "$cutlass" ] || { echo "error: no hopper/ and CUTLASS include/ in $FA3_SRC" >&2; exit 2; }
    tmp=$(mktemp -d)
    mkdir -p "$tmp/fa3src/cutlass" .device/fa3
    cp -r "$FA3_SRC/hopper" "$tmp/fa3src/" && cp -r "$cutlass" "$tmp/fa3src/cutlass/"
    tar cf - -C "$tmp" fa3src | xz -9 > .device/fa3/fa3src.tar.xz.part && mv .device/fa3/fa3src.tar.xz.part .device/fa3/fa3src.tar.xz
    rm -rf "$tmp"
fi

# Built again where missing or where this checkout refuses it (built by an older flashhead: another C interface).
LIB=.device/conv3d/libflashhead_conv3d_sm90.so
if [ -n "${CONV3D:-}" ] && ! PYTHONPATH=src python3 -c "from flashhead.models.vae.cutlass_conv import Conv3dLibrary as L; L('$LIB')" \
        2>/dev/null; then
    PYTHONPATH=src python3 -m flashhead.models.vae.cutlass_conv build --dest "$LIB" \
        --jobs "${JOBS:-2}"
fi
du -sh .device/* 2>/dev/null
