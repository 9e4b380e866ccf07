//! `atbus-relay --config relay.yaml`: the relay service. A node like any
//! other (same YAML file, same discovery, tokens, admin endpoint) that also
//! passes on frames addressed to other nodes (`relay.forward`, forced on
//! here), without reading their streams. Runs until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use libatbus::node::{Node, NodeConfig};

#[derive(Parser, Debug)]
#[command(
    name = "atbus-relay",
    version,
    about = "libatbus-rs relay: forwards bus traffic between nodes that cannot reach each other"
)]
struct Cli {
    /// The relay's YAML config (the node file format; `relay.forward` is
    /// implied).
    #[arg(long)]
    config: PathBuf,
    /// Seconds between status lines on stdout (0: none).
    #[arg(long, default_value_t = 5)]
    status_every: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    libatbus::node::init_logging(Some(&cli.config));
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("atbus-relay: {reason}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Release))
            .map_err(|e| format!("cannot catch SIGINT/SIGTERM: {e}"))?;
    }
    let mut config = NodeConfig::from_yaml_file(&cli.config).map_err(|e| e.to_string())?;
    config.relay.forward = true;
    let node = Node::start(config).map_err(|e| e.to_string())?;
    let addresses: Vec<String> = node.listen_addresses().iter().map(ToString::to_string).collect();
    // Tests and scripts wait for this line.
    eprintln!("# relay {} listening on {}", node.name(), addresses.join(", "));
    let every = Duration::from_secs(cli.status_every);
    let mut last = Instant::now();
    let mut last_frames = 0u64;
    while !stop.load(Ordering::Acquire) {
        // A relay's own messages (none expected) are taken and dropped, so
        // they never fill its queue.
        let _ = node.recv_timeout(Duration::from_millis(100));
        while let Some(report) = node.recv_undelivered(Duration::ZERO) {
            eprintln!(
                "# {} message(s) to {} dropped: {}",
                report.messages, report.to, report.reason
            );
        }
        if !every.is_zero() && last.elapsed() >= every {
            let stats = node.stats();
            let rate = (stats.relayed_frames - last_frames) as f64 / last.elapsed().as_secs_f64();
            println!(
                "{}: {} frames forwarded ({rate:.0}/s), {} dropped; peers: {}",
                node.name(),
                stats.relayed_frames,
                stats.relay_dropped,
                node.connected_peers().join(", ")
            );
            last_frames = stats.relayed_frames;
            last = Instant::now();
        }
    }
    eprintln!("# stopping");
    node.stop(Duration::from_secs(2));
    Ok(())
}
