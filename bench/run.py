"""Times MixLoRAFFN against the eager reference (the authors' algorithm) and the dense frozen MLP.

    python bench/run.py             # GPU: the SPEC shapes; CPU: small shapes, under a minute
    python bench/run.py --quick     # GPU: a few shapes, fits in one device call with the build
    python bench/run.py --tokens 1 8 16   # only the shapes with these token counts (decode)

For each shape: forward and forward+backward (gradients for x, the router and every LoRA
weight; the base MLP frozen) of the reference, of MixLoRAFFN and of the dense MLP; peak extra
memory (GPU); ratios to the dense MLP; achieved TFLOP/s against the frozen GEMM work of the
shape (6*T*H*I forward, twice that forward+backward). The layer is in training mode; rows with
p > 0 have LoRA dropout on (the usual fine-tuning setting), the others none. Writes a table to
stdout, JSON and a PNG plot of the ratios to bench/results/ (or --out).
GPU times: CUDA events around each call, median of many calls after warm-up; the dense MLP's and
the layer's calls alternate, so that drift during a row falls on both.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
from torch import nn

import mixlora_ext
from mixlora_ext import MixLoRAConfig, MixLoRAFFN, reference_forward

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import call_timer, cuda_times_ms, interleaved_medians  # noqa: E402,F401  (bench/timing.py)

GPU_SHAPES = [  # (H, I, T, E, r, LoRA dropout p)
    *[(4096, 11008, t, 8, 16, 0.0) for t in (1, 8, 16, 512, 4096, 16384)],
    *[(4096, 14336, t, 8, 16, 0.0) for t in (1, 8, 16, 512, 4096, 16384)],
    *[(2048, 5632, t, 8, 16, 0.0) for t in (1, 8, 16, 512, 4096, 16384)],
    (4096, 11008, 4096, 16, 16, 0.0), (4096, 11008, 4096, 8, 64, 0.0),
    (4096, 11008, 4096, 8, 16, 0.05),
]
QUICK_SHAPES = [(4096, 11008, 8, 8, 16, 0.0), (4096, 11008, 4096, 8, 16, 0.0),
                (2048, 5632, 2048, 8, 16, 0.0)]
CPU_SHAPES = [(256, 688, 64, 8, 16, 0.0), (256, 688, 512, 8, 16, 0.0), (512, 1376, 256, 8, 16, 0.0)]
TOP_K = 2


class DenseMLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


DECODE_T = 16  # rows with at most this many tokens are decode-sized


def _peak_extra_mib(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_shape(H, I, T, E, r, dropout, dtype, device, reps):
    torch.manual_seed(0)
    base = DenseMLP(H, I).to(device=device, dtype=dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    config = MixLoRAConfig(num_experts=E, top_k=TOP_K, r=r, lora_alpha=2 * r, lora_dropout=dropout)
    layer = MixLoRAFFN(base, config).to(device)
    with torch.no_grad():  # B = 0 at init would let a broken kernel look fine; randomize it
        for p in layer.lora_B.values():
            p.normal_(0, 0.01)
    x = torch.randn(T, H, device=device, dtype=dtype)
    grad_out = torch.randn(T, H, device=device, dtype=dtype)
    xg = x.clone().requires_grad_(True)
    call_ms = call_timer(device)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(x)
        return run

    def forward_backward(fn):
        def run():
            xg.grad = None
            for p in layer.parameters():
                p.grad = None
            fn(xg).backward(grad_out)
        return run

    variants = {"dense": base, "fused": layer, "reference": lambda v: reference_forward(layer, v)}
    row = dict(H=H, I=I, T=T, E=E, k=TOP_K, r=r, dropout=dropout, dtype=str(dtype).replace("torch.", ""))
    # Decode-sized rows take ~0.1 ms a call and their ratio moves with the host's jitter
    # (bench/NOTES.md v8: +-30% between calls at 50): ten times the calls there. The dense MLP's
    # and the layer's calls alternate (the ratios); the reference, slow, is timed after them.
    reps_here = reps * (10 if T <= DECODE_T else 1)
    for phase, wrap in (("fwd", forward), ("fwdbwd", forward_backward)):
        got = interleaved_medians({"dense": wrap(base), "fused": wrap(layer)}, reps_here, call_ms)
        got.update(interleaved_medians({"reference": wrap(variants["reference"])}, max(3, reps // 4),
                                       call_ms))
        for name, ms in got.items():
            row[f"{name}_{phase}_ms"] = ms
    for name, fn in variants.items():
        row[f"{name}_peak_mib"] = _peak_extra_mib(forward_backward(fn), device)
    gemm_flops = 6 * T * H * I
    row["fused_fwd_tflops"] = gemm_flops / row["fused_fwd_ms"] / 1e9
    row["fused_fwdbwd_tflops"] = 2 * gemm_flops / row["fused_fwdbwd_ms"] / 1e9
    for phase in ("fwd", "fwdbwd"):
        row[f"ratio_{phase}"] = row[f"fused_{phase}_ms"] / row[f"dense_{phase}_ms"]
        row[f"speedup_{phase}"] = row[f"reference_{phase}_ms"] / row[f"fused_{phase}_ms"]
    if row["dense_peak_mib"]:
        row["ratio_peak"] = row["fused_peak_mib"] / row["dense_peak_mib"]
    return row


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def print_table(rows):
    head = (f"{'H':>5} {'I':>6} {'T':>6} {'E':>3} {'r':>3} {'p':>4} | {'dense f/fb ms':>15} | {'fused f/fb ms':>15} | "
            f"{'ref f/fb ms':>15} | {'x dense f/fb':>12} | {'x faster than ref f/fb':>22} | "
            f"{'peak MiB d/f/ref':>18} | {'TFLOP/s f/fb':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['H']:>5} {r['I']:>6} {r['T']:>6} {r['E']:>3} {r['r']:>3} {r['dropout']:>4.2g} | "
              f"{r['dense_fwd_ms']:>7.3f}/{r['dense_fwdbwd_ms']:<7.3f} | "
              f"{r['fused_fwd_ms']:>7.3f}/{r['fused_fwdbwd_ms']:<7.3f} | "
              f"{r['reference_fwd_ms']:>7.2f}/{r['reference_fwdbwd_ms']:<7.2f} | "
              f"{r['ratio_fwd']:>5.2f}/{r['ratio_fwdbwd']:<6.2f} | "
              f"{r['speedup_fwd']:>10.1f}/{r['speedup_fwdbwd']:<11.1f} | "
              f"{_fmt(r['dense_peak_mib'], '.0f'):>5}/{_fmt(r['fused_peak_mib'], '.0f'):>5}/"
              f"{_fmt(r['reference_peak_mib'], '.0f'):<6} | "
              f"{r['fused_fwd_tflops']:>5.0f}/{r['fused_fwdbwd_tflops']:<6.0f}")


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    labels = [f"{r['H']}x{r['I']}\nT={r['T']} E={r['E']} r={r['r']}" + (f" p={r['dropout']}" if r['dropout'] else "")
              for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(rows)), 5))
    ax.bar([i - 0.2 for i in xs], [r["ratio_fwd"] for r in rows], 0.4, label="forward")
    ax.bar([i + 0.2 for i in xs], [r["ratio_fwdbwd"] for r in rows], 0.4, label="forward+backward")
    for y, style, name in ((1.10, "--", "fwd target 1.10"), (1.15, ":", "fwd+bwd target 1.15"),
                           (1.3, "-.", "decode target 1.3")):
        ax.axhline(y, color="gray", linestyle=style, linewidth=1, label=name)
    ax.set_xticks(list(xs), labels, fontsize=7, rotation=60, ha="right")
    ax.set_ylabel("MixLoRAFFN time / dense frozen MLP time")
    ax.set_title(f"mixlora_ext vs dense MLP ({rows[0]['dtype']}, k={TOP_K}) on {_device_name()}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per measurement")
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="only the shapes with these T (e.g. --tokens 1 8 16: the decode rows)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    shapes = (QUICK_SHAPES if args.quick else GPU_SHAPES) if on_gpu else CPU_SHAPES
    if args.tokens:
        all_tokens = sorted({s[2] for s in shapes})
        shapes = [s for s in shapes if s[2] in args.tokens]
        if not shapes:
            parser.error(f"no {device.type} shape has T in {args.tokens}; their T: {all_tokens}")
    reps = args.reps or (50 if on_gpu else 5)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for shape in shapes:
        rows.append(bench_shape(*shape, dtype=dtype, device=device, reps=reps))
        print(f"done {shape}", file=sys.stderr, flush=True)
    print(f"\nmixlora_ext {mixlora_ext.__version__} on {_device_name()}, torch {torch.__version__}, "
          f"{dtype}, k={TOP_K}, median of {reps} timed calls ({10 * reps} at T <= {DECODE_T}); "
          f"command: {' '.join(sys.argv)}")
    print_table(rows)
    os.makedirs(args.out, exist_ok=True)
    tag = "gpu" if on_gpu else "cpu"
    meta = dict(device=_device_name(), torch=torch.__version__, dtype=str(dtype),
                command=" ".join(sys.argv), cuda_version=mixlora_ext.ops.cuda_version())
    with open(os.path.join(args.out, f"bench_{tag}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {os.path.join(args.out, f'bench_{tag}.json')}")
    plot(rows, os.path.join(args.out, f"bench_{tag}.png"))


if __name__ == "__main__":
    main()
