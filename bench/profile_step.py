"""Where the time of one MixLoRAFFN step goes (GPU): kernels, and the host between them.

    python bench/profile_step.py --T 8            # decode-sized forward and forward+backward
    python bench/profile_step.py --T 4096
    python bench/profile_step.py --T 4096 --dropout 0.05   # LoRA dropout on (training mode)

Prints, for the forward and for forward+backward: the median wall time (CUDA events), the
median time of the same step replayed from a CUDA graph (no host work: the difference is launch
and dispatch overhead), and torch.profiler's per-kernel GPU time and launch counts.
"""
import argparse
import statistics

import torch

from mixlora_ext import MixLoRAConfig, MixLoRAFFN
from run import DenseMLP, cuda_times_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--H", type=int, default=4096)
    ap.add_argument("--I", type=int, default=11008)
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--E", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout p (the layer is in training mode)")
    ap.add_argument("--host", action="store_true", help="also the host time per op (torch.profiler CPU events)")
    a = ap.parse_args()
    torch.manual_seed(0)
    base = DenseMLP(a.H, a.I).cuda().to(torch.bfloat16).requires_grad_(False)
    layer = MixLoRAFFN(base, MixLoRAConfig(num_experts=a.E, top_k=2, r=a.r, lora_alpha=2 * a.r,
                                           lora_dropout=a.dropout)).cuda()
    x = torch.randn(a.T, a.H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def forward():
        with torch.no_grad():
            layer(x)

    def forward_backward():  # fresh gradients each step, as in bench/run.py (no accumulation adds)
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(grad)

    for name, step in (("forward", forward), ("forward+backward", forward_backward)):
        eager = statistics.median(cuda_times_ms(step, a.reps))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        layer.last_probs = layer.last_ids = None  # drop the warm-up's graph before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        replay = statistics.median(cuda_times_ms(graph.replay, a.reps))
        activities = [torch.profiler.ProfilerActivity.CUDA]
        if a.host:
            activities.append(torch.profiler.ProfilerActivity.CPU)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"\n== {name}, T={a.T} H={a.H} I={a.I} E={a.E} r={a.r} dropout={a.dropout} bf16: eager {eager:.3f} ms, "
              f"CUDA-graph replay {replay:.3f} ms")
        rows = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        rows.sort(key=lambda e: -e.self_device_time_total)
        launches = sum(e.count for e in rows) / 5
        print(f"   {launches:.0f} kernel launches per step; GPU time per step by kernel:")
        for e in rows[:14]:
            print(f"   {e.self_device_time_total / 5 / 1e3:8.3f} ms  x{e.count // 5:<3} {e.key[:90]}")
        if a.host:  # (the profiler's own overhead inflates these; compare ops, not totals)
            host = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
            host.sort(key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in host) / 5 / 1e3
            print(f"   host time per step by op (self, profiled: {total:.3f} ms):")
            for e in host[:16]:
                print(f"   {e.self_cpu_time_total / 5 / 1e3:8.3f} ms  x{e.count // 5:<3} {e.key[:90]}")


if __name__ == "__main__":
    main()
