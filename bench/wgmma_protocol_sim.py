"""The barrier protocols of bench/wgmma_gemm_proto.cu (sim variants 0, 1 and 3: the .cu's variants
0, 1 and 2), bench/fused_gu_wgmma_proto.cu (sim variants 2 and 4: the launcher's variants 0 / 1 and
2) and bench/fused_bwd_wgmma_proto.cu (sim variant 5), simulated on the CPU under random
interleavings: the producer thread (variant 5: its two), the consumer warpgroups (each warp's
arrivals separate), the bulk copies (which land at any later time) and the wgmma groups (which
finish at any time up to their wait), with mbarriers modelled as the PTX ISA defines them (a phase
completes when its pending arrivals reach zero and its transaction bytes are all in;
`try_wait.parity P` passes when the current, incomplete phase's parity differs from P). The loops
below mirror the kernels' loops line for line, and as the kernels are templates on the cluster size
CLUSTER (1 or 2), so is the sim: `simulate` mirrors `wgmma_gemm_kernel` (variant 0) and
`wgmma_gemm_pingpong_kernel<CLUSTER>` (variants 1 and 3), `simulate_fused` mirrors
`fused_gu_kernel<HALVES, CLUSTER>` (variants 2 and 4), `simulate_bwd` mirrors `fused_bwd_kernel`
(variant 5). All run over `Cluster`s: the CTAs of a cluster (index: rank; with CLUSTER 1 a CTA
alone, rank 0), their barriers and shared memory, the producer's fill of a stage (`produce`,
`produce_multicast`), the copies landing, the consumers' releases (`release<CLUSTER>`) and the CTAs'
exit; and over `Warpgroup`s: a consumer warpgroup's main loop over a tile's K steps. CTAs are named
by (cluster, rank) in the messages. Checked at every step: a consumer's MMAs read the stage holding
the fill they mean (tile, K step), no copy lands in a stage an unfinished MMA group still reads,
every tile's every K step is consumed once by the warpgroup that owns it (variant 0: by each of the
two), nothing reaches a CTA after it exited, and nothing deadlocks; at the end, no barrier is
partway through a phase.

Variant 0 (COOPERATIVE, `wgmma_gemm_kernel`): 4 stages, each read by both consumer warpgroups (64
rows of the tile each) and released by their 8 warps. Variant 1 (PINGPONG,
`wgmma_gemm_pingpong_kernel<1>`): 6 stages, consumer warpgroup `own` taking the CTA's tiles i = 0,
1, .. with i % 2 == own (its K steps the producer's fills i k_steps, ..), its 4 warps releasing
each stage, the two warpgroups' main loops taking turns (turn[own]: the other's main loop of tile
i - 1 has waited for all its stages). With CLUSTER 1 the sim lands a stage's two copies (A or x
rows, B or weight rows) as one.

Variant 2 (FUSED, `fused_gu_kernel<2, 1>` and `<1, 1>`, v17 and v18 alike: 4 stages on even seeds
as v17's tiles of 128 tokens, 6 on odd ones as v18's of 64): the ping-pong of variant 1, work
split into items (a 128-token block, a chunk of 64-column tiles; `make_plan` below mirrors the
kernel's), a CTA taking items blockIdx, blockIdx + grid, .. and numbering its tiles i = 0, 1, ..
across them (consumer warpgroup `own` takes those with i % 2 == own), and one epilogue buffer:
after a tile's K steps the producer waits for the buffer's "empty" barrier (the previous tile's
epilogue done) and copies the tile's epilogue operands into it (three copies, each landing on its
own). The consumer waits for the buffer's "full" barrier after its main loop, only then hands the
turn to the other warpgroup, and releases the buffer (4 warps) after its epilogue, which is
modelled as a span of time during which the buffer must hold this tile's operands, fully landed,
and no copy may land in it. At each item's end each warpgroup writes its zd partial (2 chunk +
own); checked: each (item, warpgroup) writes once, holding the warpgroup's tiles of that item, and
every tile's epilogue runs once, on warpgroup i % 2 of the item's CTA.

Variant 3 (CLUSTER, the .cu's variant 2, `wgmma_gemm_pingpong_kernel<2>`): the ping-pong of variant
1 in clusters of 2 CTAs (rank 0, 1; cluster blockIdx / 2 of grid / 2, the grid the launcher's:
even), both walking the cluster's tiles t = cluster, cluster + clusters, .. (m_units = M / 256),
rank r's tile the row block 2 (t % m_units) + r at the column block t / m_units. Each CTA's
producer (`produce_multicast`), per K step, waits for its own CTA's "empty" barrier (8 arrivals:
the tile owner's 4 warps in each CTA), arrives with expect_tx of the whole stage on its own "full"
barrier, and issues its A copy (landing in its own CTA) and its half of B multicast: one copy
landing in the same stage of both CTAs, at a different time in each, completing bytes on that
CTA's "full" barrier, so the peer's half can land before the CTA's own expect_tx (the transaction
count goes below zero for a while: `Barrier(signed_tx=True)`). Consumers as variant 1's (turn
barriers in their CTA), but each warp releases a stage on the "empty" barriers of both CTAs.
Checked besides: a K step reads the stage with its A and both B halves (from the two producers)
of the fill it means, no copy lands in a stage of the CTA it lands in while an MMA group there
reads it, and nothing touches a CTA after it exited (the kernel's final cluster_sync: a CTA exits
once the processes of both have finished; the planted fault no_final_sync lets it go once its
own have).

Variant 4 (FUSED_CLUSTER, v18c: `fused_gu_kernel<1, 2>`, the launcher's variant 2): variant 2
with v18's 6 stages in clusters of 2 CTAs, the plan over ctas // 2 clusters and pairs of 64-token
blocks (make_plan(T, I, ctas // 2, 128)), the grid 2 min(clusters, items); the cluster takes
items cluster, cluster + clusters, .. (`Walk`), rank r the block 2 (item % m_blocks) + r of each,
both CTAs walking the same tiles in lockstep (so both count them i = 0, 1, .. alike). Each
producer (`produce<1, 2>`), per K step, waits for its own "empty" barrier (8 arrivals: the tile
owner's 4 warps in each CTA), arrives with expect_tx of the whole stage on its own "full" barrier
and issues its x copy (into its CTA) and its half of the 128 weight rows multicast into both
CTAs, as variant 3's; after a tile's K steps it waits for its own epilogue buffer's "empty"
barrier (8 arrivals, as the stages'), arrives with expect_tx of the whole buffer on its own
"full" one, and issues its half (64 rows) of each of the three boxes multicast: six landings a
CTA, each on its own, half of them the peer's (which may land before the expect_tx). Consumers
as variant 2's (turn barriers in their CTA), each warp's release of a stage or of the buffer
(`release<2>`) arriving on the barrier of both CTAs. Checked besides variant 2's checks (by
64-token block; the zd partials by (item, rank, warpgroup)) and variant 3's cross-CTA ones: the
epilogue reads its CTA's buffer holding both producers' halves of each box of its tile, no
landing in a CTA's buffer while an epilogue there reads it. The fault local_release_only keeps
both the stages' and the buffer's releases local (their counts 4), half_expect both expect_tx to
the CTA's own bytes; epi_local_release_only keeps the buffer's release local only.

Variant 5 (FUSED_BWD, v19: `fused_bwd_kernel`, CLUSTER 1): the ping-pong of variant 2 with 4
stages, tiles of 64 tokens x 128 columns (make_plan(T, I, ctas): items of a 64-token block and a
chunk of 128-column tiles; the CTA takes items blockIdx, blockIdx + grid, .., counts its tiles i
across them, warpgroup i % 2 taking tile i) and two producer threads, running independently:
warp 0's fills the stages (`produce_stages`: per K step the "empty" wait, expect_tx, the dout and
wdt rows, landing as one as variant 2's), warp 1's the one epilogue buffer twice a tile, its
64-column sub-blocks c = 0, 1 in turn (`produce_epilogue`: fill n waits for the buffer's one
"empty" barrier with parity (n & 1) ^ 1, arrives with expect_tx of the buffer on sub-block c's
own "full" barrier, epi_full0 + 8 c, and issues six boxes, each landing on its own). A consumer,
per tile (`main_step` per K step, as variant 2's main loop), waits on epi_full0 (parity i & 1),
only then hands the turn over, waits for its last MMA group and releases the last stage; then
sub-block 0's epilogue (a span, as variant 2's, during which the buffer must hold this tile's
sub-block 0, fully landed, and no copy may land in it), the buffer's release (4 warps), the wait
on epi_full1 (parity i & 1), sub-block 1's epilogue, the release; at each item's end its dz / dw
partials (2 chunk + own), checked as variant 2's zd partials; every tile's two sub-blocks' epilogues
run once each, on its owner. Checked besides, as each wait on a sub-block's "full" barrier starts:
the barrier is at the phase the wait means or just past it, never one short (its previous phase
still open, on which a parity wait would pass as on its own). That is the design's point: the turn
goes over after the epi_full0 wait, so the other warpgroup's epi_full0 wait finds this tile's phase
at least started; its epi_full1 wait comes after its own sub-block 0, whose fill waited for this
warpgroup's release of sub-block 1, after its epi_full1 wait. Its own faults (FAULTS):
epi_empty_parity, bwd_one_full_barrier (one "full" barrier for both sub-blocks, two phases a tile:
tile i's wait for its phase 2 i can start at phase 2 i - 1, tile i - 1's sub-block 0 landed and its
sub-block 1 not, and passes on it) and bwd_sub0_release_early.

    python3 bench/wgmma_protocol_sim.py [--seeds 200] [--variants 5] [--fault F]
                                                           (tests/test_bench.py runs a few)
"""
import argparse
import random

