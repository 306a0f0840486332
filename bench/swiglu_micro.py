"""Micro-benchmark of the fused expert SwiGLU kernels alone (GPU only).

    python bench/swiglu_micro.py [--T 4096] [--I 11008] [--E 8] [--k 2] [--r 16] [--dtype bf16]

Times mixlora::moe_swiglu (forward) and mixlora::moe_swiglu_backward (both passes, plus their
small sum kernels) at the SPEC shape with CUDA events (median of --reps calls after warm-up),
and the dense silu(G) * U for scale; then one torch.profiler pass lists the time of each kernel.
Routing is uniform random top-k; LoRA dropout off (as at inference / p = 0 training).
"""
import argparse
import statistics

import torch

import mixlora_ext  # noqa: F401  (loads the extension, registers mixlora::*)
from mixlora_ext import ops
from run import cuda_times_ms  # bench/ is on sys.path when this script runs


def median_ms(fn, reps):
    times = cuda_times_ms(fn, reps)
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--I", type=int, default=11008)
    ap.add_argument("--E", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the torch.profiler pass (under ncu, which takes the profiling hooks)")
    a = ap.parse_args()
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    T, I, E, k, R = a.T, a.I, a.E, a.k, a.r

    def rn(*shape, dtype=dt):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=g)

    G, U = rn(T, I), rn(T, I)
    ids = torch.rand(T, E, device=dev, generator=g).topk(k, dim=1).indices.to(torch.int32)
    weights = torch.softmax(rn(T, k, dtype=torch.float32), -1)
    zg, zu = rn(T, k, R, dtype=torch.float32), rn(T, k, R, dtype=torch.float32)
    Bg, Bu, Ad = 0.05 * rn(E, I, R), 0.05 * rn(E, I, R), 0.05 * rn(E, R, I)
    grad_hbar, grad_zd = rn(T, I), rn(T, k, R, dtype=torch.float32)
    order, offsets, _ = ops.sort_pairs(ids, E)
    scale = 2.0

    def fwd():
        return torch.ops.mixlora.moe_swiglu(G, U, ids, weights, zg, Bg, zu, Bu, Ad, scale, 0, 0.0, 0)

    def bwd():
        return torch.ops.mixlora.moe_swiglu_backward(grad_hbar, grad_zd, G, U, ids, weights, zg, Bg,
                                                     zu, Bu, Ad, order, offsets, scale, 0, 0.0, 0)

    def dense():
        return torch.nn.functional.silu(G) * U

    rows = [("moe_swiglu fwd", fwd), ("moe_swiglu_backward", bwd), ("dense silu(G)*U", dense)]
    print(f"shape T={T} I={I} E={E} k={k} r={R} dtype={a.dtype} device={torch.cuda.get_device_name()}")
    for name, fn in rows:
        med, mn = median_ms(fn, a.reps)
        print(f"{name:24s} median {med:8.3f} ms   min {mn:8.3f} ms")
    if a.no_profile:
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fwd()
            bwd()
        torch.cuda.synchronize()
    print("per kernel (5 calls each):")
    for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
        if ev.device_time_total > 0:
            print(f"  {ev.key[:90]:90s} {ev.count:4d} x {ev.device_time_total / max(ev.count, 1) / 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
