//! `atbus demo`: five nodes and a relay in this process on the embedded
//! discovery. Each node finds the next one by name, and routing picks the
//! way from their records:
//!
//! ```text
//!   alpha ──mem──► delta ──unix──► beta ──tcp──► gamma ──relay──► epsilon ──tcp──► alpha
//! ```
//!
//! alpha and delta advertise this process (mem); beta advertises another pid
//! on this host (a unix socket between them); gamma advertises another host
//! (tcp); epsilon sits in namespace `edge` and admits relays only, so gamma
//! reaches it through `relay` (an `atbus-relay` node, here in-process).
//! Every link carries paced bulk messages and a frame-sync ping each
//! millisecond on an urgent stream, echoed back; every second the demo prints
//! each link's rate and round-trip percentiles.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use libatbus::discovery::{Gateway, Host, Match, Metadata};
use libatbus::node::{Node, NodeConfig, RouteInfo, SendError};

/// `atbus demo` options.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<f64>,
    /// Bulk messages per second on each link (0: as fast as it goes).
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    /// Bytes per bulk message.
    #[arg(long, default_value_t = 256)]
    size: usize,
}

const BULK: i64 = 1;
const PING: i64 = 9;
const PONG: i64 = 10;

/// One directed link of the ring and what was measured on it.
struct Link {
    from: usize,
    to: usize,
    received: AtomicU64,
    rtt: Mutex<Histogram<u64>>,
}