COOPERATIVE, PINGPONG, FUSED, CLUSTER, FUSED_CLUSTER, FUSED_BWD = 0, 1, 2, 3, 4, 5


class Barrier:
    """An mbarrier: `count` arrivals a phase and a transaction count. With signed_tx (the "full"
    barriers of variants 3 and 4) the count may go below zero for a while, as PTX allows: the peer
    CTA's multicast bytes can land before this CTA's own producer's expect_tx of the phase; the
    phase still completes only when its arrivals are all in and the count is back at zero."""

    def __init__(self, count, signed_tx=False):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0
        self.signed_tx = signed_tx

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def arrive(self, tx=0):
        if self.pending <= 0:  # (the phase's arrivals all in, its bytes not: PTX leaves it undefined)
            raise Violation("an arrival on a barrier phase that has all its arrivals")
        self.pending -= 1
        self.tx += tx
        self._maybe_complete()

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        if self.tx < 0 and not self.signed_tx:
            raise Violation("more bytes land on a barrier than its phase expects")
        self._maybe_complete()

    def passes(self, parity):  # mbarrier.try_wait.parity
        return (self.phase & 1) != parity


class Violation(AssertionError):
    pass


# Faults to plant, to show the simulation catches them (tests/test_bench.py), and the variants
# each applies to: the ping-pong's turn barrier left out, a stage released before the MMA group
# reading it finished, the producer's first wait on a fresh "empty" barrier with the wrong parity;
# for variant 2: the turn handed over before the epilogue buffer's "full" wait, the buffer
# released before the epilogue finished reading it, the "full" wait with the wrong parity, tiles
# owned by their column's parity (nt % 2) rather than the CTA's count (i % 2); for variant 3: a
# stage released on the consumer's own CTA's "empty" barrier only (its count 4), the "full"
# barrier's expect_tx of the CTA's own copies only (A and its half of B), no cluster barrier
# before exit (a CTA gone once its own processes are). Variant 4 takes all of them (a stage's and
# the epilogue buffer's releases local only, either expect_tx of the CTA's own bytes only), and
# the epilogue buffer's release alone kept local (epi_local_release_only). Variant 5 takes variant
# 2's (empty_parity: the stage producer's; epi_parity: both sub-blocks' "full" waits;
# epi_release_early: both sub-blocks' releases before their epilogue), and its own: the epilogue
# producer's "empty" wait with the wrong parity (epi_empty_parity), both sub-blocks filled and
# waited for on the one barrier epi_full0 with the parity of its phase count (2 i + c) & 1
# (bwd_one_full_barrier), the buffer released halfway through sub-block 0's epilogue
# (bwd_sub0_release_early).
FAULTS = {
    "no_turn": (PINGPONG, FUSED, CLUSTER, FUSED_CLUSTER, FUSED_BWD),
    "release_early": (COOPERATIVE, PINGPONG, FUSED, CLUSTER, FUSED_CLUSTER, FUSED_BWD),
    "empty_parity": (COOPERATIVE, PINGPONG, FUSED, CLUSTER, FUSED_CLUSTER, FUSED_BWD),
    "turn_before_epi": (FUSED, FUSED_CLUSTER, FUSED_BWD),
    "epi_release_early": (FUSED, FUSED_CLUSTER, FUSED_BWD),
    "epi_parity": (FUSED, FUSED_CLUSTER, FUSED_BWD),
    "own_by_column": (FUSED, FUSED_CLUSTER, FUSED_BWD),
    "local_release_only": (CLUSTER, FUSED_CLUSTER),
    "half_expect": (CLUSTER, FUSED_CLUSTER),
    "no_final_sync": (CLUSTER, FUSED_CLUSTER),
    "epi_local_release_only": (FUSED_CLUSTER,),
    "epi_empty_parity": (FUSED_BWD,),
    "bwd_one_full_barrier": (FUSED_BWD,),
    "bwd_sub0_release_early": (FUSED_BWD,),
}


