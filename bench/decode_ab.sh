#!/bin/bash
# One device call for the decode path's variants (bench/NOTES.md v8, v8b, v9): build for
# sm_90a, the crash checks, the decode tests (every MIXLORA_DECODE_FLAGS value),
# decode_micro.py under each value (0: one stream; 1: the shrink on a side stream beside the
# G and U GEMMs, the default); with BASE set to another source tree (a copy of an earlier
# version, carried to the device), decode_micro.py of that build first, so both versions run
# in one call; then profiles at T = 16, 8 and 1, test_cuda.py and the decode rows of
# bench/run.py. Everything goes to $OUT/check.log, so a call cut short still returns what ran.
#   device: OUT=$OUT [BASE=.ab/base] bash bench/decode_ab.sh
source "$(dirname "$0")/device_common.sh"
device_setup /tmp/decode_ab
if [ -n "${BASE:-}" ]; then
  step 400 "build $BASE" python3 -m pip install --no-build-isolation --no-deps "$BASE" -q
  step 60 "decode_micro $BASE" bash -c "cd bench && python3 decode_micro.py --T 1 4 8 16"
fi
build_and_check
# The crash of v6 / v7 (an error raised by our ops killed the process) and its link fix.
step 90 bad_inputs pytest -q tests/test_kernels_cpu.py tests/test_layer.py -k "mismatched or bad_inputs or bad_dropout"
step 150 test_decode pytest -q -x tests/test_decode.py
for f in 1 0; do
  step 60 "decode_micro flags=$f" env MIXLORA_DECODE_FLAGS=$f bash -c "cd bench && python3 decode_micro.py --T 1 4 8 16"
done
step 60 "profile T=16" bash -c "cd bench && python3 profile_step.py --T 16"
step 60 "profile T=8" bash -c "cd bench && python3 profile_step.py --T 8"
step 60 "profile T=1" bash -c "cd bench && python3 profile_step.py --T 1"
step 150 test_cuda pytest -q tests/test_cuda.py
step 120 bench_decode python3 bench/run.py --tokens 1 8 16 --out $OUT/bench_decode
grep -E "^=== |passed|failed|error|Error" $LOG | tail -40
