"""bench/fused_bwd_wgmma_proto.py on the CPU: the v19 kernel's decomposition (work items, tiles, the
warpgroups' alternation and dz / dw partials, the roundings) against the fp32 reference, the layouts
its operands take, the reference against the library's own moe_swiglu_backward, and the driver's
check / time_shape / triage with the kernel replaced by the emulation; where nvcc is, what ptxas
makes of the kernel (no serialized wgmma, spills held). The kernel itself needs a Hopper GPU (the
script's device mode)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import fused_bwd_wgmma_proto as v19  # noqa: E402  (bench/fused_bwd_wgmma_proto.py)

MAX_SPILL_BYTES = 96  # v19 spills 92 B: loop bookkeeping and its producers' (at 40 registers), bench/NOTES.md v19
ER = v19.E * v19.R


@pytest.mark.parametrize("T,H,I,ctas", v19.CHECK_SHAPES[:3])
def test_emulation_matches_reference(T, H, I, ctas):
    p = v19.Problem(T, H, I, "cpu")
    *out, written = v19.emulate(v19.prepare(p), ctas)
    err = v19.errors(v19.outputs(*out), v19.reference(p))
    assert set(err) == set(v19.NAMES) and all(e <= v19.BOUND for e in err.values()), err
    m_blocks, n_tiles, n_chunks, per_chunk, items = v19.plan(T, I, ctas)
    dz_part, dw_part = out[3], out[4]
    assert dz_part.shape == (2 * n_chunks, T, 2, 2 * v19.R) and dw_part.shape == (2 * n_chunks, T, 2)
    assert not any(torch.isnan(t).any() for t in out)
    assert sorted(written) == [(item, own) for item in range(items) for own in range(2)]


def _swap_bgu(op, p):  # G's and U's 64-row blocks of bgu swapped
    op["bgu"] = op["bgu"].view(-1, 2, 64, ER).flip(1).reshape(-1, ER)


def _swap_bgut(op, p):  # bgut's Bg and Bu halves swapped
    op["bgut"] = op["bgut"].view(2, ER, -1).flip(0).reshape(2 * ER, -1)


def _rank_major_adt(op, p):  # adt's columns r E + e instead of e R + r; dout zero: dh is Ad's term alone
    op["adt"] = p.Ad.permute(2, 1, 0).reshape(p.I, ER).contiguous()
    op["dout"].zero_()
    p.dout.zero_()


@pytest.mark.parametrize("fault,affected", [(_swap_bgu, "dG"), (_swap_bgut, "dz"), (_rank_major_adt, "dG")])
def test_emulation_sees_a_wrong_layout(fault, affected):
    p = v19.Problem(64, 64, 256, "cpu")
    op = v19.prepare(p)
    fault(op, p)
    ref = v19.reference(p)
    got = v19.outputs(*v19.emulate(op, 1)[:5])
    assert v19.errors(got, ref)[affected] > 0.1


def test_layouts():
    p = v19.Problem(64, 64, 384, "cpu")
    op = v19.prepare(p)
    R = v19.R
    assert torch.equal(op["wdt"], p.Wd.t())
    for n in range(384 // 64):
        e, c, q = n % v19.E, 64 * n + 3 + n, 7 - n
        assert op["bgu"][128 * n + 3 + n, e * R + q] == p.Bg[e, c, q]
        assert op["bgu"][128 * n + 64 + 3 + n, e * R + q] == p.Bu[e, c, q]
        assert op["adt"][c, e * R + q] == p.Ad[e, q, c]
        assert op["bgut"][e * R + q, c] == p.Bg[e, c, q]
        assert op["bgut"][ER + e * R + q, c] == p.Bu[e, c, q]
    assert torch.equal(op["bgut"][:ER].t(), v19.expert_major(p.Bg))
    assert torch.equal(op["adt"].t(), p.Ad.reshape(ER, 384))
    assert torch.equal(op["zg"].float(), p.zg.float() * v19.SCALE) and torch.equal(op["gzd"], p.gzd)


@pytest.mark.parametrize("T,I,want", [(4096, 11008, (64, 86, 2, 43, 128)),
                                      (4096, 14336, (64, 112, 2, 56, 128)),
                                      (4096, 5632, (64, 44, 2, 22, 128)),
                                      (16384, 11008, (256, 86, 1, 86, 256)),
                                      (1024, 1024, (16, 8, 8, 1, 128)),
                                      (1024, 1280, (16, 10, 5, 2, 80))])
def test_plan_at_listed_shapes(T, I, want):
    got = v19.plan(T, I, 132)  # the H100's SMs
    assert got == want
    m_blocks, n_tiles, n_chunks, per_chunk, items = got
    tiles = [nt for chunk in range(n_chunks)
             for nt in range(chunk * per_chunk, min(n_tiles, (chunk + 1) * per_chunk))]
    assert tiles == list(range(n_tiles)) and items <= max(132, m_blocks)


def test_reference_is_the_library_backward():
    """v19's contract is moe_swiglu_backward's pass 1 (csrc/swiglu/swiglu_cpu.cpp) with
    grad_hbar = dout Wd: the library's CPU op on the same values in fp32 gives the reference."""
    pytest.importorskip("mixlora_ext")
    try:
        from mixlora_ext import ops
    except ImportError as exc:
        pytest.skip(f"mixlora_ext's compiled extension: {exc}")
    p = v19.Problem(64, 64, 256, "cpu", seed=1)
    ref = v19.reference(p)
    order, offsets, _ = ops.sort_pairs(p.ids, v19.E)
    f = lambda t: t.float()  # noqa: E731
    dG, dU, dw, dzg, dzu, *_ = torch.ops.mixlora.moe_swiglu_backward(
        ref["dhbar"], f(p.gzd), f(p.G), f(p.U), p.ids, p.w, f(p.zg), f(p.Bg), f(p.zu), f(p.Bu), f(p.Ad),
        order, offsets, v19.SCALE, activation=0, dropout_p=0.0, seed=0)
    err = v19.errors(dict(dG=dG, dU=dU, dw=dw, dz=torch.cat([dzg, dzu], -1)), ref)  # dz: dzg | dzu
    assert set(err) == {"dG", "dU", "dw", "dz"} and all(e <= 1e-4 for e in err.values()), err