def interleave(procs, copies_in_flight, rng, land=0.3):
    """Runs the processes (generators yielding None or a wait condition) and lands the copies
    (callables) in a random order, a copy at a step with probability `land` (always when no
    process can run), until all are done; raises Violation("deadlock") if stuck."""
    waiting = [None] * len(procs)
    done = [False] * len(procs)
    while True:
        runnable = [j for j in range(len(procs)) if not done[j] and (waiting[j] is None or waiting[j]())]
        if not runnable and not copies_in_flight:
            if all(done):
                break
            raise Violation("deadlock")
        if copies_in_flight and (not runnable or rng.random() < land):
            copies_in_flight.pop(rng.randrange(len(copies_in_flight)))()
            continue
        j = rng.choice(runnable)
        try:
            waiting[j] = next(procs[j])
        except StopIteration:
            done[j] = True
            waiting[j] = None


# Bytes, in units of 8 KiB (64 rows of 64 bf16): a stage's A rows (128) or x rows (64: v18's;
# v17's 128 count alike), its B or weight rows (128: kPpBN, kTN) and an epilogue box (128 rows);
# in clusters of 2 each producer copies half of the latter two (HALF_BYTES). (Variant 0's B rows,
# 256, count as 128 too: with CLUSTER 1 the bytes have only to add up.)
A_BYTES, X_BYTES, B_BYTES, BOX_BYTES = 2, 1, 2, 2
HALF_BYTES = B_BYTES // 2


