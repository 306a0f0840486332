"""Micro-benchmark of mixlora::lora_shrink alone (GPU only): H = 4096, E = 8, k = 2, r = 16, bf16.

    python bench/shrink_micro.py

Median of 200 calls timed with CUDA events, at T = 8 and 16 without dropout and T = 8 and 4096
with p = 0.05. T = 8 and 16 take the CUDA-core kernel; the per-call times there are bound by
the host's dispatch (~40 us), not by the kernel: read the kernel's GPU time off
bench/profile_step.py. T = 4096 with dropout is the CUDA-core kernel of a training step.
"""
import statistics

import torch

import mixlora_ext  # noqa: F401  (registers mixlora::*)


def median_us(fn, reps=200):
    for _ in range(10):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    for T, p in ((8, 0.0), (16, 0.0), (8, 0.05), (4096, 0.05)):
        x = torch.randn(T, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
        A = 0.02 * torch.randn(8, 16, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
        ids = torch.rand(T, 8, device="cuda", generator=g).topk(2, dim=1).indices.int()
        us = median_us(lambda: torch.ops.mixlora.lora_shrink(x, A, ids, p, 1, 0))
        print(f"lora_shrink T={T} p={p}: {us:.1f} us")


if __name__ == "__main__":
    main()
