//! `atbus bench`: the end-to-end data-plane benchmark. Two nodes, each on one
//! shard pinned to its own core (0 and 1), one connection between them.
//!
//! For every transport (tcp, unix, udp, mem) it measures, and prints as one
//! JSON object per line:
//! - `throughput`: one-way `msgs_per_sec` and `mb_per_sec` for each payload
//!   size, beside a raw-socket baseline of the same transport measured in the
//!   same run on the same message count (two pinned threads, blocking
//!   sockets, length-prefixed messages through 256 KiB buffers; for udp one
//!   datagram per message, no reliability; for mem a crossbeam channel of
//!   `Bytes`);
//! - `rtt`: a 64 B ping-pong (application thread to application thread),
//!   `rtt_p50_us` / `rtt_p99_us` / max, beside the raw-socket ping-pong;
//! - `class` (with `--class`): the 64 B ping-pong while 16 KiB bulk messages
//!   saturate the same connection, sent in the throughput class (`send`) and
//!   in the latency class (`send_urgent`), and on bare sockets (`raw`).
//!
//! With `--via-relay N` (tcp only), the two nodes cannot reach each other
//! and talk through N relay hops (relay nodes in this process, unpinned,
//! each with a host of its own so nothing takes the in-process path): the
//! rows' `transport` reads `tcp+relayN`, beside the same raw TCP baseline.
//!
//! Payloads are static `Bytes` (see [`static_payload`]).

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;

#[path = "../../../perf/raw.rs"]
mod raw;
use libatbus::node::{Message, Node, NodeConfig};
use raw::{
    BULK, PING, baseline_rtt, baseline_throughput, baseline_under_bulk, handoff_rtt, hashed_baseline_throughput,
    histogram, pin, static_payload,
};
use serde::Serialize;

/// `atbus bench` options.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Transports to measure (repeatable; default: all five; quic is
    /// measured beside a raw UDP baseline).
    #[arg(long = "transport", value_parser = ["tcp", "unix", "udp", "mem", "quic"])]
    transports: Vec<String>,
    /// Payload sizes in bytes (repeatable).
    #[arg(long = "size", alias = "payload", default_values_t = [8usize, 64, 548, 1024, 16384])]
    sizes: Vec<usize>,
    /// Seconds each throughput case sends for (the baseline then moves the
    /// same number of messages).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Only the 64 B ping-pong (no throughput cases).
    #[arg(long)]
    pingpong: bool,
    /// Only the throughput cases (no ping-pong or class cases).
    #[arg(long, conflicts_with = "pingpong")]
    throughput_only: bool,
    /// Ping-pong round trips per latency case.
    #[arg(long, default_value_t = 20_000)]
    round_trips: usize,
    /// Also compare the latency class with the throughput class while 16 KiB
    /// bulk traffic saturates the connection.
    #[arg(long)]
    class: bool,
    /// Pace the bulk sender of the class cases to this many MB/s (0: as
    /// fast as it goes, saturating the link and, on few cores, the CPUs).
    #[arg(long, default_value_t = 0.0)]
    bulk_rate: f64,
    /// Override the stream layer's per-path window (bytes in flight).
    #[arg(long)]
    path_window: Option<usize>,
    /// Also measure each throughput case and the ping-pong on a stream
    /// encrypted end to end (TLS 1.3, certificates made for the run), in
    /// the same run as the plain ones (`"e2e": true` rows).
    #[arg(long)]
    e2e: bool,
    /// Also run the ping-pong and the class cases with both applications as
    /// message handlers on the nodes' shards (`Node::set_handler`; rows with
    /// `"api": "handler"`) instead of threads reading the receive queue, and
    /// (without `--pingpong`) the throughput cases with b's application as a
    /// handler (a's sender is still a thread).
    #[arg(long)]
    handler: bool,
    /// With `--handler`: only the handler cases (and the raw baselines they
    /// are compared with), not the queue API's throughput, ping-pong and
    /// class cases.
    #[arg(long, requires = "handler")]
    handler_only: bool,
    /// The shards spin this many µs before parking when idle
    /// (`RuntimeConfig::spin_before_park`; 0: the adaptive spin below).
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
    /// Without `--spin-us`: the shards' adaptive spin before parking goes
    /// up to this many µs (`RuntimeConfig::adaptive_spin`, default 50; 0:
    /// they park at once).
    #[arg(long, default_value_t = 50)]
    adaptive_spin_us: u64,
    /// Relay hops between the two nodes (0, 1 or 2; tcp only): measures the
    /// path through `atbus-relay` nodes against direct.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    via_relay: u8,
}