class Cluster:
    """The `size` CTAs of a cluster (index: rank; CLUSTER 1: a CTA alone, rank 0), as the kernel
    templates have them: each CTA's stages with their "full" and "empty" barriers, its turn pair
    and (the fused kernel: `epilogue`) its epilogue buffer with its "full" and "empty" barriers,
    all made before anything runs (the __syncthreads or cluster_sync after their init); the
    producer's fills, the copies landing, the consumers' releases and the CTAs' exit. own_bytes:
    a stage's own rows (A_BYTES or X_BYTES); rows: their name and the other rows' ("A", "B" or
    "x", "weight"); warpgroups: the consumer warpgroups reading a stage (variant 0's 2); subs:
    the epilogue buffer's "full" barriers (variant 5's 2, one a sub-block); boxes: its boxes'
    bytes; producers: the CTA's producer threads (variant 5's 2)."""

    def __init__(self, index, size, stages, fault, copies_in_flight, own_bytes, rows, warpgroups=1,
                 epilogue=False, subs=1, boxes=(BOX_BYTES,) * 3, producers=1):
        self.index, self.size, self.stages, self.fault = index, size, stages, fault
        self.copies_in_flight, self.own_bytes, self.epilogue = copies_in_flight, own_bytes, epilogue
        ranks = range(size)
        # a release of a stage or of the buffer (release<CLUSTER>): each owner warp's, with
        # CLUSTER 2 on the barrier of both CTAs (either producer refills both), so "empty" takes
        # the owner's 4 warps of each CTA (4 CLUSTER); the faults keep them local (their counts 4)
        self.local_stage = size == 1 or fault == "local_release_only"
        self.local_epi = size == 1 or fault in ("local_release_only", "epi_local_release_only")
        signed = size == 2  # the peer's multicast bytes may land before the CTA's own expect_tx
        self.full = [[Barrier(1, signed_tx=signed) for _ in range(stages)] for _ in ranks]
        arrivals = 4 * warpgroups * (1 if self.local_stage else size)
        self.empty = [[Barrier(arrivals) for _ in range(stages)] for _ in ranks]
        self.turn = [[Barrier(4), Barrier(4)] for _ in ranks]  # turn[w]: the other's 4 warps
        # which fill (it) a stage's parts hold: with CLUSTER 1 its copies (one landing), with
        # CLUSTER 2 its own rows, then the other rows' halves (index: the producer's rank)
        self.tag = [[[None] * (1 if size == 1 else 3) for _ in range(stages)] for _ in ranks]
        self.readers = [[0] * stages for _ in ranks]  # unfinished MMA groups reading the stage
        own, other = rows
        self.parts = (f"({own} and {other})" if size == 1
                      else f"({own}, {other} half 0, {other} half 1)")
        if epilogue:
            # its "full" barriers, one a sub-block (epi_full0 + 8 c: variant 5's 2, else 1), and
            # its boxes' bytes (variants 2 and 4: 3 of BOX_BYTES; 5: BWD_BOXES)
            self.epi_full = [[Barrier(1, signed_tx=signed) for _ in range(subs)] for _ in ranks]
            self.epi_empty = [Barrier(4 * (1 if self.local_epi else size)) for _ in ranks]
            self.epi_boxes = boxes
            # which tile (i; variant 5: (i, sub-block c)) each box's halves (index: the producer's
            # rank) hold
            self.epi_tag = [[[None] * size for _ in boxes] for _ in ranks]
            self.epi_readers = [0] * size  # epilogues reading the buffer
        # the CTA's processes (its producer threads and 2 consumer warpgroups) not yet at exit
        # (its final cluster_sync)
        self.running = [producers + 2] * size

    def gone(self, rank):
        """CTA rank has exited: all its processes and (CLUSTER 2: the final cluster_sync) its
        peer's have finished; without that sync (the fault no_final_sync), its own alone."""
        return self.running[rank] == 0 and (self.fault == "no_final_sync" or not any(self.running))

    def reach(self, rank, what):  # what touches CTA rank's shared memory
        if self.gone(rank):
            raise Violation(f"cluster {self.index}: {what} reaches cta rank {rank} after it exited")

    def until_sync(self, proc, rank):  # the process, then its exit (CLUSTER 2: cluster_sync arrival)
        yield from proc
        self.running[rank] -= 1

    def fill(self, rank, it):
        """CTA rank's producer's K step `it` (its it-th fill): it waits for the stage's "empty"
        barrier (mbar_wait<true> with CLUSTER 2), arrives with expect_tx of the whole stage on its
        "full" barrier and issues its copies: with CLUSTER 1 the stage's own and other rows
        (`produce`: tma_load_2d twice, one landing here), with CLUSTER 2 its own rows into its CTA
        and its half of the other rows multicast (`produce_multicast`, `produce<1, 2>`), one copy
        landing in the same stage of each CTA, on its own."""
        s = it % self.stages
        parity = ((it // self.stages) & 1) ^ (0 if self.fault == "empty_parity" else 1)
        yield lambda: self.empty[rank][s].passes(parity)
        share = 1 if self.fault == "half_expect" else self.size  # the producers' parts it expects
        self.full[rank][s].arrive(tx=self.own_bytes + share * B_BYTES // self.size)  # expect_tx
        if self.size == 1:
            self.copy(rank, rank, s, it, 0, self.own_bytes + B_BYTES)  # tma_load_2d, twice
        else:
            self.copy(rank, rank, s, it, 0, self.own_bytes)  # tma_load_2d
            for dest in range(2):  # tma_load_2d_multicast, mask 0x3
                self.copy(rank, dest, s, it, 1 + rank, HALF_BYTES)

    def copy(self, rank, dest, s, it, part, nbytes):  # rank's copy of fill it, landing in CTA dest

        def land():
            self.reach(dest, f"rank {rank}'s copy of fill {it}")
            if self.readers[dest][s]:
                raise Violation(f"cluster {self.index}: rank {rank}'s copy of fill {it} lands in "
                                f"stage {s} of rank {dest} while an MMA reads it")
            self.tag[dest][s][part] = it
            self.full[dest][s].complete_tx(nbytes)
        self.copies_in_flight.append(land)

    def fill_epilogue(self, rank, i):
        """CTA rank's producer after the K steps of the CTA's tile i: it waits for the epilogue
        buffer's "empty" barrier (the previous tile's epilogue done), arrives with expect_tx of
        the whole buffer (kEpiBytes) on its "full" barrier and issues the three boxes (Bgu K 0-63,
        Bgu K 64-127, Ad), with CLUSTER 2 its half of each multicast: each landing on its own."""
        yield lambda: self.epi_empty[rank].passes((i & 1) ^ 1)
        share = 1 if self.fault == "half_expect" else self.size
        self.epi_full[rank][0].arrive(tx=3 * share * BOX_BYTES // self.size)
        for box in range(3):
            for dest in range(self.size):
                self.copy_epilogue(rank, dest, box, i)

    def fill_epilogue_sub(self, rank, fill, i, c):
        """Variant 5's epilogue producer (`produce_epilogue`, warp 1's thread), its fill `fill`:
        sub-block c of the CTA's tile i. It waits for the buffer's one "empty" barrier (the
        previous fill's epilogue done: parity (fill & 1) ^ 1), arrives with expect_tx of the whole
        buffer (kEpiBytes) on sub-block c's "full" barrier (epi_full0 + 8 c) and issues the six
        boxes (Bgu K 0-63, 64-127, adt K 0-63, 64-127, Bg^T, Bu^T), each landing on its own. The
        faults: epi_empty_parity waits parity fill & 1; bwd_one_full_barrier fills both
        sub-blocks on epi_full0."""
        parity = (fill & 1) ^ (0 if self.fault == "epi_empty_parity" else 1)
        yield lambda: self.epi_empty[rank].passes(parity)
        full = 0 if self.fault == "bwd_one_full_barrier" else c
        self.epi_full[rank][full].arrive(tx=sum(self.epi_boxes))  # mbar_expect_tx(full, kEpiBytes)
        for box, nbytes in enumerate(self.epi_boxes):  # tma_load_2d, six times
            self.copy_epilogue(rank, rank, box, (i, c), full, nbytes)

    def copy_epilogue(self, rank, dest, box, i, full=0, nbytes=None):
        """rank's part of box (of tile i; variant 5: (i, c)), landing in CTA dest and completing
        its bytes (default BOX_BYTES // CLUSTER) on the buffer's "full" barrier `full`."""

        def land():
            self.reach(dest, f"rank {rank}'s epilogue copy of tile {i}")
            if self.epi_readers[dest]:
                raise Violation(f"cluster {self.index}: rank {rank}'s epilogue copy of tile {i} "
                                f"lands in the buffer of rank {dest} while an epilogue reads it")
            self.epi_tag[dest][box][rank] = i
            self.epi_full[dest][full].complete_tx(BOX_BYTES // self.size if nbytes is None else nbytes)
        self.copies_in_flight.append(land)

    def release(self, rank, own, bars, what, local):
        """release<CLUSTER> by the 4 warps of CTA rank's warpgroup own (each warp's lane 0): on
        the barrier of `bars` (index: rank) in its own CTA, then (unless local) in the peer's."""
        for _ in range(4):
            bars[rank].arrive()
            yield None
            if not local:
                self.reach(rank ^ 1, f"rank {rank} wg {own}'s release of {what}")
                bars[rank ^ 1].arrive()
                yield None

    def check_exit(self):  # at exit no barrier is partway through a phase
        for rank in range(self.size):
            bars = [(f"full[{s}]", self.full[rank][s]) for s in range(self.stages)]
            bars += [(f"empty[{s}]", self.empty[rank][s]) for s in range(self.stages)]
            if self.epilogue:
                bars += [(f"epi_full{c}" if len(self.epi_full[rank]) > 1 else "epi_full", bar)
                         for c, bar in enumerate(self.epi_full[rank])]
                bars += [("epi_empty", self.epi_empty[rank])]
            for name, bar in bars:
                if bar.pending != bar.count or bar.tx != 0:
                    raise Violation(f"cluster {self.index} rank {rank}: {name} ends with "
                                    f"{bar.pending} arrivals and {bar.tx} bytes pending")


class Warpgroup:
    """Consumer warpgroup 1 + own of CTA rank of a cluster: its MMA groups in flight, its main loop
    over a tile's K steps (recorded in `consumed`: each K step read once, or with `shared`,
    variant 0's, once by each warpgroup), its releases and its hand-over of the turn."""

    def __init__(self, cl, rank, own, rng, consumed, shared=False):
        self.cl, self.rank, self.own, self.rng = cl, rank, own, rng
        self.consumed, self.shared = consumed, shared
        self.cta = cl.size * cl.index + rank  # blockIdx
        self.name = f"cluster {cl.index} rank {rank} wg {own}"
        self.groups = []  # stages read by each unfinished group, oldest first
        self.turns = 0    # its waits on its turn barrier

    def finish_groups(self, keep):  # wgmma.wait_group keep
        while len(self.groups) > keep:
            self.cl.readers[self.rank][self.groups.pop(0)] -= 1

    def main_loop(self, i, k_steps, tile):
        """The K steps of the CTA's tile i (the producer's fills i k_steps, ..; `tile`: its row
        and column blocks, consumed's key): each stage's "full" wait, its MMA group committed, the
        previous group waited for and its stage released. Returns the last stage (its group
        still in flight, unreleased)."""
        cl, rank, stages = self.cl, self.rank, self.cl.stages
        it, previous = i * k_steps, None
        for ks in range(k_steps):
            s = it % stages
            yield lambda s=s, p=(it // stages) & 1: cl.full[rank][s].passes(p)
            held = cl.tag[rank][s]
            if held != [it] * len(held):
                raise Violation(f"{self.name}: K step {ks} of tile {i} reads stage {s} holding "
                                f"fills {cl.parts} {held}, not {it}")
            key, who = (*tile, ks), (self.cta, self.own)
            if key in self.consumed and (not self.shared or who in self.consumed[key]):
                raise Violation(f"{key} consumed twice")
            self.consumed.setdefault(key, []).append(who)
            cl.readers[rank][s] += 1
            self.groups.append(s)  # commit
            if self.rng.random() < 0.5:
                self.finish_groups(self.rng.randint(1, len(self.groups)))  # groups may finish early
            if cl.fault != "release_early":
                self.finish_groups(1)  # wgmma.wait_group 1
            yield None  # (a point where the other processes may run)
            if previous is not None:
                yield from self.release_stage(previous)
            previous = s
            it += 1
        return previous

    def release_stage(self, s):
        yield from self.cl.release(self.rank, self.own, [e[s] for e in self.cl.empty], f"stage {s}",
                                   self.cl.local_stage)

    def release_epilogue(self):
        yield from self.cl.release(self.rank, self.own, self.cl.epi_empty, "the epilogue buffer",
                                   self.cl.local_epi)

    def wait_turn(self, i):  # before the CTA's tile i: the other's tile i - 1 has had all it waits for
        if i > 0 and self.cl.fault != "no_turn":
            yield lambda p=self.turns & 1: self.cl.turn[self.rank][self.own].passes(p)
            self.turns += 1

    def hand_turn(self):  # each warp's lane 0: the other's next tile may start (this CTA's turn)
        for _ in range(4):
            self.cl.turn[self.rank][1 - self.own].arrive()
            yield None


def simulate(variant, m_units, n_tiles, k_steps, ctas, seed, fault=None):
    """One random interleaving of variant 0 (`wgmma_gemm_kernel`), 1 or 3
    (`wgmma_gemm_pingpong_kernel<1>`, `<2>`) for M = 128 CLUSTER m_units, N = 128 n_tiles
    (variant 0: 256), K = 64 k_steps and the launcher's grid for max_ctas `ctas` (min(ctas,
    tiles), rounded down to whole clusters); raises Violation (or AssertionError) on a fault."""
    assert variant in (COOPERATIVE, PINGPONG, CLUSTER)
    rng = random.Random(seed)
    size = 2 if variant == CLUSTER else 1  # CLUSTER
    stages = 4 if variant == COOPERATIVE else 6  # kStages, kPpStages
    tiles = m_units * n_tiles  # the CTA's (variant 3: the cluster's, a row block for each rank)
    units = min(ctas, size * tiles) // size  # gridDim.x / CLUSTER
    assert units >= 1
    consumed = {}  # (row block, column block, ks) -> [(cta, consumer warpgroup)]

    procs, copies_in_flight, clusters = [], [], []
    for unit in range(units):
        cl = Cluster(unit, size, stages, fault, copies_in_flight, A_BYTES, ("A", "B"),
                     warpgroups=2 if variant == COOPERATIVE else 1)
        walk = range(unit, tiles, units)  # the cluster's tiles, i = 0, 1, .. (both CTAs' alike)

        def producer(rank, cl=cl, walk=walk):  # produce (variants 0, 1), produce_multicast (3)
            it = 0
            for _tile in walk:
                for _ks in range(k_steps):
                    yield from cl.fill(rank, it)
                    it += 1

        def consumer(rank, own, cl=cl, walk=walk):  # consumer warpgroup 1 + own
            wg = Warpgroup(cl, rank, own, rng, consumed, shared=variant == COOPERATIVE)
            # variant 0: every tile (64 rows of it each); 1 and 3: the tiles i with i % 2 == own
            first, step = (0, 1) if variant == COOPERATIVE else (own, 2)
            for i in range(first, len(walk), step):
                tile = ((walk[i] % m_units) * size + rank, walk[i] // m_units)  # (m0 / 128, n0 / BN)
                if variant != COOPERATIVE:
                    yield from wg.wait_turn(i)
                previous = yield from wg.main_loop(i, k_steps, tile)
                if variant != COOPERATIVE:
                    yield from wg.hand_turn()
                wg.finish_groups(0)  # wgmma.wait_group 0
                yield from wg.release_stage(previous)
                # (the epilogue: registers only)

        for rank in range(size):
            procs.append(cl.until_sync(producer(rank), rank))
            procs.append(cl.until_sync(consumer(rank, 0), rank))
            procs.append(cl.until_sync(consumer(rank, 1), rank))
        clusters.append(cl)

    # copies landing at a middling rate (variant 3: slow, middling or quick, as variant 2's)
    land = 0.3 if size == 1 else rng.choice((0.05, 0.3, 0.6))
    interleave(procs, copies_in_flight, rng, land)

    for cl in clusters:
        cl.check_exit()
    for t in range(tiles):
        unit, i = t % units, t // units  # the cluster's i-th tile
        for rank in range(size):
            cta = size * unit + rank
            want = [(cta, 0), (cta, 1)] if variant == COOPERATIVE else [(cta, i % 2)]
            for ks in range(k_steps):
                key = ((t % m_units) * size + rank, t // m_units, ks)
                if sorted(consumed.get(key, [])) != want:
                    raise Violation(f"tile {key[:2]} K step {ks} consumed by (cta, wg) "
                                    f"{consumed.get(key)}, not {want}")


# The fused kernel's tiles as the sim counts them: 128 tokens (kTM: v17's tiles, v18c's block
# pairs; v18's of 64 counted alike) x 64 columns of I (kTI).
kTM, kTI = 128, 64


class Plan:
    """The kernel's make_plan(T, I, ctas, tm): items of (token block, column chunk), M fastest
    (variant 4's: over clusters, of blocks of 2 x 64 tokens, a pair of 64-token blocks; variant
    5's, bench/fused_bwd_wgmma_proto.cu's make_plan(T, I, ctas): tiles of 64 tokens (tm) x 128
    columns (tn))."""

    def __init__(self, T, I, ctas, tm=kTM, tn=kTI):
        self.m_blocks = T // tm
        self.n_tiles = I // tn
        chunks = ctas // self.m_blocks
        chunks = 1 if chunks < 1 else (self.n_tiles if chunks > self.n_tiles else chunks)
        self.tiles_per_chunk = (self.n_tiles + chunks - 1) // chunks
        self.n_chunks = (self.n_tiles + self.tiles_per_chunk - 1) // self.tiles_per_chunk
        self.items = self.m_blocks * self.n_chunks

    def item(self, item):
        """(token block, chunk, the chunk's tiles nt) of an item, as the kernel's loops get them."""
        m_block, chunk = item % self.m_blocks, item // self.m_blocks
        nt1 = min(self.n_tiles, (chunk + 1) * self.tiles_per_chunk)
        return m_block, chunk, range(chunk * self.tiles_per_chunk, nt1)


def make_plan(T, I, ctas, tm=kTM, tn=kTI):
    return Plan(T, I, ctas, tm, tn)


def simulate_fused(variant, m_blocks, n_tiles, k_steps, ctas, seed, fault=None, units=None,
                   stages=6):
    """One random interleaving of variant 2 (`fused_gu_kernel<2, 1>` with 4 stages, `<1, 1>` with
    6) or 4 (`<1, 2>`) for T = 128 m_blocks tokens (variant 4: pairs of 64-token blocks), I = 64
    n_tiles columns, H = 64 k_steps, the launcher's plan for max_ctas `ctas` (over ctas // CLUSTER
    clusters) and `units` clusters (default the launcher's, min(ctas // CLUSTER, items); the
    kernel takes any fewer); raises Violation (or AssertionError) on a fault."""
    assert variant in (FUSED, FUSED_CLUSTER)
    rng = random.Random(seed)
    size = 2 if variant == FUSED_CLUSTER else 1  # CLUSTER
    # the kernel's make_plan(T, I, plan_ctas / CLUSTER, kTM CLUSTER): blocks of 128 tokens
    plan = make_plan(m_blocks * kTM, n_tiles * kTI, ctas // size)
    units = min(ctas // size, plan.items) if units is None else units
    assert 1 <= units <= min(ctas // size, plan.items)
    consumed = {}   # (token block, nt, ks) -> [(cta, consumer warpgroup)]
    epilogues = {}  # (token block, nt) -> (cta, consumer warpgroup)
    partials = {}   # (item, rank, warpgroup) -> [(cta, the tiles nt its zd sums held)]

    procs, copies_in_flight, clusters = [], [], []
    for unit in range(units):
        cl = Cluster(unit, size, stages, fault, copies_in_flight, X_BYTES, ("x", "weight"),
                     epilogue=True)
        my_items = range(unit, plan.items, units)  # Walk: first, stride

        def producer(rank, cl=cl, my_items=my_items):  # produce<HALVES, CLUSTER>
            it = i = 0
            for item in my_items:
                _m_block, _chunk, nts = plan.item(item)
                for _nt in nts:
                    for _ks in range(k_steps):
                        yield from cl.fill(rank, it)
                        it += 1
                    yield from cl.fill_epilogue(rank, i)
                    i += 1

        def consumer(rank, own, cl=cl, my_items=my_items):  # consumer warpgroup 1 + own
            wg = Warpgroup(cl, rank, own, rng, consumed)

            def check_epi(i, nt):
                if cl.epi_tag[rank] != [[i] * size] * 3:
                    raise Violation(f"{wg.name}: the epilogue of tile {i} (nt {nt}) reads the "
                                    f"buffer holding tiles (by box, half) {cl.epi_tag[rank]}")

            i = 0
            for item in my_items:
                m_block, _chunk, nts = plan.item(item)
                block = m_block * size + rank  # Walk::m0 / tm
                mine = []  # (zd sums zeroed) the tiles this warpgroup's zd sums hold
                for nt in nts:
                    if (nt if fault == "own_by_column" else i) % 2 != own:
                        i += 1  # (the loop's ++i)
                        continue
                    yield from wg.wait_turn(i)
                    previous = yield from wg.main_loop(i, k_steps, (block, nt))
                    if fault == "turn_before_epi":
                        yield from wg.hand_turn()
                    parity = (i & 1) ^ (1 if fault == "epi_parity" else 0)
                    yield lambda p=parity: cl.epi_full[rank][0].passes(p)
                    if fault != "turn_before_epi":
                        yield from wg.hand_turn()
                    wg.finish_groups(0)  # wgmma.wait_group 0
                    yield from wg.release_stage(previous)
                    # The epilogue: two 64-row halves (v17) or one of deltas, SwiGLU, zd, their MMA
                    # groups (reading the buffer) each waited for before the next; a span during
                    # which the CTA's buffer must hold this tile's operands (with CLUSTER 2 both
                    # producers' halves) and no copy may land in it.
                    if fault == "epi_release_early":
                        yield from wg.release_epilogue()
                    cl.epi_readers[rank] += 1
                    for _step in range(4):
                        check_epi(i, nt)
                        yield None
                    check_epi(i, nt)
                    cl.epi_readers[rank] -= 1
                    if (block, nt) in epilogues:
                        raise Violation(f"the epilogue of block {block} tile {nt} runs twice")
                    epilogues[(block, nt)] = (wg.cta, own)
                    mine.append(nt)
                    if fault != "epi_release_early":  # its MMAs have completed (each waited for)
                        yield from wg.release_epilogue()
                    i += 1
                # this warpgroup's partial of the item: zd_part[2 chunk + own] at its block's rows
                partials.setdefault((item, rank, own), []).append((wg.cta, mine))
                yield None

        for rank in range(size):
            procs.append(cl.until_sync(producer(rank), rank))
            procs.append(cl.until_sync(consumer(rank, 0), rank))
            procs.append(cl.until_sync(consumer(rank, 1), rank))
        clusters.append(cl)
    # copies slow, middling or quick to land: slow ones expose stale reads (a wait passing on a
    # phase the copies have yet to complete), quick ones copies landing under a reader
    interleave(procs, copies_in_flight, rng, land=rng.choice((0.05, 0.3, 0.6)))

    for cl in clusters:
        cl.check_exit()
    for unit in range(units):
        i = 0  # the cluster's count of its tiles (both CTAs')
        for item in range(unit, plan.items, units):
            m_block, _chunk, nts = plan.item(item)
            for nt in nts:
                for rank in range(size):
                    block, want = m_block * size + rank, (size * unit + rank, i % 2)
                    for ks in range(k_steps):
                        if consumed.get((block, nt, ks)) != [want]:
                            raise Violation(f"block {block} tile {nt} K step {ks} consumed by (cta, "
                                            f"wg) {consumed.get((block, nt, ks))}, not {[want]}")
                    if epilogues.get((block, nt)) != want:
                        raise Violation(f"block {block} tile {nt}'s epilogue ran on (cta, wg) "
                                        f"{epilogues.get((block, nt))}, not {want}")
                i += 1
            first = i - len(nts)  # the count at the item's first tile
            for rank in range(size):
                for own in range(2):
                    want = [(size * unit + rank,
                             [nt for j, nt in enumerate(nts) if (first + j) % 2 == own])]
                    if partials.get((item, rank, own)) != want:
                        raise Violation(f"item {item} rank {rank} wg {own} wrote zd partials "
                                        f"{partials.get((item, rank, own))}, not {want}")
    if len(partials) != 2 * size * plan.items:
        raise Violation(f"{len(partials)} zd partials written, not {2 * size * plan.items}")


# v19's (variant 5's) tiles: 64 tokens (kTM) x 128 columns of I (kTN), two 64-column sub-blocks
# (kSub) each filling the epilogue buffer once; its 4 stages; the buffer's six boxes, in units of
# 8 KiB: Bgu K 0-63 and 64-127 (128 rows each), adt K 0-63 and 64-127 (64 rows), Bg^T and Bu^T
# (E R = 128 rows): kEpiBytes, 80 KiB
BWD_TM, BWD_TN, BWD_SUBS, BWD_STAGES = 64, 128, 2, 4
BWD_BOXES = (2, 2, 1, 1, 2, 2)


def simulate_bwd(m_blocks, n_tiles, k_steps, ctas, seed, fault=None, units=None):
    """One random interleaving of variant 5 (`fused_bwd_kernel`, bench/fused_bwd_wgmma_proto.cu)
    for T = 64 m_blocks tokens, I = 128 n_tiles columns, H = 64 k_steps, the launcher's plan for
    max_ctas `ctas` (make_plan(T, I, ctas)) and `units` CTAs (default the launcher's grid, min(ctas,
    items); the kernel takes any fewer); raises Violation (or AssertionError) on a fault."""
    rng = random.Random(seed)
    plan = make_plan(m_blocks * BWD_TM, n_tiles * BWD_TN, ctas, BWD_TM, BWD_TN)
    units = min(ctas, plan.items) if units is None else units
    assert 1 <= units <= min(ctas, plan.items)
    one_full = fault == "bwd_one_full_barrier"
    consumed = {}   # (token block, nt, ks) -> [(cta, consumer warpgroup)]
    epilogues = {}  # (token block, nt, sub-block c) -> (cta, consumer warpgroup)
    partials = {}   # (item, 0, warpgroup) -> [(cta, the tiles nt its dz / dw sums held)]

    procs, copies_in_flight, ctas_ = [], [], []
    for unit in range(units):  # blockIdx.x
        cl = Cluster(unit, 1, BWD_STAGES, fault, copies_in_flight, X_BYTES, ("dout", "wdt"),
                     epilogue=True, subs=BWD_SUBS, boxes=BWD_BOXES, producers=2)
        my_items = range(unit, plan.items, units)  # item = blockIdx.x, += gridDim.x

        def produce_stages(cl=cl, my_items=my_items):  # producer warp 0's thread
            it = 0
            for item in my_items:
                _m_block, _chunk, nts = plan.item(item)
                for _nt in nts:
                    for _ks in range(k_steps):
                        yield from cl.fill(0, it)  # wait empty, expect_tx, dout and wdt rows
                        it += 1

        def produce_epilogue(cl=cl, my_items=my_items):  # producer warp 1's thread
            fill = i = 0  # i: the CTA's tile (the tag of the fill's boxes)
            for item in my_items:
                _m_block, _chunk, nts = plan.item(item)
                for _nt in nts:
                    for c in range(BWD_SUBS):
                        yield from cl.fill_epilogue_sub(0, fill, i, c)
                        fill += 1
                    i += 1

        def consumer(own, cl=cl, my_items=my_items):  # consumer warpgroup 1 + own
            wg = Warpgroup(cl, 0, own, rng, consumed)

            def check_epi(i, c, nt):
                if cl.epi_tag[0] != [[(i, c)]] * len(BWD_BOXES):
                    raise Violation(f"{wg.name}: the epilogue of tile {i} (nt {nt}) sub-block {c} "
                                    f"reads the buffer holding (tile, sub-block) by box "
                                    f"{[t for t, in cl.epi_tag[0]]}")

            def wait_epi_full(i, c, parity):
                """mbar_wait(epi_full0 + 8 c, parity) for the barrier's phase n, the fill meant:
                the design point, checked as the wait starts, is that the barrier's previous phase
                (n - 1) is not still open (a parity wait passes on it as on its own)."""
                bar = cl.epi_full[0][0 if one_full else c]
                n = BWD_SUBS * i + c if one_full else i  # (bwd_one_full_barrier: 2 phases a tile)
                if bar.phase not in (n, n + 1):
                    raise Violation(f"{wg.name}: tile {i} waits on sub-block {c}'s full barrier for "
                                    f"its phase {n} while it is at phase {bar.phase}")
                yield lambda: bar.passes(parity)

            i = 0
            for item in my_items:
                m_block, _chunk, nts = plan.item(item)
                mine = []  # (dz sums zeroed, dw = 0) the tiles this warpgroup's sums hold
                for nt in nts:
                    if (nt if fault == "own_by_column" else i) % 2 != own:
                        i += 1  # (the loop's ++i)
                        continue
                    yield from wg.wait_turn(i)
                    # main_step<true>, then main_step<false> k_steps - 1 times
                    previous = yield from wg.main_loop(i, k_steps, (m_block, nt))
                    parity = (i & 1) ^ (1 if fault == "epi_parity" else 0)  # a phase a tile
                    if fault == "turn_before_epi":
                        yield from wg.hand_turn()
                    yield from wait_epi_full(i, 0, (2 * i) & 1 if one_full else parity)
                    if fault != "turn_before_epi":
                        yield from wg.hand_turn()
                    wg.finish_groups(0)  # wgmma_wait<0>
                    yield from wg.release_stage(previous)
                    # (store_accumulators: dhbar out to global memory, no barrier)
                    for c in range(BWD_SUBS):
                        if c > 0:
                            yield from wait_epi_full(i, c, (2 * i + c) & 1 if one_full else parity)
                        # epilogue_quarter twice: their MMA groups (reading the buffer) each
                        # waited for before the next; a span during which the buffer must hold
                        # sub-block c of this tile, fully landed, and no copy may land in it
                        if fault == "epi_release_early":
                            yield from wg.release_epilogue()
                        cl.epi_readers[0] += 1
                        for step in range(4):
                            check_epi(i, c, nt)
                            if fault == "bwd_sub0_release_early" and c == 0 and step == 2:
                                yield from wg.release_epilogue()  # mid-span
                            yield None
                        check_epi(i, c, nt)
                        cl.epi_readers[0] -= 1
                        if (m_block, nt, c) in epilogues:
                            raise Violation(f"the epilogue of block {m_block} tile {nt} sub-block "
                                            f"{c} runs twice")
                        epilogues[(m_block, nt, c)] = (wg.cta, own)
                        if fault != "epi_release_early" and not (fault == "bwd_sub0_release_early"
                                                                 and c == 0):
                            yield from wg.release_epilogue()  # its MMAs have completed
                    mine.append(nt)
                    i += 1
                # this warpgroup's partials of the item: dz_part / dw_part [2 chunk + own]
                partials.setdefault((item, 0, own), []).append((wg.cta, mine))
                yield None

        procs.append(cl.until_sync(produce_stages(), 0))
        procs.append(cl.until_sync(produce_epilogue(), 0))
        procs.append(cl.until_sync(consumer(0), 0))
        procs.append(cl.until_sync(consumer(1), 0))
        ctas_.append(cl)
    # copies slow, middling or quick to land (as variant 2's)
    interleave(procs, copies_in_flight, rng, land=rng.choice((0.05, 0.3, 0.6)))

    for cl in ctas_:
        cl.check_exit()
    for unit in range(units):
        i = 0  # the CTA's count of its tiles
        for item in range(unit, plan.items, units):
            m_block, _chunk, nts = plan.item(item)
            for nt in nts:
                want = (unit, i % 2)
                for ks in range(k_steps):
                    if consumed.get((m_block, nt, ks)) != [want]:
                        raise Violation(f"block {m_block} tile {nt} K step {ks} consumed by (cta, "
                                        f"wg) {consumed.get((m_block, nt, ks))}, not {[want]}")
                for c in range(BWD_SUBS):
                    if epilogues.get((m_block, nt, c)) != want:
                        raise Violation(f"block {m_block} tile {nt} sub-block {c}'s epilogue ran on "
                                        f"(cta, wg) {epilogues.get((m_block, nt, c))}, not {want}")
                i += 1
            first = i - len(nts)  # the count at the item's first tile
            for own in range(2):
                want = [(unit, [nt for j, nt in enumerate(nts) if (first + j) % 2 == own])]
                if partials.get((item, 0, own)) != want:
                    raise Violation(f"item {item} wg {own} wrote dz / dw partials "
                                    f"{partials.get((item, 0, own))}, not {want}")
    if len(partials) != 2 * plan.items:
        raise Violation(f"{len(partials)} dz / dw partials written, not {2 * plan.items}")


def launch_units(rng, shape, size, tm=kTM, tn=kTI):
    """The fused kernel's launch for a drawn shape: the launcher's clusters (CTAs), or (a third of
    the time) fewer, each taking more items."""
    units = shape["ctas"] // size  # the launcher's, over clusters
    launch = min(units, make_plan(shape["m_blocks"] * tm, shape["n_tiles"] * tn, units, tm, tn).items)
    return launch if rng.random() < 2 / 3 else rng.randint(1, launch)


def run(seeds, verbose=False, fault=None,
        variants=(COOPERATIVE, PINGPONG, FUSED, CLUSTER, FUSED_CLUSTER, FUSED_BWD)):
    """Random shapes and interleavings; returns the number of runs (raises at the first fault)."""
    runs = 0
    for seed in range(seeds):
        rng = random.Random(1000 + seed)
        shape = dict(m_units=rng.randint(1, 3), n_tiles=rng.randint(1, 3), k_steps=rng.randint(1, 9),
                     ctas=rng.randint(1, 4))
        # variant 2's shape, drawn after the others' (which stay as they were)
        fused = dict(m_blocks=rng.randint(1, 4), n_tiles=rng.randint(1, 6), k_steps=rng.randint(1, 6),
                     ctas=rng.randint(1, 8))
        fused["units"] = launch_units(rng, fused, 1)
        # variant 3's, drawn after variant 2's (which stays as it was): ctas as the launcher's
        # max_ctas, the grid min(ctas, tiles) rounded down to whole clusters
        cluster = dict(m_units=rng.randint(1, 2), n_tiles=rng.randint(1, 3), k_steps=rng.randint(1, 9),
                       ctas=rng.randint(2, 8))
        # variant 4's, drawn after variant 3's (which stays as it was): ctas as the launcher's
        # max_ctas (ctas // 2 clusters)
        fused_cluster = dict(m_blocks=rng.randint(1, 3), n_tiles=rng.randint(1, 6),
                             k_steps=rng.randint(1, 8), ctas=rng.randint(2, 10))
        fused_cluster["units"] = launch_units(rng, fused_cluster, 2)
        # variant 5's, drawn after variant 4's (which stays as it was): blocks of 64 tokens, tiles
        # of 128 columns, up to 3 times the 4 stages' K steps
        bwd = dict(m_blocks=rng.randint(1, 4), n_tiles=rng.randint(1, 4), k_steps=rng.randint(1, 12),
                   ctas=rng.randint(1, 8))
        bwd["units"] = launch_units(rng, bwd, 1, BWD_TM, BWD_TN)
        for variant in variants:
            if variant == FUSED:  # v17's stage count on even seeds, v18's on odd ones
                simulate_fused(variant, seed=seed, fault=fault, stages=4 if seed % 2 == 0 else 6,
                               **fused)
            elif variant == FUSED_CLUSTER:
                simulate_fused(variant, seed=seed, fault=fault, **fused_cluster)
            elif variant == FUSED_BWD:
                simulate_bwd(seed=seed, fault=fault, **bwd)
            else:
                simulate(variant, seed=seed, fault=fault, **(cluster if variant == CLUSTER else shape))
            runs += 1
        if verbose and seed % 50 == 0:
            print(f"seed {seed}: {shape}, fused {fused}, cluster {cluster}, fused cluster "
                  f"{fused_cluster}, bwd {bwd} ok", flush=True)
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--variants", type=lambda s: tuple(int(v) for v in s.split(",")),
                        default=(COOPERATIVE, PINGPONG, FUSED, CLUSTER, FUSED_CLUSTER, FUSED_BWD),
                        help="comma-separated, e.g. 5 (default: all)")
    parser.add_argument("--fault", choices=sorted(FAULTS), default=None,
                        help="plant a fault (the run stops at its first violation)")
    a = parser.parse_args()
    print(f"{run(a.seeds, verbose=True, fault=a.fault, variants=a.variants)} random runs, "
          f"no violation")


if __name__ == "__main__":
    main()
