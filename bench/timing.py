"""Timing helpers of the bench scripts (bench/run.py and the prototypes), with nothing from
mixlora_ext: CUDA events around each call on the GPU, perf_counter on the CPU."""
import statistics
import time

import torch


def cuda_times_ms(fn, reps, warmup=3):
    """Milliseconds of each of `reps` calls of fn(), by CUDA events, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    call_ms = call_timer(torch.device("cuda"))
    return [call_ms(fn) for _ in range(reps)]


def call_timer(device):
    """Returns call_ms(fn): the milliseconds of one call of fn() (CUDA events on the GPU)."""
    if device.type == "cuda":
        def call_ms(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return call_ms

    def call_ms(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return call_ms


def interleaved_medians(fns, reps, call_ms, warmup_ms=50.0):
    """{name: median milliseconds of a call} for fns ({name: fn}). Each fn is warmed up first
    (3 calls, and on until warmup_ms of them); then the timed calls alternate, round i starting
    at the i-th fn (mod len(fns)), so that a drift of the GPU's clocks or of the host's load
    during the measurement falls on every fn alike and the ratios between them keep. (Until the
    eleventh session of bench/NOTES.md each fn was timed in one block after 3 calls: the dense
    MLP's own time at T = 512 differed by up to 1.7x between two runs in one call, v11.)"""
    for fn in fns.values():
        spent, calls = 0.0, 0
        while calls < 3 or spent < warmup_ms:
            spent += call_ms(fn)
            calls += 1
    names = list(fns)
    times = {name: [] for name in names}
    for i in range(reps):
        first = i % len(names)
        for name in names[first:] + names[:first]:
            times[name].append(call_ms(fns[name]))
    return {name: statistics.median(t) for name, t in times.items()}
