#!/usr/bin/env python3
"""perf/summarize.py RESULTS.jsonl: the markdown of perf/RESULTS.md from the
JSON lines perf/run.sh collected (atbus bench, atbus-baseline, atbus-idle),
with min / median / max over the runs, ratios to the raw-socket baseline and
the issue's targets, each marked met or missed."""

import json
import platform
import statistics
import subprocess
import sys
from collections import defaultdict


def med(values):
    return statistics.median(values) if values else float("nan")


def spread(values, scale=1.0, digits=2):
    if not values:
        return "-"
    lo, mid, hi = min(values) / scale, med(values) / scale, max(values) / scale
    return f"{lo:.{digits}f} / **{mid:.{digits}f}** / {hi:.{digits}f}"


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    except OSError:
        cores = "?"
    # TCP figures depend on it (perf/README.md item 33: BBR's pacing and
    # the write size).
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            congestion = f.read().strip()
    except OSError:
        congestion = "?"
    return f"{cpu}, {cores} cores, Linux {platform.release()}, TCP congestion control {congestion}"


def add_rtt(t, r):
    """One ping-pong row's figures (and its in-run baselines) into `t`."""
    t["p50"].append(r["rtt_p50_us"])
    t["p99"].append(r["rtt_p99_us"])
    t["inrun_p50"].append(r["baseline_rtt_p50_us"])
    t["inrun_p99"].append(r["baseline_rtt_p99_us"])
    if r.get("handoff_rtt_p50_us") is not None:
        t["handoff_p50"].append(r["handoff_rtt_p50_us"])
        t["handoff_p99"].append(r["handoff_rtt_p99_us"])


