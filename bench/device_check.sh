#!/bin/bash
# One device call (bench/NOTES.md v7): build for sm_90a; the error-path tests first (the crash
# of v6 / v7 and its link fix in setup.py: libstdc++ linked as the shared library); the decode
# path's tests and measurements (decode_micro.py, the decode rows of run.py); test_cuda.py;
# profiles of decode steps.
# Everything goes to $OUT/check.log (the device tool's output folder; /tmp/device_check
# elsewhere; the tool brings back at most 8 files), so a call cut short still returns what ran.
#   device: bash bench/device_check.sh
source "$(dirname "$0")/device_common.sh"
device_setup /tmp/device_check
build_and_check
step 60 bad_inputs pytest -q tests/test_kernels_cpu.py -k "bad_inputs or bad_dropout"
step 120 test_layer pytest -q -x tests/test_layer.py
step 180 test_decode pytest -q tests/test_decode.py
step 120 decode_micro bash -c "cd bench && python3 decode_micro.py --T 1 8 16"
step 300 bench_decode python3 bench/run.py --tokens 1 8 16 --out $OUT/bench_decode
step 300 test_cuda pytest -q tests/test_cuda.py
step 60 profile_T8 bash -c "cd bench && python3 profile_step.py --T 8"
step 60 profile_T8_2048 bash -c "cd bench && python3 profile_step.py --T 8 --H 2048 --I 5632"
step 60 profile_T8_14336 bash -c "cd bench && python3 profile_step.py --T 8 --I 14336"
# The summary lines (the whole log comes back as a file).
grep -E "^=== |passed|failed|error|Error" $LOG | tail -40
