//! `atbus-baseline`: the "physical limit" column of perf/RESULTS.md. The
//! same work as `atbus bench` over bare sockets, no bus: one sender thread
//! (core 0) streams N-byte messages with a 4-byte length prefix to one
//! receiver thread (core 1), writing as much at once as the bus does (its
//! default write batch: 64 KiB on tcp, 256 KiB on unix) and reading through
//! 256 KiB buffers, and a 64 B ping-pong
//! between two pinned threads. Blocking sockets; tcp, unix, udp (one
//! datagram per message, no resend) and mem (a channel of `Bytes`).
//!
//! Prints one JSON object per line, like `atbus bench`:
//! `{"kind":"baseline_throughput",...}` and `{"kind":"baseline_rtt",...}`.

use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;

#[path = "raw.rs"]
mod raw;

#[derive(Parser, Debug)]
#[command(name = "atbus-baseline", about = "raw-socket baseline of atbus bench (no bus)")]
struct Args {
    /// Transports (repeatable).
    #[arg(long = "transport", value_parser = ["tcp", "unix", "udp", "mem"], default_values_t = ["tcp".to_string(), "unix".to_string()])]
    transports: Vec<String>,
    /// Payload sizes in bytes (repeatable).
    #[arg(long = "size", default_values_t = [8usize, 64, 548, 1024, 16384])]
    sizes: Vec<usize>,
    /// Seconds each throughput case runs for (about).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Ping-pong round trips.
    #[arg(long, default_value_t = 20_000)]
    round_trips: usize,
}

#[derive(Serialize)]
struct Throughput<'a> {
    kind: &'static str,
    transport: &'a str,
    payload: usize,
    messages: u64,
    msgs_per_sec: f64,
    mb_per_sec: f64,
    lost: u64,
}

#[derive(Serialize)]
struct Rtt<'a> {
    kind: &'static str,
    transport: &'a str,
    payload: usize,
    round_trips: usize,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    rtt_max_us: f64,
}

fn us(nanos: u64) -> f64 {
    (nanos as f64 / 100.0).round() / 10.0
}

fn print(value: &impl Serialize) {
    match serde_json::to_string(value) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("cannot print a result: {e}"),
    }
}

fn main() {
    let args = Args::parse();
    if !(args.seconds > 0.0 && args.seconds.is_finite()) || args.sizes.iter().any(|&s| s == 0 || s > 1 << 20) {
        eprintln!("atbus-baseline: --seconds must be above 0 and --size 1..=1048576");
        std::process::exit(2);
    }
    for transport in &args.transports {
        for &payload in &args.sizes {
            // Calibrate on a short run, then move about `seconds` worth.
            let probe = 20_000u64;
            let started = Instant::now();
            let _ = run_isolated(transport, payload, probe);
            let rate = probe as f64 / started.elapsed().max(Duration::from_micros(1)).as_secs_f64();
            let messages = ((rate * args.seconds) as u64).clamp(probe, 200_000_000);
            let (msgs_per_sec, lost) = run_isolated(transport, payload, messages);
            print(&Throughput {
                kind: "baseline_throughput",
                transport,
                payload,
                messages,
                msgs_per_sec,
                mb_per_sec: msgs_per_sec * payload as f64 / 1e6,
                lost,
            });
        }
        let trips = args.round_trips;
        let hist = {
            let transport = transport.clone();
            std::thread::spawn(move || raw::baseline_rtt(&transport, trips))
                .join()
                .unwrap_or_else(|_| raw::histogram())
        };
        print(&Rtt {
            kind: "baseline_rtt",
            transport,
            payload: raw::PING,
            round_trips: trips,
            rtt_p50_us: us(hist.value_at_quantile(0.5)),
            rtt_p99_us: us(hist.value_at_quantile(0.99)),
            rtt_max_us: us(hist.max()),
        });
    }
}

/// One throughput case on threads of its own (their pinning stays there).
fn run_isolated(transport: &str, payload: usize, messages: u64) -> (f64, u64) {
    let transport = transport.to_string();
    std::thread::spawn(move || raw::baseline_throughput(&transport, payload, messages))
        .join()
        .unwrap_or((0.0, messages))
}
