"""Our own Hopper GEMM (bench/wgmma_gemm_proto.cu) against cuBLAS: the first gate of the
fused-GEMM route (bench/NOTES.md v13 and "The fused-GEMM route in CUDA"), which needs a mainloop
within ~5% of cuBLAS before a MoE SwiGLU epilogue is worth writing into it.

Builds the .cu with nvcc into a shared library (sm_90a), calls it through ctypes, and for each
shape C [M, N] = A [M, K] @ B [N, K]^T (bf16, fp32 sums) and each variant (0: cooperative,
128 x 256 tiles; 1: ping-pong, 128 x 128 tiles a warpgroup in turn; 2: variant 1 in 2-CTA
clusters sharing each B tile by multicast, for L2's sake): checks C against the fp32
product (error at most 2x cuBLAS's own bf16 error plus a bf16 ulp of the largest |C|, no element
left unwritten: C is NaN before the call, identical bits on a second call), then times it beside
`torch.mm(A, B.t())` (cuBLAS, as nn.Linear calls it) with CUDA events: median of --reps samples
of 5 back-to-back calls each (so that the host's work per call, the tensor maps here and
torch's dispatch there, stays off the GPU's time), ours and cuBLAS's alternating. The shapes:
the gate and up GEMMs of the issue's (H, I) as one GEMM (N = 2 I: Wg and Wu stacked) at
T = 4096, and of 4096 x 11008 at T = 16384.

    device: timeout 120 python3 bench/wgmma_gemm_proto.py [--variants 0 1 2] [--reps 30] [--json F]
    (a wrong barrier protocol hangs rather than fails: run it under a timeout, a variant a process)
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from timing import call_timer, interleaved_medians  # noqa: E402  (bench/timing.py)

CHECK_SHAPES = [(128, 256, 64), (256, 512, 128), (384, 768, 4096), (512, 768, 4096), (1024, 2048, 1024)]
TIME_SHAPES = [  # (M = T, N = 2 I, K = H)
    (4096, 2 * 11008, 4096), (4096, 2 * 14336, 4096), (4096, 2 * 5632, 2048),
    (16384, 2 * 11008, 4096),
]


def build(out_dir):
    lib = os.path.join(out_dir, "wgmma_gemm_proto.so")
    cmd = ["nvcc", "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC",
           "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
           os.path.join(HERE, "wgmma_gemm_proto.cu"), "-o", lib]
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(done.stderr.strip()[-2000:], file=sys.stderr)
    if done.returncode != 0:
        raise SystemExit(f"nvcc failed ({done.returncode}): {' '.join(cmd)}")
    so = ctypes.CDLL(lib)
    so.wgmma_gemm_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3 + [ctypes.c_void_p] + [ctypes.c_int] * 2
    so.wgmma_gemm_bf16.restype = ctypes.c_int
    return so


VARIANTS = {0: "cooperative", 1: "pingpong", 2: "pingpong_cluster"}


def takes(variant, M, N, K):
    """The shapes the launcher takes (wgmma_gemm_bf16's checks)."""
    m_unit, n_unit = {0: (128, 256), 1: (128, 128), 2: (256, 128)}[variant]
    return M % m_unit == 0 and N % n_unit == 0 and K % 64 == 0


def ours(so, A, B, C, variant, max_ctas=0):
    code = so.wgmma_gemm_bf16(A.data_ptr(), B.data_ptr(), C.data_ptr(), A.shape[0], B.shape[0], A.shape[1],
                              torch.cuda.current_stream().cuda_stream, max_ctas, variant)
    if code != 0:
        raise RuntimeError(f"wgmma_gemm_bf16 returned {code}")
    return C


# Where check / diagnose / time_shape run: the GPU; tests/test_bench_fused_gu.py runs them on the
# CPU with `ours` replaced by a product, so that the device call does not find the driver's bugs.
DEV = "cuda"


def inputs(M, N, K):
    A = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    B = torch.randn(N, K, device=DEV, dtype=torch.bfloat16) * K ** -0.5
    return A, B


def check(so, variant, M, N, K):
    A, B = inputs(M, N, K)
    exact = A.float() @ B.float().t()
    C = torch.full((M, N), float("nan"), device=DEV, dtype=torch.bfloat16)
    ours(so, A, B, C, variant)
    again = torch.full_like(C, float("nan"))
    ours(so, A, B, again, variant)
    if DEV == "cuda":
        torch.cuda.synchronize()
    err = (C.float() - exact).abs().max().item()
    cublas_err = (torch.mm(A, B.t()).float() - exact).abs().max().item()
    bound = 2 * cublas_err + exact.abs().max().item() * 2.0 ** -8
    ok = not torch.isnan(C).any().item() and err <= bound and torch.equal(C, again)
    print(f"check {VARIANTS[variant]} M={M} N={N} K={K}: max error {err:.3e} "
          f"(cuBLAS {cublas_err:.3e}, bound {bound:.3e}), repeat identical {torch.equal(C, again)}: "
          f"{'ok' if ok else 'FAILED'}", flush=True)
    return dict(variant=VARIANTS[variant], M=M, N=N, K=K, error=err, cublas_error=cublas_err, bound=bound,
                ok=bool(ok))


def diagnose(so, variant):
    """For a variant whose results are wrong: which element of B each output used. Two row
    blocks (M 256, N 256, K 64: one tile pair of variant 2's cluster) with A one-hot (A[r, k] = 1 at k = r % 64), so C[r, c] = B[c, r % 64];
    B holds its own row index (first run) or K index (second run), both exact in bf16, so each
    output names the (B row, k) it read: the pattern of the wrong ones points at the descriptors,
    the swizzle or the fragment layout. Prints rows 0-15 and 64-79 (the first warp of each
    64-row half) and 128-135 (the second block: variant 2's other CTA), columns 0-7 and 64-71
    (in variant 2, B rows each CTA's producer copied), as "B row/k", wrong ones in brackets."""
    M, N, K = 256, 256, 64  # (two row blocks: variant 2's cluster takes both)
    A = torch.zeros(M, K, device=DEV, dtype=torch.bfloat16)
    A[torch.arange(M), torch.arange(M) % K] = 1
    index_b = [torch.arange(N, device=DEV)[:, None].expand(N, K),
               torch.arange(K, device=DEV)[None, :].expand(N, K)]
    got = []
    for index in index_b:
        C = torch.full((M, N), float("nan"), device=DEV, dtype=torch.bfloat16)
        ours(so, A, index.to(torch.bfloat16).contiguous(), C, variant)
        got.append(C.float().cpu())
    want_row = torch.arange(N).float()[None, :].expand(M, N)
    want_k = (torch.arange(M) % K).float()[:, None].expand(M, N)
    bad = (got[0] != want_row) | (got[1] != want_k)
    print(f"diagnose {VARIANTS[variant]}: {int(bad.sum())} of {M * N} outputs read the wrong element "
          "of B (or none)", flush=True)
    for r in list(range(16)) + list(range(64, 80)) + list(range(128, 136)):
        cells = []
        for c in list(range(8)) + list(range(64, 72)):
            cell = f"{got[0][r, c].item():.0f}/{got[1][r, c].item():.0f}"
            cells.append(f"[{cell}]" if bad[r, c] else cell)
        print(f"  row {r:3d} (k {r % K:2d}): " + " ".join(cells), flush=True)


CALLS = 5  # calls a timed sample: the host's work for one call overlaps the GPU's of the last


def time_shape(so, variants, M, N, K, reps):
    A, B = inputs(M, N, K)
    C = torch.empty(M, N, device=DEV, dtype=torch.bfloat16)

    def repeated(fn):
        def run():
            for _ in range(CALLS):
                fn()
        return run

    fns = {VARIANTS[v]: repeated(lambda v=v: ours(so, A, B, C, v)) for v in variants}
    fns["cublas"] = repeated(lambda: torch.mm(A, B.t()))
    got = {name: ms / CALLS for name, ms in
           interleaved_medians(fns, reps, call_timer(torch.device(DEV))).items()}
    flop = 2 * M * N * K
    row = dict(M=M, N=N, K=K, **{f"{name}_ms": ms for name, ms in got.items()},
               **{f"{name}_tflops": flop / ms / 1e9 for name, ms in got.items()},
               **{f"{VARIANTS[v]}_ratio": got[VARIANTS[v]] / got["cublas"] for v in variants})
    times = ", ".join(f"{name} {ms:.3f} ms ({flop / ms / 1e9:.0f} TFLOP/s)" for name, ms in got.items())
    ratios = ", ".join(f"{row[VARIANTS[v] + '_ratio']:.3f}" for v in variants)
    print(f"time M={M} N={N} K={K}: {times}; ratios to cuBLAS {ratios}", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--variants", type=int, nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="0 cooperative, 1 ping-pong, 2 ping-pong in 2-CTA clusters "
                             "(one per process under a timeout: a hang stops only it)")
    parser.add_argument("--json", default=None, help="write the checks and timings here")
    a = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("needs a Hopper GPU (sm_90) and a CUDA build of torch")
    torch.backends.cuda.matmul.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        so = build(tmp)
        checks = [check(so, v, *s) for v in a.variants for s in CHECK_SHAPES + TIME_SHAPES[:1] if takes(v, *s)]
        correct = [v for v in a.variants if all(c["ok"] for c in checks if c["variant"] == VARIANTS[v])]
        for v in a.variants:
            if v not in correct:
                diagnose(so, v)
        rows = [time_shape(so, correct, *s, a.reps) for s in TIME_SHAPES] if correct else []
        if not correct:
            print("no variant gave correct results: no timings", flush=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, checks=checks, rows=rows,
                  command=" ".join(sys.argv))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
