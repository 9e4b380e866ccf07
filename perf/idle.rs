//! `atbus-idle`: memory of many idle connections to one node (the memory
//! target of perf/RESULTS.md). Starts a node (one shard) in this process,
//! opens `--connections` TCP connections to it, each completing a bus
//! handshake under a name of its own, waits until the node has them all,
//! and prints the process's resident memory before and after as one JSON
//! line. The clients are bare blocking sockets that send their handshake and
//! then nothing (their own memory is a socket each); the node is set to
//! ping rarely and wait long before closing a quiet connection, so that the
//! connections stay for the measurement.
//!
//! The clients run in a child process (this binary with `--client`), so
//! each process needs one descriptor per connection: `ulimit -n` at least
//! N + 100.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::Parser;
use libatbus::address::Address;
use libatbus::frame::Encoder;
use libatbus::node::{HANDSHAKE_STREAM, Node, NodeConfig};
use libatbus::proto::{AtbusPacketType, Body, Fragment, FrameMessage, HandshakeData, PacketContent, PacketData};
use prost::Message as _;

#[derive(Parser, Debug)]
#[command(name = "atbus-idle", about = "resident memory of N idle bus connections to one node")]
struct Args {
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Internal: be the client process, dialling this host:port.
    #[arg(long, hide = true)]
    client: Option<String>,
}

/// The client process: opens the connections, sends each a handshake, says
/// READY, and holds them until its stdin closes.
fn clients(target: &str, count: usize) -> ! {
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let mut socket = match TcpStream::connect(target) {
            Ok(socket) => socket,
            Err(e) => {
                eprintln!("atbus-idle: connection {i}: {e}");
                std::process::exit(1);
            }
        };
        if let Err(e) = socket.write_all(&hello(&format!("idle-{i}"), i as u64 + 1)) {
            eprintln!("atbus-idle: connection {i}: {e}");
            std::process::exit(1);
        }
        held.push(socket);
    }
    println!("READY");
    let _ = std::io::stdout().flush();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut rest);
    drop(held);
    std::process::exit(0);
}

/// Resident set size of this process, bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn open_files_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024)
}

fn hello(name: &str, incarnation: u64) -> BytesMut {
    let hello = HandshakeData {
        version: 3,
        minimal_version: 3,
        node_name: name.to_string(),
        incarnation,
        ..HandshakeData::default()
    };
    let content = PacketContent {
        fragment: vec![Fragment {
            packet_type: AtbusPacketType::Handshake as i32,
            data: Bytes::from(hello.encode_to_vec()),
            ..Default::default()
        }],
    };
    let frame = FrameMessage {
        head: None,
        body: Some(Body::Packet(PacketData {
            stream_id: HANDSHAKE_STREAM,
            content: Bytes::from(content.encode_to_vec()),
            ..Default::default()
        })),
    };
    let mut wire = BytesMut::new();
    if let Err(e) = Encoder::default().encode(&frame, &mut wire) {
        eprintln!("atbus-idle: cannot encode a handshake: {e}");
        std::process::exit(1);
    }
    wire
}

fn main() {
    let args = Args::parse();
    let needed = args.connections as u64 + 100;
    if open_files_limit() < needed {
        eprintln!(
            "atbus-idle: {} connections need {needed} open files per process; the limit is {} (raise it: ulimit -n {needed})",
            args.connections,
            open_files_limit()
        );
        std::process::exit(2);
    }
    if let Some(target) = &args.client {
        clients(target, args.connections);
    }
    let mut config = match NodeConfig::new("idle-server", &["tcp://127.0.0.1:0"]) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("atbus-idle: {e}");
            std::process::exit(1);
        }
    };
    config.ping_interval = Duration::from_secs(60);
    config.idle_timeout = Duration::from_secs(600);
    config.latency_path = false;
    let node = match Node::start(config) {
        Ok(node) => node,
        Err(e) => {
            eprintln!("atbus-idle: {e}");
            std::process::exit(1);
        }
    };
    let Some(Address::Tcp { host, port }) = node.listen_addresses().first().cloned() else {
        eprintln!("atbus-idle: the node did not listen on tcp");
        std::process::exit(1);
    };
    // Let the node settle before the first reading.
    std::thread::sleep(Duration::from_millis(300));
    let before = rss();
    let started = Instant::now();
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("atbus-idle: {e}");
            std::process::exit(1);
        }
    };
    let mut child = match std::process::Command::new(exe)
        .args([
            "--client",
            &format!("{host}:{port}"),
            "--connections",
            &args.connections.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("atbus-idle: cannot start the client process: {e}");
            std::process::exit(1);
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while node.stats().connections_established < args.connections as u64 {
        if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            eprintln!(
                "atbus-idle: only {} of {} connections established",
                node.stats().connections_established,
                args.connections
            );
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let opened = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let after = rss();
    let per = after.saturating_sub(before) as f64 / args.connections as f64;
    println!(
        "{{\"kind\":\"idle_connections\",\"connections\":{},\"rss_before_bytes\":{before},\"rss_after_bytes\":{after},\"rss_per_connection_bytes\":{per:.0},\"seconds_to_open\":{:.2}}}",
        args.connections,
        opened.as_secs_f64()
    );
    node.stop(Duration::ZERO);
    drop(child.stdin.take());
    let _ = child.wait();
}