class _FakeLib:
    """The kernel's library as the driver sees it, for check / time_shape on the CPU."""
    ptxas = {}

    @staticmethod
    def fused_bwd_partials(T, I, max_ctas):
        return 2 * v19.plan(T, I, max_ctas if max_ctas > 0 else v19.sm_count())[2]


def _fake_fused(corrupt=None):
    """v19.fused by the emulation, optionally corrupted."""
    def fused(so, op, max_ctas=0, out=None):
        got = v19.emulate(op, max_ctas if max_ctas > 0 else v19.sm_count())[:5]
        if out is None:
            out = tuple(torch.empty_like(t) for t in got)
        for o, t in zip(out, got):
            o.copy_(t)
        if corrupt is not None:
            corrupt(out)
        return out
    return fused


@pytest.mark.parametrize("fault", [lambda out: out[3][0, 0, 0, 0].fill_(float("nan")),  # an unwritten partial
                                   lambda out: out[4][-1, -1, 1].fill_(float("nan")),
                                   lambda out: out[0].mul_(1.1),                         # dG off
                                   lambda out: out[4][0].add_(1.0),                      # dw off
                                   lambda out: out[2].mul_(1.1)])                        # dhbar off
def test_driver_check_sees_a_fault(monkeypatch, fault):
    monkeypatch.setattr(v19, "DEV", "cpu")
    monkeypatch.setattr(v19, "fused", _fake_fused(fault))
    assert not v19.check(_FakeLib, *v19.CHECK_SHAPES[0])["ok"]


def test_driver_check_on_the_cpu(monkeypatch):
    """The device call's check() path (poisoned outputs, partial counts, the repeat, the
    emulation comparison) run on the CPU: a driver bug must not cost a device call."""
    monkeypatch.setattr(v19, "DEV", "cpu")
    monkeypatch.setattr(v19, "fused", _fake_fused())
    for shape in v19.CHECK_SHAPES[:3]:
        row = v19.check(_FakeLib, *shape)
        assert row["ok"], row
        assert row["vs_emulation"] == {n: 0.0 for n in v19.NAMES}, row
        assert set(row["emulation_vs_reference"]) == set(v19.NAMES), row


def test_driver_time_shape_on_the_cpu(monkeypatch):
    """time_shape's rows (v19, the baselines, the ratios) on the CPU."""
    monkeypatch.setattr(v19, "DEV", "cpu")
    monkeypatch.setattr(v19, "fused", _fake_fused())
    monkeypatch.setattr(v19, "CALLS", 1)
    row = v19.time_shape(_FakeLib, 64, 64, 128, reps=2)
    for name in ("v19", "cublas_dhbar", "dense_bwd_part"):
        assert row[f"{name}_ms"] > 0, row
    assert row["v19_vs_dense_bwd_part"] == row["v19_ms"] / row["dense_bwd_part_ms"]
    assert row["v19_minus_cublas_dhbar_ms"] == row["v19_ms"] - row["cublas_dhbar_ms"]
    assert row["v19_tflops"] == 2 * 64 * 64 * 128 / row["v19_ms"] / 1e9


def test_driver_dense_lora_split_on_the_cpu(monkeypatch, capsys):
    """The failure triage (LoRA-free, pair 0 only, pair 1 only, gzd zero) runs and prints each split."""
    monkeypatch.setattr(v19, "DEV", "cpu")
    monkeypatch.setattr(v19, "fused", _fake_fused())
    v19.dense_lora_split(_FakeLib, 64, 64, 128)
    out = capsys.readouterr().out
    assert all(f"diagnose v19 {name}" in out for name in ("no_lora", "pair0_only", "pair1_only", "no_gzd")), out


def test_ptxas_report_reads_the_bwd_kernel():
    """ptxas_report (the forward driver's) names v19's kernel too."""
    name = "_ZN57_GLOBAL__N__3a9df734_24_fused_bwd_wgmma_proto_cu_27c939e716fused_bwd_kernelILi1EEEv14CU"
    stderr = (f"ptxas info    : Compiling entry function '{name}' for 'sm_90a'\n"
              f"    0 bytes stack frame, 16 bytes spill stores, 16 bytes spill loads\n")
    assert v19.ptxas_report(stderr) == {"fused_bwd_kernel<1>": dict(spill_store_bytes=16, serialized=[])}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.skipif(not os.path.exists(v19.NVCC[-1]), reason="bench/fused_bwd_wgmma_proto.cu not written yet")
def test_ptxas_keeps_the_wgmma_pipelined(tmp_path):
    """v19's registers: a change that tips ptxas into serializing every wgmma (C7511 / C7512 /
    C7515) or into spilling past MAX_SPILL_BYTES fails here, on any machine with nvcc."""
    done = subprocess.run(v19.NVCC + ["-cubin", "-o", str(tmp_path / "v19.cubin")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = v19.ptxas_report(done.stderr)
    bwd = {name: entry for name, entry in report.items() if "fused_bwd" in name}
    assert bwd, report
    assert all(entry["serialized"] == [] for entry in bwd.values()), report
    assert all(entry["spill_store_bytes"] <= MAX_SPILL_BYTES for entry in bwd.values()), report
