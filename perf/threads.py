#!/usr/bin/env python3
"""CPU time per message of each thread, phase by phase, in one profiled run.

`atbus bench` moves the same number of messages through the bus, then through
its in-run raw baseline, then (tcp, unix) through the raw baseline with frame
hashes, each phase on threads of its own. Profiled whole with

    perf record -F 1999 -a -g -o /tmp/p.data -- \
        target/release/atbus bench --transport unix --size 16384 \
        --throughput-only --handler --handler-only --seconds 3

(one case per run), this splits the samples at the moments new threads start
(a phase boundary) and prints, per phase and thread, the CPU time per message
(samples / frequency / messages): kernel and user, the payload copies
(`_copy_from_iter`, `_copy_to_iter`), the frame hash (xxh3) and the top
symbols. Threads of one run move the same messages, so their figures compare
without the run-to-run noise of msgs/s (perf/README.md item 45).

    python3 perf/threads.py /tmp/p.data MESSAGES [FREQ] [TOP]

MESSAGES: the case's `messages` field. FREQ: the `-F` given to perf (1999).
"""

import collections
import re
import subprocess
import sys

LEAF = re.compile(r"\s*[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")


def samples(data):
    """(tid, comm, time, leaf symbol, leaf dso) per sample."""
    out = subprocess.run(
        ["perf", "script", "-i", data, "-F", "comm,tid,time,ip,sym,dso"],
        capture_output=True, text=True, check=True,
    ).stdout
    head = None
    for line in out.splitlines():
        if line and not line.startswith("\t"):
            # "comm tid time:" (comm may hold spaces); the leaf follows.
            parts = line.split()
            head = (int(parts[-2]), " ".join(parts[:-2]), float(parts[-1].rstrip(":")))
        elif head is not None and line.startswith("\t"):
            m = LEAF.match(line)
            if m:
                yield head + (m.group(1), m.group(2))
            head = None


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    data, messages = sys.argv[1], float(sys.argv[2])
    freq = float(sys.argv[3]) if len(sys.argv) > 3 else 1999.0
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    rows = list(samples(data))
    if not rows:
        sys.exit("no samples (was perf record given -g? is perf script working?)")
    per_tid = collections.Counter(r[0] for r in rows)
    first = {}
    for tid, _, t, _, _ in rows:
        first.setdefault(tid, t)
    # Phase boundaries: where a thread holding at least 2 % of the samples
    # appears more than 50 ms after the previous boundary.
    busy = sorted(first[t] for t, n in per_tid.items() if n >= 0.02 * len(rows))
    bounds = [busy[0]]
    for t in busy[1:]:
        if t - bounds[-1] > 0.05:
            bounds.append(t)
    bounds.append(float("inf"))
    ns = 1e9 / freq / messages
    for i in range(len(bounds) - 1):
        lo, hi = bounds[i], bounds[i + 1]
        stats = collections.defaultdict(collections.Counter)
        comm = {}
        for tid, c, t, sym, dso in rows:
            if lo <= t < hi:
                s = stats[tid]
                comm[tid] = c
                s["kernel" if "kernel" in dso else "user"] += 1
                if "_copy_from_iter" in sym or "_copy_to_iter" in sym:
                    s["copy"] += 1
                if "xxh" in sym:
                    s["hash"] += 1
                s["sym:" + sym] += 1
        total = sum(s["kernel"] + s["user"] for s in stats.values())
        span = f"{lo - bounds[0]:.2f} s" + (f" to {hi - bounds[0]:.2f} s" if hi != float("inf") else " to the end")
        print(f"== phase {i + 1} ({span})")
        for tid, s in sorted(stats.items(), key=lambda kv: -(kv[1]["kernel"] + kv[1]["user"])):
            n = s["kernel"] + s["user"]
            if n < 0.005 * total:
                continue
            print(
                f"  {comm[tid]} {tid}: {n * ns:.0f} ns/msg (kernel {s['kernel'] * ns:.0f}, "
                f"user {s['user'] * ns:.0f}; copy {s['copy'] * ns:.0f}, hash {s['hash'] * ns:.0f})"
            )
            syms = sorted(((k[4:], v) for k, v in s.items() if k.startswith("sym:")), key=lambda kv: -kv[1])
            for sym, v in syms[:top]:
                print(f"      {v * ns:6.0f}  {sym[:100]}")


if __name__ == "__main__":
    main()
