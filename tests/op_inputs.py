"""Random arguments for every torch.ops.mixlora op, shared by the CPU and the CUDA kernel tests.

`OpInputs(device).build(name, case, dtype, variant)` returns the op's arguments for a case
(T, E, k, R, D) on that device, with fresh random values on every call. `variant` picks optional
inputs, dropout and activation (see VARIANTS). D is the op's feature width (I for the SwiGLU ops).
"""
import torch

import op_reference as ref

SEED = 987654321
DROPOUT_P = 0.1

# moe_swiglu variants: (Bg/zg given, Bu/zu given, Ad given, activation, dropout_p, grad_zd given).
SWIGLU_VARIANTS = (
    (True, True, True, 0, 0.0, True),
    (True, True, True, 1, DROPOUT_P, True),
    (False, False, True, 2, DROPOUT_P, False),  # Ad given but no gradient reaches zd
    (False, False, False, 3, 0.0, False),
    (True, True, False, 0, 0.0, False),
    (True, False, True, 0, 0.0, True),
    (True, True, True, 0, DROPOUT_P, True),  # SiLU with dropout: the usual training setup
)

# op name -> (number of variants, takes a floating input whose dtype the test chooses)
VARIANTS = {
    "router_logits": (1, True),
    "router_logits_backward": (1, True),
    "topk_gating": (1, True),
    "topk_gating_backward": (2, True),
    "sort_pairs": (1, False),
    "gather_pairs": (2, True),
    "scatter_pairs": (2, True),
    "pair_dot": (1, True),
    "lora_shrink": (2, True),
    "lora_expand": (2, True),
    "lora_weight_grad": (2, True),
    "moe_swiglu": (len(SWIGLU_VARIANTS), True),
    "moe_swiglu_backward": (len(SWIGLU_VARIANTS), True),
}
OP_VARIANTS = [(name, v) for name, (n, _) in VARIANTS.items() for v in range(n)]
FLOAT_OP_VARIANTS = [(name, v) for name, v in OP_VARIANTS if VARIANTS[name][1]]


