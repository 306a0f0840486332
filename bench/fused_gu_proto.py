"""A measured prototype of the fused-GEMM route for the forward (bench/NOTES.md v13).

The layer's forward runs the frozen gate / up GEMMs (cuBLAS), writes G and U [T, I], and then
`moe_swiglu` reads them back to add each pair's LoRA deltas, apply the SwiGLU, combine the k
pairs and sum the down LoRA's shrink. NOTES (v11, "Where each target stands") name the route
to the 1.10x forward target: the SwiGLU in the frozen GEMM's epilogue. This file measures that
route before anyone writes it in CUDA: a Triton kernel computing, per tile of BM tokens x BN
columns of I,

    acc_g = x @ Wg^T, acc_u = x @ Wu^T                               (the frozen GEMMs)
    for each of the token's k pairs j (expert e_j, weight w_j):
        g = acc_g + s * Ag_j @ Bg_cat,  u = acc_u + s * Au_j @ Bu_cat  (masked-row MMAs, K = E*R)
        h = silu(g) * u;   hbar += w_j * h
        Z += mask_j * (bf16(h) @ Ad_cat)                             (the down LoRA's shrink)

where xa_g = x @ Ag_all^T [T, E*R] (one dense GEMM for every expert), Ag_j is xa_g with every
rank slot but expert e_j's zeroed, Bg_cat [E*R, I] is Bg rank-major, and Z [T, E*R] holds both
pairs' zd in their own experts' slots (a token's k experts differ, so they do not collide).
The down projection and the down LoRA's expand are then one GEMM and one addmm:
out = hbar @ Wd^T + (s * w-weighted Z) @ Bd_cat^T. Each program owns BM tokens and a chunk of
I's tiles, so Z sums in registers in a fixed order (deterministic); the chunks' partial Z are
summed after.

Forward only (no grad), E * R <= 128 (the Z accumulator lives in registers), SiLU, no dropout:
this is a measurement, not a code path of the library.

    device: python3 bench/fused_gu_proto.py [--T 4096] [--H 4096] [--I 11008] [--json F]
    here:   TRITON_INTERPRET=1 python3 bench/fused_gu_proto.py --check-only   (small shapes, CPU)
"""
import argparse
import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/run.py's helpers


