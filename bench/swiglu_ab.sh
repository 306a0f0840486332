#!/bin/bash
# One device call for a change to the large-T SwiGLU kernels (bench/NOTES.md v12): build this
# tree, run tests/test_cuda.py (unless SKIP_TEST_CUDA=1) and measure it; then, with BASE set
# to another source tree (a copy of main, carried to the device), build that and measure it
# the same way (this tree first: if the call runs out of time, the tests and the change's
# numbers are in). Measured per build: swiglu_micro.py at r = 16 and r = 64 (CUDA events and
# per-kernel times, T = 4096, I = 11008, E = 8, k = 2, bf16) and profile_step.py --T 4096 at
# r = 16 and r = 64 (the layer step's kernels). With BREAKDOWN=1, bench/breakdown.sh of this
# build follows its own measurements (before BASE's build: a call cut short keeps the shapes it
# got to). Output: $OUT/check.log (and breakdown.jsonl / .md).
#   device: OUT=$OUT BASE=.ab/base bash bench/swiglu_ab.sh     (RANKS=16: r = 16 only)
source "$(dirname "$0")/device_common.sh"
device_setup /tmp/swiglu_ab
measure() {  # $1: the build's name in the log
  for r in ${RANKS:-16 64}; do
    step 120 "$1 swiglu_micro r=$r" bash -c "cd bench && python3 swiglu_micro.py --r $r --reps 30"
    step 120 "$1 profile T=4096 r=$r" bash -c "cd bench && python3 profile_step.py --T 4096 --r $r --reps 20"
  done
}
build_and_check
[ "${SKIP_TEST_CUDA:-0}" = 1 ] || step 300 test_cuda pytest -q tests/test_cuda.py
measure this
if [ "${BREAKDOWN:-0}" = 1 ]; then OUT=$OUT SKIP_BUILD=1 bash "$(dirname "$0")/breakdown.sh"; fi
if [ -n "${BASE:-}" ]; then
  step 300 "build $BASE" python3 -m pip install --no-build-isolation --no-deps "$BASE" -q
  measure base
fi
grep -E "^=== |passed|failed" $LOG | tail -30