/// Streams the bench encrypts when `--e2e` is on: bulk, ping.
const E2E_BULK: i64 = 4;
const E2E_PING: i64 = 5;

#[derive(Serialize)]
struct Throughput<'a> {
    kind: &'static str,
    transport: &'a str,
    /// `queue`: b's application thread reads the receive queue; `handler`:
    /// b's application is a message handler on its shard. a's sender is an
    /// application thread in both.
    api: &'static str,
    /// `--spin-us`: the shards spun this long before parking.
    spin_us: u64,
    e2e: bool,
    payload: usize,
    messages: u64,
    msgs_per_sec: f64,
    mb_per_sec: f64,
    baseline_msgs_per_sec: f64,
    baseline_mb_per_sec: f64,
    /// Baseline messages lost (udp only: raw datagrams have no resend).
    baseline_lost: u64,
    ratio: f64,
    /// tcp, unix: the same bare sockets with each message's frame hash
    /// computed and checked (`raw::hashed_baseline_throughput`), measured in
    /// the same run: the ceiling of any implementation of the wire format.
    hashed_baseline_msgs_per_sec: Option<f64>,
}

#[derive(Serialize)]
struct Rtt<'a> {
    kind: &'static str,
    transport: &'a str,
    /// `queue`: application threads read the receive queue; `handler`: the
    /// applications are message handlers on the shards.
    api: &'static str,
    /// `--spin-us`: the shards spun this long before parking.
    spin_us: u64,
    e2e: bool,
    payload: usize,
    round_trips: usize,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    rtt_max_us: f64,
    baseline_rtt_p50_us: f64,
    baseline_rtt_p99_us: f64,
    /// Queue API rows (tcp, unix): bare sockets with the queue API's thread
    /// layout, an application and an I/O thread at each end
    /// (`raw::handoff_rtt`), measured in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    handoff_rtt_p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    handoff_rtt_p99_us: Option<f64>,
}

#[derive(Serialize)]
struct Class<'a> {
    kind: &'static str,
    transport: &'a str,
    /// As in [`Rtt`] (`raw` rows: `queue`).
    api: &'static str,
    spin_us: u64,
    /// `idle` (no bulk), `throughput` (send), `latency` (send_urgent), and
    /// `raw`: bare sockets, a ping-pong on one while bulk floods another.
    class: &'static str,
    bulk_mb_per_sec: f64,
    round_trips: usize,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    rtt_max_us: f64,
}

const PEER_A: &str = "bench-a";
const PEER_B: &str = "bench-b";

/// Runs the benchmark; results on stdout, progress on stderr.
pub fn run(mut args: BenchArgs) -> Result<(), String> {
    if args.transports.is_empty() {
        args.transports = ["tcp", "unix", "udp", "quic", "mem"].map(String::from).to_vec();
    }
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return Err(format!("--seconds {}: must be above 0", args.seconds));
    }
    if let Some(bad) = args.sizes.iter().find(|&&s| s == 0 || s > 1 << 20) {
        return Err(format!("--size {bad}: must be 1..=1048576"));
    }
    if args.via_relay > 0 {
        if args.transports.iter().any(|t| t != "tcp") {
            return Err("--via-relay: relays are measured on tcp only (add --transport tcp)".into());
        }
        if args.e2e {
            return Err("--via-relay with --e2e is not measured".into());
        }
    }
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    eprintln!("# {} cores; nodes pinned to cores 0 and 1", cores.len());
    for transport_name in &args.transports {
        let label = if args.via_relay > 0 {
            format!("{transport_name}+relay{}", args.via_relay)
        } else {
            transport_name.clone()
        };
        let pair = if args.via_relay > 0 {
            Pair::through_relays(args.via_relay, args.path_window)?
        } else {
            Pair::start(transport_name, &args, args.e2e)?
        };
        let transport = &label;
        let variants: &[bool] = if args.e2e && transport != "mem" {
            &[false, true]
        } else {
            &[false]
        };
        if !args.pingpong && !args.handler_only {
            for &payload in &args.sizes {
                let mut plain = None;
                for &e2e in variants {
                    let stream = if e2e { E2E_BULK } else { 1 };
                    let label = if e2e { " e2e" } else { "" };
                    eprintln!("# {transport}{label} {payload} B: {} s ...", args.seconds);
                    let (messages, ours) = pair.throughput(payload, Duration::from_secs_f64(args.seconds), stream)?;
                    // One baseline per size, moving the plain case's count.
                    let baselines = *plain.get_or_insert_with(|| raw_baselines(transport_name, payload, messages));
                    print_json(&Throughput::of(
                        transport,
                        "queue",
                        args.spin_us,
                        e2e,
                        (payload, messages, ours),
                        baselines,
                    ));
                }
            }
        }
        if args.throughput_only {
            pair.stop();
            if args.handler && args.via_relay == 0 {
                handler_cases(transport_name, &args, None)?;
            }
            continue;
        }
        let base = isolated({
            let (transport, trips) = (transport_name.clone(), args.round_trips);
            move || baseline_rtt(&transport, trips)
        });
        let handoff = if args.handler_only {
            None
        } else {
            let (transport, trips) = (transport_name.clone(), args.round_trips);
            isolated(move || handoff_rtt(&transport, trips))
        };
        for &e2e in variants.iter().filter(|_| !args.handler_only) {
            let label = if e2e { " e2e" } else { "" };
            eprintln!("# {transport}{label} ping-pong: {} round trips ...", args.round_trips);
            let ours = pair.ping_pong(args.round_trips, if e2e { E2E_PING } else { 2 });
            print_json(
                &Rtt::of(transport, "queue", args.spin_us, e2e, args.round_trips, &ours, &base)
                    .with_handoff(handoff.as_ref()),
            );
        }
        if args.class && transport != "mem" && !args.handler_only {
            let trips = (args.round_trips / 4).max(500);
            for class in ["idle", "throughput", "latency"] {
                eprintln!("# {transport} ping-pong under bulk, {class} class ...");
                let (hist, bulk) = pair.under_bulk(trips, class, args.bulk_rate);
                print_json(&Class::of(transport, "queue", args.spin_us, class, bulk, trips, &hist));
            }
            let (hist, bulk) = isolated({
                let (transport, rate) = (transport_name.clone(), args.bulk_rate);
                move || baseline_under_bulk(&transport, trips, rate)
            });
            print_json(&Class::of(transport, "queue", args.spin_us, "raw", bulk, trips, &hist));
        }
        pair.stop();
        if args.handler && args.via_relay == 0 {
            handler_cases(transport_name, &args, Some(&base))?;
        }
    }
    Ok(())
}