@triton.jit
def _gu_moe_swiglu_kernel(x_ptr, wg_ptr, wu_ptr, hbar_ptr, z_ptr, xag_ptr, xau_ptr, ids_ptr,
                          w_ptr, bg_ptr, bu_ptr, ad_ptr, T, H, I, tiles_per_chunk, scale, xa_stride,
                          KP: tl.constexpr, ER: tl.constexpr, R: tl.constexpr,
                          LORA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    rc = tl.arange(0, ER)
    m_ok = rm < T
    n_tiles = tl.cdiv(I, BN)
    t0 = pid_s * tiles_per_chunk
    t1 = tl.minimum(t0 + tiles_per_chunk, n_tiles)
    zacc = tl.zeros((BM, ER), dtype=tl.float32)
    for nt in range(t0, t1):
        rn = nt * BN + tl.arange(0, BN)
        n_ok = rn < I
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        x_ptrs = x_ptr + rm[:, None] * H + rk[None, :]
        wg_ptrs = wg_ptr + rn[None, :] * H + rk[:, None]
        wu_ptrs = wu_ptr + rn[None, :] * H + rk[:, None]
        for _ in range(0, H, BK):  # H % BK == 0 (checked by the host)
            a = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            bg = tl.load(wg_ptrs, mask=n_ok[None, :], other=0.0)
            bu = tl.load(wu_ptrs, mask=n_ok[None, :], other=0.0)
            acc_g = tl.dot(a, bg, acc_g)
            acc_u = tl.dot(a, bu, acc_u)
            x_ptrs += BK
            wg_ptrs += BK
            wu_ptrs += BK
        if LORA:
            bg_t = tl.load(bg_ptr + rc[:, None] * I + rn[None, :], mask=n_ok[None, :], other=0.0)
            bu_t = tl.load(bu_ptr + rc[:, None] * I + rn[None, :], mask=n_ok[None, :], other=0.0)
            ad_t = tl.load(ad_ptr + rn[:, None] * ER + rc[None, :], mask=n_ok[:, None], other=0.0)
            xag = tl.load(xag_ptr + rm[:, None] * xa_stride + rc[None, :], mask=m_ok[:, None], other=0.0)
            xau = tl.load(xau_ptr + rm[:, None] * xa_stride + rc[None, :], mask=m_ok[:, None], other=0.0)
            hbar = tl.zeros((BM, BN), dtype=tl.float32)
            for j in tl.static_range(KP):
                e_j = tl.load(ids_ptr + rm * KP + j, mask=m_ok, other=-1)
                w_j = tl.load(w_ptr + rm * KP + j, mask=m_ok, other=0.0)
                sel = (rc[None, :] // R) == e_j[:, None]
                dg = tl.dot(tl.where(sel, xag, tl.zeros_like(xag)), bg_t)
                du = tl.dot(tl.where(sel, xau, tl.zeros_like(xau)), bu_t)
                g = acc_g + scale * dg
                u = acc_u + scale * du
                h = g * tl.sigmoid(g) * u
                hbar += w_j[:, None] * h
                p = tl.dot(h.to(ad_t.dtype), ad_t)
                zacc += tl.where(sel, p * w_j[:, None], tl.zeros_like(p))
        else:
            hbar = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(hbar_ptr + rm[:, None] * I + rn[None, :], hbar.to(hbar_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
    if LORA:
        tl.store(z_ptr + pid_s * T * ER + rm[:, None] * ER + rc[None, :], zacc, mask=m_ok[:, None])


def num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def gu_moe_swiglu(x, Wg, Wu, lora, *, BM=128, BN=64, BK=64, num_warps=8, num_stages=3, waves=1):
    """hbar [T, I] and Z [T, E*R] fp32, w-weighted (None without lora). lora: dict of xag, xau
    [T, ER] (a row stride of their own, unit column stride),
    ids [T, k] int32, w [T, k] fp32, bg, bu [ER, I], ad [I, ER], scale, R."""
    for t in (lora or {}).get("xag"), (lora or {}).get("xau"):
        if t is not None and (t.stride(1) != 1 or t.stride(0) != lora["xag"].stride(0)):
            raise ValueError("xag and xau need unit column stride and one row stride")
    T, H = x.shape
    I = Wg.shape[0]
    if H % BK:
        raise ValueError(f"H = {H} must be a multiple of BK = {BK}")
    m_tiles = triton.cdiv(T, BM)
    n_tiles = triton.cdiv(I, BN)
    chunks = max(1, min(n_tiles, round(waves * num_sms(x.device) / m_tiles)))
    per_chunk = triton.cdiv(n_tiles, chunks)
    chunks = triton.cdiv(n_tiles, per_chunk)
    hbar = torch.empty(T, I, device=x.device, dtype=x.dtype)
    if lora is None:
        dummy = x
        _gu_moe_swiglu_kernel[(m_tiles, chunks)](
            x, Wg, Wu, hbar, dummy, dummy, dummy, dummy, dummy, dummy, dummy, dummy,
            T, H, I, per_chunk, 1.0, 0, KP=1, ER=16, R=16, LORA=False, BM=BM, BN=BN, BK=BK,
            num_warps=num_warps, num_stages=num_stages)
        return hbar, None
    ER = lora["bg"].shape[0]
    zpart = torch.empty(chunks, T, ER, device=x.device, dtype=torch.float32)
    _gu_moe_swiglu_kernel[(m_tiles, chunks)](
        x, Wg, Wu, hbar, zpart, lora["xag"], lora["xau"], lora["ids"], lora["w"], lora["bg"],
        lora["bu"], lora["ad"], T, H, I, per_chunk, float(lora["scale"]), lora["xag"].stride(0),
        KP=lora["ids"].shape[1], ER=ER, R=lora["R"], LORA=True, BM=BM, BN=BN, BK=BK,
        num_warps=num_warps, num_stages=num_stages)
    return hbar, zpart.sum(0)


class Weights:
    """Random frozen MLP + MixLoRA weights, in the layouts the fused route reads."""

    def __init__(self, H, I, E, R, k, dtype, device, seed=0):
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def rnd(*shape, std):
            return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)
        self.H, self.I, self.E, self.R, self.k = H, I, E, R, k
        self.Wg, self.Wu = rnd(I, H, std=H ** -0.5), rnd(I, H, std=H ** -0.5)
        self.Wd = rnd(H, I, std=I ** -0.5)
        self.router = rnd(E, H, std=H ** -0.5).float()
        self.Ag, self.Au = rnd(E, R, H, std=H ** -0.5), rnd(E, R, H, std=H ** -0.5)
        self.Bg, self.Bu = rnd(E, I, R, std=0.05), rnd(E, I, R, std=0.05)
        self.Ad, self.Bd = rnd(E, R, I, std=I ** -0.5), rnd(E, H, R, std=0.05)
        self.scale = 2.0
        # rank-major / concatenated layouts (weight preparation, once per weight update)
        self.Agu_all = torch.cat([self.Ag.reshape(E * R, H), self.Au.reshape(E * R, H)])
        self.bg_cat = self.Bg.permute(0, 2, 1).reshape(E * R, I).contiguous()
        self.bu_cat = self.Bu.permute(0, 2, 1).reshape(E * R, I).contiguous()
        self.ad_cat = self.Ad.reshape(E * R, I).t().contiguous()
        self.bd_cat = self.Bd.permute(1, 0, 2).reshape(H, E * R).contiguous()


def route(x, W):
    """ids [T, k] int32, w [T, k] fp32: the library's router and top-k kernels where it is
    built (SPEC's gating), else the same in PyTorch."""
    try:
        from mixlora_ext import ops
        w, ids, _ = ops.topk_gating(ops.router_logits(x, W.router), W.k)
        return ids, w
    except Exception:
        probs = torch.softmax(x.float() @ W.router.t(), dim=-1)
        w, ids = probs.topk(W.k, dim=-1)
        return ids.to(torch.int32), w / w.sum(-1, keepdim=True)


def fused_route_forward(x, W, ids, w, **cfg):
    """The whole forward by the fused route: shrinks, fused GU kernel, down GEMM + LoRA."""
    lora = lora_inputs(x, W, ids, w)
    hbar, Z = gu_moe_swiglu(x, W.Wg, W.Wu, lora, **cfg)
    out = hbar @ W.Wd.t()
    out.addmm_(Z.to(x.dtype), W.bd_cat.t(), alpha=W.scale)
    return out, hbar, Z


def lora_inputs(x, W, ids, w):
    xa = x @ W.Agu_all.t()  # both shrinks, every expert: one GEMM [T, 2 E R]
    ER = W.E * W.R
    return dict(xag=xa[:, :ER], xau=xa[:, ER:], ids=ids, w=w, bg=W.bg_cat, bu=W.bu_cat,
                ad=W.ad_cat, scale=W.scale, R=W.R)


def reference_forward(x, W, ids, w):
    """Per pair, in fp32 (the operands rounded as the layer's contract rounds them)."""
    xf = x.float()
    G, U = xf @ W.Wg.float().t(), xf @ W.Wu.float().t()
    out = torch.zeros(x.shape[0], W.H)
    out = out.to(x.device)
    hbar = torch.zeros_like(G)
    zs = []
    for j in range(W.k):
        e = ids[:, j].long()
        zg = torch.einsum("th,trh->tr", xf, W.Ag.float()[e]).to(x.dtype).float()
        zu = torch.einsum("th,trh->tr", xf, W.Au.float()[e]).to(x.dtype).float()
        g = G + W.scale * torch.einsum("tr,tir->ti", zg, W.Bg.float()[e])
        u = U + W.scale * torch.einsum("tr,tir->ti", zu, W.Bu.float()[e])
        h = torch.nn.functional.silu(g) * u
        hbar += w[:, j, None] * h
        zd = torch.einsum("ti,tri->tr", h.to(x.dtype).float(), W.Ad.float()[e])
        zs.append(zd)
        out += w[:, j, None] * W.scale * torch.einsum("tr,thr->th", zd, W.Bd.float()[e])
    out += hbar.to(x.dtype).float() @ W.Wd.float().t()
    return out, hbar, zs


def check(T, H, I, E, R, k, dtype, device, **cfg):
    W = Weights(H, I, E, R, k, dtype, device)
    x = torch.randn(T, H, device=device, dtype=dtype)
    ids, w = route(x, W)
    out, hbar, Z = fused_route_forward(x, W, ids, w, **cfg)
    ref_out, ref_hbar, ref_zs = reference_forward(x, W, ids, w)
    errs = {}
    errs["hbar"] = ((hbar.float() - ref_hbar).abs().max() / ref_hbar.abs().max()).item()
    errs["out"] = ((out.float() - ref_out).abs().max() / ref_out.abs().max()).item()
    for j in range(k):
        zj = Z.view(T, E, R)[torch.arange(T, device=device), ids[:, j].long()] / w[:, j, None]
        errs[f"zd{j}"] = ((zj - ref_zs[j]).abs().max() / ref_zs[j].abs().max()).item()
    dense_hbar, _ = gu_moe_swiglu(x, W.Wg, W.Wu, None, **cfg)
    xf = x.float()
    ref_dense = torch.nn.functional.silu(xf @ W.Wg.float().t()) * (xf @ W.Wu.float().t())
    errs["dense_hbar"] = ((dense_hbar.float() - ref_dense).abs().max() / ref_dense.abs().max()).item()
    return errs


def cuda_ms(fn, reps=30):
    """Median milliseconds of fn() by CUDA events (bench/run.py's timer; imported here because
    run.py needs the built package, which the CPU check does not)."""
    from run import cuda_times_ms
    return statistics.median(cuda_times_ms(fn, reps, warmup=5))


def bench(args):
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    T, H, I, E, R, k = args.T, args.H, args.I, args.E, args.r, 2
    W = Weights(H, I, E, R, k, dtype, dev)
    x = torch.randn(T, H, device=dev, dtype=dtype)
    ids, w = route(x, W)
    row = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, T=T, H=H, I=I, E=E, r=R, k=k, dtype="bfloat16")
    silu = torch.nn.functional.silu
    with torch.no_grad():
        row["dense_mlp_ms"] = cuda_ms(lambda: (silu(x @ W.Wg.t()) * (x @ W.Wu.t())) @ W.Wd.t())
        row["cublas_gu_gemms_ms"] = cuda_ms(lambda: (x @ W.Wg.t(), x @ W.Wu.t()))
        row["cublas_down_gemm_ms"] = cuda_ms(lambda: torch.empty(T, I, device=dev, dtype=dtype) @ W.Wd.t())
        G, U = x @ W.Wg.t(), x @ W.Wu.t()
        row["dense_swiglu_elementwise_ms"] = cuda_ms(lambda: silu(G) * U)
        del G, U
        lora = lora_inputs(x, W, ids, w)
        configs = [dict(BM=128, BN=64, BK=64, num_warps=8, num_stages=3),
                   dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3),
                   dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=4, waves=2),
                   dict(BM=128, BN=64, BK=32, num_warps=8, num_stages=4)]
        row["configs"] = []
        for cfg in configs:
            entry = dict(cfg)
            try:
                entry["triton_dense_gu_swiglu_ms"] = cuda_ms(lambda: gu_moe_swiglu(x, W.Wg, W.Wu, None, **cfg))
                entry["triton_moe_gu_swiglu_ms"] = cuda_ms(lambda: gu_moe_swiglu(x, W.Wg, W.Wu, lora, **cfg))
                entry["fused_route_forward_ms"] = cuda_ms(lambda: fused_route_forward(x, W, ids, w, **cfg))
            except Exception as exc:  # a config that does not compile or fit: say so, go on
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(json.dumps(entry), flush=True)
            row["configs"].append(entry)
        ok = [c for c in row["configs"] if "error" not in c]
        if ok:
            best = min(ok, key=lambda c: c["fused_route_forward_ms"])
            row["best"] = best
            cfg = {key: best[key] for key in ("BM", "BN", "BK", "num_warps", "num_stages", "waves") if key in best}
            row["route_with_routing_ms"] = cuda_ms(lambda: fused_route_forward(x, W, *route(x, W), **cfg))
            row["ratio_fused_route_vs_dense"] = row["route_with_routing_ms"] / row["dense_mlp_ms"]
            errs = check(512, H, I, E, R, k, dtype, dev, **cfg)
            row["check_T512"] = errs
    try:  # the library's layer on the same shape, for the same call's side-by-side
        from run import DenseMLP
        from mixlora_ext import MixLoRAConfig, MixLoRAFFN
        base = DenseMLP(H, I).to(device=dev, dtype=dtype)
        for p in base.parameters():
            p.requires_grad_(False)
        layer = MixLoRAFFN(base, MixLoRAConfig(num_experts=E, top_k=k, r=R, lora_alpha=2 * R)).to(dev)
        with torch.no_grad():
            for p in layer.lora_B.values():
                p.normal_(0, 0.01)
            row["run_py_dense_ms"] = cuda_ms(lambda: base(x))
            row["mixlora_layer_ms"] = cuda_ms(lambda: layer(x))
        row["ratio_layer_vs_dense"] = row["mixlora_layer_ms"] / row["run_py_dense_ms"]
    except Exception as exc:
        row["layer_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=4096)
    ap.add_argument("--I", type=int, default=11008)
    ap.add_argument("--E", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--json", default=None)
    ap.add_argument("--check-only", action="store_true",
                    help="small-shape correctness only (CPU under TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.check_only or not torch.cuda.is_available():
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        for T, H, I in ((70, 64, 96), (33, 32, 40)):
            errs = check(T, H, I, 4, 16, 2, dtype, dev, BM=32, BN=32, BK=32, num_warps=4, num_stages=1)
            print(T, H, I, json.dumps(errs))
        return
    row = bench(args)
    print(json.dumps(row, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
