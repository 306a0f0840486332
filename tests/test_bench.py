"""The bench scripts, on the CPU: bench/timing.py's interleaved_medians (warm-up and
alternation); one row of bench/run.py's bench_shape (every time present, the ratios those times
give); the barrier protocols of bench/wgmma_gemm_proto.cu and bench/fused_gu_wgmma_proto.cu under
random interleavings (bench/wgmma_protocol_sim.py), and that simulation catching faults planted in
it."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import run  # noqa: E402  (bench/run.py)
import timing  # noqa: E402  (bench/timing.py)
import wgmma_protocol_sim as sim  # noqa: E402  (bench/wgmma_protocol_sim.py)


def test_interleaved_medians_warms_up_then_alternates():
    cost = {"a": 1.0, "b": 2.0, "c": 3.0}
    calls = []

    def make(name):
        def fn():
            calls.append(name)
            return cost[name]
        return fn

    got = timing.interleaved_medians({n: make(n) for n in cost}, 4, call_ms=lambda fn: fn(), warmup_ms=5.0)
    assert got == cost
    # Warm-up: each fn 3 calls and on until 5 ms of them (a: 5 calls; b, c: 3).
    assert calls[:11] == ["a"] * 5 + ["b"] * 3 + ["c"] * 3
    # Timed rounds: round i starts at the i-th fn.
    assert calls[11:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]


def test_bench_shape_row_on_cpu():
    row = run.bench_shape(64, 96, 16, 4, 4, 0.0, torch.float32, torch.device("cpu"), reps=2)
    for phase in ("fwd", "fwdbwd"):
        for name in ("dense", "fused", "reference"):
            assert row[f"{name}_{phase}_ms"] > 0
        assert row[f"ratio_{phase}"] == row[f"fused_{phase}_ms"] / row[f"dense_{phase}_ms"]
        assert row[f"speedup_{phase}"] == row[f"reference_{phase}_ms"] / row[f"fused_{phase}_ms"]


def test_wgmma_protocol_holds_under_random_interleavings():
    """The three variants' protocols: 100 random shapes and interleavings each."""
    assert sim.run(100) == 300


def test_fused_plan_mirrors_the_kernel():
    """make_plan as bench/fused_gu_wgmma_proto.cu's: 2 token blocks, 5 tiles, over 132 / 4 / 1 CTAs."""
    p = sim.make_plan(256, 320, 132)
    assert (p.m_blocks, p.n_tiles, p.n_chunks, p.tiles_per_chunk, p.items) == (2, 5, 5, 1, 10)
    p = sim.make_plan(256, 320, 4)
    assert (p.n_chunks, p.tiles_per_chunk, p.items) == (2, 3, 4)
    assert [list(p.item(j)[2]) for j in range(p.items)] == [[0, 1, 2], [0, 1, 2], [3, 4], [3, 4]]
    p = sim.make_plan(384, 128, 1)
    assert (p.n_chunks, p.tiles_per_chunk, p.items) == (1, 2, 3)


# what variant 2's faults show up as: a stale read of the epilogue buffer (the turn handed over
# before the "full" wait: the other warpgroup's wait passes on the phase still open), a copy
# landing in it under the epilogue (or the epilogue reading the next tile's operands)
CAUGHT_AS = {"turn_before_epi": "epilogue of tile .* reads the buffer holding",
             "epi_release_early": "the buffer"}


@pytest.mark.parametrize("fault,variant", [(f, v) for f, vs in sim.FAULTS.items() for v in vs])
def test_wgmma_protocol_sim_catches_planted_faults(fault, variant):
    with pytest.raises(sim.Violation, match=CAUGHT_AS.get(fault)):
        sim.run(300, fault=fault, variants=(variant,))
