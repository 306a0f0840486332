"""v19 with parts of its epilogue left out (bench/fused_bwd_wgmma_proto.cu's V19_ABLATE), timed at
one shape beside cuBLAS's dhbar GEMM: where the epilogue's time goes (bench/NOTES.md v19).
    device: timeout 200 python3 bench/v19_ablate.py [--T 4096 --H 4096 --I 11008]"""
import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fused_bwd_wgmma_proto as v19  # noqa: E402
from timing import call_timer, interleaved_medians  # noqa: E402

NAMES = {0: "v19", 1: "gemm_and_dhbar_store_only", 2: "no_dz_products", 3: "no_delta_mmas"}


def main():
    a = argparse.ArgumentParser(description=__doc__)
    a.add_argument("--T", type=int, default=4096)
    a.add_argument("--H", type=int, default=4096)
    a.add_argument("--I", type=int, default=11008)
    a.add_argument("--reps", type=int, default=20)
    a = a.parse_args()
    base = list(v19.NVCC)
    dirs = {n: f"/tmp/v19_ablate_{n}" for n in NAMES}
    builds = {}
    for n, d in dirs.items():  # the four builds at once (build() below then finds them made)
        os.makedirs(d, exist_ok=True)
        cmd = base[:-1] + [f"-DV19_ABLATE={n}", base[-1], "-shared", "-Xcompiler", "-fPIC", "-o",
                           os.path.join(d, "fused_bwd_wgmma_proto.so")]
        builds[n] = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for n, proc in builds.items():
        err = proc.communicate()[1]
        if proc.returncode != 0:
            raise SystemExit(f"nvcc failed for V19_ABLATE={n}: {err[-2000:]}")
        with open(os.path.join(dirs[n], "fused_bwd_ptxas.json"), "w") as f:
            json.dump(v19.ptxas_report(err), f)
    p = v19.Problem(a.T, a.H, a.I, "cuda")
    op = v19.prepare(p)
    fns = {}
    for n, name in NAMES.items():
        so = v19.build(dirs[n])
        out = v19.empty_outputs(so, op)
        fns[name] = lambda so=so, out=out: v19.fused(so, op, 0, out)
    fns["cublas_dhbar"] = lambda: p.dout @ p.Wd
    got = interleaved_medians(fns, a.reps, call_timer(torch.device("cuda")))
    print(f"v19 ablations T={a.T} H={a.H} I={a.I} (H100 ms): " +
          ", ".join(f"{k} {v:.3f}" for k, v in got.items()), flush=True)


if __name__ == "__main__":
    main()
