"""Decode-sized steps (a few tokens, no grad): expert_ffn's decode path against the composed
forward and the dense frozen MLP.

    python bench/decode_micro.py                       # GPU; the decode shapes of bench/run.py
    python bench/decode_micro.py --T 1 8 16 32 64      # other token counts

For each (H, I, T), bf16, E = 8, k = 2, r = 16 on gate/up/down (LoRA B random, as bench/run.py):
  - eager ms: CUDA events around each call, median (as bench/run.py: host time counts);
  - graph ms: the same call captured in a CUDA graph and replayed (GPU time alone);
of the dense MLP, of MixLoRAFFN's no-grad forward (the decode path where it applies) and of the
composed forward on the same inputs (expert_ffn's composite kernel, reached by redispatching
to the CPU key's entry, which is that kernel), and the largest difference between the last
two outputs (the decode path reads the float32 LoRA weights, the composed one their bf16 casts).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from mixlora_ext import MixLoRAConfig, MixLoRAFFN

from run import DenseMLP, cuda_times_ms  # bench/run.py

SHAPES = [(4096, 11008), (4096, 14336), (2048, 5632)]


def expert_ffn_args(layer, x2):
    base, A, B = layer.base_layer, layer.lora_A, layer.lora_B
    gate, up, down = base.gate_proj, base.up_proj, base.down_proj
    return (x2, gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias, layer.router,
            A["gate_proj"], B["gate_proj"], A["up_proj"], B["up_proj"], A["down_proj"],
            B["down_proj"], layer.top_k, layer.scaling, layer.activation, 0.0, 0)


def graph_ms(fn, replays=50):
    """GPU milliseconds of fn() replayed from a CUDA graph (median over batches of replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = cuda_times_ms(lambda: [graph.replay() for _ in range(replays)], 10)
    return statistics.median(times) / replays


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "decode_micro.py needs a GPU"
    dev, dtype = torch.device("cuda"), torch.bfloat16
    op = torch.ops.mixlora.expert_ffn.default
    cpu_entry = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)  # the composite kernel
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, E=8, k=2, r=16; ms")
    print(f"{'H x I':>12} {'T':>3} | {'dense':>6} {'decode':>6} {'composed':>8} | "
          f"{'graph: dense':>12} {'decode':>6} {'composed':>8} | {'ratio eager':>11} {'graph':>5} | max |diff|")
    for H, I in SHAPES:
        torch.manual_seed(0)
        base = DenseMLP(H, I).to(device=dev, dtype=dtype).requires_grad_(False)
        layer = MixLoRAFFN(base, MixLoRAConfig(num_experts=8, top_k=2, r=16, lora_alpha=32)).to(dev)
        layer.eval()
        with torch.no_grad():
            for p in layer.lora_B.values():
                p.normal_(0, 0.01)
        for T in args.T:
            x = torch.randn(T, H, device=dev, dtype=dtype)

            def dense():
                with torch.no_grad():
                    return base(x)

            def decode():
                with torch.no_grad():
                    return layer(x)

            def composed():
                with torch.no_grad():
                    return op.redispatch(cpu_entry, *expert_ffn_args(layer, x))[0]

            eager = [statistics.median(cuda_times_ms(f, args.reps)) for f in (dense, decode, composed)]
            graph = [graph_ms(f) for f in (dense, decode, composed)]
            diff = (decode().float() - composed().float()).abs().max().item()
            print(f"{H:>5} x {I:<5} {T:>3} | {eager[0]:6.3f} {eager[1]:6.3f} {eager[2]:8.3f} | "
                  f"{graph[0]:12.3f} {graph[1]:6.3f} {graph[2]:8.3f} | "
                  f"{eager[1] / eager[0]:11.2f} {graph[1] / graph[0]:5.2f} | {diff:.2e}")


if __name__ == "__main__":
    main()
