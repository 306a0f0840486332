"""The barrier protocols of bench/wgmma_gemm_proto.cu (variants 0 and 1) and
bench/fused_gu_wgmma_proto.cu (variant 2), simulated on the CPU under random interleavings: the
producer thread, the consumer warpgroups (each warp's arrivals separate), the bulk copies (which
land at any later time) and the wgmma groups (which finish at any time up to their wait), with
mbarriers modelled as the PTX ISA defines them (a phase completes when its pending arrivals reach
zero and its transaction bytes are all in; `try_wait.parity P` passes when the current, incomplete
phase's parity differs from P). The loops below mirror the kernels' loops line for line. Checked
at every step: a consumer's MMAs read the stage holding the fill they mean (tile, K step), no copy
lands in a stage an unfinished MMA group still reads, every tile's every K step is consumed once
by the warpgroup that owns it, and nothing deadlocks.

Variant 2 (FUSED, `fused_gu_kernel`): the ping-pong of variant 1 with 4 stages, work split into
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

    python3 bench/wgmma_protocol_sim.py [--seeds 200]       (tests/test_bench.py runs a few)
"""
import argparse
import random

COOPERATIVE, PINGPONG, FUSED = 0, 1, 2


class Barrier:
    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def arrive(self, tx=0):
        assert self.pending > 0
        self.pending -= 1
        self.tx += tx
        self._maybe_complete()

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        assert self.tx >= 0
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
# owned by their column's parity (nt % 2) rather than the CTA's count (i % 2).
FAULTS = {
    "no_turn": (PINGPONG, FUSED),
    "release_early": (COOPERATIVE, PINGPONG, FUSED),
    "empty_parity": (COOPERATIVE, PINGPONG, FUSED),
    "turn_before_epi": (FUSED,),
    "epi_release_early": (FUSED,),
    "epi_parity": (FUSED,),
    "own_by_column": (FUSED,),
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
    """The kernel's make_plan(T, I, ctas): items of (token block, column chunk), M fastest."""

    def __init__(self, T, I, ctas):
        self.m_blocks = T // kTM
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


def make_plan(T, I, ctas):
    return Plan(T, I, ctas)


def simulate_fused(m_blocks, n_tiles, k_steps, ctas, seed, fault=None, grid=None):
    """One random interleaving of variant 2 for T = 128 m_blocks tokens, I = 64 n_tiles columns,
    H = 64 k_steps, a plan for `ctas` CTAs and a grid of `grid` (default the launcher's,
    min(ctas, items); the kernel takes any fewer); raises Violation (or AssertionError) on a fault."""
    rng = random.Random(seed)
    stages = 4  # kStages
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


def run(seeds, verbose=False, fault=None, variants=(COOPERATIVE, PINGPONG, FUSED)):
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
        for variant in variants:
            if variant == FUSED:
                simulate_fused(seed=seed, fault=fault, **fused)
            else:
                simulate(variant, seed=seed, fault=fault, **shape)
            runs += 1
        if verbose and seed % 50 == 0:
            print(f"seed {seed}: {shape}, fused {fused} ok", flush=True)
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200)
    a = parser.parse_args()
    print(f"{run(a.seeds, verbose=True)} random runs, no violation")


if __name__ == "__main__":
    main()