fn histogram() -> Result<Histogram<u64>, String> {
    Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Runs the demo; results on stdout.
pub fn run(args: DemoArgs) -> Result<(), String> {
    if args.size < 16 || args.size > 1 << 20 {
        return Err(format!("--size {}: must be 16..=1048576", args.size));
    }
    let stop = super::interrupted();
    let tag = std::process::id();
    let dir = std::env::temp_dir().join(format!("atbus-demo-{tag}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let here = hostname();
    let pid = i64::from(tag);
    // name, advertised host (None: this process).
    let other_host = |suffix: &str, offset: i64| {
        Some(Host {
            hostname: format!("{here}-{suffix}.demo"),
            pid: pid + offset,
        })
    };
    let specs: [(&str, Option<Host>); 5] = [
        ("alpha", None),
        (
            "beta",
            Some(Host {
                hostname: here.clone(),
                pid: pid + 1,
            }),
        ),
        ("gamma", other_host("gamma", 2)),
        ("delta", None),
        ("epsilon", other_host("epsilon", 3)),
    ];
    let cores = core_affinity::get_core_ids().map_or(1, |c| c.len().max(1));
    let relay_kind = Metadata {
        kind: "relay".into(),
        ..Metadata::default()
    };
    // The relay: another host, open to everyone; it only forwards.
    let relay = {
        let mut config = NodeConfig::new("relay", &["tcp://127.0.0.1:0"]).map_err(|e| e.to_string())?;
        config.host = other_host("relay", 4);
        config.metadata = relay_kind.clone();
        config.relay.forward = true;
        config.runtime.pin = false;
        Node::start(config).map_err(|e| format!("relay: {e}"))?
    };
    let addresses: Vec<String> = relay.listen_addresses().iter().map(ToString::to_string).collect();
    println!("relay listens on {} (forwards)", addresses.join(", "));
    let mut nodes = Vec::new();
    for (i, (name, host)) in specs.into_iter().enumerate() {
        let unix = format!("unix://{}", dir.join(format!("{name}.sock")).display());
        let mut config = NodeConfig::new(name, &["tcp://127.0.0.1:0", &unix]).map_err(|e| e.to_string())?;
        config.runtime.first_core = i % cores;
        config.host = host;
        if name == "epsilon" {
            // Behind the relay: its gateway admits relays only.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| e.to_string())?
                .port();
            let address = format!("tcp://127.0.0.1:{port}");
            config.listen = vec![address.parse().map_err(|e| format!("{e}"))?];
            config.metadata = Metadata {
                namespace_name: "edge".into(),
                ..Metadata::default()
            };
            config.gateways = vec![Gateway {
                priority: 1,
                address: vec![address],
                r#match: Some(Match {
                    host: None,
                    metadata: Some(relay_kind.clone()),
                }),
            }];
            config.advertise_relay = Some(libatbus::discovery::RelaySelector {
                name: "relay".into(),
                metadata: None,
            });
        }
        let node = Node::start(config).map_err(|e| format!("{name}: {e}"))?;
        let addresses: Vec<String> = node.listen_addresses().iter().map(ToString::to_string).collect();
        println!("{name:>7} listens on {}", addresses.join(", "));
        nodes.push(Arc::new(node));
    }
    // alpha → delta → beta → gamma → epsilon → alpha (indices into `nodes`).
    let ring = [(0, 3), (3, 1), (1, 2), (2, 4), (4, 0)];
    let mut links = Vec::new();
    for (from, to) in ring {
        links.push(Arc::new(Link {
            from,
            to,
            received: AtomicU64::new(0),
            rtt: Mutex::new(histogram()?),
        }));
    }
    let links = Arc::new(links);
    let epoch = Instant::now();
    // Senders stop first; receivers go on until every node's data is
    // acknowledged, so that stopping the nodes drops nothing.
    let sending = Arc::new(AtomicBool::new(true));
    let receiving = Arc::new(AtomicBool::new(true));
    let mut senders = Vec::new();
    for link in links.iter() {
        let (sender, peer) = (nodes[link.from].clone(), nodes[link.to].name().to_string());
        let (sending, rate, size) = (sending.clone(), args.rate, args.size);
        senders.push(thread::spawn(move || {
            send_loop(&sender, &peer, &sending, rate, size, epoch)
        }));
    }
    let mut receivers = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        let (node, links, receiving) = (node.clone(), links.clone(), receiving.clone());
        let names: Vec<String> = specs_names();
        receivers.push(thread::spawn(move || {
            receive_loop(&node, index, &names, &links, &receiving, epoch)
        }));
    }

    let started = Instant::now();
    let mut last = Instant::now();
    let mut before: Vec<u64> = vec![0; links.len()];
    let limit = args.seconds.map(Duration::from_secs_f64);
    while !stop.load(Ordering::Acquire) && limit.is_none_or(|l| started.elapsed() < l) {
        thread::sleep(Duration::from_millis(50));
        if last.elapsed() < Duration::from_secs(1) {
            continue;
        }
        let window = last.elapsed().as_secs_f64();
        last = Instant::now();
        println!("--- {:.0} s", started.elapsed().as_secs_f64());
        for (i, link) in links.iter().enumerate() {
            let received = link.received.load(Ordering::Relaxed);
            let rate = (received - before[i]) as f64 / window;
            before[i] = received;
            let (from, to) = (&nodes[link.from], &nodes[link.to]);
            let via = describe(from.route_to(to.name()));
            let rtt = link.rtt.lock().map(|h| h.clone()).ok();
            let (p50, p99) = rtt
                .filter(|h| !h.is_empty())
                .map_or((0, 0), |h| (h.value_at_quantile(0.5), h.value_at_quantile(0.99)));
            println!(
                "{:>7} → {:<7} [{via:<5}] {rate:>9.0} msgs/s  total {received:>9}  rtt since start p50 {p50:>5} µs p99 {p99:>6} µs",
                from.name(),
                to.name()
            );
        }
    }
    sending.store(false, Ordering::Release);
    let mut failures = Vec::new();
    let mut join = |threads: Vec<thread::JoinHandle<Result<(), String>>>| {
        for t in threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e),
                Err(_) => failures.push("a demo thread panicked".to_string()),
            }
        }
    };
    join(senders);
    let unsent = drain(&nodes, DRAIN_TIMEOUT);
    receiving.store(false, Ordering::Release);
    join(receivers);
    match unsent {
        Ok(waited) => println!(
            "=== every message acknowledged {:.0} ms after the senders stopped",
            waited.as_secs_f64() * 1e3
        ),
        Err(busy) => failures.push(format!(
            "not drained {DRAIN_TIMEOUT:?} after the senders stopped: {}",
            busy.join("; ")
        )),
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total: u64 = links.iter().map(|l| l.received.load(Ordering::Relaxed)).sum();
    println!(
        "=== {total} messages in {elapsed:.1} s ({:.0} msgs/s over {} links)",
        total as f64 / elapsed,
        links.len()
    );
    for node in &nodes {
        let stats = node.stats();
        println!(
            "{:>7}: {} connections, {} messages received, {} bad frames",
            node.name(),
            stats.connections_established,
            stats.messages_received,
            stats.bad_frames
        );
        if stats.bad_frames > 0 {
            failures.push(format!("{}: {} bad frames", node.name(), stats.bad_frames));
        }
    }
    let relayed = relay.stats();
    println!(
        "  relay: {} frames forwarded, {} dropped",
        relayed.relayed_frames, relayed.relay_dropped
    );
    if relayed.relayed_frames == 0 {
        failures.push("nothing went through the relay".into());
    }
    for node in &nodes {
        node.stop(Duration::from_millis(500));
    }
    relay.stop(Duration::from_millis(200));
    let _ = std::fs::remove_dir_all(&dir);
    if total == 0 {
        failures.push("no message arrived".into());
    }
    match failures.first() {
        None => Ok(()),
        Some(first) => Err(first.clone()),
    }
}

