"""v17 and v18: the MoE SwiGLU in our own Hopper gate / up GEMM's epilogue
(bench/fused_gu_wgmma_proto.cu, bench/NOTES.md v17, v18), checked against the fp32 reference and
timed beside cuBLAS. v17 (variant 0) takes tiles of 128 tokens, v18 (variant 1) of 64 with each
pair's deltas in sums of their own, and in training also writes G and U for the backward; v18c
(variant 2) is v18 in 2-CTA clusters that share the weight and epilogue tiles by multicast;
v17s (variant 3) is v17 reading Wg and Wu as the model holds them (one 3-D tensor map over both)
instead of the interleaved copy, which would double the frozen gate / up weights' memory.

What the kernel computes, for T tokens with experts ids [T, 2] and weights w [T, 2] (E = 8,
R = 16, bf16; s the LoRA scale):
    g_j = bf16(x Wg^T) + s zg_j Bg[e_j]^T,  u_j likewise,  h_j = silu(g_j) u_j   (v18: x Wg^T in fp32)
    hbar = bf16(w_0 bf16(h_0) + w_1 h_1)     zd_j = bf16(h_j) Ad[e_j]^T (fp32, [T, 2, R])
with zg_j = bf16(x Ag[e_j]^T) the shrink's output (the library's moe_swiglu contract).

Its inputs are laid out once per weight update (`prepare`): Wg and Wu rows interleaved in blocks
of 64 ([2 I, H]), Bg and Bu the same way with expert-major columns ([2 I, E R]), Ad as [E R, I];
zg and zu per pair as bf16 [T, 2, R] with s folded in (exact for the power-of-two s used here).

`emulate` is the kernel's decomposition in PyTorch (its work items, tiles, the two warpgroups'
alternation and zd partials, v17's pair-1 deltas as (Z_1 - Z_0) onto sums holding delta_0, the
roundings where the kernel rounds): on the CPU it checks the algebra and the layouts `prepare`
makes (tests/test_bench_fused_gu.py), on the GPU it says, when the kernel disagrees with the reference,
whether the disagreement is the decomposition's or the device code's.

    device: timeout 150 python3 bench/fused_gu_wgmma_proto.py [--variants 0 1 2] [--reps 30] [--json F]
            [--build-dir D]   (a variant a process under a timeout: a wrong protocol hangs; D: one build)
    here:   python3 bench/fused_gu_wgmma_proto.py --emulate      (CPU: emulate vs reference)
"""
import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from timing import call_timer, interleaved_medians  # noqa: E402  (bench/timing.py)

E, R, K = 8, 16, 2  # the prototype's experts, rank, pairs (compile-time in the .cu)
TI = 64             # a tile's columns of I
VARIANTS = {0: "v17", 1: "v18", 2: "v18c", 3: "v17s"}  # the launcher's: tiles of 128 / 64 / 64 /
TILE_ROWS = {0: 128, 1: 64, 2: 64, 3: 128}            # 128 tokens, v18c's CTAs in clusters of 2
CLUSTER = {0: 1, 1: 1, 2: 2, 3: 1}                    # over block pairs; v17s reads Wg, Wu as they are
V17_NUMERICS = (0, 3)  # G, U rounded to bf16, pair 1 as (Z_1 - Z_0): v17's and v17s's epilogue
TRAINING = (1, 2)      # the variants that can also write G and U
SCALE = 2.0         # alpha / r of the bench (a power of two: folding it into bf16 z is exact)

# (T, H, I, max_ctas): one tile; several items a CTA with odd tile counts; a few waves; the target
CHECK_SHAPES = [(128, 64, 64, 1), (384, 128, 320, 2), (256, 256, 448, 3), (1024, 512, 1024, 0),
                (4096, 4096, 11008, 0)]
TIME_SHAPES = [(4096, 4096, 11008), (4096, 4096, 14336), (4096, 2048, 5632), (16384, 4096, 11008)]