/// The ping-pong (and with `--class` the class cases) with both
/// applications as message handlers on the shards, on a pair of its own.
/// `base`: the raw ping-pong of the same run (`None` with
/// `--throughput-only`: no ping-pong).
fn handler_cases(transport: &str, args: &BenchArgs, base: Option<&Histogram<u64>>) -> Result<(), String> {
    let pair = Pair::start(transport, args, false)?;
    let handlers = Handlers::install(&pair)?;
    if !args.pingpong {
        for &payload in &args.sizes {
            eprintln!(
                "# {transport} {payload} B, b's handler receiving: {} s ...",
                args.seconds
            );
            let (messages, ours) = handlers.throughput(&pair, payload, Duration::from_secs_f64(args.seconds))?;
            print_json(&Throughput::of(
                transport,
                "handler",
                args.spin_us,
                false,
                (payload, messages, ours),
                raw_baselines(transport, payload, messages),
            ));
        }
    }
    let Some(base) = base else {
        pair.stop();
        return Ok(());
    };
    eprintln!(
        "# {transport} ping-pong, handlers: {} round trips ...",
        args.round_trips
    );
    let ours = handlers.ping(&pair, args.round_trips, 2, false)?;
    print_json(&Rtt::of(
        transport,
        "handler",
        args.spin_us,
        false,
        args.round_trips,
        &ours,
        base,
    ));
    if args.class && transport != "mem" {
        let trips = (args.round_trips / 4).max(500);
        for class in ["idle", "throughput", "latency"] {
            eprintln!("# {transport} ping-pong under bulk, handlers, {class} class ...");
            let (hist, bulk) = handlers.under_bulk(&pair, trips, class, args.bulk_rate)?;
            print_json(&Class::of(
                transport,
                "handler",
                args.spin_us,
                class,
                bulk,
                trips,
                &hist,
            ));
        }
    }
    pair.stop();
    Ok(())
}

/// One ping-pong run driven by a's handler: each pong sends the next ping.
struct Driver {
    hist: Histogram<u64>,
    started: Instant,
    /// Round trips still to make, warm-up ones first.
    left: usize,
    warmup_left: usize,
    stream: i64,
    urgent: bool,
    done: crossbeam_channel::Sender<Result<Histogram<u64>, String>>,
}

/// The handlers of a pair: b echoes pings (streams 2 and 3) and counts bulk
/// bytes; a drives the ping-pong.
struct Handlers {
    driver: Arc<std::sync::Mutex<Option<Driver>>>,
    bulk_bytes: Arc<AtomicU64>,
    /// Throughput cases: bulk bytes at which b's handler reports the end.
    bulk_target: Arc<AtomicU64>,
    bulk_done: Arc<std::sync::Mutex<Option<crossbeam_channel::Sender<Instant>>>>,
}

