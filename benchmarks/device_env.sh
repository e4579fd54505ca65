# Sourced by the device scripts of this folder (sp_device.sh, speed_device.sh): the carried wheels (diffusers, soxr,
# torchao; the device image has none of them) into /tmp/site, and the environment the benchmarks and GPU tests
# expect (the carried copy of ../shared, which does not travel to the device by itself).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl
# The server's packages (FastAPI, starlette, pydantic, uvicorn, python-multipart, websockets), where carried: for
# `speed_device.sh serve_cold`. Here, once (the versions this checkout's tests run with):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .device/serve_whl fastapi starlette pydantic pydantic_core annotated-types typing-inspection uvicorn \
#     python-multipart websockets typing_extensions opentelemetry-api   (~3 MB; FastAPI imports OpenTelemetry's API)
[ -d .device/serve_whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .device/serve_whl/*.whl
# PyAV (the bench's video encode stage), where carried: its wheel unpacked and xz-packed (24 MB instead of 35), because
# the wheel with ../shared and the rest is over the 64 MiB a call carries. Here, once:
#   mkdir -p .device/av && pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d /tmp av==19.0.2
#   (mkdir /tmp/avx && cd /tmp/avx && unzip -q /tmp/av-19.0.2-*.whl && tar cf - . | xz -9e) > .device/av/av.tar.xz
# and carry .device/av with a slim .device/audio (the bench's speech) instead of .device/shared.
[ -f .device/av/av.tar.xz ] && tar xJf .device/av/av.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:src:tests PYTHONUNBUFFERED=1 FLASHHEAD_SHARED=.device/shared
# FlashAttention-3 for attention=fa3, where carried: sources to build (benchmarks/build_fa3.py, speed_device.sh fa3)
# and, once built and brought back, the built folder (.device/fa3/built: flash_attn_interface.py & co.).
[ -f .device/fa3/fa3src.tar.xz ] && [ ! -d /tmp/fa3src ] && tar xJf .device/fa3/fa3src.tar.xz -C /tmp
[ -d .device/fa3/built ] && export PYTHONPATH=$PYTHONPATH:$PWD/.device/fa3/built
# The CUTLASS convolutions for vae_cutlass_conv, where carried: built here (nvcc and the nvidia-cutlass wheel's headers;
# `python -m flashhead.models.vae.cutlass_conv build --dest .device/conv3d/libflashhead_conv3d_sm90.so`, ~5 min on 2
# cores), since the library needs neither torch headers nor a GPU to compile.
# A library chosen by the caller (e.g. an experiment's, FLASHHEAD_CONV3D_LIB=$PWD/.device/conv3d_exp/...) is kept.
[ -z "${FLASHHEAD_CONV3D_LIB:-}" ] && [ -f .device/conv3d/libflashhead_conv3d_sm90.so ] \
    && export FLASHHEAD_CONV3D_LIB=$PWD/.device/conv3d/libflashhead_conv3d_sm90.so