# ------------------------------------------------------------------------------------------------
# inputs, layouts, reference
# ------------------------------------------------------------------------------------------------
class Problem:
    """Random frozen gate / up weights, MixLoRA weights and routing for one shape."""

    def __init__(self, T, H, I, device, dtype=torch.bfloat16, seed=0):
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def rnd(*shape, std):
            return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)
        self.T, self.H, self.I = T, H, I
        self.x = rnd(T, H, std=1.0)
        self.Wg, self.Wu = rnd(I, H, std=H ** -0.5), rnd(I, H, std=H ** -0.5)
        self.Ag, self.Au = rnd(E, R, H, std=H ** -0.5), rnd(E, R, H, std=H ** -0.5)
        self.Bg, self.Bu = rnd(E, I, R, std=0.05), rnd(E, I, R, std=0.05)
        self.Ad = rnd(E, R, I, std=I ** -0.5)
        logits = torch.randn(T, E, generator=gen)
        top, ids = logits.softmax(-1).topk(K, dim=-1)  # two distinct experts a token
        self.ids = ids.to(device=device, dtype=torch.int32)
        self.w = (top / top.sum(-1, keepdim=True)).to(device=device, dtype=torch.float32)
        e = self.ids.long()
        # the shrinks as the library gives them to moe_swiglu: zg [T, 2, R], rounded to x's dtype
        self.zg = torch.einsum("th,tjrh->tjr", self.x.float(), self.Ag.float()[e]).to(dtype)
        self.zu = torch.einsum("th,tjrh->tjr", self.x.float(), self.Au.float()[e]).to(dtype)


