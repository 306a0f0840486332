"""v19: pass 1 of the MoE SwiGLU backward in our own Hopper dhbar GEMM's epilogue
(bench/fused_bwd_wgmma_proto.cu), checked against the fp32 reference and timed beside cuBLAS.

What the kernel computes, for T tokens with experts ids [T, 2] and weights w [T, 2] (E = 8,
R = 16, bf16, SiLU, no dropout; s the LoRA scale), given dout [T, H], the frozen G, U [T, I]
and the forward's z:
    dhbar = bf16(dout Wd)                (fp32 sums, stored as bf16 for pass 2 and read back)
    g_j = G + s zg_j Bg[e_j]^T,  u_j likewise,  dh_j = w_j dhbar + gzd_j Ad[e_j]   (gzd = dL/dzd)
    dg_j = dh_j u_j silu'(g_j),  du_j = dh_j silu(g_j),  h_j = silu(g_j) u_j
    dG = bf16(dg_0 + dg_1), dU likewise;  dzg_j = s dg_j Bg[e_j], dzu_j = s du_j Bu[e_j];
    dw_j = sum_i dhbar h_j   (the zd term of dw the library adds elsewhere)
the library's moe_swiglu_backward pass 1 (csrc/swiglu/swiglu_cpu.cpp) with grad_hbar = dhbar
(bf16, as the library's GEMM writes it).
dz and dw come as fp32 partials [P, T, 2, 2R] and [P, T, 2] (P = 2 per column chunk, one per
warpgroup), dz's from bf16(dg), bf16(du) and without s: the caller takes s dz_part.sum(0).

Its inputs are laid out once per weight update (`prepare`): Wd as Wd^T [I, H], Bg and Bu as the
forward's (rows interleaved in blocks of 64, expert-major columns: [2 I, E R]), Ad as [I, E R],
Bg and Bu again transposed for the dz products ([2 E R, I]); zg and zu per pair as bf16
[T, 2, R] with s folded in (exact for the power-of-two s used here), gzd as bf16 [T, 2, R].

`emulate` is the kernel's decomposition in PyTorch (its work items, tiles, the two warpgroups'
alternation and dz / dw partials, the roundings where the kernel rounds): on the CPU it checks
the algebra and the layouts `prepare` makes (tests/test_bench_fused_bwd.py), on the GPU it says,
when the kernel disagrees with the reference, whether the disagreement is the decomposition's or
the device code's.

    device: timeout 300 python3 bench/fused_bwd_wgmma_proto.py [--reps 30] [--json F] [--build-dir D]
    here:   python3 bench/fused_bwd_wgmma_proto.py --emulate      (CPU: emulate vs reference)
"""
import argparse
import ctypes
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from fused_gu_wgmma_proto import NVCC as FWD_NVCC, interleave, load_library, ptxas_report  # noqa: E402
from timing import call_timer, interleaved_medians  # noqa: E402  (bench/timing.py)

E, R, K = 8, 16, 2  # the prototype's experts, rank, pairs (compile-time in the .cu)
TM, TN = 64, 128    # a tile's tokens and columns of I (two 64-column blocks of bgu, four quarters)
SCALE = 2.0         # alpha / r of the bench (a power of two: folding it into bf16 z is exact)
NAMES = ("dG", "dU", "dhbar", "dz", "dw")

# (T, H, I, max_ctas): one tile; several items a CTA with odd tile counts; a few waves; the target
CHECK_SHAPES = [(64, 64, 128, 1), (192, 128, 384, 2), (256, 256, 640, 3), (1024, 512, 1024, 0),
                (4096, 4096, 11008, 0)]
TIME_SHAPES = [(4096, 4096, 11008), (4096, 4096, 14336), (4096, 2048, 5632), (16384, 4096, 11008)]