class OpInputs:
    def __init__(self, device):
        self.device = device

    def build(self, name, case, dtype, variant, **kwargs):
        return getattr(self, name)(*case, dtype, variant, **kwargs)

    # --- random tensors --------------------------------------------------------------------
    def randn(self, *shape, dtype):
        return torch.randn(*shape, dtype=dtype, device=self.device)

    def rand_ids(self, T, E, k):
        """[T, k] int32: k distinct experts per token, as topk_gating gives."""
        return torch.rand(T, E, device=self.device).argsort(-1)[:, :k].to(torch.int32)

    def tie_logits(self, T, E, dtype):
        """Logits on a 1/64 grid in [-3.9, 3.9]: exact in every dtype, many exact ties (which every
        precision breaks alike, lower expert first) and no near-ties that rounding could reorder."""
        return (torch.randn(T, E, device=self.device) * 48).round().clamp(-250, 250).div(64).to(dtype)

    # --- one builder per op ------------------------------------------------------------------
    def router_logits(self, T, E, k, R, D, dtype, variant):
        return self.randn(T, D, dtype=dtype), self.randn(E, D, dtype=ref.acc_dtype(dtype))

    def router_logits_backward(self, T, E, k, R, D, dtype, variant):
        acc = ref.acc_dtype(dtype)
        return self.randn(T, E, dtype=acc), self.randn(T, D, dtype=dtype), self.randn(E, D, dtype=acc)

    def topk_gating(self, T, E, k, R, D, dtype, variant):
        return self.tie_logits(T, E, dtype), k

    def topk_gating_backward(self, T, E, k, R, D, dtype, variant):
        acc = ref.acc_dtype(dtype)
        weights, ids, probs = ref.ref_topk_gating(self.tie_logits(T, E, acc), k)
        grad_probs = self.randn(T, E, dtype=acc) if variant else None
        return self.randn(T, k, dtype=acc), grad_probs, weights, ids, probs

    def sort_pairs(self, T, E, k, R, D, dtype, variant):
        return self.rand_ids(T, E, k), E

    def gather_pairs(self, T, E, k, R, D, dtype, variant):
        order, _, _ = ref.ref_sort_pairs(self.rand_ids(T, E, k), E)
        weights = self.randn(T, k, dtype=ref.acc_dtype(dtype)) if variant else None
        return self.randn(T, D, dtype=dtype), order, k, weights

    def scatter_pairs(self, T, E, k, R, D, dtype, variant):
        _, _, position = ref.ref_sort_pairs(self.rand_ids(T, E, k), E)
        weights = self.randn(T, k, dtype=ref.acc_dtype(dtype)) if variant else None
        return self.randn(T * k, D, dtype=dtype), position, k, weights

    def pair_dot(self, T, E, k, R, D, dtype, variant):
        _, _, position = ref.ref_sort_pairs(self.rand_ids(T, E, k), E)
        return self.randn(T, D, dtype=dtype), self.randn(T * k, D, dtype=dtype), position, k

    def lora_shrink(self, T, E, k, R, D, dtype, variant, ids=None):
        p = DROPOUT_P if variant else 0.0
        ids = self.rand_ids(T, E, k) if ids is None else ids
        return self.randn(T, D, dtype=dtype), self.randn(E, R, D, dtype=dtype), ids, p, SEED, 0

    def lora_expand(self, T, E, k, R, D, dtype, variant, ids=None):
        acc = ref.acc_dtype(dtype)
        coef, p = (self.randn(T, k, dtype=acc), DROPOUT_P) if variant else (None, 0.0)
        ids = self.rand_ids(T, E, k) if ids is None else ids
        return self.randn(T, k, R, dtype=acc), self.randn(E, D, R, dtype=dtype), ids, coef, p, SEED, 1

    def lora_weight_grad(self, T, E, k, R, D, dtype, variant, ids=None):
        acc = ref.acc_dtype(dtype)
        order, offsets, _ = ref.ref_sort_pairs(self.rand_ids(T, E, k) if ids is None else ids, E)
        coef, p = (self.randn(T, k, dtype=acc), DROPOUT_P) if variant else (None, 0.0)
        return (self.randn(T, k, R, dtype=acc), self.randn(T, D, dtype=dtype), order, offsets,
                coef, p, SEED, 2)

    def moe_swiglu(self, T, E, k, R, D, dtype, variant, ids=None):
        with_g, with_u, with_d, activation, p, _ = SWIGLU_VARIANTS[variant]
        acc = ref.acc_dtype(dtype)
        ids = self.rand_ids(T, E, k) if ids is None else ids
        weights = torch.softmax(self.randn(T, k, dtype=acc), -1)

        def lora_pair():  # (z, B) of a targeted gate or up projection
            return self.randn(T, k, R, dtype=acc), 0.5 * self.randn(E, D, R, dtype=dtype)

        zg, Bg = lora_pair() if with_g else (None, None)
        zu, Bu = lora_pair() if with_u else (None, None)
        Ad = self.randn(E, R, D, dtype=dtype) if with_d else None
        return (self.randn(T, D, dtype=dtype), self.randn(T, D, dtype=dtype), ids, weights, zg, Bg,
                zu, Bu, Ad, 0.7, activation, p, SEED)

    def moe_swiglu_backward(self, T, E, k, R, D, dtype, variant, ids=None):
        G, U, ids, weights, zg, Bg, zu, Bu, Ad, scale, activation, p, seed = self.moe_swiglu(
            T, E, k, R, D, dtype, variant, ids)
        order, offsets, _ = ref.ref_sort_pairs(ids, E)
        grad_zd = self.randn(T, k, R, dtype=ref.acc_dtype(dtype)) if SWIGLU_VARIANTS[variant][5] else None
        return (self.randn(T, D, dtype=dtype), grad_zd, G, U, ids, weights, zg, Bg, zu, Bu, Ad,
                order, offsets, scale, activation, p, seed)
