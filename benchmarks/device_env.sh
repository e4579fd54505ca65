# Sourced by the device scripts of this folder (sp_device.sh, speed_device.sh): the carried wheels (diffusers, soxr,
# torchao; the device image has none of them) into /tmp/site, and the environment the benchmarks and GPU tests
# expect (the carried copy of ../shared, which does not travel to the device by itself).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl
export PYTHONPATH=/tmp/site:src:tests PYTHONUNBUFFERED=1 FLASHHEAD_SHARED=.device/shared
