"""The barrier protocol of bench/wgmma_gemm_proto.cu, simulated on the CPU under random
interleavings: the producer thread, the consumer warpgroups (each warp's arrivals separate), the
bulk copies (which land at any later time) and the wgmma groups (which finish at any time up to
their wait), with mbarriers modelled as the PTX ISA defines them (a phase completes when its
pending arrivals reach zero and its transaction bytes are all in; `try_wait.parity P` passes
when the current, incomplete phase's parity differs from P). The loops below mirror the kernels'
loops line for line. Checked at every step: a consumer's MMAs read the stage holding the fill
they mean (tile, K step), no copy lands in a stage an unfinished MMA group still reads, every
tile's every K step is consumed once by the warpgroup that owns it, and nothing deadlocks.

    python3 bench/wgmma_protocol_sim.py [--seeds 200]       (tests/test_bench.py runs a few)
"""
import argparse
import random

COOPERATIVE, PINGPONG = 0, 1


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


# Faults to plant, to show the simulation catches them (tests/test_bench.py): the ping-pong's turn
# barrier left out, a stage released before the MMA group reading it finished, the producer's
# first wait on a fresh "empty" barrier with the wrong parity.
FAULTS = ("no_turn", "release_early", "empty_parity")


def simulate(variant, m_tiles, n_tiles, k_steps, grid, seed, fault=None):
    """One random interleaving of one CTA set; raises Violation (or AssertionError) on a fault."""
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

    waiting = [None] * len(procs)
    done = [False] * len(procs)
    while True:
        runnable = [j for j in range(len(procs)) if not done[j] and (waiting[j] is None or waiting[j]())]
        if not runnable and not copies_in_flight:
            if all(done):
                break
            raise Violation("deadlock")
        if copies_in_flight and (not runnable or rng.random() < 0.3):
            copies_in_flight.pop(rng.randrange(len(copies_in_flight)))()
            continue
        j = rng.choice(runnable)
        try:
            waiting[j] = next(procs[j])
        except StopIteration:
            done[j] = True
            waiting[j] = None
    for cta in range(min(grid, tiles)):
        for tile in range(cta, tiles, grid):
            for ks in range(k_steps):
                got = consumed.get((cta, tile, ks))
                want = {0, 1} if variant == COOPERATIVE else None
                if got is None or (want is not None and got != want):
                    raise Violation(f"tile {tile} K step {ks} consumed by {got}")
                if variant == PINGPONG and got != (tile - cta) // grid % 2:
                    raise Violation(f"tile {tile} consumed by warpgroup {got}")


def run(seeds, verbose=False, fault=None, variants=(COOPERATIVE, PINGPONG)):
    """Random shapes and interleavings; returns the number of runs (raises at the first fault)."""
    runs = 0
    for seed in range(seeds):
        rng = random.Random(1000 + seed)
        shape = dict(m_tiles=rng.randint(1, 3), n_tiles=rng.randint(1, 3), k_steps=rng.randint(1, 9),
                     grid=rng.randint(1, 4))
        for variant in variants:
            simulate(variant, seed=seed, fault=fault, **shape)
            runs += 1
        if verbose and seed % 50 == 0:
            print(f"seed {seed}: {shape} ok", flush=True)
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200)
    a = parser.parse_args()
    print(f"{run(a.seeds, verbose=True)} random runs, no violation")


if __name__ == "__main__":
    main()