impl Handlers {
    fn install(pair: &Pair) -> Result<Handlers, String> {
        let driver: Arc<std::sync::Mutex<Option<Driver>>> = Arc::default();
        let bulk_bytes = Arc::new(AtomicU64::new(0));
        let bulk_target = Arc::new(AtomicU64::new(u64::MAX));
        let bulk_done: Arc<std::sync::Mutex<Option<crossbeam_channel::Sender<Instant>>>> = Arc::default();
        {
            let (bulk_bytes, bulk_target, bulk_done) = (bulk_bytes.clone(), bulk_target.clone(), bulk_done.clone());
            pair.b
                .set_handler(move |handle, m| {
                    let echoed = match m.stream_id {
                        2 => handle.send(&m.from, 2, m.data),
                        3 => handle.send_urgent(&m.from, 3, m.data),
                        _ => {
                            let len = m.data.len() as u64;
                            let total = bulk_bytes.fetch_add(len, Ordering::Relaxed) + len;
                            if total >= bulk_target.load(Ordering::Acquire)
                                && let Ok(mut done) = bulk_done.lock()
                                && let Some(done) = done.take()
                            {
                                let _ = done.send(Instant::now());
                            }
                            Ok(())
                        }
                    };
                    if let Err(e) = echoed {
                        eprintln!("# echo handler: {e}");
                    }
                })
                .map_err(|e| e.to_string())?;
        }
        {
            let driver = driver.clone();
            pair.a
                .set_handler(move |handle, m| {
                    if m.stream_id != 2 && m.stream_id != 3 {
                        return;
                    }
                    let Ok(mut slot) = driver.lock() else { return };
                    let Some(d) = slot.as_mut() else { return };
                    if d.warmup_left > 0 {
                        d.warmup_left -= 1;
                    } else {
                        let _ = d.hist.record(d.started.elapsed().as_nanos() as u64);
                    }
                    d.left -= 1;
                    if d.left == 0 {
                        if let Some(d) = slot.take() {
                            let _ = d.done.send(Ok(d.hist));
                        }
                        return;
                    }
                    d.started = Instant::now();
                    let sent = if d.urgent {
                        handle.send_urgent(PEER_B, d.stream, m.data)
                    } else {
                        handle.send(PEER_B, d.stream, m.data)
                    };
                    if let Err(e) = sent
                        && let Some(d) = slot.take()
                    {
                        let _ = d.done.send(Err(format!("ping from the handler: {e}")));
                    }
                })
                .map_err(|e| e.to_string())?;
        }
        Ok(Handlers {
            driver,
            bulk_bytes,
            bulk_target,
            bulk_done,
        })
    }

    /// `trips` round trips (after a tenth as many warm-up ones), the first
    /// ping sent from this thread, every later one from a's handler.
    fn ping(&self, pair: &Pair, trips: usize, stream: i64, urgent: bool) -> Result<Histogram<u64>, String> {
        let (done, finished) = crossbeam_channel::bounded(1);
        let warmup = (trips / 10).max(10);
        *self.driver.lock().map_err(|_| "driver lock")? = Some(Driver {
            hist: histogram(),
            started: Instant::now(),
            left: trips + warmup,
            warmup_left: warmup,
            stream,
            urgent,
            done,
        });
        send(&pair.a, PEER_B, stream, &static_payload(0x11u8, PING), urgent);
        finished
            .recv_timeout(Duration::from_secs(120))
            .map_err(|_| "the handler ping-pong stalled".to_string())?
    }

    /// One-way messages from an application thread on a to b's handler for
    /// `period` (stream 1): (messages, messages/s from the first send to the
    /// handler's last count).
    fn throughput(&self, pair: &Pair, payload: usize, period: Duration) -> Result<(u64, f64), String> {
        let (done, finished) = crossbeam_channel::bounded(1);
        let before = self.bulk_bytes.load(Ordering::Acquire);
        self.bulk_target.store(u64::MAX, Ordering::Release);
        *self.bulk_done.lock().map_err(|_| "bulk lock")? = Some(done);
        let (started, sent) = send_for(pair.a.clone(), payload, period, 1)?;
        let target = before + sent * payload as u64;
        self.bulk_target.store(target, Ordering::Release);
        // The handler may have counted the last message before the target
        // was set.
        if self.bulk_bytes.load(Ordering::Acquire) >= target
            && let Some(done) = self.bulk_done.lock().map_err(|_| "bulk lock")?.take()
        {
            let _ = done.send(Instant::now());
        }
        let ended = finished.recv_timeout(Duration::from_secs(30)).map_err(|_| {
            format!(
                "{} of {sent} messages arrived",
                (self.bulk_bytes.load(Ordering::Acquire) - before) / payload.max(1) as u64
            )
        })?;
        Ok((sent, sent as f64 / (ended - started).as_secs_f64()))
    }