# ------------------------------------------------------------------------------------------------
# inputs, layouts, reference
# ------------------------------------------------------------------------------------------------
class Problem:
    """Random frozen down weight, forward activations, MixLoRA weights, routing and the
    gradients arriving at the MLP (dout) and at zd (gzd) for one shape."""

    def __init__(self, T, H, I, device, dtype=torch.bfloat16, seed=0):
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def rnd(*shape, std):
            return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)
        self.T, self.H, self.I = T, H, I
        self.dout = rnd(T, H, std=1.0)
        self.Wd = rnd(H, I, std=I ** -0.5)
        self.G, self.U = rnd(T, I, std=1.0), rnd(T, I, std=1.0)
        self.Bg, self.Bu = rnd(E, I, R, std=0.05), rnd(E, I, R, std=0.05)
        self.Ad = rnd(E, R, I, std=I ** -0.5)
        self.zg, self.zu = rnd(T, K, R, std=1.0), rnd(T, K, R, std=1.0)  # unscaled, as moe_swiglu takes them
        self.gzd = rnd(T, K, R, std=0.05)
        logits = torch.randn(T, E, generator=gen)
        top, ids = logits.softmax(-1).topk(K, dim=-1)  # two distinct experts a token
        self.ids = ids.to(device=device, dtype=torch.int32)
        self.w = (top / top.sum(-1, keepdim=True)).to(device=device, dtype=torch.float32)


def expert_major(B):
    """B [E, I, R] as [I, E R] (column e R + r)."""
    return B.permute(1, 0, 2).reshape(B.shape[1], E * R)


def prepare(p):
    """The kernel's operands (weight preparation, once per weight update; dout, G, U, z, gzd,
    ids and w per call)."""
    return dict(
        dout=p.dout.contiguous(), wdt=p.Wd.t().contiguous(), g=p.G.contiguous(), u=p.U.contiguous(),
        bgu=interleave(expert_major(p.Bg), expert_major(p.Bu)).contiguous(),
        adt=p.Ad.permute(2, 0, 1).reshape(p.I, E * R).contiguous(),             # [i, e R + r] = Ad[e, r, i]
        bgut=torch.cat([expert_major(p.Bg).t(), expert_major(p.Bu).t()]).contiguous(),  # [e R + r, i] = Bg[e, i, r]
        zg=(p.zg.float() * SCALE).to(p.dout.dtype).contiguous(),
        zu=(p.zu.float() * SCALE).to(p.dout.dtype).contiguous(),
        gzd=p.gzd.contiguous(), ids=p.ids.contiguous(), w=p.w.contiguous())


def spread(z, e):
    """z [T, R] (any dtype) into its expert's R columns of [T, E R] fp32, zeros elsewhere."""
    out = torch.zeros(z.shape[0], E, R, device=z.device)
    out[torch.arange(z.shape[0], device=z.device), e.long()] = z.float()
    return out.view(-1, E * R)


def pick(y, e):
    """y [T, E R]: each row's R columns of its expert e [T]: [T, R]."""
    return y.view(-1, E, R)[torch.arange(y.shape[0], device=y.device), e.long()]


def silu_grads(g, u, dh):
    """dg, du and h of one pair from fp32 g, u and dh (the library's swiglu_point_grad)."""
    sig = torch.sigmoid(g)
    silu = g * sig
    return dh * u * sig * (1 + g * (1 - sig)), dh * silu, silu * u


def reference(p):
    """dG, dU, dhbar [T, I], dz [T, 2, 2R] (dzg | dzu, with s) and dw [T, 2], all fp32, from the
    unprepared weights in fp32 (no rounding of dhbar, dg, du)."""
    dhbar = p.dout.float() @ p.Wd.float()
    G, U = p.G.float(), p.U.float()
    bg, bu = expert_major(p.Bg.float()), expert_major(p.Bu.float())  # [I, E R]
    ad = p.Ad.float().reshape(E * R, p.I)
    out = dict(dG=torch.zeros_like(G), dU=torch.zeros_like(G), dhbar=dhbar,
               dz=torch.zeros(p.T, K, 2 * R, device=G.device), dw=torch.zeros(p.T, K, device=G.device))
    for j in range(K):
        e = p.ids[:, j]
        g = G + SCALE * spread(p.zg[:, j], e) @ bg.t()
        u = U + SCALE * spread(p.zu[:, j], e) @ bu.t()
        dh = p.w[:, j, None] * dhbar + spread(p.gzd[:, j], e) @ ad
        dg, du, h = silu_grads(g, u, dh)
        out["dG"] += dg
        out["dU"] += du
        out["dz"][:, j, :R] = SCALE * pick(dg @ bg, e)
        out["dz"][:, j, R:] = SCALE * pick(du @ bu, e)
        out["dw"][:, j] = (dhbar * h).sum(1)
    return out


