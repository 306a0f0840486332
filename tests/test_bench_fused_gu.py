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
    assert set(report) == {"fused_gu_kernel<2, 1>", "fused_gu_kernel<1, 1>", "fused_gu_kernel<1, 2>"}, report
    assert all(entry["serialized"] == [] for entry in report.values()), report
    assert report["fused_gu_kernel<2, 1>"]["spill_store_bytes"] <= 256, report  # v17: 190
    assert report["fused_gu_kernel<1, 1>"]["spill_store_bytes"] == 0, report  # v18
    assert report["fused_gu_kernel<1, 2>"]["spill_store_bytes"] == 0, report  # v18c


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