fn specs_names() -> Vec<String> {
    ["alpha", "beta", "gamma", "delta", "epsilon"]
        .map(String::from)
        .to_vec()
}

fn describe(route: Option<RouteInfo>) -> String {
    match route {
        Some(RouteInfo::Mem) => "mem".into(),
        Some(RouteInfo::Dial(addresses)) => addresses.first().map_or("dial".into(), |a| {
            a.to_string().split("://").next().unwrap_or("?").to_string()
        }),
        Some(RouteInfo::Group(_)) => "group".into(),
        None => "-".into(),
    }
}

fn micros_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// How long the senders' last messages may take to be acknowledged.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until no node holds unacknowledged data or unsent messages (the
/// receivers still reading); how long that took, or what is still held.
fn drain(nodes: &[Arc<Node>], timeout: Duration) -> Result<Duration, Vec<String>> {
    let started = Instant::now();
    loop {
        let busy: Vec<String> = nodes
            .iter()
            .flat_map(|node| {
                node.unsafe_to_delete(Duration::from_millis(200))
                    .into_iter()
                    .map(move |why| format!("{}: {why}", node.name()))
            })
            .collect();
        if busy.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return Err(busy);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Bulk messages at `rate` per second, and a ping every millisecond.
fn send_loop(
    node: &Node,
    peer: &str,
    running: &AtomicBool,
    rate: u64,
    size: usize,
    epoch: Instant,
) -> Result<(), String> {
    let payload = Bytes::from(vec![0x42u8; size]);
    let started = Instant::now();
    let (mut sent, mut last_ping) = (0u64, Instant::now());
    while running.load(Ordering::Acquire) {
        if last_ping.elapsed() >= Duration::from_millis(1) {
            last_ping = Instant::now();
            let ping = Bytes::copy_from_slice(&micros_since(epoch).to_le_bytes());
            match node.send_urgent(peer, PING, ping) {
                Ok(()) | Err(SendError::WouldBlock { .. }) => {}
                Err(e) => return Err(format!("{} → {peer}: {e}", node.name())),
            }
        }
        if rate > 0 && sent as f64 >= started.elapsed().as_secs_f64() * rate as f64 {
            thread::sleep(Duration::from_micros(200));
            continue;
        }
        match node.send(peer, BULK, payload.clone()) {
            Ok(()) => sent += 1,
            Err(SendError::WouldBlock { .. }) => {
                let generation = node.writable_generation();
                node.wait_writable(generation, Duration::from_millis(1));
            }
            Err(e) => return Err(format!("{} → {peer}: {e}", node.name())),
        }
    }
    Ok(())
}

/// Counts bulk messages per link, echoes pings, records round trips.
fn receive_loop(
    node: &Node,
    index: usize,
    names: &[String],
    links: &[Arc<Link>],
    running: &AtomicBool,
    epoch: Instant,
) -> Result<(), String> {
    let link_from = |from: &str| {
        let from = names.iter().position(|n| n == from)?;
        links.iter().find(|l| l.from == from && l.to == index)
    };
    let link_to = |to: &str| {
        let to = names.iter().position(|n| n == to)?;
        links.iter().find(|l| l.from == index && l.to == to)
    };
    while running.load(Ordering::Acquire) {
        let Some(message) = node.recv_timeout(Duration::from_millis(50)) else {
            continue;
        };
        match message.stream_id {
            BULK => {
                if let Some(link) = link_from(&message.from) {
                    link.received.fetch_add(1, Ordering::Relaxed);
                }
            }
            PING => match node.send_urgent(&message.from, PONG, message.data) {
                Ok(()) | Err(SendError::WouldBlock { .. }) => {}
                Err(e) => return Err(format!("{} → {}: {e}", node.name(), message.from)),
            },
            PONG => {
                let Ok(sent) = <[u8; 8]>::try_from(message.data.as_ref()) else {
                    continue;
                };
                let rtt = micros_since(epoch).saturating_sub(u64::from_le_bytes(sent)).max(1);
                if let Some(link) = link_to(&message.from)
                    && let Ok(mut hist) = link.rtt.lock()
                {
                    let _ = hist.record(rtt);
                }
            }
            _ => {}
        }
    }
    Ok(())
}
