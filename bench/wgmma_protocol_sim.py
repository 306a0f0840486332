"""The barrier protocols of bench/wgmma_gemm_proto.cu (sim variants 0, 1 and 3: the .cu's variants
0, 1 and 2) and bench/fused_gu_wgmma_proto.cu (sim variants 2 and 4: the launcher's variants 0 / 1
and 2), simulated on the CPU under random interleavings: the producer thread, the consumer
warpgroups (each warp's arrivals separate), the bulk copies (which land at any later time) and
the wgmma groups (which finish at any time up to their wait), with mbarriers modelled as the PTX
ISA defines them (a phase completes when its pending arrivals reach zero and its transaction bytes
are all in; `try_wait.parity P` passes when the current, incomplete phase's parity differs from
P). The loops below mirror the kernels' loops line for line. Checked at every step: a consumer's
MMAs read the stage holding the fill they mean (tile, K step), no copy lands in a stage an
unfinished MMA group still reads, every tile's every K step is consumed once by the warpgroup that
owns it, and nothing deadlocks.

Variant 2 (FUSED, `fused_gu_kernel`, v17 and v18 alike: 4 stages on even seeds as v17's tiles of
128 tokens, 6 on odd ones as v18's of 64): the ping-pong of variant 1, work split into
items (a 128-token block, a chunk of 64-column tiles; `make_plan` below mirrors the kernel's), a
CTA taking items blockIdx, blockIdx + grid, .. and numbering its tiles i = 0, 1, .. across them
(consumer warpgroup `own` takes those with i % 2 == own), and one epilogue buffer: after a tile's
K steps the producer waits for the buffer's "empty" barrier (the previous tile's epilogue done)
and copies the tile's epilogue operands into it (three copies, each landing on its own). The
consumer waits for the buffer's "full" barrier after its main loop, only then hands the turn to
the other warpgroup, and releases the buffer (4 warps) after its epilogue, which is modelled as a
span of time during which the buffer must hold this tile's operands, fully landed, and no copy
may land in it. At each item's end each warpgroup writes its zd partial (2 chunk + own); checked:
each (item, warpgroup) writes once, holding the warpgroup's tiles of that item, and every tile's
epilogue runs once, on warpgroup i % 2 of the item's CTA.

Variant 3 (CLUSTER, the .cu's variant 2, `wgmma_gemm_pingpong_kernel<2>`): the ping-pong of variant
1 in clusters of 2 CTAs (rank 0, 1; cluster blockIdx / 2 of grid / 2, the grid the launcher's:
even), both walking the cluster's pair tiles pt = cluster, cluster + clusters, .., rank r's tile
the row block 2 (pt % m_pairs) + r at the column block pt / m_pairs. Each CTA's producer
(`produce_multicast`), per K step, waits for its own CTA's "empty" barrier (8 arrivals: the tile
owner's 4 warps in each CTA), arrives with expect_tx of the whole stage on its own "full" barrier,
and issues its A copy (landing in its own CTA) and its half of B multicast: one copy landing in
the same stage of both CTAs, at a different time in each, completing bytes on that CTA's "full"
barrier, so the peer's half can land before the CTA's own expect_tx (the transaction count goes
below zero for a while: `Barrier(signed_tx=True)`). Consumers as variant 1's (turn barriers in
their CTA), but each warp releases a stage on the "empty" barriers of both CTAs. Checked besides:
a K step reads the stage with its A and both B halves (from the two producers) of the fill it
means, no copy lands in a stage of the CTA it lands in while an MMA group there reads it, no
barrier is partway through a phase at exit, and nothing touches a CTA after it exited (the
kernel's final cluster_sync: a CTA exits once the processes of both have finished; the planted
fault no_final_sync lets it go once its own have).

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
landing in a CTA's buffer while an epilogue there reads it, nothing partway through a phase at
exit. The fault local_release_only keeps both the stages' and the buffer's releases local (their
counts 4), half_expect both expect_tx to the CTA's own bytes; epi_local_release_only keeps the
buffer's release local only.

    python3 bench/wgmma_protocol_sim.py [--seeds 200]       (tests/test_bench.py runs a few)
"""
import argparse
import random