def interleave(a, b):
    """Rows of a and b [I, C] in alternating blocks of 64: [2 I, C]."""
    I, C = a.shape
    return torch.stack([a.reshape(I // 64, 64, C), b.reshape(I // 64, 64, C)], 1).reshape(2 * I, C)


def prepare(p):
    """The kernel's operands (weight preparation, once per weight update; the z per call)."""
    expert_major = lambda B: B.permute(1, 0, 2).reshape(B.shape[1], E * R)  # noqa: E731  [I, E R]
    # v17s reads Wg and Wu as they are, Wu after Wg in memory (its 3-D tensor map's third stride
    # is their distance): here the two halves of one allocation
    w2 = torch.stack([p.Wg, p.Wu])
    return dict(
        x=p.x.contiguous(),
        wgu=interleave(p.Wg, p.Wu).contiguous(), wg=w2[0], wu=w2[1],
        bgu=interleave(expert_major(p.Bg), expert_major(p.Bu)).contiguous(),
        ad=p.Ad.reshape(E * R, p.I).contiguous(),
        zg=(p.zg.float() * SCALE).to(p.x.dtype).contiguous(),
        zu=(p.zu.float() * SCALE).to(p.x.dtype).contiguous(),
        ids=p.ids.contiguous(), w=p.w.contiguous())


def reference(p):
    """hbar [T, I] fp32 and zd [T, 2, R] fp32 per pair, from the unprepared weights, in fp32 with
    the library contract's roundings (G and U, then h for the zd product, in bf16)."""
    xf = p.x.float()
    G = (xf @ p.Wg.float().t()).to(p.x.dtype).float()
    U = (xf @ p.Wu.float().t()).to(p.x.dtype).float()
    hbar = torch.zeros_like(G)
    zd = torch.zeros(p.T, K, R, device=G.device)
    for j in range(K):
        e = p.ids[:, j].long()
        g = G + SCALE * torch.einsum("tr,tir->ti", p.zg[:, j].float(), p.Bg.float()[e])
        u = U + SCALE * torch.einsum("tr,tir->ti", p.zu[:, j].float(), p.Bu.float()[e])
        h = torch.nn.functional.silu(g) * u
        hbar += p.w[:, j, None] * h
        zd[:, j] = torch.einsum("ti,tri->tr", h.to(p.x.dtype).float(), p.Ad.float()[e])
    return hbar, zd


def plan(T, I, ctas, variant=0):
    """make_plan of the .cu as the launcher calls it: (m_blocks, n_tiles, n_chunks,
    tiles_per_chunk, items), v18c's over clusters (ctas // 2) and pairs of token blocks."""
    cl = CLUSTER[variant]
    units = ctas // cl
    m_blocks, n_tiles = T // (TILE_ROWS[variant] * cl), I // TI
    chunks = min(max(units // m_blocks, 1), n_tiles)
    per_chunk = -(-n_tiles // chunks)
    n_chunks = -(-n_tiles // per_chunk)
    return m_blocks, n_tiles, n_chunks, per_chunk, m_blocks * n_chunks


def emulate(op, ctas, variant=0):
    """The kernel's decomposition in PyTorch (fp32 where it sums in fp32): (hbar bf16 [T, I],
    zd_part [P, T, 2, R] fp32, and the (item, warpgroup) partials written, for the tests).
    v17 rounds G and U to bf16 and adds pair 1's deltas as (Z_1 - Z_0) onto pair 0's sums; v18
    keeps them fp32 and adds each pair's deltas to them apart."""
    x, wgu, bgu, ad = op["x"], op["wgu"], op["bgu"], op["ad"]
    T, I = x.shape[0], ad.shape[1]
    TM, cl = TILE_ROWS[variant], CLUSTER[variant]
    m_blocks, n_tiles, n_chunks, per_chunk, items = plan(T, I, ctas, variant)
    grid = min(ctas // cl, items)  # CTAs, or v18c's clusters
    if grid < 1:
        raise ValueError(f"{VARIANTS[variant]} needs at least {cl} CTAs, got {ctas}")
    dt = x.dtype
    hbar = torch.full((T, I), float("nan"), dtype=dt, device=x.device)
    part = torch.full((2 * n_chunks, T, K, R), float("nan"), device=x.device)
    ids, w = op["ids"].long(), op["w"]
    written = []
    for cta in range(grid * cl):
        unit, rank = cta // cl, cta % cl
        i = 0  # the CTA's tile count (its warpgroups alternate on it)
        for item in range(unit, items, grid):
            m0, chunk = ((item % m_blocks) * cl + rank) * TM, item // m_blocks
            rows = slice(m0, m0 + TM)
            e, wr = ids[rows], w[rows]
            zsum = torch.zeros(2, TM, K, R, device=x.device)  # [warpgroup] the item's zd sums
            slot = torch.arange(E * R, device=x.device) // R  # expert of each K column
            mask = [(e[:, j, None] == slot[None, :]).float() for j in range(K)]  # [TM, E R]
            zgj = [op["zg"][rows, j].float().repeat(1, E) * mask[j] for j in range(K)]
            zuj = [op["zu"][rows, j].float().repeat(1, E) * mask[j] for j in range(K)]
            for nt in range(chunk * per_chunk, min(n_tiles, (chunk + 1) * per_chunk)):
                own = i % 2
                cols = slice(nt * 2 * TI, (nt + 1) * 2 * TI)
                base = x[rows].float() @ wgu[cols].float().t()  # [TM, 128]: 64 of G, 64 of U
                if variant in V17_NUMERICS:
                    base = base.to(dt).float()
                b = bgu[cols].float()  # [128, E R]: rows 0-63 G's, 64-127 U's
                a_t = ad[:, nt * TI:(nt + 1) * TI].float()  # [E R, 64]
                acc = base.clone()
                acc[:, :TI] += zgj[0] @ b[:TI].t()
                acc[:, TI:] += zuj[0] @ b[TI:].t()
                h0 = (torch.nn.functional.silu(acc[:, :TI]) * acc[:, TI:]).to(dt)
                zsum[own, :, 0] += ((h0.float() @ a_t.t()).view(TM, E, R) *
                                    mask[0].view(TM, E, R)).sum(1)
                if variant in V17_NUMERICS:
                    acc[:, :TI] += (zgj[1] - zgj[0]) @ b[:TI].t()
                    acc[:, TI:] += (zuj[1] - zuj[0]) @ b[TI:].t()
                else:
                    acc = base.clone()
                    acc[:, :TI] += zgj[1] @ b[:TI].t()
                    acc[:, TI:] += zuj[1] @ b[TI:].t()
                h1 = torch.nn.functional.silu(acc[:, :TI]) * acc[:, TI:]
                hbar[rows, nt * TI:(nt + 1) * TI] = (wr[:, 1:2] * h1 + wr[:, 0:1] * h0.float()).to(dt)
                zsum[own, :, 1] += ((h1.to(dt).float() @ a_t.t()).view(TM, E, R) *
                                    mask[1].view(TM, E, R)).sum(1)
                i += 1
            for own in range(2):
                part[2 * chunk + own, rows] = zsum[own]
                written.append((item, rank, own))
    return hbar, part, written


def at_least_a_cluster(ctas, variant):
    """A shape's CTA cap as a variant can take it (v18c: whole clusters of 2; <= 0 stays: all SMs)."""
    return ctas if ctas <= 0 else max(ctas, CLUSTER[variant])


def errors(hbar, zd, ref_hbar, ref_zd):
    """Max errors relative to the largest reference value, and the bf16 bound they are held to."""
    rel = lambda a, b: ((a.float() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    return dict(hbar=rel(hbar, ref_hbar), zd=rel(zd, ref_zd))


BOUND = 2.0 ** -6  # 4 bf16 ulps of the largest value: the kernels round (G, U,) h0 and hbar


# ------------------------------------------------------------------------------------------------
# the device kernel
# ------------------------------------------------------------------------------------------------
NVCC = ["nvcc", "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
        "-I", os.path.join(HERE, "..", "csrc"), os.path.join(HERE, "fused_gu_wgmma_proto.cu")]


def ptxas_report(stderr):
    """What ptxas -v said of each kernel (by the name in its mangled one, e.g. fused_gu_kernel<1>):
    spill bytes, and its warnings that every wgmma of the kernel is serialized (C7511 for
    registers, C7512, C7515 for accumulators written between wgmma): under any of them the main
    loop loses its overlap and no timing measures the design."""
    def short(mangled):
        names = re.findall(r"\d((?:wgmma_gemm|fused_gu|fused_bwd)\w*?kernel)", mangled)
        tmpl = re.search(r"kernelI((?:L[ib]\d+E)+)E", mangled)
        base = names[-1] if names else mangled
        if tmpl is None:
            return base
        args = [("true" if v == "1" else "false") if t == "b" else v
                for t, v in re.findall(r"L([ib])(\d+)E", tmpl.group(1))]
        return base + "<" + ", ".join(args) + ">"
    report, current = {}, None
    for line in stderr.splitlines():
        fn = re.search(r"(?:Compiling entry function|(?:in|for) the function) '([^']+)'", line)
        if fn is None:
            m = re.search(r"(\d+) bytes spill stores", line)
            if m and current is not None:
                report[current]["spill_store_bytes"] = int(m.group(1))
            continue
        name = short(fn.group(1))
        entry = report.setdefault(name, dict(spill_store_bytes=0, serialized=[]))
        warning = re.search(r"\((C75\d\d)\)", line)
        if warning:
            entry["serialized"] = sorted(set(entry["serialized"]) | {warning.group(1)})
        else:
            current = name
    return report


def load_library(out_dir, nvcc, name, report_name):
    """nvcc's shared library `name` in out_dir, built there unless an earlier run did (its ptxas
    report kept beside it as report_name): one build for the processes of a device call. Returns
    (the ctypes library, the report), after printing the report and any serialized kernel."""
    lib = os.path.join(out_dir, name)
    saved = os.path.join(out_dir, report_name)
    if os.path.exists(lib) and os.path.exists(saved):
        with open(saved) as f:
            report = json.load(f)
    else:
        cmd = nvcc + ["-shared", "-Xcompiler", "-fPIC", "-o", lib]
        done = subprocess.run(cmd, capture_output=True, text=True)
        print(done.stderr.strip()[-2000:], file=sys.stderr)
        if done.returncode != 0:
            raise SystemExit(f"nvcc failed ({done.returncode}): {' '.join(cmd)}")
        report = ptxas_report(done.stderr)
        with open(saved, "w") as f:
            json.dump(report, f)
    print(f"ptxas: {json.dumps(report)}", flush=True)
    for kernel, entry in report.items():
        if entry["serialized"]:
            print(f"WARNING: ptxas serialized {kernel}'s wgmma: its timings are not the design's", flush=True)
    return ctypes.CDLL(lib), report


def build(out_dir):
    """The kernels as a shared library in out_dir (load_library)."""
    so, report = load_library(out_dir, NVCC, "fused_gu_wgmma_proto.so", "ptxas.json")
    so.fused_gu_partials.argtypes = [ctypes.c_int] * 4
    so.fused_gu_partials.restype = ctypes.c_int
    so.fused_gu_moe_swiglu_bf16.argtypes = ([ctypes.c_void_p] * 13 + [ctypes.c_int] * 3 +
                                            [ctypes.c_void_p, ctypes.c_int, ctypes.c_int])
    so.fused_gu_moe_swiglu_bf16.restype = ctypes.c_int
    so.ptxas = report
    return so


def fused(so, op, max_ctas=0, out=None, variant=0, gu=None):
    """hbar [T, I] bf16 and zd_part [P, T, 2, R] fp32 from the kernel (out: reuse these); with
    gu = (G, U) [T, I] bf16 (v18, training) also the frozen GEMM's sums into them."""
    x = op["x"]
    T, H, I = x.shape[0], x.shape[1], op["ad"].shape[1]
    if out is None:
        P = so.fused_gu_partials(T, I, max_ctas, variant)
        if P <= 0:
            raise RuntimeError(f"fused_gu_partials({T}, {I}, {max_ctas}, {variant}) = {P}")
        out = (torch.empty(T, I, device=x.device, dtype=x.dtype),
               torch.empty(P, T, K, R, device=x.device, dtype=torch.float32))
    hbar, part = out
    split = variant == 3  # v17s: Wg and Wu as they are, in place of the interleaved copy
    ptrs = [op[n].data_ptr() for n in ("x", "wg" if split else "wgu")] + [op["wu"].data_ptr() if split else None]
    ptrs += [op[n].data_ptr() for n in ("bgu", "ad", "zg", "zu", "ids", "w")]
    g, u = (gu[0].data_ptr(), gu[1].data_ptr()) if gu is not None else (None, None)
    code = so.fused_gu_moe_swiglu_bf16(*ptrs, hbar.data_ptr(), part.data_ptr(), g, u, T, H, I,
                                       torch.cuda.current_stream().cuda_stream, max_ctas, variant)
    if code != 0:
        raise RuntimeError(f"fused_gu_moe_swiglu_bf16 returned {code}")
    return hbar, part


# Where check / time_shape run: the GPU; tests/test_bench_fused_gu.py runs them on the CPU with
# `fused` replaced by the emulation, so that the device call does not find the driver's bugs.
DEV = "cuda"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def sm_count():
    return torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 132


def check(so, variant, T, H, I, max_ctas):
    p = Problem(T, H, I, DEV)
    op = prepare(p)
    ref_hbar, ref_zd = reference(p)
    max_ctas = at_least_a_cluster(max_ctas, variant)
    row = dict(variant=VARIANTS[variant], T=T, H=H, I=I, max_ctas=max_ctas)
    P = so.fused_gu_partials(T, I, max_ctas, variant)
    runs = []
    for _ in range(2):
        out = (torch.full((T, I), float("nan"), device=DEV, dtype=torch.bfloat16),
               torch.full((P, T, K, R), float("nan"), device=DEV))
        gu = None
        if variant in TRAINING:  # training: G and U out too (NaN before)
            gu = tuple(torch.full((T, I), float("nan"), device=DEV, dtype=torch.bfloat16)
                       for _ in range(2))
        runs.append(fused(so, op, max_ctas, out, variant, gu) + (gu,))
    sync()
    hbar, part, gu = runs[0]
    row.update(errors(hbar, part.sum(0), ref_hbar, ref_zd))
    row["nan"] = bool(torch.isnan(hbar).any().item() or torch.isnan(part).any().item())
    row["repeat_identical"] = bool(torch.equal(hbar, runs[1][0]) and torch.equal(part, runs[1][1]))
    gu_ok = True
    if gu is not None:  # against the fp32 products, to a bf16 ulp of their largest value and cuBLAS's error
        xf = p.x.float()
        for name, got, W in (("G", gu[0], p.Wg), ("U", gu[1], p.Wu)):
            exact = xf @ W.float().t()
            err = (got.float() - exact).abs().max().item()
            bound = 2 * ((p.x @ W.t()).float() - exact).abs().max().item() + exact.abs().max().item() * 2.0 ** -8
            row[f"{name}_error"], row[f"{name}_bound"] = err, bound
            gu_ok = gu_ok and err <= bound and not torch.isnan(got).any().item()
        row["gu_repeat_identical"] = bool(all(torch.equal(a, b) for a, b in zip(gu, runs[1][2])))
        gu_ok = gu_ok and row["gu_repeat_identical"]
    # the decomposition on the GPU in fp32: where the kernel and the reference disagree, this
    # says whose the difference is (ctas as the kernel's plan saw them)
    sms = sm_count()
    if T * I <= 1024 * 1024:
        e_hbar, e_part, _ = emulate(op, max_ctas if max_ctas > 0 else sms, variant)
        row["vs_emulation"] = errors(hbar, part.sum(0), e_hbar.float(), e_part.sum(0))
        row["emulation_vs_reference"] = errors(e_hbar, e_part.sum(0), ref_hbar, ref_zd)
    row["ok"] = bool(not row["nan"] and row["repeat_identical"] and row["hbar"] <= BOUND
                     and row["zd"] <= BOUND and gu_ok)
    print(f"check {VARIANTS[variant]} T={T} H={H} I={I} ctas={max_ctas or sms}: " + json.dumps(row),
          flush=True)
    return row


def dense_lora_split(so, variant, T, H, I):
    """When a check fails: the same shape with the LoRA zeroed (zg = zu = 0: the GEMM, the
    interleave and the SwiGLU alone; zd then checks the zd products on dense h), with only pair
    0's z (its masks and deltas) and with only pair 1's (v17's Z_1 - Z_0, v18's second sums)."""
    for name, edit in (("no_lora", lambda q: (q.zg.zero_(), q.zu.zero_())),
                       ("pair0_only", lambda q: (q.zg[:, 1].zero_(), q.zu[:, 1].zero_())),
                       ("pair1_only", lambda q: (q.zg[:, 0].zero_(), q.zu[:, 0].zero_()))):
        p = Problem(T, H, I, DEV)
        edit(p)
        op = prepare(p)
        hbar, part = fused(so, op, variant=variant)
        ref_hbar, ref_zd = reference(p)
        print(f"diagnose {VARIANTS[variant]} {name} T={T} H={H} I={I}: " +
              json.dumps(errors(hbar, part.sum(0), ref_hbar, ref_zd)), flush=True)


GROUP_TOKENS = 4096  # time_shape's slices at larger T (the x blocks of 4096 tokens fit L2)


def sliced(op, t0, n):
    """op's tokens t0 .. t0 + n (row slices of the per-token operands: views, 16-byte aligned)."""
    return {k: (v[t0:t0 + n] if k in ("x", "zg", "zu", "ids", "w") else v) for k, v in op.items()}


CALLS = 5  # calls a timed sample: the host's work for one call overlaps the GPU's of the last


def time_shape(so, variants, T, H, I, reps):
    """Ours (hbar and zd partials, then their sum; v18 also in training, writing G and U) beside
    cuBLAS's gate / up GEMM + silu(G) * U (the dense MLP's part this replaces) and the library's
    path (the same GEMM + moe_swiglu)."""
    p = Problem(T, H, I, DEV)
    op = prepare(p)
    wgu = torch.cat([p.Wg, p.Wu])
    silu = torch.nn.functional.silu

    def repeated(fn):
        def run():
            for _ in range(CALLS):
                fn()
        return run

    def dense():
        gu = p.x @ wgu.t()
        return silu(gu[:, :I]) * gu[:, I:]

    fns = {}
    for v in variants:
        out = fused(so, op, variant=v)
        fns[VARIANTS[v]] = repeated(lambda v=v, out=out: (fused(so, op, 0, out, v), out[1].sum(0)))
        if T > GROUP_TOKENS and T % GROUP_TOKENS == 0:
            # the same work as calls over GROUP_TOKENS-token slices: the x blocks in use at once
            # then fit L2 (at T = 16384 the plan's one chunk has all 128 MB of them in use)
            parts = [(sliced(op, g * GROUP_TOKENS, GROUP_TOKENS),) for g in range(T // GROUP_TOKENS)]
            parts = [(q, fused(so, q, variant=v)) for (q,) in parts]
            fns[VARIANTS[v] + "_by_slices"] = repeated(
                lambda v=v, parts=parts: [(fused(so, q, 0, o, v), o[1].sum(0)) for q, o in parts])
        if v in TRAINING:
            gu = (torch.empty(T, I, device=DEV, dtype=torch.bfloat16),
                  torch.empty(T, I, device=DEV, dtype=torch.bfloat16))
            fns[VARIANTS[v] + "_training"] = repeated(
                lambda v=v, out=out, gu=gu: (fused(so, op, 0, out, v, gu), out[1].sum(0)))
    fns.update(cublas_gu=repeated(lambda: p.x @ wgu.t()), dense_gu_swiglu=repeated(dense))
    try:
        from mixlora_ext import ops
        zg, zu = p.zg.float(), p.zu.float()

        def library():
            gu = p.x @ wgu.t()
            return ops.moe_swiglu(gu[:, :I], gu[:, I:], p.ids, p.w, zg, p.Bg, zu, p.Bu, p.Ad, SCALE, 0)
        library()
        fns["library_gu_moe_swiglu"] = repeated(library)
    except Exception as exc:  # the extension not built here: time the rest
        print(f"library path not timed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    got = {n: ms / CALLS for n, ms in interleaved_medians(fns, reps, call_timer(torch.device(DEV))).items()}
    row = dict(T=T, H=H, I=I, **{f"{n}_ms": ms for n, ms in got.items()})
    for v in variants:
        name = VARIANTS[v]
        row[f"{name}_vs_dense_gu_swiglu"] = got[name] / got["dense_gu_swiglu"]
        if name + "_by_slices" in got:
            row[f"{name}_by_slices_vs_dense_gu_swiglu"] = got[name + "_by_slices"] / got["dense_gu_swiglu"]
        row[f"{name}_tflops"] = 2 * T * H * 2 * I / got[name] / 1e9
    print(f"time T={T} H={H} I={I}: " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in got.items()) + "; / dense " +
          ", ".join(f"{VARIANTS[v]} {row[VARIANTS[v] + '_vs_dense_gu_swiglu']:.3f}" for v in variants), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--variants", type=int, nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="0 v17 (128-token tiles), 1 v18 (64-token tiles, also in training), "
                             "2 v18c (v18 in 2-CTA clusters), 3 v17s (v17 reading Wg, Wu as they are)")
    parser.add_argument("--json", default=None, help="write the checks and timings here")
    parser.add_argument("--build-dir", default=None,
                        help="build the library here, or reuse the one an earlier run built (default: a temporary one)")
    parser.add_argument("--emulate", action="store_true", help="CPU: the decomposition vs the reference")
    a = parser.parse_args()
    if a.emulate:
        for v in a.variants:
            for T, H, I, ctas in CHECK_SHAPES[:3]:
                p = Problem(T, H, I, "cpu")
                hbar, part, _ = emulate(prepare(p), at_least_a_cluster(ctas, v), v)
                print(f"emulate {VARIANTS[v]} T={T} H={H} I={I} ctas={ctas}:",
                      json.dumps(errors(hbar, part.sum(0), *reference(p))))
        return
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("needs a Hopper GPU (sm_90) and a CUDA build of torch")
    torch.backends.cuda.matmul.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        if a.build_dir:
            os.makedirs(a.build_dir, exist_ok=True)
        so = build(a.build_dir or tmp)
        checks = [check(so, v, *s) for v in a.variants for s in CHECK_SHAPES]
        correct = [v for v in a.variants if all(c["ok"] for c in checks if c["variant"] == VARIANTS[v])]
        for v in a.variants:
            if v not in correct:
                dense_lora_split(so, v, *CHECK_SHAPES[3][:3])
        rows = [time_shape(so, correct, *s, a.reps) for s in TIME_SHAPES] if correct else []
        if not correct:
            print("no variant gave correct results: no timings", flush=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, ptxas=so.ptxas,
                  checks=checks, rows=rows, command=" ".join(sys.argv))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
