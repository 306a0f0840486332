"""The bench scripts, on the CPU: bench/timing.py's interleaved_medians (warm-up and
alternation); one row of bench/run.py's bench_shape (every time present, the ratios those times
give); the barrier protocols of bench/wgmma_gemm_proto.cu, bench/fused_gu_wgmma_proto.cu and
bench/fused_bwd_wgmma_proto.cu under random interleavings (bench/wgmma_protocol_sim.py), and that
simulation catching faults planted in it."""
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
    """The six variants' protocols: 100 random shapes and interleavings each."""
    assert sim.run(100) == 600


def test_barrier_signed_tx():
    """Variant 3's "full" barrier: the peer's multicast bytes may land before the CTA's own
    expect_tx (the count below zero); the phase completes only with its arrival in and the count
    back at zero; an unsigned barrier takes no bytes beyond those expected."""
    full = sim.Barrier(1, signed_tx=True)
    full.complete_tx(1)  # the peer's half of B, early
    assert (full.phase, full.tx) == (0, -1) and not full.passes(0)
    full.arrive(tx=4)    # the producer's arrive.expect_tx of the whole stage
    full.complete_tx(2)  # A
    assert full.phase == 0
    full.complete_tx(1)  # its own half
    assert (full.phase, full.pending, full.tx) == (1, 1, 0) and full.passes(0)
    plain = sim.Barrier(1)
    with pytest.raises(sim.Violation):
        plain.complete_tx(1)


@pytest.mark.parametrize("variant", [sim.CLUSTER, sim.FUSED_CLUSTER])
def test_cluster_sim_lands_peer_bytes_before_expect_tx(monkeypatch, variant):
    """Variants 3 and 4's runs do take the case above (a peer's half landing before the
    expect_tx); variant 4's also with two or three of the peer's epilogue halves in (only the
    epilogue buffer's "full" barrier can go below one half's bytes)."""
    tx = []
    complete_tx = sim.Barrier.complete_tx

    def counting(self, nbytes):
        complete_tx(self, nbytes)
        tx.append(self.tx)
    monkeypatch.setattr(sim.Barrier, "complete_tx", counting)
    sim.run(20, variants=(variant,))
    assert min(tx) < 0
    if variant == sim.FUSED_CLUSTER:
        assert min(tx) <= -2 * sim.HALF_BYTES


def test_fused_plan_mirrors_the_kernel():
    """make_plan as bench/fused_gu_wgmma_proto.cu's: 2 token blocks, 5 tiles, over 132 / 4 / 1 CTAs."""
    p = sim.make_plan(256, 320, 132)
    assert (p.m_blocks, p.n_tiles, p.n_chunks, p.tiles_per_chunk, p.items) == (2, 5, 5, 1, 10)
    p = sim.make_plan(256, 320, 4)
    assert (p.n_chunks, p.tiles_per_chunk, p.items) == (2, 3, 4)
    assert [list(p.item(j)[2]) for j in range(p.items)] == [[0, 1, 2], [0, 1, 2], [3, 4], [3, 4]]
    p = sim.make_plan(384, 128, 1)
    assert (p.n_chunks, p.tiles_per_chunk, p.items) == (1, 2, 3)


def test_fused_bwd_plan_mirrors_the_kernel():
    """v19's make_plan (variant 5: tiles of 64 tokens x 128 columns) at two of
    tests/test_bench_fused_bwd.py's listed shapes over 132 CTAs, and over 4."""
    for T, I, want in ((4096, 11008, (64, 86, 2, 43, 128)), (1024, 1280, (16, 10, 5, 2, 80))):
        p = sim.make_plan(T, I, 132, tm=sim.BWD_TM, tn=sim.BWD_TN)
        assert (p.m_blocks, p.n_tiles, p.n_chunks, p.tiles_per_chunk, p.items) == want
    p = sim.make_plan(128, 640, 4, tm=sim.BWD_TM, tn=sim.BWD_TN)
    assert (p.n_chunks, p.tiles_per_chunk, p.items) == (2, 3, 4)
    assert [list(p.item(j)[2]) for j in range(p.items)] == [[0, 1, 2], [0, 1, 2], [3, 4], [3, 4]]


class _WatchedFull0(sim.Barrier):
    """Variant 5's epi_full0, noting each wait on it that blocks while an epilogue (the other
    warpgroup's) reads the buffer."""
    blocked = []

    def passes(self, parity):
        ok = super().passes(parity)
        if not ok and self.cl.epi_readers[0]:
            self.blocked.append(self.phase)
        return ok