def main(path, commit, date):
    rows = [json.loads(line) for line in open(path) if line.strip().startswith("{")]
    runs = sorted({r.get("run", 1) for r in rows})
    bus = defaultdict(list)        # (transport, payload) -> msgs/s
    inrun = defaultdict(list)      # same-run baseline inside atbus bench
    hashed = defaultdict(list)     # same-run baseline with the frame hash (tcp, unix)
    inrun_h = defaultdict(list)    # the in-run raw of the runs that measured `hashed`
    base = defaultdict(list)       # atbus-baseline
    rtt = defaultdict(lambda: defaultdict(list))
    klass = defaultdict(lambda: defaultdict(list))
    hbus = defaultdict(list)       # (transport, payload) -> msgs/s, b's application a handler
    hinrun = defaultdict(list)
    hhashed = defaultdict(list)
    hspin = []
    hrtt = defaultdict(lambda: defaultdict(list))    # applications as handlers
    srtt = defaultdict(lambda: defaultdict(list))    # queue API, shards spinning before parking
    hklass = defaultdict(lambda: defaultdict(list))
    idle = [r for r in rows if r["kind"] == "idle_connections"]
    for r in rows:
        kind = r["kind"]
        if kind == "throughput" and r.get("api") == "handler":
            key = (r["transport"], r["payload"])
            hbus[key].append(r["msgs_per_sec"])
            hinrun[key].append(r["baseline_msgs_per_sec"])
            if r.get("hashed_baseline_msgs_per_sec") is not None:
                hhashed[key].append(r["hashed_baseline_msgs_per_sec"])
            hspin.append(r.get("spin_us", 0))
        elif kind == "throughput" and not r.get("e2e"):
            key = (r["transport"], r["payload"])
            bus[key].append(r["msgs_per_sec"])
            inrun[key].append(r["baseline_msgs_per_sec"])
            if r.get("hashed_baseline_msgs_per_sec") is not None:
                hashed[key].append(r["hashed_baseline_msgs_per_sec"])
                inrun_h[key].append(r["baseline_msgs_per_sec"])
        elif kind == "baseline_throughput":
            base[(r["transport"], r["payload"])].append(r["msgs_per_sec"])
        elif kind == "rtt" and r.get("api", "queue") == "queue" and r.get("spin_us", 0) > 0 and not r.get("e2e"):
            add_rtt(srtt[r["transport"]], r)
            srtt[r["transport"]]["spin"].append(r["spin_us"])
        elif kind == "class" and r.get("api", "queue") == "queue" and r.get("spin_us", 0) > 0:
            continue  # side rows of a spinning run: the class table shows the defaults
        elif kind == "rtt" and r.get("api") == "handler":
            add_rtt(hrtt[r["transport"]], r)
            hrtt[r["transport"]]["spin"].append(r.get("spin_us", 0))
        elif kind == "class" and r.get("api") == "handler":
            c = hklass[r["transport"]]
            c[r["class"] + "_p99"].append(r["rtt_p99_us"])
            c[r["class"] + "_p50"].append(r["rtt_p50_us"])
        elif kind == "rtt" and not r.get("e2e"):
            add_rtt(rtt[r["transport"]], r)
        elif kind == "baseline_rtt":
            t = rtt[r["transport"]]
            t["base_p50"].append(r["rtt_p50_us"])
            t["base_p99"].append(r["rtt_p99_us"])
        elif kind == "class":
            c = klass[r["transport"]]
            c[r["class"] + "_p99"].append(r["rtt_p99_us"])
            c[r["class"] + "_p50"].append(r["rtt_p50_us"])

    out = []
    out.append("# perf/RESULTS.md")
    out.append("")
    out.append(f"Written by `perf/run.sh` ({len(runs)} runs) on {date}, commit `{commit}`.  ")
    out.append(f"Machine: {machine()}.  ")
    out.append("Each cell: min / **median** / max over the runs. Raw baseline: `atbus-baseline`")
    out.append("(perf/baseline.rs: bare blocking sockets, two pinned threads, 4-byte length")
    out.append("prefixes, writes as large as the bus's (64 KiB tcp, 256 KiB unix), 256 KiB reads;")
    out.append("the 'physical limit'); *in-run*: the same")
    out.append("baseline measured by `atbus bench` right after the bus case, same message count;")
    out.append("*raw + frame hash* (tcp, unix): that in-run baseline with each message's frame hash")
    out.append("(xxh3-64 of its bytes, design 'Wire format') computed by the sender and checked by the")
    out.append("receiver (perf/raw.rs `hashed_baseline_throughput`): the ceiling of any implementation")
    out.append("of the wire format on these sockets, and its ratio to the in-run raw.")
    out.append("")

    def ceiling(key):
        """raw + frame hash over the in-run raw of the same runs."""
        return med(hashed[key]) / med(inrun_h[key])

    def ratio(key, values):
        b = base.get(key) or inrun.get(key)
        return med(values) / med(b) if b else float("nan")

    out.append("## Throughput, one connection, one sender and one receiver on separate cores")
    out.append("")
    out.append("| transport | payload | bus M msgs/s | bus MB/s (median) | raw M msgs/s | raw MB/s (median) | bus / raw | in-run raw M msgs/s | raw + frame hash M msgs/s (/ in-run raw) |")
    out.append("|---|---:|---|---:|---|---:|---:|---|---|")
    for key in sorted(bus, key=lambda k: (k[0], k[1])):
        transport, payload = key
        b = base.get(key, [])
        h = hashed.get(key, [])
        out.append(
            f"| {transport} | {payload} B | {spread(bus[key], 1e6)} | {med(bus[key]) * payload / 1e6:.0f} | "
            f"{spread(b, 1e6) if b else '-'} | {f'{med(b) * payload / 1e6:.0f}' if b else '- (in-run below)'} | "
            f"{ratio(key, bus[key]):.2f} | {spread(inrun[key], 1e6)} | "
            f"{f'{spread(h, 1e6)} ({ceiling(key):.2f})' if h else '-'} |"
        )
    out.append("")
    if hbus:
        out.append("### The same with b's application as a message handler")
        out.append("")
        out.append("a's sender is an application thread as above; b's application is a message handler")
        spin = int(med(hspin))
        spinning = (
            f"shards spinning {spin} µs before parking"
            if spin
            else "shards parking after their adaptive spin, the default"
        )
        out.append(f"on b's shard (`Node::set_handler`, {spinning}), so")
        out.append("core 1 runs the receiving shard alone instead of the shard and a reader thread taking")
        out.append("turns. Raw and raw + frame hash: measured in these runs right after each case.")
        out.append("")
        out.append("| transport | payload | bus M msgs/s | bus MB/s (median) | bus / raw (`atbus-baseline`) | in-run raw M msgs/s | bus / in-run raw | raw + frame hash M msgs/s (/ in-run raw) |")
        out.append("|---|---:|---|---:|---:|---|---:|---|")
        for key in sorted(hbus):
            transport, payload = key
            h = hhashed.get(key, [])
            ceil = f"{spread(h, 1e6)} ({med(h) / med(hinrun[key]):.2f})" if h else "-"
            out.append(
                f"| {transport} | {payload} B | {spread(hbus[key], 1e6)} | {med(hbus[key]) * payload / 1e6:.0f} | "
                f"{ratio(key, hbus[key]):.2f} | {spread(hinrun[key], 1e6)} | "
                f"{med(hbus[key]) / med(hinrun[key]):.2f} | {ceil} |"
            )
        out.append("")
    out.append("## 64 B ping-pong (application to application)")
    out.append("")
    out.append("*queue*: application threads (pinned beside their shards) call `recv_timeout` and `send`,")
    out.append("shards as configured by default: before parking they spin for a window that adapts between")
    out.append("nothing and 50 µs (`RuntimeConfig::adaptive_spin`: it opens while wake-ups come soon after a park,")
    out.append("and closes after a few long sleeps; perf/README.md item 36);")
    out.append("*queue, spin*: the same with the shards spinning the given µs before parking")
    out.append("(`RuntimeConfig::spin_before_park`, `--spin-us`; idle shards burn that much CPU per wake-up);")
    out.append("*handlers*: the applications are message handlers on the shards (`Node::set_handler`),")
    out.append("shards spinning the given µs before parking. Raw: blocking sockets, two")
    out.append("pinned threads. *Raw + hand-offs*: bare sockets with the queue API's thread layout (an")
    out.append("application and an I/O thread at each end, pinned on one core, handing messages over")
    out.append("through channels; perf/raw.rs `handoff_rtt`), measured in the same run: what the layout")
    out.append("itself costs.")
    out.append("")
    out.append("| transport | API | bus p50 µs | bus p99 µs | raw p50 µs | raw p99 µs | p50 / raw | p99 / raw | raw + hand-offs p50 / p99 µs |")
    out.append("|---|---|---|---|---|---|---:|---:|---|")

    def rtt_ratios(t, raw):
        bp50 = raw.get("base_p50") or t["inrun_p50"]
        bp99 = raw.get("base_p99") or t["inrun_p99"]
        return bp50, bp99, med(t["p50"]) / med(bp50), med(t["p99"]) / med(bp99)

    def rtt_apis(transport):
        return (
            ("queue", rtt.get(transport)),
            ("queue, spin", srtt.get(transport)),
            ("handlers, spin", hrtt.get(transport)),
        )

    for transport in sorted(set(rtt) | set(srtt) | set(hrtt)):
        for api, t in rtt_apis(transport):
            if not t or not t["p50"]:
                continue
            bp50, bp99, r50, r99 = rtt_ratios(t, rtt.get(transport, {}))
            label = f"{api} {int(med(t['spin']))} µs" if t.get("spin") else api
            handoff = (
                f"{med(t['handoff_p50']):.1f} / {med(t['handoff_p99']):.1f}" if t.get("handoff_p50") else "-"
            )
            out.append(
                f"| {transport} | {label} | {spread(t['p50'], 1, 1)} | {spread(t['p99'], 1, 1)} | {spread(bp50, 1, 1)} | "
                f"{spread(bp99, 1, 1)} | {r50:.2f} | {r99:.2f} | {handoff} |"
            )
    out.append("")
    if klass:
        out.append("## Frame-sync class: 64 B ping-pong while 16 KiB bulk saturates the connection")
        out.append("")
        out.append("The machine's own floor: *raw under bulk / raw idle* is bare sockets' ping-pong p99")
        out.append("while a bare bulk socket floods the same two cores, over their idle p99.")
        out.append("")
        out.append("| transport | API | idle p99 µs | bulk, throughput class p99 µs | bulk, latency class p99 µs | raw sockets under bulk p99 µs | latency / idle | raw under bulk / raw idle |")
        out.append("|---|---|---|---|---|---|---:|---:|")
        for transport in sorted(set(klass) | set(hklass)):
            raw_bulk = klass.get(transport, {}).get("raw_p99", [])
            raw_idle = (rtt.get(transport, {}).get("base_p99") or rtt.get(transport, {}).get("inrun_p99") or [])
            floor = f"{med(raw_bulk) / med(raw_idle):.1f}" if raw_bulk and raw_idle else "-"
            for api, c in (("queue", klass.get(transport)), ("handlers", hklass.get(transport))):
                if not c or not c["latency_p99"]:
                    continue
                out.append(
                    f"| {transport} | {api} | {spread(c['idle_p99'], 1, 1)} | {spread(c['throughput_p99'], 1, 1)} | "
                    f"{spread(c['latency_p99'], 1, 1)} | {spread(raw_bulk, 1, 1)} | "
                    f"{med(c['latency_p99']) / med(c['idle_p99']):.1f} | {floor} |"
                )
        out.append("")
    if idle:
        r = idle[-1]
        out.append("## Memory: idle connections to one node (`atbus-idle`)")
        out.append("")
        out.append(
            f"{r['connections']} connections: resident {r['rss_before_bytes'] / 2**20:.0f} MiB before, "
            f"{r['rss_after_bytes'] / 2**20:.0f} MiB after ({r['rss_per_connection_bytes'] / 1024:.1f} KiB each), "
            f"opened in {r['seconds_to_open']:.1f} s."
        )
        out.append("")

    # Targets.
    def m(key):
        return med(bus.get(key, []))

    targets = []
    tcp64 = m(("tcp", 64))
    targets.append(("1. tcp 64 B ≥ 5 M msgs/s", f"{tcp64 / 1e6:.2f} M", tcp64 >= 5e6))
    mem64 = m(("mem", 64))
    raw_mem64 = med(inrun.get(("mem", 64), []))
    targets.append((
        "2. mem 64 B ≥ 20 M msgs/s",
        f"{mem64 / 1e6:.2f} M (in-run raw crossbeam channel: {raw_mem64 / 1e6:.2f} M, {mem64 / raw_mem64:.2f}×)",
        mem64 >= 20e6,
    ))
    for transport in ("tcp", "unix"):
        key = (transport, 16384)
        if key in bus:
            r = ratio(key, bus[key])
            figure = f"{r * 100:.0f} %"
            if hashed.get(key):
                figure += f" (raw + frame hash, same runs: {ceiling(key) * 100:.0f} % of raw)"
            targets.append((f"3. {transport} 16 KiB ≥ 85 % of raw bytes/s (queue API)", figure, r >= 0.85))
        if key in hbus:
            r = ratio(key, hbus[key])
            figure = f"{r * 100:.0f} % (of the in-run raw: {med(hbus[key]) / med(hinrun[key]) * 100:.0f} %)"
            targets.append((f"3. {transport} 16 KiB ≥ 85 % of raw bytes/s (receiver a handler)", figure, r >= 0.85))
    for transport in ("tcp", "unix"):
        for api, t in rtt_apis(transport):
            if t and t["p50"]:
                _, _, r50, r99 = rtt_ratios(t, rtt.get(transport, {}))
                api = f"{api} {int(med(t['spin']))} µs" if t.get("spin") else api
                api = api.replace("queue", "queue API")
                figure = f"{r50:.2f}× / {r99:.2f}×"
                if t.get("handoff_p50"):
                    _, _, h50, h99 = rtt_ratios({"p50": t["handoff_p50"], "p99": t["handoff_p99"], **{
                        k: t[k] for k in ("inrun_p50", "inrun_p99")}}, rtt.get(transport, {}))
                    figure += f" (raw sockets with the same hand-offs: {h50:.2f}× / {h99:.2f}×)"
                targets.append((
                    f"4. {transport} RTT p50 ≤ 1.5× raw, p99 ≤ 2× raw ({api})",
                    figure,
                    r50 <= 1.5 and r99 <= 2.0,
                ))
    for transport in sorted(set(klass) | set(hklass)):
        for api, c in (("queue API", klass.get(transport)), ("handlers", hklass.get(transport))):
            if c and c["latency_p99"] and c["idle_p99"]:
                r = med(c["latency_p99"]) / med(c["idle_p99"])
                targets.append((f"5. {transport} frame-sync p99 under bulk ≤ 3× idle p99 ({api})", f"{r:.1f}×", r <= 3.0))
    if idle:
        r = idle[-1]
        ok = r["connections"] >= 10000 and r["rss_after_bytes"] < 2**30
        targets.append(("6. 10 000 idle tcp connections < 1 GiB RSS", f"{r['rss_after_bytes'] / 2**20:.0f} MiB", ok))
    out.insert(
        out.index("## Throughput, one connection, one sender and one receiver on separate cores"),
        "\n".join(
            ["## Targets", "", "| target | measured (median) | |", "|---|---|---|"]
            + [f"| {name} | {value} | {'met' if ok else '**missed**'} |" for name, value, ok in targets]
            + [""]
        ),
    )
    try:
        with open(__file__.rsplit("/", 1)[0] + "/RESULTS-notes.md") as notes:
            out.append(notes.read())
    except OSError:
        pass
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: summarize.py RESULTS.jsonl COMMIT DATE")
    main(sys.argv[1], sys.argv[2], sys.argv[3])
