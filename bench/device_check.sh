#!/bin/bash
# One device call (bench/NOTES.md v7): build for sm_90a, the layer tests on the device's torch
# (the v6 crash check), the decode path's tests, its measurements (decode_micro.py and the
# decode rows of run.py), test_cuda.py, the T = 8 profile. Logs go to $OUT (the device tool's
# output folder; /tmp/device_check elsewhere), so a call cut short still returns what it ran.
#   device: bash bench/device_check.sh
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch;print(torch.__version__)"
( time MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a python3 -m pip install --no-build-isolation --no-deps . -q ) > $OUT/build.log 2>&1 || { tail -50 $OUT/build.log; exit 1; }
tail -3 $OUT/build.log
python3 -m pytest -q tests/test_layer.py > $OUT/test_layer.log 2>&1; tail -3 $OUT/test_layer.log
python3 -m pytest -q tests/test_decode.py > $OUT/test_decode.log 2>&1; tail -30 $OUT/test_decode.log
(cd bench && python3 decode_micro.py --T 1 8 16) > $OUT/decode_micro.txt 2>&1; cat $OUT/decode_micro.txt
python3 bench/run.py --tokens 1 8 16 --out $OUT/bench_decode > $OUT/bench_decode.txt 2>$OUT/bench_decode.err; tail -14 $OUT/bench_decode.txt; tail -3 $OUT/bench_decode.err
python3 -m pytest -q tests/test_cuda.py > $OUT/test_cuda.log 2>&1; tail -3 $OUT/test_cuda.log
(cd bench && python3 profile_step.py --T 8) > $OUT/profile_T8.txt 2>&1; head -30 $OUT/profile_T8.txt