    fn under_bulk(
        &self,
        pair: &Pair,
        trips: usize,
        class: &'static str,
        rate_mb: f64,
    ) -> Result<(Histogram<u64>, f64), String> {
        let bulk_stop = Arc::new(AtomicBool::new(class == "idle"));
        let before = self.bulk_bytes.load(Ordering::Relaxed);
        let started = Instant::now();
        let bulk = bulk_sender(pair.a.clone(), bulk_stop.clone(), rate_mb);
        if class != "idle" {
            thread::sleep(Duration::from_millis(200));
        }
        let latency = class == "latency";
        let hist = self.ping(pair, trips, if latency { 3 } else { 2 }, latency);
        bulk_stop.store(true, Ordering::Release);
        bulk.join().map_err(|_| "bulk sender panicked")?;
        thread::sleep(Duration::from_millis(300));
        let bytes = self.bulk_bytes.load(Ordering::Relaxed) - before;
        Ok((hist?, bytes as f64 / started.elapsed().as_secs_f64() / 1e6))
    }
}

/// The raw baselines of a throughput case, measured now with its message
/// count: (bare sockets' msgs/s, messages they lost, the same with the
/// frame hash).
fn raw_baselines(transport: &str, payload: usize, messages: u64) -> (f64, u64, Option<f64>) {
    let (base, lost) = isolated({
        let transport = transport.to_string();
        move || baseline_throughput(&transport, payload, messages)
    });
    let hashed = isolated({
        let transport = transport.to_string();
        move || hashed_baseline_throughput(&transport, payload, messages)
    });
    (base, lost, hashed)
}

impl<'a> Throughput<'a> {
    /// A throughput row: `(payload, messages, msgs/s)` beside
    /// [`raw_baselines`].
    fn of(
        transport: &'a str,
        api: &'static str,
        spin_us: u64,
        e2e: bool,
        (payload, messages, ours): (usize, u64, f64),
        (base, lost, hashed): (f64, u64, Option<f64>),
    ) -> Self {
        Throughput {
            kind: "throughput",
            transport,
            api,
            spin_us,
            e2e,
            payload,
            messages,
            msgs_per_sec: ours,
            mb_per_sec: ours * payload as f64 / 1e6,
            baseline_msgs_per_sec: base,
            baseline_mb_per_sec: base * payload as f64 / 1e6,
            baseline_lost: lost,
            ratio: ours / base,
            hashed_baseline_msgs_per_sec: hashed,
        }
    }
}

impl<'a> Rtt<'a> {
    /// A ping-pong row from its histogram and the raw one of the same run.
    fn of(
        transport: &'a str,
        api: &'static str,
        spin_us: u64,
        e2e: bool,
        round_trips: usize,
        ours: &Histogram<u64>,
        base: &Histogram<u64>,
    ) -> Self {
        Rtt {
            kind: "rtt",
            transport,
            api,
            spin_us,
            e2e,
            payload: PING,
            round_trips,
            rtt_p50_us: us(ours.value_at_quantile(0.5)),
            rtt_p99_us: us(ours.value_at_quantile(0.99)),
            rtt_max_us: us(ours.max()),
            baseline_rtt_p50_us: us(base.value_at_quantile(0.5)),
            baseline_rtt_p99_us: us(base.value_at_quantile(0.99)),
            handoff_rtt_p50_us: None,
            handoff_rtt_p99_us: None,
        }
    }

    /// With the hand-off baseline's figures.
    fn with_handoff(mut self, handoff: Option<&Histogram<u64>>) -> Self {
        self.handoff_rtt_p50_us = handoff.map(|h| us(h.value_at_quantile(0.5)));
        self.handoff_rtt_p99_us = handoff.map(|h| us(h.value_at_quantile(0.99)));
        self
    }
}

impl<'a> Class<'a> {
    /// A class row from its histogram.
    fn of(
        transport: &'a str,
        api: &'static str,
        spin_us: u64,
        class: &'static str,
        bulk_mb_per_sec: f64,
        round_trips: usize,
        hist: &Histogram<u64>,
    ) -> Self {
        Class {
            kind: "class",
            transport,
            api,
            spin_us,
            class,
            bulk_mb_per_sec,
            round_trips,
            rtt_p50_us: us(hist.value_at_quantile(0.5)),
            rtt_p99_us: us(hist.value_at_quantile(0.99)),
            rtt_max_us: us(hist.max()),
        }
    }
}