COOPERATIVE, PINGPONG, FUSED, CLUSTER, FUSED_CLUSTER = 0, 1, 2, 3, 4


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
# the epilogue buffer's release alone kept local (epi_local_release_only).
FAULTS = {
    "no_turn": (PINGPONG, FUSED, CLUSTER, FUSED_CLUSTER),
    "release_early": (COOPERATIVE, PINGPONG, FUSED, CLUSTER, FUSED_CLUSTER),
    "empty_parity": (COOPERATIVE, PINGPONG, FUSED, CLUSTER, FUSED_CLUSTER),
    "turn_before_epi": (FUSED, FUSED_CLUSTER),
    "epi_release_early": (FUSED, FUSED_CLUSTER),
    "epi_parity": (FUSED, FUSED_CLUSTER),
    "own_by_column": (FUSED, FUSED_CLUSTER),
    "local_release_only": (CLUSTER, FUSED_CLUSTER),
    "half_expect": (CLUSTER, FUSED_CLUSTER),
    "no_final_sync": (CLUSTER, FUSED_CLUSTER),
    "epi_local_release_only": (FUSED_CLUSTER,),
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


def simulate(variant, m_tiles, n_tiles, k_steps, grid, seed, fault=None):
    """One random interleaving of one CTA set (variant 0 or 1); raises Violation (or
    AssertionError) on a fault."""
    assert variant in (COOPERATIVE, PINGPONG)
    rng = random.Random(seed)
    stages = 4 if variant == COOPERATIVE else 6
    tiles = m_tiles * n_tiles
    STAGE = 1  # bytes of a stage, in units
    consumed = {}  # (cta, tile, ks) -> consumer warpgroup

    procs, copies_in_flight = [], []
    for cta in range(min(grid, tiles)):
        full = [Barrier(1) for _ in range(stages)]
        empty = [Barrier(8 if variant == COOPERATIVE else 4) for _ in range(stages)]
        turn = [Barrier(4), Barrier(4)]
        stage_tag = [None] * stages      # which fill (it) the stage holds
        readers = [0] * stages           # unfinished MMA groups reading the stage
        my_tiles = list(range(cta, tiles, grid))

        def producer(cta=cta, full=full, empty=empty, stage_tag=stage_tag, readers=readers,
                     my_tiles=my_tiles):
            it = 0
            for _tile in my_tiles:
                for _ks in range(k_steps):
                    s = it % stages
                    parity = ((it // stages) & 1) ^ (0 if fault == "empty_parity" else 1)
                    yield lambda s=s, parity=parity: empty[s].passes(parity)
                    full[s].arrive(tx=STAGE)  # arrive.expect_tx

                    def land(s=s, it=it):
                        if readers[s]:
                            raise Violation(f"cta {cta}: a copy lands in stage {s} while an MMA "
                                            "reads it")
                        stage_tag[s] = it
                        full[s].complete_tx(STAGE)
                    copies_in_flight.append(land)
                    it += 1

        def consumer(wg, cta=cta, full=full, empty=empty, turn=turn, stage_tag=stage_tag,
                     readers=readers, my_tiles=my_tiles):
            groups = []  # stages read by each unfinished group, oldest first

            def finish_groups(keep):  # wgmma.wait_group keep
                while len(groups) > keep:
                    readers[groups.pop(0)] -= 1

            if variant == COOPERATIVE:
                owned = [(i, t) for i, t in enumerate(my_tiles)]
                it = 0
            else:
                owned = [(i, t) for i, t in enumerate(my_tiles) if i % 2 == wg]
            turns = 0
            for i, tile in owned:
                if variant == PINGPONG:
                    if i > 0 and fault != "no_turn":
                        yield lambda p=turns & 1: turn[wg].passes(p)
                        turns += 1
                    it = i * k_steps
                previous = None
                for ks in range(k_steps):
                    s = it % stages
                    yield lambda s=s, p=(it // stages) & 1: full[s].passes(p)
                    if stage_tag[s] != it:
                        raise Violation(f"cta {cta} wg {wg}: K step {ks} of tile {tile} reads stage {s} "
                                        f"holding fill {stage_tag[s]}, not {it}")
                    key = (cta, tile, ks)
                    if variant == COOPERATIVE:
                        consumed.setdefault(key, set()).add(wg)
                    elif key in consumed:
                        raise Violation(f"{key} consumed twice")
                    else:
                        consumed[key] = wg
                    readers[s] += 1
                    groups.append(s)  # commit
                    if rng.random() < 0.5:
                        finish_groups(rng.randint(1, len(groups)))  # groups may finish early
                    if fault != "release_early":
                        finish_groups(1)  # wgmma.wait_group 1
                    yield None  # (a point where the other processes may run)
                    if previous is not None:
                        for _ in range(4):  # each warp's lane 0
                            empty[previous].arrive()
                            yield None
                    previous = s
                    it += 1
                if variant == PINGPONG:
                    for _ in range(4):
                        turn[1 - wg].arrive()
                        yield None
                finish_groups(0)
                if previous is not None:
                    for _ in range(4):
                        empty[previous].arrive()
                        yield None
                # (the epilogue: registers only)

        procs.append(producer())
        procs.append(consumer(0))
        procs.append(consumer(1))

    interleave(procs, copies_in_flight, rng)
    for cta in range(min(grid, tiles)):
        for tile in range(cta, tiles, grid):
            for ks in range(k_steps):
                got = consumed.get((cta, tile, ks))
                want = {0, 1} if variant == COOPERATIVE else None
                if got is None or (want is not None and got != want):
                    raise Violation(f"tile {tile} K step {ks} consumed by {got}")
                if variant == PINGPONG and got != (tile - cta) // grid % 2:
                    raise Violation(f"tile {tile} consumed by warpgroup {got}")


# Variant 2's tiles: 128 tokens (kTM) x 64 columns of I (kTI).
kTM, kTI = 128, 64


class Plan:
    """The kernel's make_plan(T, I, ctas, tm): items of (token block, column chunk), M fastest
    (variant 4's: over clusters, of blocks of 2 x 64 tokens, a pair of 64-token blocks)."""

    def __init__(self, T, I, ctas, tm=kTM):
        self.m_blocks = T // tm
        self.n_tiles = I // kTI
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


def make_plan(T, I, ctas, tm=kTM):
    return Plan(T, I, ctas, tm)


def simulate_fused(m_blocks, n_tiles, k_steps, ctas, seed, fault=None, grid=None, stages=4):
    """One random interleaving of variant 2 for T = 128 m_blocks tokens, I = 64 n_tiles columns,
    H = 64 k_steps, a plan for `ctas` CTAs and a grid of `grid` (default the launcher's,
    min(ctas, items); the kernel takes any fewer); raises Violation (or AssertionError) on a fault."""
    rng = random.Random(seed)
    # kStages: 4 for v17 (fused_gu_kernel<2>), 6 for v18 (<1>); the protocol is the same
    plan = make_plan(m_blocks * kTM, n_tiles * kTI, ctas)
    grid = min(ctas, plan.items) if grid is None else grid
    assert 1 <= grid <= min(ctas, plan.items)
    STAGE, BOX = 1, 1  # bytes of a stage, of an epilogue box, in units
    consumed = {}   # (item, nt, ks) -> (cta, consumer warpgroup)
    epilogues = {}  # (item, nt) -> (cta, consumer warpgroup)
    partials = {}   # (item, warpgroup) -> [(cta, the tiles nt its zd sums held)]

    procs, copies_in_flight = [], []

    def cta_procs(cta):
        full = [Barrier(1) for _ in range(stages)]
        empty = [Barrier(4) for _ in range(stages)]  # the 4 warps of the tile's owner
        epi_full, epi_empty = Barrier(1), Barrier(4)
        turn = [Barrier(4), Barrier(4)]
        stage_tag = [None] * stages  # which fill (it) the stage holds
        readers = [0] * stages       # unfinished MMA groups reading the stage
        epi_tag = [None] * 3         # which tile (i) each of the epilogue buffer's boxes holds
        epi_readers = [0]            # epilogues reading the buffer
        my_items = list(range(cta, plan.items, grid))

        def producer():  # produce(...)
            it = i = 0
            for item in my_items:
                _m_block, _chunk, nts = plan.item(item)
                for _nt in nts:
                    for _ks in range(k_steps):
                        s = it % stages
                        parity = ((it // stages) & 1) ^ (0 if fault == "empty_parity" else 1)
                        yield lambda s=s, parity=parity: empty[s].passes(parity)
                        full[s].arrive(tx=STAGE)  # arrive.expect_tx

                        def land(s=s, it=it):
                            if readers[s]:
                                raise Violation(f"cta {cta}: a copy lands in stage {s} while an "
                                                "MMA reads it")
                            stage_tag[s] = it
                            full[s].complete_tx(STAGE)
                        copies_in_flight.append(land)
                        it += 1
                    yield lambda p=(i & 1) ^ 1: epi_empty.passes(p)
                    epi_full.arrive(tx=3 * BOX)  # arrive.expect_tx kEpiBytes
                    for box in range(3):  # Bgu K 0-63, Bgu K 64-127, Ad: each lands on its own

                        def land_epi(box=box, i=i):
                            if epi_readers[0]:
                                raise Violation(f"cta {cta}: tile {i}'s epilogue copy lands in "
                                                "the buffer while an epilogue reads it")
                            epi_tag[box] = i
                            epi_full.complete_tx(BOX)
                        copies_in_flight.append(land_epi)
                    i += 1

        def consumer(own):  # fused_gu_kernel's consumer warpgroup 1 + own
            groups = []  # stages read by each unfinished group, oldest first

            def finish_groups(keep):  # wgmma.wait_group keep
                while len(groups) > keep:
                    readers[groups.pop(0)] -= 1

            def check_epi(i, nt):
                if epi_tag != [i, i, i]:
                    raise Violation(f"cta {cta} wg {own}: the epilogue of tile {i} (nt {nt}) reads "
                                    f"the buffer holding tiles {epi_tag}")

            i = turns = 0
            for item in my_items:
                _m_block, chunk, nts = plan.item(item)
                mine = []  # (zd sums zeroed) the tiles this warpgroup's zd sums hold
                for nt in nts:
                    if (nt if fault == "own_by_column" else i) % 2 != own:
                        i += 1  # (the loop's ++i)
                        continue
                    if i > 0 and fault != "no_turn":
                        yield lambda p=turns & 1: turn[own].passes(p)
                        turns += 1
                    it = i * k_steps
                    previous = None
                    for ks in range(k_steps):
                        s = it % stages
                        yield lambda s=s, p=(it // stages) & 1: full[s].passes(p)
                        if stage_tag[s] != it:
                            raise Violation(f"cta {cta} wg {own}: K step {ks} of tile {i} reads "
                                            f"stage {s} holding fill {stage_tag[s]}, not {it}")
                        key = (item, nt, ks)
                        if key in consumed:
                            raise Violation(f"{key} consumed twice")
                        consumed[key] = (cta, own)
                        readers[s] += 1
                        groups.append(s)  # commit
                        if rng.random() < 0.5:
                            finish_groups(rng.randint(1, len(groups)))  # groups may finish early
                        if fault != "release_early":
                            finish_groups(1)  # wgmma.wait_group 1
                        yield None  # (a point where the other processes may run)
                        if previous is not None:
                            for _ in range(4):  # each warp's lane 0
                                empty[previous].arrive()
                                yield None
                        previous = s
                        it += 1
                    if fault == "turn_before_epi":
                        for _ in range(4):
                            turn[1 - own].arrive()
                            yield None
                    yield lambda p=(i & 1) ^ (1 if fault == "epi_parity" else 0): epi_full.passes(p)
                    if fault != "turn_before_epi":
                        for _ in range(4):  # the other's next tile may start
                            turn[1 - own].arrive()
                            yield None
                    finish_groups(0)  # wgmma.wait_group 0
                    for _ in range(4):
                        empty[previous].arrive()
                        yield None
                    # The epilogue: two 64-row halves of deltas, SwiGLU, zd, their MMA groups
                    # (reading the buffer) each waited for before the next; a span during which
                    # the buffer must hold this tile's operands and no copy may land in it.
                    if fault == "epi_release_early":
                        for _ in range(4):
                            epi_empty.arrive()
                            yield None
                    epi_readers[0] += 1
                    for _step in range(4):
                        check_epi(i, nt)
                        yield None
                    check_epi(i, nt)
                    epi_readers[0] -= 1
                    if (item, nt) in epilogues:
                        raise Violation(f"the epilogue of item {item} tile {nt} runs twice")
                    epilogues[(item, nt)] = (cta, own)
                    mine.append(nt)
                    if fault != "epi_release_early":
                        for _ in range(4):  # its MMAs have completed (each waited for)
                            epi_empty.arrive()
                            yield None
                    i += 1
                # this warpgroup's partial of the item: zd_part[2 chunk + own] at the block's rows
                partials.setdefault((item, own), []).append((cta, mine))
                yield None

        return [producer(), consumer(0), consumer(1)]

    for cta in range(grid):
        procs += cta_procs(cta)
    # copies slow, middling or quick to land: slow ones expose stale reads (a wait passing on a
    # phase the copies have yet to complete), quick ones copies landing under a reader
    interleave(procs, copies_in_flight, rng, land=rng.choice((0.05, 0.3, 0.6)))

    for cta in range(grid):
        i = 0
        for item in range(cta, plan.items, grid):
            _m_block, _chunk, nts = plan.item(item)
            for nt in nts:
                for ks in range(k_steps):
                    got = consumed.get((item, nt, ks))
                    if got != (cta, i % 2):
                        raise Violation(f"item {item} tile {nt} K step {ks} consumed by (cta, wg) "
                                        f"{got}, not {(cta, i % 2)}")
                if epilogues.get((item, nt)) != (cta, i % 2):
                    raise Violation(f"item {item} tile {nt}'s epilogue ran on (cta, wg) "
                                    f"{epilogues.get((item, nt))}, not {(cta, i % 2)}")
                i += 1
            first = i - len(nts)  # the CTA's count at the item's first tile
            for own in range(2):
                want = [(cta, [nt for j, nt in enumerate(nts) if (first + j) % 2 == own])]
                if partials.get((item, own)) != want:
                    raise Violation(f"item {item} wg {own} wrote zd partials {partials.get((item, own))}, "
                                    f"not {want}")
    if len(partials) != 2 * plan.items:
        raise Violation(f"{len(partials)} zd partials written, not {2 * plan.items}")


# Variant 3's stage, in units of 8 KiB: A (128 rows) 2, each half of B (64 rows) 1.
A_BYTES, HALF_BYTES = 2, 1


def simulate_cluster(m_pairs, n_tiles, k_steps, ctas, seed, fault=None):
    """One random interleaving of variant 3 (the .cu's variant 2, `wgmma_gemm_pingpong_kernel<2>`)
    for M = 256 m_pairs, N = 128 n_tiles, K = 64 k_steps and the launcher's grid for `ctas`
    (min(ctas, tiles) rounded down to whole clusters); raises Violation (or AssertionError) on
    a fault."""
    rng = random.Random(seed)
    stages = 6  # kPpStages
    pair_tiles = m_pairs * n_tiles
    grid = min(ctas, 2 * pair_tiles) & ~1
    assert grid >= 2
    clusters = grid // 2
    consumed = {}  # (row block, column block, ks) -> (cta, consumer warpgroup)

    procs, copies_in_flight, clusters_state = [], [], []
    for cluster in range(clusters):
        # both CTAs' barriers and stages (index: rank), made before anything runs (the cluster
        # sync after their init)
        full = [[Barrier(1, signed_tx=True) for _ in range(stages)] for _ in range(2)]
        empty = [[Barrier(4 if fault == "local_release_only" else 8) for _ in range(stages)]
                 for _ in range(2)]  # kMcEmptyArrivals: the tile owner's 4 warps of both CTAs
        turn = [[Barrier(4), Barrier(4)] for _ in range(2)]
        a_tag = [[None] * stages for _ in range(2)]  # which fill (pt, ks) a stage's A holds
        b_tag = [[[None, None] for _ in range(stages)] for _ in range(2)]  # its B halves' (by rank)
        readers = [[0] * stages for _ in range(2)]   # unfinished MMA groups reading the stage
        running = [3, 3]  # the CTA's processes not yet at the final cluster_sync

        def gone(rank, running=running):
            """The CTA has exited: all its processes and (the final cluster_sync) its peer's have
            finished; without that sync, its own alone."""
            return running[rank] == 0 and (fault == "no_final_sync" or running[rank ^ 1] == 0)

        def reach(rank, what, cluster=cluster, gone=gone):  # what touches CTA rank's shared memory
            if gone(rank):
                raise Violation(f"cluster {cluster}: {what} reaches cta rank {rank} after it exited")

        def until_sync(proc, rank, running=running):  # the process, then its cluster_sync arrival
            yield from proc
            running[rank] -= 1

        def producer(rank, cluster=cluster, full=full, empty=empty, a_tag=a_tag, b_tag=b_tag,
                     readers=readers, reach=reach):  # produce_multicast
            it = 0
            for pt in range(cluster, pair_tiles, clusters):
                for ks in range(k_steps):
                    s = it % stages
                    parity = ((it // stages) & 1) ^ (0 if fault == "empty_parity" else 1)
                    yield lambda s=s, parity=parity: empty[rank][s].passes(parity)  # mbar_wait_cluster
                    expect = A_BYTES + (1 if fault == "half_expect" else 2) * HALF_BYTES
                    full[rank][s].arrive(tx=expect)  # arrive.expect_tx kPpStageBytes

                    def land(dest, half, s=s, fill=(pt, ks)):
                        """The A copy (half None) into this CTA, or this rank's half of B landing
                        in CTA dest (the multicast: one such landing per CTA, at its own time)."""
                        reach(dest, f"rank {rank}'s copy of fill {fill}")
                        if readers[dest][s]:
                            raise Violation(f"cluster {cluster}: rank {rank}'s copy of fill {fill} "
                                            f"lands in stage {s} of rank {dest} while an MMA reads it")
                        if half is None:
                            a_tag[dest][s] = fill
                            full[dest][s].complete_tx(A_BYTES)
                        else:
                            b_tag[dest][s][half] = fill
                            full[dest][s].complete_tx(HALF_BYTES)
                    copies_in_flight.append(lambda land=land: land(rank, None))  # tma_load_2d
                    for dest in range(2):  # tma_load_2d_multicast, mask 0x3
                        copies_in_flight.append(lambda land=land, dest=dest: land(dest, rank))
                    it += 1

        def consumer(rank, own, cluster=cluster, full=full, empty=empty, turn=turn, a_tag=a_tag,
                     b_tag=b_tag, readers=readers, reach=reach):
            groups = []  # stages read by each unfinished group, oldest first

            def finish_groups(keep):  # wgmma.wait_group keep
                while len(groups) > keep:
                    readers[rank][groups.pop(0)] -= 1

            def release(s):  # each warp's lane 0: mbar_arrive_cluster on empty_here, empty_peer
                for _ in range(4):
                    empty[rank][s].arrive()
                    yield None
                    if fault != "local_release_only":
                        reach(rank ^ 1, f"rank {rank} wg {own}'s release of stage {s}")
                        empty[rank ^ 1][s].arrive()
                        yield None

            i, turns = own, 0
            for pt in range(cluster + own * clusters, pair_tiles, 2 * clusters):
                tile = (2 * (pt % m_pairs) + rank, pt // m_pairs)  # (row block, column block)
                if i > 0 and fault != "no_turn":
                    yield lambda p=turns & 1: turn[rank][own].passes(p)
                    turns += 1
                it, previous = i * k_steps, None
                for ks in range(k_steps):
                    s = it % stages
                    yield lambda s=s, p=(it // stages) & 1: full[rank][s].passes(p)
                    held = (a_tag[rank][s], *b_tag[rank][s])
                    if held != ((pt, ks),) * 3:
                        raise Violation(f"cluster {cluster} rank {rank} wg {own}: K step {ks} of "
                                        f"pair tile {pt} reads stage {s} holding fills (A, B half "
                                        f"0, B half 1) {held}, not {(pt, ks)}")
                    key = (*tile, ks)
                    if key in consumed:
                        raise Violation(f"{key} consumed twice")
                    consumed[key] = (2 * cluster + rank, own)
                    readers[rank][s] += 1
                    groups.append(s)  # commit
                    if rng.random() < 0.5:
                        finish_groups(rng.randint(1, len(groups)))  # groups may finish early
                    if fault != "release_early":
                        finish_groups(1)  # wgmma.wait_group 1
                    yield None  # (a point where the other processes may run)
                    if previous is not None:
                        yield from release(previous)
                    previous = s
                    it += 1
                for _ in range(4):  # the other's next tile may start (this CTA's turn barrier)
                    turn[rank][1 - own].arrive()
                    yield None
                finish_groups(0)  # wgmma.wait_group 0
                yield from release(previous)
                # (the epilogue: registers only)
                i += 2

        for rank in range(2):
            procs.append(until_sync(producer(rank), rank))
            procs.append(until_sync(consumer(rank, 0), rank))
            procs.append(until_sync(consumer(rank, 1), rank))
        clusters_state.append((cluster, full, empty))

    # copies slow, middling or quick to land, as variant 2's
    interleave(procs, copies_in_flight, rng, land=rng.choice((0.05, 0.3, 0.6)))

    for cluster, full, empty in clusters_state:  # at exit no barrier is partway through a phase
        for rank in range(2):
            for s in range(stages):
                for name, bar in (("full", full[rank][s]), ("empty", empty[rank][s])):
                    if bar.pending != bar.count or bar.tx != 0:
                        raise Violation(f"cluster {cluster} rank {rank}: {name}[{s}] ends with "
                                        f"{bar.pending} arrivals and {bar.tx} bytes pending")
    for pt in range(pair_tiles):
        cluster = pt % clusters
        i = (pt - cluster) // clusters  # the cluster's i-th pair tile
        for rank in range(2):
            for ks in range(k_steps):
                key = (2 * (pt % m_pairs) + rank, pt // m_pairs, ks)
                if consumed.get(key) != (2 * cluster + rank, i % 2):
                    raise Violation(f"tile {key[:2]} K step {ks} consumed by (cta, wg) "
                                    f"{consumed.get(key)}, not {(2 * cluster + rank, i % 2)}")


# Variant 4's bytes, in units of 8 KiB: a stage's x rows (64) 1 and each half of its weight tile
# (64 of the 128 rows) 1 (HALF_BYTES); the epilogue buffer's boxes (16 KiB each) halves of 1.
X_BYTES = 1


def simulate_fused_cluster(m_pairs, n_tiles, k_steps, ctas, seed, fault=None, clusters=None):
    """One random interleaving of variant 4 (v18c, `fused_gu_kernel<1, 2>`, the launcher's variant
    2) for T = 128 m_pairs tokens (pairs of 64-token blocks), I = 64 n_tiles columns, H = 64
    k_steps, the launcher's plan for max_ctas `ctas` (over ctas // 2 clusters) and `clusters`
    clusters (default the launcher's, min(ctas // 2, items); the kernel takes any fewer); raises
    Violation (or AssertionError) on a fault."""
    rng = random.Random(seed)
    stages = 6  # v18's kStages
    units = ctas // 2  # the launcher's: clusters
    plan = make_plan(m_pairs * 2 * 64, n_tiles * kTI, units, tm=2 * 64)  # m_blocks: block pairs
    clusters = min(units, plan.items) if clusters is None else clusters
    assert 1 <= clusters <= min(units, plan.items)
    consumed = {}   # (64-token block, nt, ks) -> (cta, consumer warpgroup)
    epilogues = {}  # (64-token block, nt) -> (cta, consumer warpgroup)
    partials = {}   # (item, rank, warpgroup) -> [(cta, the tiles nt its zd sums held)]
    local_stage = fault == "local_release_only"
    local_epi = fault in ("local_release_only", "epi_local_release_only")

    procs, copies_in_flight, clusters_state = [], [], []
    for cluster in range(clusters):
        # both CTAs' barriers and buffers (index: rank), made before anything runs (the
        # cluster_sync after their init); "empty" and the buffer's: the tile owner's 4 warps of
        # each CTA (4 * CLUSTER)
        full = [[Barrier(1, signed_tx=True) for _ in range(stages)] for _ in range(2)]
        empty = [[Barrier(4 if local_stage else 8) for _ in range(stages)] for _ in range(2)]
        epi_full = [Barrier(1, signed_tx=True) for _ in range(2)]
        epi_empty = [Barrier(4 if local_epi else 8) for _ in range(2)]
        turn = [[Barrier(4), Barrier(4)] for _ in range(2)]
        x_tag = [[None] * stages for _ in range(2)]  # which fill (it) a stage's x rows hold
        w_tag = [[[None, None] for _ in range(stages)] for _ in range(2)]  # its weight halves'
        readers = [[0] * stages for _ in range(2)]   # unfinished MMA groups reading the stage
        epi_tag = [[[None, None] for _ in range(3)] for _ in range(2)]  # tile (i) of each box half
        epi_readers = [[0] for _ in range(2)]        # epilogues reading the buffer
        my_items = list(range(cluster, plan.items, clusters))  # Walk: first, stride (clusters)
        running = [3, 3]  # the CTA's processes not yet at the final cluster_sync

        def gone(rank, running=running):
            """The CTA has exited: all its processes and (the final cluster_sync) its peer's have
            finished; without that sync, its own alone."""
            return running[rank] == 0 and (fault == "no_final_sync" or running[rank ^ 1] == 0)

        def reach(rank, what, cluster=cluster, gone=gone):  # what touches CTA rank's shared memory
            if gone(rank):
                raise Violation(f"cluster {cluster}: {what} reaches cta rank {rank} after it exited")

        def until_sync(proc, rank, running=running):  # the process, then its cluster_sync arrival
            yield from proc
            running[rank] -= 1

        def producer(rank, cluster=cluster, full=full, empty=empty, epi_full=epi_full,
                     epi_empty=epi_empty, x_tag=x_tag, w_tag=w_tag, readers=readers,
                     epi_tag=epi_tag, epi_readers=epi_readers, my_items=my_items, reach=reach):
            # produce<1, 2>
            it = i = 0
            for item in my_items:
                _m_pair, _chunk, nts = plan.item(item)
                for _nt in nts:
                    for _ks in range(k_steps):
                        s = it % stages
                        parity = ((it // stages) & 1) ^ (0 if fault == "empty_parity" else 1)
                        yield lambda s=s, parity=parity: empty[rank][s].passes(parity)  # mbar_wait_cluster
                        expect = X_BYTES + (1 if fault == "half_expect" else 2) * HALF_BYTES
                        full[rank][s].arrive(tx=expect)  # arrive.expect_tx kStageBytes

                        def land(dest, half, s=s, it=it):
                            """The x copy (half None) into this CTA, or this rank's half of the
                            weight rows landing in CTA dest (the multicast: one landing a CTA)."""
                            reach(dest, f"rank {rank}'s copy of fill {it}")
                            if readers[dest][s]:
                                raise Violation(f"cluster {cluster}: rank {rank}'s copy of fill {it} "
                                                f"lands in stage {s} of rank {dest} while an MMA reads it")
                            if half is None:
                                x_tag[dest][s] = it
                                full[dest][s].complete_tx(X_BYTES)
                            else:
                                w_tag[dest][s][half] = it
                                full[dest][s].complete_tx(HALF_BYTES)
                        copies_in_flight.append(lambda land=land: land(rank, None))  # tma_load_2d
                        for dest in range(2):  # tma_load_2d_multicast, mask 0x3
                            copies_in_flight.append(lambda land=land, dest=dest: land(dest, rank))
                        it += 1
                    yield lambda p=(i & 1) ^ 1: epi_empty[rank].passes(p)  # mbar_wait_cluster
                    # arrive.expect_tx kEpiBytes: both producers' halves of the three boxes
                    epi_full[rank].arrive(tx=(3 if fault == "half_expect" else 6) * HALF_BYTES)
                    for box in range(3):  # Bgu K 0-63, Bgu K 64-127, Ad: this rank's half of each

                        def land_epi(dest, box=box, i=i):
                            reach(dest, f"rank {rank}'s epilogue copy of tile {i}")
                            if epi_readers[dest][0]:
                                raise Violation(f"cluster {cluster}: rank {rank}'s epilogue copy of "
                                                f"tile {i} lands in the buffer of rank {dest} while "
                                                "an epilogue reads it")
                            epi_tag[dest][box][rank] = i
                            epi_full[dest].complete_tx(HALF_BYTES)
                        for dest in range(2):  # multicast: landing in each CTA on its own
                            copies_in_flight.append(lambda land_epi=land_epi, dest=dest: land_epi(dest))
                    i += 1

        def consumer(rank, own, cluster=cluster, full=full, empty=empty, epi_full=epi_full,
                     epi_empty=epi_empty, turn=turn, x_tag=x_tag, w_tag=w_tag, readers=readers,
                     epi_tag=epi_tag, epi_readers=epi_readers, my_items=my_items, reach=reach):
            cta = 2 * cluster + rank
            groups = []  # stages read by each unfinished group, oldest first

            def finish_groups(keep):  # wgmma.wait_group keep
                while len(groups) > keep:
                    readers[rank][groups.pop(0)] -= 1

            def release(bars, what, local):  # release<2>: each warp's lane 0, here then the peer
                for _ in range(4):
                    bars[rank].arrive()
                    yield None
                    if not local:
                        reach(rank ^ 1, f"rank {rank} wg {own}'s release of {what}")
                        bars[rank ^ 1].arrive()
                        yield None

            def check_epi(i, nt):
                if epi_tag[rank] != [[i, i]] * 3:
                    raise Violation(f"cluster {cluster} rank {rank} wg {own}: the epilogue of tile "
                                    f"{i} (nt {nt}) reads the buffer holding tiles (by box, half) "
                                    f"{epi_tag[rank]}")

            i = turns = 0
            for item in my_items:
                m_pair, _chunk, nts = plan.item(item)
                block = 2 * m_pair + rank  # Walk::m0 / 64
                mine = []  # (zd sums zeroed) the tiles this warpgroup's zd sums hold
                for nt in nts:
                    if (nt if fault == "own_by_column" else i) % 2 != own:
                        i += 1  # (the loop's ++i)
                        continue
                    if i > 0 and fault != "no_turn":
                        yield lambda p=turns & 1: turn[rank][own].passes(p)
                        turns += 1
                    it = i * k_steps
                    previous = None
                    for ks in range(k_steps):
                        s = it % stages
                        yield lambda s=s, p=(it // stages) & 1: full[rank][s].passes(p)
                        held = (x_tag[rank][s], *w_tag[rank][s])
                        if held != (it,) * 3:
                            raise Violation(f"cluster {cluster} rank {rank} wg {own}: K step {ks} of "
                                            f"tile {i} reads stage {s} holding fills (x, weight half "
                                            f"0, weight half 1) {held}, not {it}")
                        key = (block, nt, ks)
                        if key in consumed:
                            raise Violation(f"{key} consumed twice")
                        consumed[key] = (cta, own)
                        readers[rank][s] += 1
                        groups.append(s)  # commit
                        if rng.random() < 0.5:
                            finish_groups(rng.randint(1, len(groups)))  # groups may finish early
                        if fault != "release_early":
                            finish_groups(1)  # wgmma.wait_group 1
                        yield None  # (a point where the other processes may run)
                        if previous is not None:
                            yield from release([e[previous] for e in empty], f"stage {previous}",
                                               local_stage)
                        previous = s
                        it += 1
                    if fault == "turn_before_epi":
                        for _ in range(4):
                            turn[rank][1 - own].arrive()
                            yield None
                    yield lambda p=(i & 1) ^ (1 if fault == "epi_parity" else 0): epi_full[rank].passes(p)
                    if fault != "turn_before_epi":
                        for _ in range(4):  # the other's next tile may start (this CTA's turn)
                            turn[rank][1 - own].arrive()
                            yield None
                    finish_groups(0)  # wgmma.wait_group 0
                    yield from release([e[previous] for e in empty], f"stage {previous}", local_stage)
                    # the epilogue (epilogue_half_sep), as variant 2's: a span during which this
                    # CTA's buffer must hold both producers' halves of this tile's operands
                    if fault == "epi_release_early":
                        yield from release(epi_empty, "the epilogue buffer", local_epi)
                    epi_readers[rank][0] += 1
                    for _step in range(4):
                        check_epi(i, nt)
                        yield None
                    check_epi(i, nt)
                    epi_readers[rank][0] -= 1
                    if (block, nt) in epilogues:
                        raise Violation(f"the epilogue of block {block} tile {nt} runs twice")
                    epilogues[(block, nt)] = (cta, own)
                    mine.append(nt)
                    if fault != "epi_release_early":  # its MMAs have completed (each waited for)
                        yield from release(epi_empty, "the epilogue buffer", local_epi)
                    i += 1
                # this warpgroup's partial of the item: zd_part[2 chunk + own] at its block's rows
                partials.setdefault((item, rank, own), []).append((cta, mine))
                yield None

        for rank in range(2):
            procs.append(until_sync(producer(rank), rank))
            procs.append(until_sync(consumer(rank, 0), rank))
            procs.append(until_sync(consumer(rank, 1), rank))
        clusters_state.append((cluster, full, empty, epi_full, epi_empty))

    # copies slow, middling or quick to land, as variant 2's
    interleave(procs, copies_in_flight, rng, land=rng.choice((0.05, 0.3, 0.6)))

    for cluster, full, empty, epi_full, epi_empty in clusters_state:  # none partway through a phase
        for rank in range(2):
            bars = [(f"full[{s}]", full[rank][s]) for s in range(stages)]
            bars += [(f"empty[{s}]", empty[rank][s]) for s in range(stages)]
            bars += [("epi_full", epi_full[rank]), ("epi_empty", epi_empty[rank])]
            for name, bar in bars:
                if bar.pending != bar.count or bar.tx != 0:
                    raise Violation(f"cluster {cluster} rank {rank}: {name} ends with "
                                    f"{bar.pending} arrivals and {bar.tx} bytes pending")
    for cluster in range(clusters):
        i = 0
        for item in range(cluster, plan.items, clusters):
            m_pair, _chunk, nts = plan.item(item)
            for nt in nts:
                for rank in range(2):
                    block, want = 2 * m_pair + rank, (2 * cluster + rank, i % 2)
                    for ks in range(k_steps):
                        if consumed.get((block, nt, ks)) != want:
                            raise Violation(f"block {block} tile {nt} K step {ks} consumed by (cta, "
                                            f"wg) {consumed.get((block, nt, ks))}, not {want}")
                    if epilogues.get((block, nt)) != want:
                        raise Violation(f"block {block} tile {nt}'s epilogue ran on (cta, wg) "
                                        f"{epilogues.get((block, nt))}, not {want}")
                i += 1
            first = i - len(nts)  # the cluster's count at the item's first tile (both CTAs')
            for rank in range(2):
                for own in range(2):
                    want = [(2 * cluster + rank, [nt for j, nt in enumerate(nts) if (first + j) % 2 == own])]
                    if partials.get((item, rank, own)) != want:
                        raise Violation(f"item {item} rank {rank} wg {own} wrote zd partials "
                                        f"{partials.get((item, rank, own))}, not {want}")
    if len(partials) != 4 * plan.items:
        raise Violation(f"{len(partials)} zd partials written, not {4 * plan.items}")


def run(seeds, verbose=False, fault=None,
        variants=(COOPERATIVE, PINGPONG, FUSED, CLUSTER, FUSED_CLUSTER)):
    """Random shapes and interleavings; returns the number of runs (raises at the first fault)."""
    runs = 0
    for seed in range(seeds):
        rng = random.Random(1000 + seed)
        shape = dict(m_tiles=rng.randint(1, 3), n_tiles=rng.randint(1, 3), k_steps=rng.randint(1, 9),
                     grid=rng.randint(1, 4))
        # variant 2's shape, drawn after the others' (which stay as they were)
        fused = dict(m_blocks=rng.randint(1, 4), n_tiles=rng.randint(1, 6), k_steps=rng.randint(1, 6),
                     ctas=rng.randint(1, 8))
        items = make_plan(fused["m_blocks"] * kTM, fused["n_tiles"] * kTI, fused["ctas"]).items
        launch = min(fused["ctas"], items)
        # the launcher's grid, or (a third of the time) fewer CTAs, each taking more items
        fused["grid"] = launch if rng.random() < 2 / 3 else rng.randint(1, launch)
        # variant 3's, drawn after variant 2's (which stays as it was): ctas as the launcher's
        # max_ctas, the grid min(ctas, tiles) rounded down to whole clusters
        cluster = dict(m_pairs=rng.randint(1, 2), n_tiles=rng.randint(1, 3), k_steps=rng.randint(1, 9),
                       ctas=rng.randint(2, 8))
        # variant 4's, drawn after variant 3's (which stays as it was): ctas as the launcher's
        # max_ctas (ctas // 2 clusters), the launcher's clusters or (a third of the time) fewer
        fused_cluster = dict(m_pairs=rng.randint(1, 3), n_tiles=rng.randint(1, 6),
                             k_steps=rng.randint(1, 8), ctas=rng.randint(2, 10))
        items = make_plan(fused_cluster["m_pairs"] * 128, fused_cluster["n_tiles"] * kTI,
                          fused_cluster["ctas"] // 2, tm=128).items
        launch = min(fused_cluster["ctas"] // 2, items)
        fused_cluster["clusters"] = launch if rng.random() < 2 / 3 else rng.randint(1, launch)
        for variant in variants:
            if variant == FUSED:  # v17's stage count on even seeds, v18's on odd ones
                simulate_fused(seed=seed, fault=fault, stages=4 if seed % 2 == 0 else 6, **fused)
            elif variant == CLUSTER:
                simulate_cluster(seed=seed, fault=fault, **cluster)
            elif variant == FUSED_CLUSTER:
                simulate_fused_cluster(seed=seed, fault=fault, **fused_cluster)
            else:
                simulate(variant, seed=seed, fault=fault, **shape)
            runs += 1
        if verbose and seed % 50 == 0:
            print(f"seed {seed}: {shape}, fused {fused}, cluster {cluster}, fused cluster "
                  f"{fused_cluster} ok", flush=True)
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200)
    a = parser.parse_args()
    print(f"{run(a.seeds, verbose=True)} random runs, no violation")


if __name__ == "__main__":
    main()
