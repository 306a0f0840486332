"""Where the time of one MixLoRAFFN step goes (GPU): kernels, and the host between them.

    python bench/profile_step.py --T 8            # decode-sized forward and forward+backward
    python bench/profile_step.py --T 4096
    python bench/profile_step.py --T 4096 --dropout 0.05   # LoRA dropout on (training mode)

    python bench/profile_step.py --T 4096 --dense --json b.json   # the dense MLP too; records

Prints, for the forward and for forward+backward: the median wall time (CUDA events), the
median time of the same step replayed from a CUDA graph (no host work: the difference is launch
and dispatch overhead), and torch.profiler's per-kernel GPU time and launch counts. With
--dense the dense frozen MLP (run.py's, gradients for x only) is profiled the same way, and
each step's kernel time is split by kind (frozen GEMMs, SwiGLU kernels, LoRA ops, ...), so the
layer's time beyond the dense MLP's is attributed to kernels. --json appends one record per
model and step to a JSON-lines file (bench/breakdown.py turns it into a table).
"""
import argparse
import json
import re
import statistics

import torch

from mixlora_ext import MixLoRAConfig, MixLoRAFFN
from run import DenseMLP, cuda_times_ms

# Kinds of kernel, by name (first match): what a step's GPU time is split into.
KINDS = [
    ("gemm", r"nvjet|gemm|cutlass|xmma|sm90_|ampere_|cublas"),
    ("swiglu_bwd_pass2", r"wgrad|moe_swiglu_bwd_expert|sum_splits_kernel"),
    ("swiglu_bwd_pass1", r"moe_swiglu_bwd"),
    ("swiglu_fwd", r"moe_swiglu|decode_swiglu"),
    ("tile_sums", r"sum_tiles|sum_split_partials"),
    ("lora", r"lora_|decode_shrink|decode_expand|pair_dot|gather_pairs|scatter_pairs|dropout_mask"),
    ("routing", r"router_|topk_|sort_pairs"),
    ("lora_cast", r"multi_tensor_apply"),
    ("elementwise", r"elementwise|reduce|Reduce|CatArray|copy|fill"),
]


def kind_of(kernel):
    return next((k for k, pat in KINDS if re.search(pat, kernel)), "other")


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
    ap.add_argument("--dense", action="store_true", help="also the dense frozen MLP, and each step's time by kind of kernel")
    ap.add_argument("--json", help="append a record per model and step to this JSON-lines file")
    a = ap.parse_args()
    torch.manual_seed(0)
    base = DenseMLP(a.H, a.I).cuda().to(torch.bfloat16).requires_grad_(False)
    layer = MixLoRAFFN(base, MixLoRAConfig(num_experts=a.E, top_k=2, r=a.r, lora_alpha=2 * a.r,
                                           lora_dropout=a.dropout)).cuda()
    x = torch.randn(a.T, a.H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    models = [("mixlora", layer)] + ([("dense", base)] if a.dense else [])
    for model_name, model in models:
        profile_model(a, model_name, model, x, grad)


def profile_model(a, model_name, model, x, grad):
    def forward():
        with torch.no_grad():
            model(x)

    def forward_backward():  # fresh gradients each step, as in bench/run.py (no accumulation adds)
        x.grad = None
        for p in model.parameters():
            p.grad = None
        model(x).backward(grad)

    for name, step in (("forward", forward), ("forward+backward", forward_backward)):
        eager = statistics.median(cuda_times_ms(step, a.reps))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        if model_name == "mixlora":
            model.last_probs = model.last_ids = None  # drop the warm-up's graph before capture
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
        print(f"\n== {model_name} {name}, T={a.T} H={a.H} I={a.I} E={a.E} r={a.r} dropout={a.dropout} bf16: eager {eager:.3f} ms, "
              f"CUDA-graph replay {replay:.3f} ms")
        rows = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        rows.sort(key=lambda e: -e.self_device_time_total)
        launches = sum(e.count for e in rows) / 5
        print(f"   {launches:.0f} kernel launches per step; GPU time per step by kernel:")
        for e in rows[:14]:
            print(f"   {e.self_device_time_total / 5 / 1e3:8.3f} ms  x{e.count // 5:<3} {e.key[:90]}")
        kinds = {}
        for e in rows:
            k = kind_of(e.key)
            kinds[k] = kinds.get(k, 0.0) + e.self_device_time_total / 5 / 1e3
        if a.dense:
            print("   by kind: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps({
                    "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "H": a.H, "I": a.I, "T": a.T, "E": a.E, "r": a.r, "dropout": a.dropout,
                    "model": model_name, "step": name, "eager_ms": eager, "graph_ms": replay,
                    "kinds_ms": kinds,
                    "kernels": {e.key: [e.self_device_time_total / 5 / 1e3, e.count // 5] for e in rows},
                }) + "\n")
        if a.host:  # (the profiler's own overhead inflates these; compare ops, not totals)
            host = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
            host.sort(key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in host) / 5 / 1e3
            print(f"   host time per step by op (self, profiled: {total:.3f} ms):")
            for e in host[:16]:
                print(f"   {e.self_cpu_time_total / 5 / 1e3:8.3f} ms  x{e.count // 5:<3} {e.key[:90]}")


if __name__ == "__main__":
    main()
