"""The tolerance of v15's dense lora_weight_grad (bench/patches/v15-lora-wgrad-gemm.patch),
emulated on the CPU: (coef *) z split into bf16 hi + lo at each slot's expert columns, times the
bf16 x with fp32 sums, against the bound tests/test_cuda.py applies (2x the error of the fp32
reference, plus 1e-5 of the largest output) at the tests' shapes, with and without coef.
Prints error / bound per case (1 fails). From the repository root, with the package installed:

    python bench/wgrad_tolerance_emu.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import op_reference as ref
from op_inputs import OpInputs

CASES = [(1000, 8, 2, 16, 200), (1000, 16, 4, 64, 1000), (1000, 16, 2, 16, 1000),
         (4097, 8, 2, 16, 1000), (4097, 64, 1, 1, 200), (520, 4, 2, 8, 200), (300, 8, 2, 32, 1032)]


def dense_emulated(z, x, order, offsets, coef):
    T, k, R = z.shape
    E = offsets.numel() - 1
    ids = ref.pair_experts(order, offsets).view(T, k)  # (the patch's lora_pair_ids_kernel)
    v = torch.zeros(T, E, R)
    cz = z if coef is None else coef[..., None] * z
    for j in range(k):  # the split kernel's sum over the slots that picked e, in j order
        v[torch.arange(T), ids[:, j]] += cz[:, j]
    hi = v.to(torch.bfloat16)
    lo = (v - hi.float()).to(torch.bfloat16)
    halves = [h.float().view(T, E * R).t() @ x.float() for h in (hi, lo)]  # fp32 sums
    return (halves[0] + halves[1]).view(E, R, -1)


def main():
    torch.manual_seed(0)
    inputs = OpInputs("cpu")
    for case in CASES:
        for with_coef in (False, True):
            z, x, order, offsets, _, _, seed, stream = inputs.lora_weight_grad(*case, torch.bfloat16, 0)
            coef = torch.randn(case[0], case[2]) if with_coef else None
            args = (z, x, order, offsets, coef, 0.0, seed, stream)
            same = ref.ref_lora_weight_grad(*args)
            exact = ref.ref_lora_weight_grad(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                               else a for a in args])
            err = (dense_emulated(z, x, order, offsets, coef).double() - exact).abs().max().item()
            bound = 2 * (same.double() - exact).abs().max().item() + 1e-5 * exact.abs().max().item()
            print(f"T{case[0]}-E{case[1]}-k{case[2]}-R{case[3]}-D{case[4]} coef={with_coef}: "
                  f"error / bound {err / bound:.2f}")


if __name__ == "__main__":
    main()