/// Runs a baseline on its own threads, so its core pinning stays there.
fn isolated<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    thread::spawn(f).join().expect("baseline thread")
}

fn print_json(value: &impl Serialize) {
    match serde_json::to_string(value) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("cannot print a result: {e}"),
    }
}

fn us(nanos: u64) -> f64 {
    (nanos as f64 / 1000.0 * 10.0).round() / 10.0
}

/// Two nodes, `bench-a` on core 0 and `bench-b` on core 1, connected over one
/// transport.
struct Pair {
    a: Arc<Node>,
    b: Arc<Node>,
    dir: Option<std::path::PathBuf>,
    /// Relay nodes between them (`--via-relay`).
    relays: Vec<Node>,
}

impl Pair {
    fn start(transport: &str, args: &BenchArgs, e2e: bool) -> Result<Pair, String> {
        let path_window = args.path_window;
        let tls = if e2e || transport == "quic" {
            let issued = libatbus::tls::issue("atbus-bench-ca", &[PEER_A.to_string(), PEER_B.to_string()])
                .map_err(|e| e.to_string())?;
            let streams = libatbus::tls::E2eStreams::Only([E2E_BULK, E2E_PING].into());
            let mut contexts = Vec::new();
            for name in [PEER_A, PEER_B] {
                contexts.push(issued.context(name, streams.clone()).map_err(|e| e.to_string())?);
            }
            contexts
        } else {
            Vec::new()
        };
        let tag = std::process::id();
        let dir = std::env::temp_dir().join(format!("atbus-bench-{tag}"));
        let (listen_a, listen_b, dir) = match transport {
            "tcp" => ("tcp://127.0.0.1:0".to_string(), "tcp://127.0.0.1:0".to_string(), None),
            "udp" => ("udp://127.0.0.1:0".to_string(), "udp://127.0.0.1:0".to_string(), None),
            "quic" => ("quic://127.0.0.1:0".to_string(), "quic://127.0.0.1:0".to_string(), None),
            "unix" => {
                std::fs::create_dir_all(&dir).expect("socket directory");
                (
                    format!("unix://{}", dir.join("a.sock").display()),
                    format!("unix://{}", dir.join("b.sock").display()),
                    Some(dir),
                )
            }
            "mem" => (format!("mem://bench-a-{tag}"), format!("mem://bench-b-{tag}"), None),
            other => return Err(format!("unknown transport {other}")),
        };
        let node = |name: &str, listen: &str, core: usize| -> Result<Arc<Node>, String> {
            let mut config = NodeConfig::new(name, &[listen]).map_err(|e| e.to_string())?;
            config.runtime.first_core = core;
            if args.spin_us > 0 {
                config.runtime.spin_before_park = Some(Duration::from_micros(args.spin_us));
            }
            config.runtime.adaptive_spin =
                (args.adaptive_spin_us > 0).then(|| Duration::from_micros(args.adaptive_spin_us));
            config.tls = tls.get(core).cloned();
            if let Some(window) = path_window {
                config.stream.path_window = window;
            }
            Node::start(config).map(Arc::new).map_err(|e| e.to_string())
        };
        let a = node(PEER_A, &listen_a, 0)?;
        let b = node(PEER_B, &listen_b, 1)?;
        a.add_route(PEER_B, b.listen_addresses()[0].clone())
            .map_err(|e| e.to_string())?;
        if transport == "mem" {
            b.add_route(PEER_A, a.listen_addresses()[0].clone())
                .map_err(|e| e.to_string())?;
        } else {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !b.connected_peers().iter().any(|p| p == PEER_A) {
                if Instant::now() > deadline {
                    return Err(format!("{transport}: the two nodes never connected"));
                }
                thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(Pair {
            a,
            b,
            dir,
            relays: Vec::new(),
        })
    }

    /// a and b in namespaces of their own, reachable only from a relay
    /// (`hops` = 1: one relay both use; 2: a's relay hands over to b's), on
    /// a discovery registry of their own.
    fn through_relays(hops: u8, path_window: Option<usize>) -> Result<Pair, String> {
        use libatbus::discovery::{Gateway, Host, Match, MemoryDiscovery, Metadata, RelaySelector};
        let discovery = Arc::new(MemoryDiscovery::new());
        let meta = |namespace: &str, kind: &str| Metadata {
            namespace_name: namespace.into(),
            kind: kind.into(),
            ..Metadata::default()
        };
        let node = |name: &str, metadata: Metadata, rule: Option<Match>, relay: Option<&str>, core: Option<usize>| {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| e.to_string())?
                .port();
            let address = format!("tcp://127.0.0.1:{port}");
            let mut config = NodeConfig::new(name, &[&address]).map_err(|e| e.to_string())?;
            config.discovery = libatbus::node::DiscoverySource(discovery.clone());
            config.host = Some(Host {
                hostname: format!("bench-host-{name}"),
                pid: 1,
            });
            config.metadata = metadata;
            config.gateways = vec![Gateway {
                priority: 1,
                address: vec![address],
                r#match: rule,
            }];
            config.advertise_relay = relay.map(|r| RelaySelector {
                name: r.into(),
                metadata: None,
            });
            match core {
                Some(core) => config.runtime.first_core = core,
                None => config.runtime.pin = false,
            }
            config.relay.forward = core.is_none();
            if let Some(window) = path_window {
                config.stream.path_window = window;
            }
            Node::start(config).map_err(|e| e.to_string())
        };
        // One hop: a and b admit relays only; two: each admits its own
        // namespace only, where its relay is.
        let only = |namespace: &str| {
            Some(Match {
                host: None,
                metadata: Some(if hops == 1 {
                    meta("", "relay")
                } else {
                    meta(namespace, "")
                }),
            })
        };
        let (relay_a, relay_b) = if hops == 1 {
            ("bench-relay", "bench-relay")
        } else {
            ("bench-relay-a", "bench-relay-b")
        };
        let mut relays = vec![node(relay_a, meta("bench-na", "relay"), None, None, None)?];
        if hops == 2 {
            relays.push(node(relay_b, meta("bench-nb", "relay"), None, None, None)?);
        }
        let a = Arc::new(node(
            PEER_A,
            meta("bench-na", "app"),
            only("bench-na"),
            Some(relay_a),
            Some(0),
        )?);
        let b = Arc::new(node(
            PEER_B,
            meta("bench-nb", "app"),
            only("bench-nb"),
            Some(relay_b),
            Some(1),
        )?);
        // A first message makes the routes (and the tunnel) both ways.
        let deadline = Instant::now() + Duration::from_secs(10);
        for (from, to, peer) in [(&a, &b, PEER_B), (&b, &a, PEER_A)] {
            from.send(peer, 9, Bytes::from_static(b"hello"))
                .map_err(|e| e.to_string())?;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match to.recv_timeout(left) {
                    Some(m) if m.stream_id == 9 => break,
                    Some(_) => continue,
                    None => return Err("the nodes never met through the relays".into()),
                }
            }
        }
        let through: Vec<String> = a.connected_peers();
        eprintln!("# {PEER_A} is connected to {through:?}");
        Ok(Pair {
            a,
            b,
            dir: None,
            relays,
        })
    }

