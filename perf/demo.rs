//! A small bus in one process: three nodes on tcp, unix and mem exchange
//! messages in a ring (each sends to the next, on two streams, one of them
//! urgent) and print what arrived. Routes are given by hand until the node
//! reads discovery (the `atbus` binary of the node issue).
//!
//! Run: `scripts/demo.sh` (or `cargo run --release --example demo`).

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libatbus::node::{Node, NodeConfig};

const MESSAGES: u64 = 50_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tag = std::process::id();
    let dir = std::env::temp_dir().join(format!("atbus-demo-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let listen = [
        ("alpha", "tcp://127.0.0.1:0".to_string()),
        ("beta", format!("unix://{}", dir.join("beta.sock").display())),
        ("gamma", format!("mem://gamma-{tag}")),
    ];
    let mut nodes = Vec::new();
    for (i, (name, address)) in listen.iter().enumerate() {
        let mut config = NodeConfig::new(name, &[address.as_str()])?;
        config.runtime.first_core = i;
        let node = Arc::new(Node::start(config)?);
        println!("{name} listens on {}", node.listen_addresses()[0]);
        nodes.push(node);
    }
    // alpha → beta over unix, beta → gamma in memory, gamma → alpha over tcp.
    let ring = [(0, 1), (1, 2), (2, 0)];
    for (from, to) in ring {
        nodes[from].add_route(nodes[to].name(), nodes[to].listen_addresses()[0].clone())?;
    }

    let started = Instant::now();
    let mut threads = Vec::new();
    for (from, to) in ring {
        let (sender, peer) = (nodes[from].clone(), nodes[to].name().to_string());
        threads.push(thread::spawn(move || -> Result<(), String> {
            for seq in 0..MESSAGES {
                let data = Bytes::from(format!("{} #{seq}", sender.name()));
                let sent = if seq % 100 == 0 {
                    // Every hundredth: a frame-sync tick on its urgent stream.
                    sender.send_urgent(&peer, 2, data)
                } else {
                    sender.send_blocking(&peer, 1, data, Duration::from_secs(10))
                };
                sent.map_err(|e| format!("{} → {peer}: {e}", sender.name()))?;
            }
            Ok(())
        }));
    }
    let mut receivers = Vec::new();
    for node in &nodes {
        let node = node.clone();
        receivers.push(thread::spawn(move || {
            let (mut bulk, mut ticks, mut last) = (0u64, 0u64, String::new());
            while bulk + ticks < MESSAGES {
                let Some(message) = node.recv_timeout(Duration::from_secs(10)) else {
                    break;
                };
                if message.stream_id == 2 {
                    ticks += 1;
                } else {
                    bulk += 1;
                }
                last = String::from_utf8_lossy(&message.data).into_owned();
            }
            (node.name().to_string(), bulk, ticks, last)
        }));
    }
    for t in threads {
        t.join().map_err(|_| "sender panicked")??;
    }
    let mut ok = true;
    for r in receivers {
        let (name, bulk, ticks, last) = r.join().map_err(|_| "receiver panicked")?;
        println!("{name}: {bulk} messages + {ticks} urgent ticks, last {last:?}");
        ok &= bulk + ticks == MESSAGES;
    }
    let elapsed = started.elapsed();
    println!(
        "{} messages in {elapsed:.2?} ({:.0} msgs/s)",
        3 * MESSAGES,
        (3 * MESSAGES) as f64 / elapsed.as_secs_f64()
    );
    for node in &nodes {
        let stats = node.stats();
        println!(
            "{}: {} connections, {} received, {} bad frames",
            node.name(),
            stats.connections_established,
            stats.messages_received,
            stats.bad_frames
        );
        node.stop(Duration::from_millis(500));
    }
    let _ = std::fs::remove_dir_all(dir);
    if ok { Ok(()) } else { Err("messages missing".into()) }
}
