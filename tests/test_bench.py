"""The bench scripts, on the CPU: bench/timing.py's interleaved_medians (warm-up and
alternation); one row of bench/run.py's bench_shape (every time present, the ratios those times
give); the barrier protocol of bench/wgmma_gemm_proto.cu under random interleavings
(bench/wgmma_protocol_sim.py), and that simulation catching faults planted in it."""
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
    """Both variants' protocol: 100 random shapes and interleavings each."""
    assert sim.run(100) == 200


@pytest.mark.parametrize("fault", ["no_turn", "release_early", "empty_parity"])
def test_wgmma_protocol_sim_catches_planted_faults(fault):
    variants = (sim.PINGPONG,) if fault == "no_turn" else (sim.COOPERATIVE, sim.PINGPONG)
    with pytest.raises(AssertionError):
        sim.run(300, fault=fault, variants=variants)
