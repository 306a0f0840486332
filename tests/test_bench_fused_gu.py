"""bench/fused_gu_wgmma_proto.py on the CPU: the v17 and v18 kernels' decomposition (work items, tiles,
the warpgroups' alternation and zd partials, the pair-1 deltas as (Z_1 - Z_0) onto sums holding
delta_0, the roundings) against the fp32 reference, and the layouts its operands take; where nvcc
is, what ptxas makes of v16's and v17's kernels (no serialized wgmma, spills held). The kernels
themselves need a Hopper GPU (the script's device mode)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import fused_gu_wgmma_proto as v17  # noqa: E402  (bench/fused_gu_wgmma_proto.py)


@pytest.mark.parametrize("variant", list(v17.VARIANTS))
@pytest.mark.parametrize("T,H,I,ctas", v17.CHECK_SHAPES[:3])
def test_emulation_matches_reference(T, H, I, ctas, variant):
    ctas = v17.at_least_a_cluster(ctas, variant)
    p = v17.Problem(T, H, I, "cpu")
    hbar, part, written = v17.emulate(v17.prepare(p), ctas, variant)
    err = v17.errors(hbar, part.sum(0), *v17.reference(p))
    assert err["hbar"] <= v17.BOUND and err["zd"] <= v17.BOUND, err
    m_blocks, n_tiles, n_chunks, per_chunk, items = v17.plan(T, I, ctas, variant)
    assert part.shape[0] == 2 * n_chunks and not torch.isnan(part).any()
    ranks = range(v17.CLUSTER[variant])  # v18c: each item's two token blocks, one a CTA
    assert sorted(written) == [(item, rank, own) for item in range(items) for rank in ranks for own in range(2)]


def test_emulation_sees_a_wrong_layout():
    p = v17.Problem(128, 64, 128, "cpu")
    op = v17.prepare(p)
    ref = v17.reference(p)
    op["wgu"] = op["wgu"].view(-1, 2, 64, 64).flip(1).reshape(-1, 64)  # G and U blocks swapped
    for variant in v17.VARIANTS:
        hbar, part, _ = v17.emulate(op, v17.at_least_a_cluster(1, variant), variant)
        assert v17.errors(hbar, part.sum(0), *ref)["hbar"] > 0.1


def test_v17s_operands_are_the_weights_as_they_are():
    """v17s's wg / wu: Wg and Wu themselves, Wu after Wg in memory by a multiple of 16 bytes (its
    3-D tensor map's third stride); its tile (Wg's 64 rows, then Wu's) is the interleaved copy's."""
    p = v17.Problem(128, 64, 192, "cpu")
    op = v17.prepare(p)
    assert torch.equal(op["wg"], p.Wg) and torch.equal(op["wu"], p.Wu)
    gap = op["wu"].data_ptr() - op["wg"].data_ptr()
    assert gap > 0 and gap % 16 == 0
    for nt in range(192 // 64):  # the 3-D box (64 rows x 2) at rows 64 nt = wgu's 128 rows at 128 nt
        box = torch.stack([op["wg"][64 * nt:64 * nt + 64], op["wu"][64 * nt:64 * nt + 64]]).reshape(128, -1)
        assert torch.equal(box, op["wgu"][128 * nt:128 * nt + 128])


def test_interleaved_layouts():
    p = v17.Problem(128, 64, 192, "cpu")
    op = v17.prepare(p)
    for c in range(192 // 64):
        assert torch.equal(op["wgu"][128 * c:128 * c + 64], p.Wg[64 * c:64 * c + 64])
        assert torch.equal(op["wgu"][128 * c + 64:128 * c + 128], p.Wu[64 * c:64 * c + 64])
        e, col, q = 5, 64 * c + 3, 7
        assert op["bgu"][128 * c + 3, e * v17.R + q] == p.Bg[e, col, q]
        assert op["bgu"][128 * c + 64 + 3, e * v17.R + q] == p.Bu[e, col, q]
    assert torch.equal(op["ad"][5 * v17.R + 7], p.Ad[5, 7])


@pytest.mark.parametrize("T,I,variant,want", [(4096, 11008, 0, (32, 172, 4, 43, 128)),
                                              (16384, 11008, 0, (128, 172, 1, 172, 128)),
                                              (4096, 5632, 0, (32, 88, 4, 22, 128)),
                                              (4096, 11008, 1, (64, 172, 2, 86, 128)),
                                              (16384, 11008, 1, (256, 172, 1, 172, 256)),
                                              (4096, 11008, 2, (32, 172, 2, 86, 64))])
def test_plan_at_listed_shapes(T, I, variant, want):
    got = v17.plan(T, I, 132, variant)  # the H100's SMs (v18c: 66 clusters over 32 block pairs)
    assert got == want
    m_blocks, n_tiles, n_chunks, per_chunk, items = got
    tiles = [nt for chunk in range(n_chunks)
             for nt in range(chunk * per_chunk, min(n_tiles, (chunk + 1) * per_chunk))]
    assert tiles == list(range(n_tiles)) and items <= max(132, m_blocks)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_ptxas_keeps_the_wgmma_pipelined(tmp_path):
    """The fused kernels' registers (bench/NOTES.md v17, v18): a change that tips ptxas into
    serializing every wgmma (C7511 / C7512 / C7515, the main loop's too) or into spilling fails
    here, on any machine with nvcc. v17 is at the edge (190 B of spills), v18 spills nothing."""
    done = subprocess.run(v17.NVCC + ["-cubin", "-o", str(tmp_path / "v17.cubin")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = v17.ptxas_report(done.stderr)
    assert set(report) == {"fused_gu_kernel<2, 1, false>", "fused_gu_kernel<1, 1, false>",
                           "fused_gu_kernel<1, 2, false>", "fused_gu_kernel<2, 1, true>"}, report
    assert all(entry["serialized"] == [] for entry in report.values()), report
    assert report["fused_gu_kernel<2, 1, false>"]["spill_store_bytes"] <= 256, report  # v17: 190
    assert report["fused_gu_kernel<2, 1, true>"]["spill_store_bytes"] <= 256, report  # v17s: 190
    assert report["fused_gu_kernel<1, 1, false>"]["spill_store_bytes"] == 0, report  # v18
    assert report["fused_gu_kernel<1, 2, false>"]["spill_store_bytes"] == 0, report  # v18c


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_ptxas_v16_gemm_has_no_spills(tmp_path):
    """v16's GEMMs (bench/wgmma_gemm_proto.cu, its three variants), which v17 and v18 build on:
    no spills, no serialized wgmma."""
    here = os.path.dirname(v17.__file__)
    cmd = [a for a in v17.NVCC if not a.endswith("fused_gu_wgmma_proto.cu")]
    done = subprocess.run(cmd + [os.path.join(here, "wgmma_gemm_proto.cu"), "-cubin",
                                 "-o", str(tmp_path / "v16.cubin")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = v17.ptxas_report(done.stderr)
    assert set(report) == {"wgmma_gemm_kernel", "wgmma_gemm_pingpong_kernel<1>", "wgmma_gemm_pingpong_kernel<2>"}
    assert all(entry == dict(spill_store_bytes=0, serialized=[]) for entry in report.values()), report


def test_ptxas_report_reads_each_kernel():
    """The report of a serialized, spilling kernel (ptxas's lines as 13.0 prints them)."""
    name = "_ZN56_GLOBAL__N__3a9df734_23_fused_gu_wgmma_proto_cu_27c939e715fused_gu_kernelILi1ELi2EEEv14CU"
    stderr = (f"ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are "
              f"serialized due to insufficient register resources for the wgmma pipeline in the "
              f"function '{name}'\nptxas info    : Compiling entry function '{name}' for 'sm_90a'\n"
              f"    32 bytes stack frame, 32 bytes spill stores, 64 bytes spill loads\n")
    assert v17.ptxas_report(stderr) == {"fused_gu_kernel<1, 2>": dict(spill_store_bytes=32, serialized=["C7511"])}
    # C7512 names the function with "for the function" (nvcc 13.0)
    stderr = (f"ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are "
              f"serialized due to insufficient register resources for the function '{name}'\n" + stderr)
    assert v17.ptxas_report(stderr)["fused_gu_kernel<1, 2>"]["serialized"] == ["C7511", "C7512"]


class _FakeLib:
    """The kernels' library as the driver sees it, for check / time_shape on the CPU."""
    ptxas = {}

    @staticmethod
    def fused_gu_partials(T, I, max_ctas, variant):
        return 2 * v17.plan(T, I, max_ctas if max_ctas > 0 else v17.sm_count(), variant)[2]


def _fake_fused(corrupt=None):
    """v17.fused by the emulation (and G, U by the products it rounds), optionally corrupted."""
    def fused(so, op, max_ctas=0, out=None, variant=0, gu=None):
        ctas = max_ctas if max_ctas > 0 else v17.sm_count()
        hbar, part, _ = v17.emulate(op, ctas, variant)
        if out is None:
            out = (torch.empty_like(hbar), torch.empty_like(part))
        out[0].copy_(hbar)
        out[1].copy_(part)
        if gu is not None:
            I = op["ad"].shape[1]
            s = (op["x"].float() @ op["wgu"].float().t()).view(-1, I // 64, 2, 64)
            gu[0].copy_(s[:, :, 0].reshape(-1, I))
            gu[1].copy_(s[:, :, 1].reshape(-1, I))
        if corrupt is not None:
            corrupt(out, gu)
        return out
    return fused


@pytest.mark.parametrize("variant", list(v17.VARIANTS))
def test_driver_check_on_the_cpu(monkeypatch, variant):
    """The device call's check() path (poisoned outputs, partial counts, G / U bounds, the
    emulation comparison) run on the CPU: a driver bug must not cost a device call."""
    monkeypatch.setattr(v17, "DEV", "cpu")
    monkeypatch.setattr(v17, "fused", _fake_fused())
    for shape in v17.CHECK_SHAPES[:3]:
        row = v17.check(_FakeLib, variant, *shape)
        assert row["ok"], row
        assert row["vs_emulation"] == dict(hbar=0.0, zd=0.0), row
    # a partial left unwritten (NaN), or G off by more than its bound, fails the check
    monkeypatch.setattr(v17, "fused", _fake_fused(lambda out, gu: out[1][0, 0, 0].fill_(float("nan"))))
    assert not v17.check(_FakeLib, variant, *v17.CHECK_SHAPES[0])["ok"]
    if variant in v17.TRAINING:
        monkeypatch.setattr(v17, "fused", _fake_fused(lambda out, gu: gu[0].mul_(1.1)))
        assert not v17.check(_FakeLib, variant, *v17.CHECK_SHAPES[0])["ok"]


def test_driver_time_shape_on_the_cpu(monkeypatch):
    """time_shape's rows (every variant, v18's and v18c's training runs, the ratios) on the CPU."""
    monkeypatch.setattr(v17, "DEV", "cpu")
    monkeypatch.setattr(v17, "fused", _fake_fused())
    row = v17.time_shape(_FakeLib, list(v17.VARIANTS), 128, 64, 128, reps=2)
    for name in ("v17", "v18", "v18c", "v17s", "v18_training", "v18c_training", "cublas_gu", "dense_gu_swiglu"):
        assert row[f"{name}_ms"] > 0, row
    assert "v17s_training_ms" not in row, row
    for name in ("v17", "v18", "v18c", "v17s"):
        assert row[f"{name}_vs_dense_gu_swiglu"] == row[f"{name}_ms"] / row["dense_gu_swiglu_ms"]
    assert not any("by_slices" in k for k in row), row  # T <= GROUP_TOKENS: one call


def test_driver_times_token_slices_on_the_cpu(monkeypatch):
    """Above GROUP_TOKENS, time_shape also times the work as calls over token slices, and a
    slice's outputs are those of the whole call's rows."""
    monkeypatch.setattr(v17, "DEV", "cpu")
    monkeypatch.setattr(v17, "fused", _fake_fused())
    monkeypatch.setattr(v17, "GROUP_TOKENS", 128)
    row = v17.time_shape(_FakeLib, [0], 256, 64, 128, reps=2)
    assert row["v17_by_slices_ms"] > 0 and row["v17_by_slices_vs_dense_gu_swiglu"] > 0, row
    p = v17.Problem(256, 64, 128, "cpu")
    op = v17.prepare(p)
    whole, _, _ = v17.emulate(op, 4, 0)
    part, _, _ = v17.emulate(v17.sliced(op, 128, 128), 4, 0)
    assert torch.equal(part, whole[128:])


def test_v16_driver_on_the_cpu(monkeypatch, capsys):
    """bench/wgmma_gemm_proto.py's check, diagnose and time_shape on the CPU with its kernel
    replaced by the product (and by a planted column swap): right results pass, wrong ones fail
    and are decoded, the timing rows come out."""
    import wgmma_gemm_proto as v16
    monkeypatch.setattr(v16, "DEV", "cpu")

    def product(so, A, B, C, variant, max_ctas=0):
        C.copy_((A.float() @ B.float().t()).to(C.dtype))
        return C

    def swapped(so, A, B, C, variant, max_ctas=0):
        product(so, A, B, C, variant)
        C[:, [0, 1]] = C[:, [1, 0]]
        return C

    monkeypatch.setattr(v16, "ours", product)
    for v in v16.VARIANTS:
        assert all(v16.check(None, v, *s)["ok"] for s in v16.CHECK_SHAPES[:2] if v16.takes(v, *s))
    row = v16.time_shape(None, list(v16.VARIANTS), 256, 256, 64, reps=2)
    assert all(row[f"{name}_ratio"] > 0 for name in v16.VARIANTS.values()), row
    monkeypatch.setattr(v16, "ours", swapped)
    assert not v16.check(None, 1, *v16.CHECK_SHAPES[1])["ok"]
    v16.diagnose(None, 2)
    assert "512 of 65536 outputs read the wrong element" in capsys.readouterr().out


def test_driver_dense_lora_split_on_the_cpu(monkeypatch, capsys):
    """The failure triage (LoRA-free, pair 0 only, pair 1 only) runs and prints each split."""
    monkeypatch.setattr(v17, "DEV", "cpu")
    monkeypatch.setattr(v17, "fused", _fake_fused())
    v17.dense_lora_split(_FakeLib, 1, 128, 64, 128)
    out = capsys.readouterr().out
    assert all(f"diagnose v18 {name}" in out for name in ("no_lora", "pair0_only", "pair1_only")), out
