"""The tolerance of the bf16 tensor-core SwiGLU kernels, emulated on the CPU (bench/NOTES.md
v12): the kernels' roundings (z, drop(h), grad_zd, dg, du to bf16; fp32 sums, exact SiLU)
written in PyTorch, against the bound tests/test_cuda.py applies (2x the error of the rounding reference
in bf16, plus the floor) at the tensor-core test cases, every SwiGLU variant. Prints the worst
error / bound per output (1 fails). From the repository root, with the package installed:

    python bench/tolerance_emu.py [draws]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import mixlora_ext  # noqa
import op_reference as ref
from op_inputs import OpInputs, SWIGLU_VARIANTS
bf = torch.bfloat16
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2 * 2.0**-8}
rd = lambda t: t.to(bf).float()


def act_and_grad(act, g):
    g = g.detach().requires_grad_()
    with torch.enable_grad():
        a = ref.ACTIVATIONS[act](g)
        (da,) = torch.autograd.grad(a.sum(), g)
    return a.detach(), da


def pairs(G, U, ids, zg, Bg, zu, Bu, s):
    e = ids.long(); k = ids.shape[1]
    g = G.float()[:, None, :].expand(-1, k, -1).clone(); u = U.float()[:, None, :].expand(-1, k, -1).clone()
    if Bg is not None: g = g + s * torch.einsum("tkir,tkr->tki", Bg.float()[e], rd(zg))
    if Bu is not None: u = u + s * torch.einsum("tkir,tkr->tki", Bu.float()[e], rd(zu))
    return g, u


def kern_fwd(G, U, ids, w, zg, Bg, zu, Bu, Ad, s, act, p, seed):
    T, I = G.shape; k = ids.shape[1]
    g, u = pairs(G, U, ids, zg, Bg, zu, Bu, s)
    a, _ = act_and_grad(act, g); h = a * u
    hbar = (w[..., None] * h).sum(1).to(G.dtype)
    if Ad is None: return hbar, torch.empty(0)
    m = ref.dropout_scale(G, seed, 2, T, k, I, p, torch.float32)
    zd = torch.einsum("tkri,tki->tkr", Ad.float()[ids.long()], rd(h * m))
    return hbar, zd


def kern_bwd(gh, gzd, G, U, ids, w, zg, Bg, zu, Bu, Ad, order, offsets, s, act, p, seed):
    T, I = G.shape; k = ids.shape[1]; e = ids.long(); E = offsets.numel() - 1
    g, u = pairs(G, U, ids, zg, Bg, zu, Bu, s)
    a, da = act_and_grad(act, g); h = a * u
    ghf = gh.float()[:, None, :]
    m = ref.dropout_scale(G, seed, 2, T, k, I, p, torch.float32)
    dh = w[..., None] * ghf
    has_gzd = Ad is not None and gzd is not None
    if has_gzd: dh = dh + m * torch.einsum("tkri,tkr->tki", Ad.float()[e], rd(gzd))
    dg = dh * u * da; du = dh * a
    dG = dg.sum(1).to(G.dtype); dU = du.sum(1).to(G.dtype)
    dw = (ghf * h).sum(-1)
    out = [dG, dU, dw]
    out.append(s * torch.einsum("tkir,tki->tkr", Bg.float()[e], rd(dg)) if Bg is not None else torch.empty(0))
    out.append(s * torch.einsum("tkir,tki->tkr", Bu.float()[e], rd(du)) if Bu is not None else torch.empty(0))
    def wg(x, z):  # sum over pairs per expert of x (tki) outer z (tkr) -> [E, I, R]
        o = torch.zeros(E, x.shape[-1], z.shape[-1])
        o.index_add_(0, e.reshape(-1), torch.einsum("ni,nr->nir", x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1])))
        return o
    out.append((s * wg(dg, rd(zg))).to(G.dtype) if Bg is not None else torch.empty(0, dtype=G.dtype))
    out.append((s * wg(du, rd(zu))).to(G.dtype) if Bu is not None else torch.empty(0, dtype=G.dtype))
    if Ad is not None:
        if has_gzd:
            dAd = wg(rd(h * m), gzd).transpose(1, 2)
        else:
            dAd = torch.zeros_like(Ad, dtype=torch.float32)
        out.append(dAd.to(G.dtype))
    else:
        out.append(torch.empty(0, dtype=G.dtype))
    return tuple(out)


def upcast(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

worst = {}
inp = OpInputs("cpu")
cases = [(1000, 8, 2, 16, 200), (1000, 16, 4, 64, 1000), (1000, 16, 2, 16, 1000), (4097, 8, 2, 16, 1000), (520, 4, 2, 8, 200), (600, 8, 2, 32, 520)]
torch.manual_seed(0)
for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
  for case in cases:
    for name, kern in (("moe_swiglu", kern_fwd), ("moe_swiglu_backward", kern_bwd)):
        for v in range(len(SWIGLU_VARIANTS)):
            args = inp.build(name, case, bf, v)
            got = kern(*args)
            same = getattr(ref, "ref_" + name)(*args)
            exact = getattr(ref, "ref_" + name)(*upcast(args))
            for i, (o, lo, ex) in enumerate(zip(got, same, exact)):
                if o.numel() == 0 or not o.is_floating_point(): continue
                err = (o.double() - ex.double()).abs().max().item()
                ref_err = (lo.double() - ex.double()).abs().max().item()
                floor = FLOOR[lo.dtype] * ex.double().abs().max().item()
                bound = 2 * ref_err + floor
                key = (name, i)
                r = err / bound if bound > 0 else (0 if err == 0 else float('inf'))
                if r > worst.get(key, (0,))[0]: worst[key] = (r, case, v, err, ref_err, floor)
for k, v in sorted(worst.items()):
    print(k, "worst err/bound %.3f" % v[0], "case", v[1], "variant", v[2], "err %.3g ref_err %.3g floor %.3g" % v[3:])
