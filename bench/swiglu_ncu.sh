#!/bin/bash
# The large-T SwiGLU kernels, measured in one device call after a build (bench/NOTES.md v11):
# swiglu_micro.py (CUDA events and per-kernel times at the SPEC shape), profile_step.py
# --T 4096 (where the layer step's GPU time goes), then ncu on one call of the forward and one
# of the backward's pass 1 (--clock-control none; the SourceCounters page per SASS
# instruction as CSV, for reading offline). Output under $OUT; appends to $OUT/check.log.
#   device (after a build): OUT=$OUT bash bench/swiglu_ncu.sh
source "$(dirname "$0")/device_common.sh"
OUT=${OUT:-/tmp/swiglu_ncu}
mkdir -p "$OUT"
LOG=$OUT/check.log
export PYTHONUNBUFFERED=1
step 90 swiglu_micro bash -c "cd bench && python3 swiglu_micro.py --reps 30"
step 90 "profile T=4096" bash -c "cd bench && python3 profile_step.py --T 4096 --reps 20"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for k in ${KERNELS:-moe_swiglu_mma_kernel moe_swiglu_bwd_mma_kernel}; do
  step 150 "ncu $k" "$NCU" --clock-control none -k "regex:$k" -c 1 \
    --section SourceCounters --section WarpStateStats --section SchedulerStats \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy \
    --section LaunchStats -f -o "$OUT/$k" \
    bash -c "cd bench && python3 swiglu_micro.py --reps 2 --no-profile"
  step 60 "ncu details $k" "$NCU" --import "$OUT/$k.ncu-rep" --print-details all
  ( "$NCU" --import "$OUT/$k.ncu-rep" --page source --print-source sass --csv > "$OUT/$k.sass.csv" ) 2>> "$LOG"
done
grep -E "^=== " $LOG | tail -20
