#!/bin/bash
# Shared by the one-call device scripts (device_check.sh, decode_ab.sh): source it, then
#   device_setup DEFAULT_OUT   the output folder ($OUT, else DEFAULT_OUT), $LOG, the device's
#                              name and torch's version into the log, the build's settings;
#   step SECONDS TITLE CMD...  run CMD with a time limit, its output into $LOG;
#   build_and_check            build this tree for sm_90a, import it, and log how the extension
#                              links the C++ runtime (bench/NOTES.md v7: the shared libstdc++).
device_setup() {
  OUT=${OUT:-$1}
  mkdir -p "$OUT"
  LOG=$OUT/check.log
  export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$LOG"
  python3 -c "import torch;print(torch.__version__)" | tee -a "$LOG"
}

step() {
  local limit=$1 title=$2
  shift 2
  echo "=== $title ($(date +%T))" | tee -a "$LOG"
  ( timeout "$limit" "$@" ) >> "$LOG" 2>&1
  echo "=== $title: exit $? ($(date +%T))" | tee -a "$LOG"
}

build_and_check() {
  step 400 build python3 -m pip install --no-build-isolation --no-deps . -q
  (cd /tmp && python3 -c "import mixlora_ext") >> "$LOG" 2>&1 || { tail -60 "$LOG"; exit 1; }
  local so
  so=$(cd /tmp && python3 -c "import mixlora_ext, os; print(os.path.dirname(mixlora_ext.__file__))")/_C.abi3.so
  { ldd "$so" | grep stdc; echo "std::locale symbols defined in _C: $(nm -C --defined-only "$so" | grep -c 'std::locale')"; } | tee -a "$LOG"
}
