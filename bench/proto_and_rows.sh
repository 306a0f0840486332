#!/bin/bash
# One device call (bench/NOTES.md v13): build this tree (incremental where the machine still
# has its build/), measure the fused-GEMM route's prototype (bench/fused_gu_proto.py: a Triton
# kernel with the frozen gate / up GEMMs and the MoE SwiGLU in one, beside cuBLAS, the dense
# MLP and this tree's layer), then run.py's rows at T = 4096 and 16384 and the layer tests.
# Output under $OUT (proto.json, bench_rows/, check.log).
#   device: OUT=$OUT bash bench/proto_and_rows.sh
source "$(dirname "$0")/device_common.sh"
device_setup /tmp/proto_and_rows
build_and_check
step 240 "fused-GEMM route prototype" python3 bench/fused_gu_proto.py --json $OUT/proto.json
[ "${SKIP_ROWS:-0}" = 1 ] || step 150 "run.py rows" python3 bench/run.py --tokens 4096 16384 --reps 30 --out $OUT/bench_rows
[ "${SKIP_ROWS:-0}" = 1 ] || step 150 tests pytest -q tests/test_decode.py tests/test_layer.py
grep -E "^=== |passed|failed|Error|ratio" $LOG | tail -30