    /// One-way messages from a to b for `period`: (messages, messages/s,
    /// from the first send to the last receive).
    fn throughput(&self, payload: usize, period: Duration, stream: i64) -> Result<(u64, f64), String> {
        let total = Arc::new(AtomicU64::new(u64::MAX));
        let b = self.b.clone();
        let receiver = {
            let total = total.clone();
            thread::spawn(move || {
                pin(1);
                let mut received = 0u64;
                while received < total.load(Ordering::Acquire) {
                    if b.recv_timeout(Duration::from_millis(100)).is_some() {
                        received += 1;
                    } else if received < total.load(Ordering::Acquire) && total.load(Ordering::Acquire) != u64::MAX {
                        // Everything was sent; give stragglers 30 s.
                        if b.recv_timeout(Duration::from_secs(30)).is_none() {
                            return Err(format!(
                                "{received} of {} messages arrived",
                                total.load(Ordering::Acquire)
                            ));
                        }
                        received += 1;
                    }
                }
                Ok(Instant::now())
            })
        };
        let (started, sent) = send_for(self.a.clone(), payload, period, stream)?;
        total.store(sent, Ordering::Release);
        let done = receiver
            .join()
            .map_err(|_| "the receiving thread panicked".to_string())??;
        Ok((sent, sent as f64 / (done - started).as_secs_f64()))
    }

    /// 64 B round trips a → b → a on `stream`.
    fn ping_pong(&self, trips: usize, stream: i64) -> Histogram<u64> {
        let stop = Arc::new(AtomicBool::new(false));
        let echo = self.echo(stop.clone());
        let a = self.a.clone();
        let hist = thread::spawn(move || {
            pin(0);
            ping(&a, trips, stream, false)
        })
        .join()
        .expect("ping");
        stop.store(true, Ordering::Release);
        echo.join().expect("echo");
        hist
    }

