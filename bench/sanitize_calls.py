"""Small calls of the bf16 tensor-core paths, for compute-sanitizer (GPU only).

    compute-sanitizer --tool racecheck --racecheck-report hazard python3 bench/sanitize_calls.py
    compute-sanitizer --tool memcheck python3 bench/sanitize_calls.py

moe_swiglu and moe_swiglu_backward (forward, pass 1 and pass 2 on tensor cores: >= 1024 pairs,
I % 8 == 0) at five shapes, with and without LoRA dropout (E = 16, r = 16 and E = 8, r = 64:
pass 1 with one shared-memory stage on an H100), the dense lora_shrink / lora_expand (T >= 256,
no dropout), the CUDA-core lora_shrink with dropout (one block per pair and rank group
below 1024 pairs, one per pair from there), and router_logits with its backward (one and
several token splits).
"""
import torch

import mixlora_ext  # noqa: F401  (registers mixlora::*)
from mixlora_ext import ops

DEV = "cuda"
GEN = torch.Generator(device=DEV).manual_seed(0)


def rn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=DEV, dtype=dtype, generator=GEN)


def main():
    for T, I, E, k, R, p in ((520, 1032, 4, 2, 16, 0.0), (520, 1032, 4, 2, 8, 0.1),
                             (600, 1040, 8, 2, 16, 0.0), (520, 1032, 16, 2, 16, 0.1),
                             (520, 1032, 8, 2, 64, 0.0)):
        G, U, grad_hbar = rn(T, I), rn(T, I), rn(T, I)
        ids = torch.rand(T, E, device=DEV, generator=GEN).topk(k, dim=1).indices.to(torch.int32)
        w = torch.softmax(rn(T, k, dtype=torch.float32), -1)
        zg, zu, grad_zd = (rn(T, k, R, dtype=torch.float32) for _ in range(3))
        Bg, Bu, Ad = 0.05 * rn(E, I, R), 0.05 * rn(E, I, R), 0.05 * rn(E, R, I)
        order, offsets, _ = ops.sort_pairs(ids, E)
        torch.ops.mixlora.moe_swiglu(G, U, ids, w, zg, Bg, zu, Bu, Ad, 2.0, 0, p, 7)
        torch.ops.mixlora.moe_swiglu_backward(grad_hbar, grad_zd, G, U, ids, w, zg, Bg, zu, Bu, Ad,
                                              order, offsets, 2.0, 0, p, 7)
        x, A = rn(T, 256), 0.05 * rn(E, R, 256)
        z = torch.ops.mixlora.lora_shrink(x, A, ids, 0.0, 0, 0)
        torch.ops.mixlora.lora_expand(z, A.transpose(1, 2), ids, w, 0.0, 0, 0)
        torch.ops.mixlora.lora_shrink(x, A, ids, 0.1, 3, 0)
        torch.ops.mixlora.lora_shrink(x[:100], A, ids[:100], 0.1, 3, 0)
        W, g = rn(E, 256, dtype=torch.float32), rn(T, E, dtype=torch.float32)
        torch.ops.mixlora.router_logits(x, W)
        torch.ops.mixlora.router_logits_backward(g, x, W)
        torch.ops.mixlora.router_logits_backward(g[:20], x[:20], W)
    torch.cuda.synchronize()
    print("sanitize_calls.py done")


if __name__ == "__main__":
    main()
