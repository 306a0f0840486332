#!/bin/bash
# One device call for a large-T change (bench/NOTES.md v11): with BASE set to another source
# tree (a copy of main, carried to the device), build it and run bench/run.py's rows at
# T = 512, 4096 and 16384; then build this tree, run the same rows, and T = 4096 once more
# (run.py's run-to-run spread); then the layer and decode tests. Output under $OUT
# (base_large/, bench_large/, bench_4096_again/ and check.log).
#   device: OUT=$OUT BASE=.ab/base bash bench/large_ab.sh
source "$(dirname "$0")/device_common.sh"
device_setup /tmp/large_ab
if [ -n "${BASE:-}" ]; then
  step 300 "build $BASE" python3 -m pip install --no-build-isolation --no-deps "$BASE" -q
  step 120 "base bench_large" python3 bench/run.py --tokens 512 4096 16384 --reps 30 --out $OUT/base_large
fi
build_and_check
step 120 bench_large python3 bench/run.py --tokens 512 4096 16384 --reps 30 --out $OUT/bench_large
step 120 "bench 4096 again" python3 bench/run.py --tokens 4096 --reps 30 --out $OUT/bench_4096_again
step 150 tests pytest -q tests/test_decode.py tests/test_layer.py
grep -E "^=== |passed|failed|Error" $LOG | tail -30
