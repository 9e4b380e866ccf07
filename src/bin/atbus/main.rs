//! `atbus`: run nodes, send and receive, ping, and benchmark the bus.
//!
//! ```text
//! atbus demo [--seconds N]                 several nodes in one process
//! atbus node --config node.yaml            a node that echoes pings
//! atbus send --config F --to NAME [--stream N] [--count K] [--size S]
//! atbus recv --config F [--count K]
//! atbus ping --config F --to NAME [--count K]
//! atbus bench [--transport T] [--size S] [--seconds T] [--pingpong]
//! ```
//!
//! Exit codes: 0 success, 1 failure (one line on stderr says why), 2 bad
//! usage.

mod bench;
mod demo;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use libatbus::node::{Node, NodeConfig};

/// Stream on which `atbus node` answers: a message there comes back as is.
pub const ECHO_STREAM: i64 = 0x7fff_0000;
/// Stream of the answers.
pub const ECHO_REPLY_STREAM: i64 = 0x7fff_0001;

#[derive(Parser, Debug)]
#[command(
    name = "atbus",
    version,
    about = "libatbus-rs: a message bus for latency-critical servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Several nodes in this process, on the embedded discovery, exchanging
    /// messages over mem, unix and tcp; live rates and RTT percentiles.
    Demo(demo::DemoArgs),
    /// Runs a node from a YAML config; it echoes messages sent to its echo
    /// stream (what `atbus ping` uses) and reports what it receives.
    Node {
        /// The node's YAML config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Sends messages to a node or group by name.
    Send {
        /// The sending node's YAML config.
        #[arg(long)]
        config: PathBuf,
        /// Target node or group name.
        #[arg(long)]
        to: String,
        /// Stream id (0 and up).
        #[arg(long, default_value_t = 0)]
        stream: i64,
        /// Messages to send.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Bytes per message.
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Receives and counts messages.
    Recv {
        /// The node's YAML config.
        #[arg(long)]
        config: PathBuf,
        /// Stop after this many messages (default: until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Round trips to a node running `atbus node`.
    Ping {
        /// The pinging node's YAML config.
        #[arg(long)]
        config: PathBuf,
        /// Target node name.
        #[arg(long)]
        to: String,
        /// Pings to send.
        #[arg(long, default_value_t = 10)]
        count: u64,
        /// Pause between pings, in milliseconds.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
    /// The data-plane benchmark: two pinned nodes, one connection, beside a
    /// raw-socket baseline measured in the same run. One JSON object per case.
    Bench(bench::BenchArgs),
    /// Makes a CA and a certificate per node name for end-to-end
    /// encryption: <out>/ca.pem, <out>/<name>.pem, <out>/<name>.key. The
    /// CA's key is not kept: run it again with every name to add a node.
    Cert {
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
        /// Node names (repeatable).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// The CA's common name.
        #[arg(long, default_value = "atbus-ca")]
        ca_name: String,
    },
    /// Client tokens for untrusted networks.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Live view of a running node from its admin endpoint (`/stats`):
    /// message and byte rates, loss, RTT mean and percentiles, per node and
    /// per connection.
    Stats {
        /// The node's admin endpoint, host:port.
        #[arg(long)]
        admin: String,
        /// Window shown: 1, 5, 15 or 60 seconds.
        #[arg(long, default_value_t = 5)]
        window: u64,
        /// Refreshes (0: until Ctrl-C).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Asks a running server node (its admin endpoint, `admin:` in its
    /// config) to allocate a client: name, stream id and token, registered
    /// in its discovery. Prints the grant (JSON) and the client's YAML keys.
    Issue {
        /// The server's admin endpoint, host:port.
        #[arg(long)]
        admin: String,
        /// The one stream the client may use.
        #[arg(long)]
        stream: i64,
        /// Seconds the grant is valid.
        #[arg(long, default_value_t = 3600)]
        ttl_s: u64,
        /// The client's name (default: a random `client-…`).
        #[arg(long)]
        name: Option<String>,
        /// The client's relays: nodes whose metadata `kind` is this.
        #[arg(long)]
        relay_kind: Option<String>,
    },
}

fn run_stats(admin: &str, window: u64, count: u64) -> Result<(), String> {
    use libatbus::node::metrics::WINDOWS_S;
    if !WINDOWS_S.contains(&window) {
        return Err(format!("--window {window}: one of {WINDOWS_S:?}"));
    }
    #[derive(serde::Deserialize)]
    struct Report {
        node: String,
        totals: serde_json::Value,
        windows: Vec<serde_json::Value>,
        connections: Vec<serde_json::Value>,
    }
    let stop = interrupted();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let url = format!("http://{admin}/stats");
    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let ms = |v: &serde_json::Value, k: &str| v[k].as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
    let mut shown = 0u64;
    while !stop.load(Ordering::Acquire) && (count == 0 || shown < count) {
        let mut response = agent.get(&url).call().map_err(|e| format!("{url}: {e}"))?;
        let status = response.status();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("{url}: {e}"))?;
        if status.as_u16() == 503 {
            eprintln!("# {}", body.trim());
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        if !status.is_success() {
            return Err(format!("{url}: {status}: {}", body.trim()));
        }
        let report: Report = serde_json::from_str(&body).map_err(|e| format!("{url}: unexpected answer: {e}"))?;
        let pick = |windows: &[serde_json::Value]| {
            windows
                .iter()
                .find(|w| w["window_s"].as_u64() == Some(window))
                .cloned()
                .unwrap_or_default()
        };
        let w = pick(&report.windows);
        println!(
            "{} (last {window} s): out {:.0} msgs/s {:.0} B/s, in {:.0} msgs/s {:.0} B/s, loss {:.2} %, rtt mean {} ms sd {} ms p50 {} p99 {} max {} ms; totals: {} sent, {} received",
            report.node,
            num(&w, "messages_sent_per_s"),
            num(&w, "bytes_sent_per_s"),
            num(&w, "messages_received_per_s"),
            num(&w, "bytes_received_per_s"),
            num(&w, "loss_rate") * 100.0,
            ms(&w, "rtt_mean_ms"),
            w["rtt_variance_ms2"]
                .as_f64()
                .map_or("-".to_string(), |v| format!("{:.2}", v.sqrt())),
            ms(&w, "rtt_p50_ms"),
            ms(&w, "rtt_p99_ms"),
            ms(&w, "rtt_max_ms"),
            report.totals["messages_sent"],
            report.totals["messages_received"],
        );
        for conn in &report.connections {
            let windows: Vec<serde_json::Value> = conn["windows"].as_array().cloned().unwrap_or_default();
            let w = pick(&windows);
            println!(
                "  {:<24} #{:<4} out {:>12.0} B/s {:>8.0} frames/s  in {:>12.0} B/s {:>8.0} frames/s  loss {:.2} %  rtt {} ms (srtt {} ms)",
                conn["peer"].as_str().unwrap_or("?"),
                conn["connection"],
                num(&w, "bytes_sent_per_s"),
                num(&w, "frames_sent_per_s"),
                num(&w, "bytes_received_per_s"),
                num(&w, "frames_received_per_s"),
                num(&w, "loss_rate") * 100.0,
                ms(&w, "rtt_mean_ms"),
                ms(conn, "smoothed_rtt_ms"),
            );
        }
        shown += 1;
        if count == 0 || shown < count {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    Ok(())
}

fn run_token_issue(
    admin: &str,
    stream: i64,
    ttl_s: u64,
    name: Option<&str>,
    relay_kind: Option<&str>,
) -> Result<(), String> {
    let mut url = format!("http://{admin}/clients?stream={stream}&ttl_s={ttl_s}");
    for (key, value) in [("name", name), ("relay_kind", relay_kind)] {
        if let Some(value) = value {
            if !value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
            {
                return Err(format!(
                    "--{}: {value:?} is not a node name or kind",
                    key.replace('_', "-")
                ));
            }
            url.push_str(&format!("&{key}={value}"));
        }
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut response = agent.post(&url).send_empty().map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("{url}: {e}"))?;
    if !status.is_success() {
        return Err(format!("{url}: {status}: {}", body.trim()));
    }
    let grant: libatbus::grant::ClientGrant =
        serde_json::from_str(&body).map_err(|e| format!("{url}: unexpected answer ({e}): {body}"))?;
    println!("{body}");
    eprintln!(
        "# the client's config: name: {}, client: true, auth: {{ tokens: [\"{}\"] }}; it may send to {} on stream {} until {} (Unix s)",
        grant.name, grant.token, grant.server, grant.stream_id, grant.expires
    );
    Ok(())
}

fn run_cert(out: &std::path::Path, names: &[String], ca_name: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let issued = libatbus::tls::issue(ca_name, names).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let write = |name: String, text: &str, mode: u32| -> Result<(), String> {
        let path = out.join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        file.write_all(text.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("{}", path.display());
        Ok(())
    };
    write("ca.pem".into(), &issued.ca_cert, 0o644)?;
    for (name, cert, key) in &issued.nodes {
        write(format!("{name}.pem"), cert, 0o644)?;
        write(format!("{name}.key"), key, 0o600)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A bug (or an exhausted machine: no socket, no thread) ends the run
    // with one line and exit code 1, like any other failure; set
    // RUST_BACKTRACE to see the backtrace instead.
    if std::env::var_os("RUST_BACKTRACE").is_none() {
        std::panic::set_hook(Box::new(|info| {
            eprintln!("atbus: internal error: {info}");
            std::process::exit(1);
        }));
    }
    // ATBUS_LOG, else the node config's `log`, else warn.
    let config = match &cli.command {
        Command::Node { config }
        | Command::Send { config, .. }
        | Command::Recv { config, .. }
        | Command::Ping { config, .. } => Some(config.clone()),
        _ => None,
    };
    libatbus::node::init_logging(config.as_deref());
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Node { config } => run_node(&config),
        Command::Send {
            config,
            to,
            stream,
            count,
            size,
        } => run_send(&config, &to, stream, count, size),
        Command::Recv { config, count } => run_recv(&config, count),
        Command::Ping {
            config,
            to,
            count,
            interval_ms,
        } => run_ping(&config, &to, count, Duration::from_millis(interval_ms)),
        Command::Bench(args) => bench::run(args),
        Command::Cert { out, names, ca_name } => run_cert(&out, &names, &ca_name),
        Command::Token(TokenCommand::Issue {
            admin,
            stream,
            ttl_s,
            name,
            relay_kind,
        }) => run_token_issue(&admin, stream, ttl_s, name.as_deref(), relay_kind.as_deref()),
        Command::Stats { admin, window, count } => run_stats(&admin, window, count),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("atbus: {reason}");
            ExitCode::FAILURE
        }
    }
}

/// Set by Ctrl-C (SIGINT) or SIGTERM.
pub fn interrupted() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let set = flag.clone();
        if let Err(e) = ctrlc::set_handler(move || set.store(true, Ordering::Release)) {
            eprintln!("atbus: cannot catch Ctrl-C ({e}); it will end the process at once");
        }
        flag
    })
    .clone()
}

fn start(config: &std::path::Path) -> Result<Node, String> {
    let config = NodeConfig::from_yaml_file(config).map_err(|e| e.to_string())?;
    let node = Node::start(config).map_err(|e| e.to_string())?;
    let addresses: Vec<String> = node.listen_addresses().iter().map(ToString::to_string).collect();
    eprintln!("# node {} listening on {}", node.name(), addresses.join(", "));
    Ok(node)
}

fn run_node(config: &std::path::Path) -> Result<(), String> {
    let stop = interrupted();
    let node = start(config)?;
    let (mut count, mut bytes, mut last) = (0u64, 0u64, Instant::now());
    while !stop.load(Ordering::Acquire) {
        if let Some(message) = node.recv_timeout(Duration::from_millis(100)) {
            if message.stream_id == ECHO_STREAM {
                if let Err(e) = node.send_urgent(&message.from, ECHO_REPLY_STREAM, message.data) {
                    eprintln!("# cannot answer {}: {e}", message.from);
                }
            } else {
                count += 1;
                bytes += message.data.len() as u64;
            }
        }
        while let Some(report) = node.recv_undelivered(Duration::ZERO) {
            eprintln!(
                "# {} message(s) to {} on stream {} dropped: {}",
                report.messages, report.to, report.stream_id, report.reason
            );
        }
        if last.elapsed() >= Duration::from_secs(1) {
            if count > 0 {
                println!(
                    "{}: {count} messages, {bytes} bytes in the last {:.1} s; peers: {}",
                    node.name(),
                    last.elapsed().as_secs_f64(),
                    node.connected_peers().join(", ")
                );
            }
            (count, bytes, last) = (0, 0, Instant::now());
        }
    }
    eprintln!("# stopping");
    node.stop(Duration::from_secs(2));
    Ok(())
}

fn run_send(config: &std::path::Path, to: &str, stream: i64, count: u64, size: usize) -> Result<(), String> {
    if size == 0 {
        return Err("--size must be at least 1".into());
    }
    let stop = interrupted();
    let node = start(config)?;
    let started = Instant::now();
    let mut progress = Instant::now();
    let mut sent = 0u64;
    while sent < count && !stop.load(Ordering::Acquire) {
        let mut data = vec![0u8; size];
        let seq = sent.to_le_bytes();
        let n = size.min(8);
        data[..n].copy_from_slice(&seq[..n]);
        node.send_blocking(to, stream, Bytes::from(data), Duration::from_secs(30))
            .map_err(|e| format!("message {sent} of {count}: {e}"))?;
        sent += 1;
        if progress.elapsed() >= Duration::from_secs(1) {
            eprintln!("# {sent} of {count} sent");
            progress = Instant::now();
        }
    }
    // Graceful stop waits (up to the linger) until the peer acknowledged all.
    node.stop(Duration::from_secs(10));
    let mut dropped = 0;
    while let Some(report) = node.recv_undelivered(Duration::ZERO) {
        dropped += report.messages;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "sent {sent} messages of {size} B to {to} on stream {stream} in {elapsed:.3} s ({:.0} msgs/s)",
        sent as f64 / elapsed
    );
    if dropped > 0 {
        return Err(format!("{dropped} message(s) reported undelivered"));
    }
    Ok(())
}

fn run_recv(config: &std::path::Path, count: Option<u64>) -> Result<(), String> {
    let stop = interrupted();
    let node = start(config)?;
    let (mut total, mut window, mut last) = (0u64, 0u64, Instant::now());
    while !stop.load(Ordering::Acquire) && count.is_none_or(|c| total < c) {
        if let Some(message) = node.recv_timeout(Duration::from_millis(100)) {
            total += 1;
            window += 1;
            if total == 1 {
                eprintln!(
                    "# first message from {} on stream {} ({} B)",
                    message.from,
                    message.stream_id,
                    message.data.len()
                );
            }
        }
        if last.elapsed() >= Duration::from_secs(1) {
            if window > 0 {
                println!(
                    "{total} received ({:.0} msgs/s)",
                    window as f64 / last.elapsed().as_secs_f64()
                );
            }
            (window, last) = (0, Instant::now());
        }
    }
    println!("{total} messages received");
    node.stop(Duration::from_secs(1));
    Ok(())
}

fn run_ping(config: &std::path::Path, to: &str, count: u64, interval: Duration) -> Result<(), String> {
    let stop = interrupted();
    let node = start(config)?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let mut lost = 0u64;
    for seq in 0..count {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let sent = Instant::now();
        node.send_urgent(to, ECHO_STREAM, Bytes::copy_from_slice(&seq.to_le_bytes()))
            .map_err(|e| format!("ping {seq}: {e}"))?;
        let deadline = sent + Duration::from_secs(2);
        let mut answered = false;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(message) = node.recv_timeout(left) else { break };
            if message.stream_id == ECHO_REPLY_STREAM
                && *message.from == *to
                && message.data.as_ref() == seq.to_le_bytes()
            {
                let rtt = sent.elapsed();
                let _ = hist.record(u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1));
                println!("reply from {to}: seq={seq} time={:.1} µs", rtt.as_secs_f64() * 1e6);
                answered = true;
                break;
            }
        }
        if !answered {
            println!("no reply from {to} for seq={seq} within 2 s");
            lost += 1;
        }
        std::thread::sleep(interval);
    }
    node.stop(Duration::from_millis(200));
    if hist.is_empty() {
        return Err(format!("no reply from {to} (is `atbus node` running there?)"));
    }
    println!(
        "{} replies, {lost} lost; rtt p50 {} µs, p99 {} µs, max {} µs",
        hist.len(),
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.max()
    );
    Ok(())
}