def plan(T, I, ctas):
    """make_plan of the .cu as the launcher calls it (tiles of 64 tokens, 128 columns):
    (m_blocks, n_tiles, n_chunks, tiles_per_chunk, items)."""
    m_blocks, n_tiles = T // TM, I // TN
    chunks = min(max(ctas // m_blocks, 1), n_tiles)
    per_chunk = -(-n_tiles // chunks)
    n_chunks = -(-n_tiles // per_chunk)
    return m_blocks, n_tiles, n_chunks, per_chunk, m_blocks * n_chunks


def emulate(op, ctas):
    """The kernel's decomposition in PyTorch (fp32 where it sums in fp32): (dG, dU, dhbar bf16
    [T, I], dz_part [P, T, 2, 2R] and dw_part [P, T, 2] fp32, and the (item, warpgroup) partials
    written, for the tests). Emulated per 32-column quarter of the tile's two 64-column blocks,
    pair 0 then pair 1 in each (the order of the kernel's fp32 sums of dw and dz)."""
    dout, wdt, bgu, adt, bgut = op["dout"], op["wdt"], op["bgu"], op["adt"], op["bgut"]
    T, I, dt, dev = dout.shape[0], wdt.shape[0], dout.dtype, dout.device
    m_blocks, n_tiles, n_chunks, per_chunk, items = plan(T, I, ctas)
    grid = min(ctas, items)
    nan = float("nan")
    dG, dU, dhb = (torch.full((T, I), nan, dtype=dt, device=dev) for _ in range(3))
    dz_part = torch.full((2 * n_chunks, T, K, 2 * R), nan, device=dev)
    dw_part = torch.full((2 * n_chunks, T, K), nan, device=dev)
    ids, w = op["ids"], op["w"]
    written = []
    for cta in range(grid):
        i = 0  # the CTA's tile count (its warpgroups alternate on it)
        for item in range(cta, items, grid):
            m0, chunk = (item % m_blocks) * TM, item // m_blocks
            rows = slice(m0, m0 + TM)
            e, wr = ids[rows], w[rows]
            # each pair's bf16 z (zg, zu scaled) in its expert's 16 columns of E R: the A operands
            zgm, zum, gzm = ([spread(op[n][rows, j], e[:, j]) for j in range(K)] for n in ("zg", "zu", "gzd"))
            dz = torch.zeros(2, TM, K, 2 * R, device=dev)  # [warpgroup] the item's sums
            dw = torch.zeros(2, TM, K, device=dev)
            for nt in range(chunk * per_chunk, min(n_tiles, (chunk + 1) * per_chunk)):
                own = i % 2
                dhbar = dout[rows].float() @ wdt[nt * TN:(nt + 1) * TN].float().t()  # [TM, 128]
                dhbar = dhbar.to(dt).float()  # stored as bf16, the epilogue reads it back
                dgs, dus = torch.zeros(TM, TN, device=dev), torch.zeros(TM, TN, device=dev)
                for c in range(2):  # the tile's 64-column blocks n: bgu rows 128 n.. G's, 128 n + 64.. U's
                    n = 2 * nt + c
                    for q in range(2):  # 32-column quarters
                        lc = slice(64 * c + 32 * q, 64 * c + 32 * q + 32)  # the tile's columns
                        gc = slice(nt * TN + lc.start, nt * TN + lc.stop)    # I's
                        bg = bgu[128 * n + 32 * q:128 * n + 32 * q + 32].float()  # [32, E R]
                        bu = bgu[128 * n + 64 + 32 * q:128 * n + 64 + 32 * q + 32].float()
                        ad = adt[gc].float()                                      # [32, E R]
                        btg, btu = bgut[:E * R, gc].float(), bgut[E * R:, gc].float()  # [E R, 32]
                        for j in range(K):
                            g = op["g"][rows, gc].float() + zgm[j] @ bg.t()
                            u = op["u"][rows, gc].float() + zum[j] @ bu.t()
                            dh = wr[:, j, None] * dhbar[:, lc] + gzm[j] @ ad.t()
                            dg, du, h = silu_grads(g, u, dh)
                            dgs[:, lc] += dg
                            dus[:, lc] += du
                            dw[own, :, j] += (dhbar[:, lc] * h).sum(1)
                            dz[own, :, j, :R] += pick(dg.to(dt).float() @ btg.t(), e[:, j])
                            dz[own, :, j, R:] += pick(du.to(dt).float() @ btu.t(), e[:, j])
                cols = slice(nt * TN, (nt + 1) * TN)
                dG[rows, cols], dU[rows, cols], dhb[rows, cols] = dgs.to(dt), dus.to(dt), dhbar.to(dt)
                i += 1
            for own in range(2):  # both warpgroups write the item's partials (zeros without a tile)
                dz_part[2 * chunk + own, rows] = dz[own]
                dw_part[2 * chunk + own, rows] = dw[own]
                written.append((item, own))
    return dG, dU, dhb, dz_part, dw_part, written


def outputs(dG, dU, dhbar, dz_part, dw_part):
    """The kernel's outputs as the reference's (dz and dw summed over the partials, s on dz)."""
    return dict(dG=dG, dU=dU, dhbar=dhbar, dz=SCALE * dz_part.sum(0), dw=dw_part.sum(0))


def errors(got, ref):
    """Max errors relative to the largest reference value, per output (those in both dicts)."""
    rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()  # noqa: E731
    return {n: rel(got[n], ref[n]) for n in NAMES if got.get(n) is not None and n in ref}


BOUND = 2.0 ** -6  # 4 bf16 ulps of the largest value: the kernel rounds dG, dU, dhbar and dz's dg, du


# ------------------------------------------------------------------------------------------------
# the device kernel
# ------------------------------------------------------------------------------------------------
NVCC = [a for a in FWD_NVCC if not a.endswith("fused_gu_wgmma_proto.cu")] + [
    os.path.join(HERE, "fused_bwd_wgmma_proto.cu")]


def build(out_dir):
    """The kernel as a shared library in out_dir (the forward driver's load_library; its ptxas
    report under a name of its own: the forward's driver may share the folder)."""
    so, report = load_library(out_dir, NVCC, "fused_bwd_wgmma_proto.so", "fused_bwd_ptxas.json")
    so.fused_bwd_partials.argtypes = [ctypes.c_int] * 3
    so.fused_bwd_partials.restype = ctypes.c_int
    so.fused_moe_swiglu_bwd_bf16.argtypes = ([ctypes.c_void_p] * 17 + [ctypes.c_int] * 3 +
                                             [ctypes.c_void_p, ctypes.c_int])
    so.fused_moe_swiglu_bwd_bf16.restype = ctypes.c_int
    so.ptxas = report
    return so


def empty_outputs(so, op, max_ctas=0, fill=None):
    """(dG, dU, dhbar, dz_part, dw_part) for the kernel at this cap of CTAs (fill: the
    value to poison them with)."""
    T, I, dev = op["dout"].shape[0], op["wdt"].shape[0], op["dout"].device
    P = so.fused_bwd_partials(T, I, max_ctas)
    if P <= 0:
        raise RuntimeError(f"fused_bwd_partials({T}, {I}, {max_ctas}) = {P}")

    def new(*shape, dtype=torch.float32):
        t = torch.empty(*shape, dtype=dtype, device=dev)
        return t if fill is None else t.fill_(fill)
    return (new(T, I, dtype=torch.bfloat16), new(T, I, dtype=torch.bfloat16),
            new(T, I, dtype=torch.bfloat16), new(P, T, K, 2 * R), new(P, T, K))


def fused(so, op, max_ctas=0, out=None):
    """(dG, dU, dhbar, dz_part, dw_part) from the kernel into out (empty_outputs), or into new ones."""
    if out is None:
        out = empty_outputs(so, op, max_ctas)
    T, H, I = op["dout"].shape[0], op["dout"].shape[1], op["wdt"].shape[0]
    ptrs = [op[n].data_ptr() for n in ("dout", "wdt", "g", "u", "bgu", "adt", "bgut", "zg", "zu", "gzd",
                                       "ids", "w")]
    code = so.fused_moe_swiglu_bwd_bf16(*ptrs, *[t.data_ptr() for t in out],
                                        T, H, I, torch.cuda.current_stream().cuda_stream, max_ctas)
    if code != 0:
        raise RuntimeError(f"fused_moe_swiglu_bwd_bf16 returned {code}")
    return out


# Where check / time_shape run: the GPU; tests/test_bench_fused_bwd.py runs them on the CPU with
# `fused` replaced by the emulation, so that the device call does not find the driver's bugs.
DEV = "cuda"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def sm_count():
    return torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 132


def check(so, T, H, I, max_ctas):
    """Two runs into NaN-poisoned outputs (bitwise alike), each output against the reference."""
    p = Problem(T, H, I, DEV)
    op = prepare(p)
    ref = reference(p)
    row = dict(T=T, H=H, I=I, max_ctas=max_ctas)
    runs = [fused(so, op, max_ctas, empty_outputs(so, op, max_ctas, fill=float("nan"))) for _ in range(2)]
    sync()
    got = outputs(*runs[0])
    row.update(errors(got, ref))
    row["nan"] = any(bool(torch.isnan(t).any().item()) for t in runs[0])
    row["repeat_identical"] = all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    # the decomposition on the GPU in fp32: where the kernel and the reference disagree, this
    # says whose the difference is (ctas as the kernel's plan saw them)
    sms = sm_count()
    if T * I <= 1024 * 1024:
        emulated = outputs(*emulate(op, max_ctas if max_ctas > 0 else sms)[:5])
        row["vs_emulation"] = errors(got, emulated)
        row["emulation_vs_reference"] = errors(emulated, ref)
    row["ok"] = bool(not row["nan"] and row["repeat_identical"]
                     and all(row[n] <= BOUND for n in NAMES))
    print(f"check v19 T={T} H={H} I={I} ctas={max_ctas or sms}: " + json.dumps(row), flush=True)
    return row


def dense_lora_split(so, T, H, I):
    """When a check fails: the same shape with the LoRA zeroed (zg = zu = gzd = 0: the GEMM and
    the SwiGLU gradients alone; dz then checks the dz products on dense dg, du), with only pair
    0's z and gzd, only pair 1's, and with gzd alone zeroed (the Ad term of dh)."""
    for name, edit in (("no_lora", lambda q: (q.zg.zero_(), q.zu.zero_(), q.gzd.zero_())),
                       ("pair0_only", lambda q: (q.zg[:, 1].zero_(), q.zu[:, 1].zero_(), q.gzd[:, 1].zero_())),
                       ("pair1_only", lambda q: (q.zg[:, 0].zero_(), q.zu[:, 0].zero_(), q.gzd[:, 0].zero_())),
                       ("no_gzd", lambda q: q.gzd.zero_())):
        p = Problem(T, H, I, DEV)
        edit(p)
        got = outputs(*fused(so, prepare(p)))
        print(f"diagnose v19 {name} T={T} H={H} I={I}: " + json.dumps(errors(got, reference(p))), flush=True)


CALLS = 5  # calls a timed sample: the host's work for one call overlaps the GPU's of the last


def time_shape(so, T, H, I, reps):
    """Ours (then the partials' sums) beside cuBLAS's dhbar
    GEMM, the dense MLP's backward at this stage (the same GEMM + the SwiGLU's gradients) and
    the library's path (the same GEMM + moe_swiglu_backward: its pass 1 and pass 2, the latter
    also dBg, dBu and dAd, which v19 leaves to another kernel)."""
    p = Problem(T, H, I, DEV)
    op = prepare(p)
    silu = torch.nn.functional.silu

    def repeated(fn):
        def run():
            for _ in range(CALLS):
                fn()
        return run

    def dense():
        dhbar = p.dout @ p.Wd
        dU = dhbar * silu(p.G)
        return torch.ops.aten.silu_backward(dhbar * p.U, p.G), dU

    out = empty_outputs(so, op)
    fns = dict(v19=repeated(lambda: (fused(so, op, 0, out), out[3].sum(0), out[4].sum(0))),
               cublas_dhbar=repeated(lambda: p.dout @ p.Wd), dense_bwd_part=repeated(dense))
    try:
        from mixlora_ext import ops
        zg, zu, gzd = p.zg.float(), p.zu.float(), p.gzd.float()

        def library():
            order, offsets, _ = ops.sort_pairs(p.ids, E)  # as the op's autograd backward does
            return torch.ops.mixlora.moe_swiglu_backward(p.dout @ p.Wd, gzd, p.G, p.U, p.ids, p.w, zg, p.Bg,
                                                         zu, p.Bu, p.Ad, order, offsets, SCALE, 0, 0.0, 0)
        library()
        fns["library_bwd"] = repeated(library)
    except Exception as exc:  # the extension not built here: time the rest
        print(f"library path not timed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    got = {n: ms / CALLS for n, ms in interleaved_medians(fns, reps, call_timer(torch.device(DEV))).items()}
    row = dict(T=T, H=H, I=I, **{f"{n}_ms": ms for n, ms in got.items()})
    if "library_bwd" in got:
        row["library_bwd"] = "dout @ Wd + sort_pairs + moe_swiglu_backward (pass 1 and pass 2: dBg, dBu, dAd too)"
    row["v19_vs_dense_bwd_part"] = got["v19"] / got["dense_bwd_part"]
    row["v19_minus_cublas_dhbar_ms"] = got["v19"] - got["cublas_dhbar"]
    row["v19_tflops"] = 2 * T * H * I / got["v19"] / 1e9
    print(f"time T={T} H={H} I={I}: " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in got.items()) +
          f"; v19 / dense {row['v19_vs_dense_bwd_part']:.3f}", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", default=None, help="write the checks and timings here")
    parser.add_argument("--build-dir", default=None,
                        help="build the library here, or reuse the one an earlier run built (default: a temporary one)")
    parser.add_argument("--emulate", action="store_true", help="CPU: the decomposition vs the reference")
    a = parser.parse_args()
    if a.emulate:
        for T, H, I, ctas in CHECK_SHAPES[:3]:
            p = Problem(T, H, I, "cpu")
            got = outputs(*emulate(prepare(p), ctas)[:5])
            print(f"emulate v19 T={T} H={H} I={I} ctas={ctas}:", json.dumps(errors(got, reference(p))))
        return
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("needs a Hopper GPU (sm_90) and a CUDA build of torch")
    torch.backends.cuda.matmul.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        if a.build_dir:
            os.makedirs(a.build_dir, exist_ok=True)
        so = build(a.build_dir or tmp)
        checks = [check(so, *s) for s in CHECK_SHAPES]
        correct = all(c["ok"] for c in checks)
        if not correct:
            dense_lora_split(so, *CHECK_SHAPES[3][:3])
            print("v19 gave wrong results: no timings", flush=True)
        rows = [time_shape(so, *s, a.reps) for s in TIME_SHAPES] if correct else []
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, ptxas=so.ptxas,
                  checks=checks, rows=rows, command=" ".join(sys.argv))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