def test_fused_bwd_sim_waits_on_sub_block_0_under_the_other_epilogue(monkeypatch):
    """Variant 5's runs take the case its design is about: a warpgroup waiting for its tile's first
    sub-block while the other's epilogue of the previous tile reads the buffer (where one "full"
    barrier for both sub-blocks would pass on the previous tile's phase)."""
    init = sim.Cluster.__init__

    def watching(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if kwargs.get("subs", 1) == 2:
            self.epi_full[0][0].__class__ = _WatchedFull0
            self.epi_full[0][0].cl = self
    monkeypatch.setattr(sim.Cluster, "__init__", watching)
    monkeypatch.setattr(_WatchedFull0, "blocked", [])
    sim.run(50, variants=(sim.FUSED_BWD,))
    assert len(_WatchedFull0.blocked) > 0


def test_fused_cluster_plan_mirrors_the_launcher():
    """v18c's plan (variant 4): over max_ctas // 2 clusters and pairs of 64-token blocks
    (make_plan(T, I, units, 64 * 2)); 132 SMs over T = 256, I = 320: 66 clusters, 2 block pairs,
    5 tiles: 10 items, a grid of 20 CTAs."""
    p = sim.make_plan(256, 320, 132 // 2, tm=128)
    assert (p.m_blocks, p.n_tiles, p.n_chunks, p.tiles_per_chunk, p.items) == (2, 5, 5, 1, 10)
    p = sim.make_plan(256, 320, 5 // 2, tm=128)  # max_ctas 5: 2 clusters (a grid of 4)
    assert (p.m_blocks, p.n_chunks, p.tiles_per_chunk, p.items) == (2, 1, 5, 2)


# what variant 2's faults show up as: a stale read of the epilogue buffer (the turn handed over
# before the "full" wait: the other warpgroup's wait passes on the phase still open), a copy
# landing in it under the epilogue (or the epilogue reading the next tile's operands); variant
# 3's: the peer's multicast of a later fill landing in a stage this CTA still reads or has yet to
# read (released locally only), a K step reading a stage one B half short (expect_tx of the CTA's
# own copies only), the peer's release arriving on a CTA gone (no cluster barrier before exit);
# variant 4's (keyed (fault, variant) where they differ): the same, or in the epilogue buffer (the
# peer's epilogue copy landing under an epilogue, an epilogue reading the buffer with another
# tile's halves or short of one), and the last release of the buffer reaching a CTA gone; variant
# 5's: a wait on a sub-block's "full" barrier starting while the barrier's previous phase is still
# open (the turn handed over before the epi_full0 wait, one barrier for both sub-blocks), a copy
# landing in the buffer under sub-block 0's epilogue (released halfway through), a deadlock (the
# epilogue producer's first "empty" wait with the wrong parity)
CAUGHT_AS = {"turn_before_epi": "epilogue of tile .* reads the buffer holding",
             "epi_release_early": "the buffer",
             "local_release_only": "lands in stage .* of rank .* while an MMA reads it|holding fills",
             "half_expect": "reads stage .* holding fills",
             "no_final_sync": "release of stage .* reaches cta rank .* after it exited",
             ("local_release_only", sim.FUSED_CLUSTER):
                 "lands in (stage .*|the buffer) of rank .* while an (MMA|epilogue) reads it|holding",
             ("no_final_sync", sim.FUSED_CLUSTER):
                 "release of (stage .*|the epilogue buffer) reaches cta rank .* after it exited",
             "epi_local_release_only": "the buffer",
             ("turn_before_epi", sim.FUSED_BWD): "waits on sub-block 0's full barrier for its phase "
                                                 ".* while it is at phase",
             "bwd_one_full_barrier": "waits on sub-block 0's full barrier for its phase .* while it "
                                     "is at phase",
             "bwd_sub0_release_early": "lands in the buffer of rank 0 while an epilogue reads it",
             "epi_empty_parity": "deadlock"}


@pytest.mark.parametrize("fault,variant", [(f, v) for f, vs in sim.FAULTS.items() for v in vs])
def test_wgmma_protocol_sim_catches_planted_faults(fault, variant):
    with pytest.raises(sim.Violation, match=CAUGHT_AS.get((fault, variant), CAUGHT_AS.get(fault))):
        sim.run(300, fault=fault, variants=(variant,))
