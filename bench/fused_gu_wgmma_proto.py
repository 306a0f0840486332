"""v17: the MoE SwiGLU in our own Hopper gate / up GEMM's epilogue (bench/fused_gu_wgmma_proto.cu,
bench/NOTES.md v17), checked against the fp32 reference and timed beside cuBLAS.

What the kernel computes, for T tokens with experts ids [T, 2] and weights w [T, 2] (E = 8,
R = 16, bf16; s the LoRA scale):
    g_j = bf16(x Wg^T) + s zg_j Bg[e_j]^T,  u_j likewise,  h_j = silu(g_j) u_j
    hbar = bf16(w_0 bf16(h_0) + w_1 h_1)     zd_j = bf16(h_j) Ad[e_j]^T (fp32, [T, 2, R])
with zg_j = bf16(x Ag[e_j]^T) the shrink's output (the library's moe_swiglu contract).

Its inputs are laid out once per weight update (`prepare`): Wg and Wu rows interleaved in blocks
of 64 ([2 I, H]), Bg and Bu the same way with expert-major columns ([2 I, E R]), Ad as [E R, I];
zg and zu per pair as bf16 [T, 2, R] with s folded in (exact for the power-of-two s used here).

`emulate` is the kernel's decomposition in PyTorch (its work items, tiles, the two warpgroups'
alternation and zd partials, the pair-1 deltas as (Z_1 - Z_0) onto sums holding delta_0, the
roundings where the kernel rounds): on the CPU it checks the algebra and the layouts `prepare`
makes (tests/test_bench.py), on the GPU it says, when the kernel disagrees with the reference,
whether the disagreement is the decomposition's or the device code's.

    device: timeout 300 python3 bench/fused_gu_wgmma_proto.py [--reps 30] [--json F]
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
TM, TI = 128, 64    # a tile: tokens, columns of I
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
    return dict(
        x=p.x.contiguous(),
        wgu=interleave(p.Wg, p.Wu).contiguous(),
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


def plan(T, I, ctas):
    """make_plan of the .cu: (m_blocks, n_tiles, n_chunks, tiles_per_chunk, items)."""
    m_blocks, n_tiles = T // TM, I // TI
    chunks = min(max(ctas // m_blocks, 1), n_tiles)
    per_chunk = -(-n_tiles // chunks)
    n_chunks = -(-n_tiles // per_chunk)
    return m_blocks, n_tiles, n_chunks, per_chunk, m_blocks * n_chunks


def emulate(op, ctas):
    """The kernel's decomposition in PyTorch (fp32 where it sums in fp32): (hbar bf16 [T, I],
    zd_part [P, T, 2, R] fp32, and the (item, warpgroup) partials written, for the tests)."""
    x, wgu, bgu, ad = op["x"], op["wgu"], op["bgu"], op["ad"]
    T, I = x.shape[0], ad.shape[1]
    m_blocks, n_tiles, n_chunks, per_chunk, items = plan(T, I, ctas)
    grid = min(ctas, items)
    dt = x.dtype
    hbar = torch.full((T, I), float("nan"), dtype=dt, device=x.device)
    part = torch.full((2 * n_chunks, T, K, R), float("nan"), device=x.device)
    ids, w = op["ids"].long(), op["w"]
    written = []
    for cta in range(grid):
        i = 0  # the CTA's tile count (its warpgroups alternate on it)
        for item in range(cta, items, grid):
            m0, chunk = (item % m_blocks) * TM, item // m_blocks
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
                acc = (x[rows].float() @ wgu[cols].float().t()).to(dt).float()  # [TM, 128]
                b = bgu[cols].float()  # [128, E R]: rows 0-63 G's, 64-127 U's
                a_t = ad[:, nt * TI:(nt + 1) * TI].float()  # [E R, 64]
                acc[:, :TI] += zgj[0] @ b[:TI].t()
                acc[:, TI:] += zuj[0] @ b[TI:].t()
                h0 = (torch.nn.functional.silu(acc[:, :TI]) * acc[:, TI:]).to(dt)
                zsum[own, :, 0] += ((h0.float() @ a_t.t()).view(TM, E, R) *
                                    mask[0].view(TM, E, R)).sum(1)
                acc[:, :TI] += (zgj[1] - zgj[0]) @ b[:TI].t()
                acc[:, TI:] += (zuj[1] - zuj[0]) @ b[TI:].t()
                h1 = torch.nn.functional.silu(acc[:, :TI]) * acc[:, TI:]
                hbar[rows, nt * TI:(nt + 1) * TI] = (wr[:, 1:2] * h1 + wr[:, 0:1] * h0.float()).to(dt)
                zsum[own, :, 1] += ((h1.to(dt).float() @ a_t.t()).view(TM, E, R) *
                                    mask[1].view(TM, E, R)).sum(1)
                i += 1
            for own in range(2):
                part[2 * chunk + own, rows] = zsum[own]
                written.append((item, own))
    return hbar, part, written


def errors(hbar, zd, ref_hbar, ref_zd):
    """Max errors relative to the largest reference value, and the bf16 bound they are held to."""
    rel = lambda a, b: ((a.float() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    return dict(hbar=rel(hbar, ref_hbar), zd=rel(zd, ref_zd))


BOUND = 2.0 ** -6  # 4 bf16 ulps of the largest value: the kernel rounds G, U, h0 and hbar


# ------------------------------------------------------------------------------------------------
# the device kernel
# ------------------------------------------------------------------------------------------------
NVCC = ["nvcc", "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
        "-I", os.path.join(HERE, "..", "csrc"), os.path.join(HERE, "fused_gu_wgmma_proto.cu")]


def ptxas_report(stderr):
    """What ptxas -v said of the kernel: spill bytes, and its warnings that every wgmma of the
    kernel is serialized (C7511 for registers, C7515 for accumulators written between wgmma):
    under either the main loop loses its overlap and no timing measures the design."""
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", stderr)]
    return dict(spill_store_bytes=max(spills, default=0),
                serialized=sorted(set(re.findall(r"\((C751\d)\)", stderr))))


def build(out_dir):
    lib = os.path.join(out_dir, "fused_gu_wgmma_proto.so")
    cmd = NVCC + ["-shared", "-Xcompiler", "-fPIC", "-o", lib]
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(done.stderr.strip()[-2000:], file=sys.stderr)
    if done.returncode != 0:
        raise SystemExit(f"nvcc failed ({done.returncode}): {' '.join(cmd)}")
    report = ptxas_report(done.stderr)
    print(f"ptxas: {json.dumps(report)}", flush=True)
    if report["serialized"]:
        print("WARNING: ptxas serialized the kernel's wgmma: timings below are not the design's", flush=True)
    so = ctypes.CDLL(lib)
    so.fused_gu_partials.argtypes = [ctypes.c_int] * 3
    so.fused_gu_partials.restype = ctypes.c_int
    so.fused_gu_moe_swiglu_bf16.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.c_int]
    so.fused_gu_moe_swiglu_bf16.restype = ctypes.c_int
    so.ptxas = report
    return so


def fused(so, op, max_ctas=0, out=None):
    """hbar [T, I] bf16 and zd_part [P, T, 2, R] fp32 from the kernel (out: reuse these)."""
    x = op["x"]
    T, H, I = x.shape[0], x.shape[1], op["ad"].shape[1]
    if out is None:
        P = so.fused_gu_partials(T, I, max_ctas)
        if P <= 0:
            raise RuntimeError(f"fused_gu_partials({T}, {I}) = {P}")
        out = (torch.empty(T, I, device=x.device, dtype=x.dtype),
               torch.empty(P, T, K, R, device=x.device, dtype=torch.float32))
    hbar, part = out
    ptrs = [op[n].data_ptr() for n in ("x", "wgu", "bgu", "ad", "zg", "zu", "ids", "w")]
    code = so.fused_gu_moe_swiglu_bf16(*ptrs, hbar.data_ptr(), part.data_ptr(), T, H, I,
                                       torch.cuda.current_stream().cuda_stream, max_ctas)
    if code != 0:
        raise RuntimeError(f"fused_gu_moe_swiglu_bf16 returned {code}")
    return hbar, part


def check(so, T, H, I, max_ctas):
    p = Problem(T, H, I, "cuda")
    op = prepare(p)
    ref_hbar, ref_zd = reference(p)
    row = dict(T=T, H=H, I=I, max_ctas=max_ctas)
    P = so.fused_gu_partials(T, I, max_ctas)
    runs = []
    for _ in range(2):
        out = (torch.full((T, I), float("nan"), device="cuda", dtype=torch.bfloat16),
               torch.full((P, T, K, R), float("nan"), device="cuda"))
        runs.append(fused(so, op, max_ctas, out))
    torch.cuda.synchronize()
    hbar, part = runs[0]
    row.update(errors(hbar, part.sum(0), ref_hbar, ref_zd))
    row["nan"] = bool(torch.isnan(hbar).any().item() or torch.isnan(part).any().item())
    row["repeat_identical"] = bool(torch.equal(hbar, runs[1][0]) and torch.equal(part, runs[1][1]))
    # the decomposition on the GPU in fp32: where the kernel and the reference disagree, this
    # says whose the difference is (ctas as the kernel's plan saw them)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if T * I <= 1024 * 1024:
        e_hbar, e_part, _ = emulate(op, max_ctas if max_ctas > 0 else sms)
        row["vs_emulation"] = errors(hbar, part.sum(0), e_hbar.float(), e_part.sum(0))
        row["emulation_vs_reference"] = errors(e_hbar, e_part.sum(0), ref_hbar, ref_zd)
    row["ok"] = (not row["nan"] and row["repeat_identical"] and row["hbar"] <= BOUND
                 and row["zd"] <= BOUND)
    print(f"check T={T} H={H} I={I} ctas={max_ctas or sms}: " + json.dumps(row), flush=True)
    return row


def dense_lora_split(so, T, H, I):
    """When a check fails: the same shape with the LoRA zeroed (zg = zu = 0: the GEMM, the
    interleave and the SwiGLU alone) and with only pair 0's experts' z (the masks and deltas)."""
    p = Problem(T, H, I, "cuda")
    for name, edit in (("no_lora", lambda q: (q.zg.zero_(), q.zu.zero_())),
                       ("pair0_only", lambda q: (q.zg[:, 1].zero_(), q.zu[:, 1].zero_()))):
        edit(p)
        op = prepare(p)
        hbar, part = fused(so, op)
        ref_hbar, ref_zd = reference(p)
        print(f"diagnose {name} T={T} H={H} I={I}: " +
              json.dumps(errors(hbar, part.sum(0), ref_hbar, ref_zd)), flush=True)


CALLS = 5  # calls a timed sample: the host's work for one call overlaps the GPU's of the last


def time_shape(so, T, H, I, reps):
    """Ours (hbar and zd partials, then their sum) beside cuBLAS's gate / up GEMM + silu(G) * U
    (the dense MLP's part this replaces) and the library's path (the same GEMM + moe_swiglu)."""
    p = Problem(T, H, I, "cuda")
    op = prepare(p)
    out = fused(so, op)
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

    fns = dict(fused=repeated(lambda: (fused(so, op, 0, out), out[1].sum(0))),
               cublas_gu=repeated(lambda: p.x @ wgu.t()), dense_gu_swiglu=repeated(dense))
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
    got = {n: ms / CALLS for n, ms in interleaved_medians(fns, reps, call_timer(torch.device("cuda"))).items()}
    row = dict(T=T, H=H, I=I, **{f"{n}_ms": ms for n, ms in got.items()})
    row["fused_vs_dense_gu_swiglu"] = got["fused"] / got["dense_gu_swiglu"]
    row["fused_tflops"] = 2 * T * H * 2 * I / got["fused"] / 1e9
    print(f"time T={T} H={H} I={I}: " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in got.items()) +
          f"; fused / dense {row['fused_vs_dense_gu_swiglu']:.3f}", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", default=None, help="write the checks and timings here")
    parser.add_argument("--emulate", action="store_true", help="CPU: the decomposition vs the reference")
    a = parser.parse_args()
    if a.emulate:
        for T, H, I, ctas in CHECK_SHAPES[:3]:
            p = Problem(T, H, I, "cpu")
            hbar, part, _ = emulate(prepare(p), ctas)
            print(f"emulate T={T} H={H} I={I} ctas={ctas}:", json.dumps(errors(hbar, part.sum(0), *reference(p))))
        return
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("needs a Hopper GPU (sm_90) and a CUDA build of torch")
    torch.backends.cuda.matmul.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        so = build(tmp)
        checks = [check(so, *s) for s in CHECK_SHAPES]
        ok = all(c["ok"] for c in checks)
        if not ok:
            dense_lora_split(so, *CHECK_SHAPES[3][:3])
        rows = [time_shape(so, *s, a.reps) for s in TIME_SHAPES] if ok else []
        if not ok:
            print("wrong results: no timings", flush=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, ptxas=so.ptxas,
                  checks=checks, rows=rows, command=" ".join(sys.argv))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
