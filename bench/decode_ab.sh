#!/bin/bash
# One device call for the decode path's variants (bench/NOTES.md v8): build for sm_90a, the
# crash checks, the decode tests (every variant), then decode_micro.py under each
# MIXLORA_DECODE_FLAGS value (0: one stream; 1: the shrink on a side stream beside the G and U
# GEMMs, the default), the decode rows of bench/run.py (default), profiles at T = 16 (default
# and 0) and T = 8, and test_cuda.py. (v8's prefetch variant, bit 2, is in git: 4e11b06.)
# Everything goes to $OUT/check.log, so a call cut short still returns what ran.
#   device: OUT=$OUT bash bench/decode_ab.sh
source "$(dirname "$0")/device_common.sh"
device_setup /tmp/decode_ab
build_and_check
# The crash of v6 / v7 (an error raised by our ops killed the process) and its link fix.
step 90 bad_inputs pytest -q tests/test_kernels_cpu.py tests/test_layer.py -k "mismatched or bad_inputs or bad_dropout"
step 150 test_decode pytest -q -x tests/test_decode.py
for f in 1 0; do
  step 90 "decode_micro flags=$f" env MIXLORA_DECODE_FLAGS=$f bash -c "cd bench && python3 decode_micro.py --T 1 4 8 16"
done
step 120 bench_decode python3 bench/run.py --tokens 1 8 16 --out $OUT/bench_decode
step 60 "profile T=16" bash -c "cd bench && python3 profile_step.py --T 16"
step 60 "profile T=16 flags=0" env MIXLORA_DECODE_FLAGS=0 bash -c "cd bench && python3 profile_step.py --T 16"
step 60 "profile T=8" bash -c "cd bench && python3 profile_step.py --T 8"
step 200 test_cuda pytest -q tests/test_cuda.py
grep -E "^=== |passed|failed|error|Error" $LOG | tail -40