    /// b's application: echoes pings (stream 2 with `send`, stream 3 with
    /// `send_urgent`), drops bulk (stream 1). Returns bulk bytes received.
    fn echo(&self, stop: Arc<AtomicBool>) -> thread::JoinHandle<(u64, Duration)> {
        let b = self.b.clone();
        thread::spawn(move || {
            pin(1);
            let started = Instant::now();
            let mut bulk = 0u64;
            while !stop.load(Ordering::Acquire) {
                let Some(Message { stream_id, data, .. }) = b.recv_timeout(Duration::from_millis(50)) else {
                    continue;
                };
                match stream_id {
                    2 | E2E_PING => send(&b, PEER_A, stream_id, &data, false),
                    3 => send(&b, PEER_A, 3, &data, true),
                    _ => bulk += data.len() as u64,
                }
            }
            (bulk, started.elapsed())
        })
    }

    /// The ping-pong while a bulk sender saturates a → b.
    fn under_bulk(&self, trips: usize, class: &'static str, rate_mb: f64) -> (Histogram<u64>, f64) {
        let stop = Arc::new(AtomicBool::new(false));
        let echo = self.echo(stop.clone());
        let bulk_stop = Arc::new(AtomicBool::new(class == "idle"));
        let bulk = bulk_sender(self.a.clone(), bulk_stop.clone(), rate_mb);
        if class != "idle" {
            thread::sleep(Duration::from_millis(200)); // let the bulk fill the way
        }
        let a = self.a.clone();
        let hist = thread::spawn(move || {
            pin(0);
            ping(&a, trips, if class == "latency" { 3 } else { 2 }, class == "latency")
        })
        .join()
        .expect("ping");
        bulk_stop.store(true, Ordering::Release);
        bulk.join().expect("bulk sender");
        // Let b drain what is in flight before the next case.
        thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Release);
        let (bytes, elapsed) = echo.join().expect("echo");
        (hist, bytes as f64 / elapsed.as_secs_f64() / 1e6)
    }

    fn stop(self) {
        self.a.stop(Duration::from_millis(200));
        self.b.stop(Duration::from_millis(200));
        for relay in &self.relays {
            relay.stop(Duration::from_millis(200));
        }
        if let Some(dir) = self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// a's bulk sender (pinned beside a): 16 KiB messages on stream 1 until
/// `stop`, paced to `rate_mb` MB/s when above 0.
fn bulk_sender(a: Arc<Node>, stop: Arc<AtomicBool>, rate_mb: f64) -> thread::JoinHandle<()> {
    let data = static_payload(0x5au8, BULK);
    thread::spawn(move || {
        pin(0);
        let started = Instant::now();
        let mut sent = 0f64;
        while !stop.load(Ordering::Acquire) {
            send(&a, PEER_B, 1, &data, false);
            sent += BULK as f64;
            if rate_mb > 0.0 {
                let due = Duration::from_secs_f64(sent / (rate_mb * 1e6));
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    thread::sleep(ahead);
                }
            }
        }
    })
}

/// a's application: sends `payload`-byte messages to b on `stream` for
/// `period` from a thread pinned to core 0. (when it started, messages sent)
fn send_for(a: Arc<Node>, payload: usize, period: Duration, stream: i64) -> Result<(Instant, u64), String> {
    let data = static_payload(0xa5u8, payload);
    thread::spawn(move || {
        pin(0);
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < period {
            for _ in 0..256 {
                send(&a, PEER_B, stream, &data, false);
            }
            sent += 256;
        }
        (started, sent)
    })
    .join()
    .map_err(|_| "the sending thread panicked".to_string())
}

/// Sends one message, waiting while the way is full. By reference: one
/// clone per attempt, as an application that keeps its buffer would.
fn send(node: &Node, peer: &str, stream: i64, data: &Bytes, urgent: bool) {
    loop {
        let since = node.writable_generation();
        let sent = if urgent {
            node.send_urgent(peer, stream, data.clone())
        } else {
            node.send(peer, stream, data.clone())
        };
        match sent {
            Ok(()) => return,
            Err(libatbus::node::SendError::WouldBlock { .. }) => {
                node.wait_writable(since, Duration::from_millis(10));
            }
            Err(e) => panic!("send to {peer}: {e}"),
        }
    }
}

fn ping(node: &Node, trips: usize, stream: i64, urgent: bool) -> Histogram<u64> {
    let mut hist = histogram();
    let data = static_payload(0x11u8, PING);
    let warmup = (trips / 10).max(10);
    for i in 0..trips + warmup {
        let started = Instant::now();
        send(node, PEER_B, stream, &data, urgent);
        loop {
            match node.recv_timeout(Duration::from_secs(10)) {
                Some(m) if m.stream_id == stream => break,
                Some(_) => continue,
                None => panic!("pong {i} never came"),
            }
        }
        if i >= warmup {
            let _ = hist.record(started.elapsed().as_nanos() as u64);
        }
    }
    hist
}
