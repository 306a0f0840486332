#!/bin/bash
# One device call: build this tree, then profile the layer and the dense MLP side by side at
# every shape of the performance targets above decode size (issue 4: T = 512, 4096, 16384 at the
# three (H, I), E = 16, r = 64, LoRA dropout 0.05) and at T = 16, and write the table of where
# the layer's time beyond the dense MLP's goes (bench/breakdown.py). Output under $OUT
# (breakdown.jsonl, breakdown.md, check.log).
#   device: OUT=$OUT bash bench/breakdown.sh          (SKIP_BUILD=1: use the installed build)
source "$(dirname "$0")/device_common.sh"
device_setup /tmp/breakdown
[ "${SKIP_BUILD:-0}" = 1 ] || build_and_check
J=$(realpath -m "$OUT")/breakdown.jsonl  # (absolute: profile_step runs in bench/)
prof() { step 90 "profile $*" bash -c "cd bench && python3 profile_step.py --dense --reps 20 --json $J $*"; }
# (In the order of what matters most, each shape's records appended as it finishes: a call cut
# short still returns the shapes it got to.)
shapes() { prof --H 4096 --I 11008 --T $1; prof --H 4096 --I 14336 --T $1; prof --H 2048 --I 5632 --T $1; }
shapes 4096
prof --T 4096 --E 16
prof --T 4096 --r 64
for T in 16384 512 16; do shapes $T; done
prof --T 4096 --dropout 0.05
python3 bench/breakdown.py $J | tee $OUT/breakdown.md
