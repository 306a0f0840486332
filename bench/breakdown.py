"""Where the layer's time beyond the dense MLP's goes, per shape: a table from profile_step's records.

    python bench/profile_step.py --T 4096 --dense --json b.jsonl   # on the GPU, once per shape
    python bench/breakdown.py b.jsonl                               # anywhere

For each shape and step (forward; forward+backward): the dense MLP's and the layer's time
(CUDA events, eager), their ratio, the time the target allows (1.10x forward, 1.15x
forward+backward; 1.3x forward at T <= 16) and how far the layer is from it, and the GPU time
per kind of kernel (profile_step.KINDS) of the layer minus the dense MLP's, largest first: what
the excess is made of. Kernel times are torch.profiler's (sum over the step's kernels); the
eager time also holds launch gaps, which the last column shows (eager - sum of kernels).
"""
import argparse
import json
import os

TARGET = {"forward": 1.10, "forward+backward": 1.15}
DECODE_T, DECODE_TARGET = 16, 1.3


def shape_key(r):
    return (r["H"], r["I"], r["T"], r["E"], r["r"], r["dropout"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("records", nargs="+", help="JSON-lines files written by profile_step.py --json")
    a = ap.parse_args()
    recs = {}
    for path in a.records:
        if not os.path.exists(path):
            print(f"{path}: no records (did every profile_step run fail?)")
            continue
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    recs[(shape_key(r), r["step"], r["model"])] = r
    devices = sorted({r["device"] for r in recs.values()})
    print(f"device: {', '.join(devices)}; bf16, k = 2; times in ms\n")
    print("| H x I | T | E | r | p | step | dense | layer | ratio | allowed | short by "
          "| kernel time beyond the dense MLP's, by kind | launch gaps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (key, step, model) in sorted(recs, key=lambda k: (k[0], k[1])):
        if model != "mixlora" or (key, step, "dense") not in recs:
            continue
        m, d = recs[(key, step, "mixlora")], recs[(key, step, "dense")]
        H, I, T, E, r, p = key
        target = DECODE_TARGET if (T <= DECODE_T and step == "forward") else TARGET[step]
        if T <= DECODE_T and step != "forward":
            continue  # no target for decode-sized training steps
        allowed = target * d["eager_ms"]
        kinds = {k: m["kinds_ms"].get(k, 0.0) - d["kinds_ms"].get(k, 0.0)
                 for k in set(m["kinds_ms"]) | set(d["kinds_ms"])}
        excess = ", ".join(f"{k} {v:+.3f}" for k, v in sorted(kinds.items(), key=lambda kv: -abs(kv[1]))
                           if abs(v) >= 0.005)
        gaps = m["eager_ms"] - sum(m["kinds_ms"].values())
        print(f"| {H} x {I} | {T} | {E} | {r} | {p:g} | {step} | {d['eager_ms']:.3f} | {m['eager_ms']:.3f} "
              f"| {m['eager_ms'] / d['eager_ms']:.2f}x | {allowed:.3f} | {max(0.0, m['eager_ms'] - allowed):.3f} "
              f"| {excess} | {gaps:+.3f} |")


if __name__ == "__main__":
    main()
