//! The data plane between two processes: the test binary runs itself again as
//! the far node (`child_node`, driven by environment variables).
//!
//! - `*_two_processes`: 100 000 messages of random sizes each way, in order.
//! - `*_kill_and_restart`: the far process is killed (SIGKILL) and started
//!   again on the same address; the connection comes back by itself and
//!   what was sent while it was down arrives, in order, nothing lost.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libatbus::address::Address;
use libatbus::node::{Node, NodeConfig};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const MESSAGES: u64 = 100_000;
const PARENT: &str = "node-a";
const CHILD: &str = "node-b";

/// Message `seq`: its sequence number, then bytes derived from it.
fn payload(seq: u64, len: usize) -> Bytes {
    let mut data = Vec::with_capacity(len.max(8));
    data.extend_from_slice(&seq.to_le_bytes());
    data.extend((8..len).map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i) as u8));
    Bytes::from(data)
}

/// The sequence number of a message, after checking its body.
fn check(data: &[u8]) -> u64 {
    assert!(data.len() >= 8, "message too short");
    let seq = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    for (i, b) in data.iter().enumerate().skip(8) {
        assert_eq!(
            *b,
            (seq as usize).wrapping_mul(31).wrapping_add(i) as u8,
            "message {seq} corrupted at {i}"
        );
    }
    seq
}

fn send_all(node: &Node, peer: &str, seed: u64, range: std::ops::Range<u64>, max_len: usize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for seq in range {
        let len = rng.random_range(8..=max_len);
        node.send_blocking(peer, 1, payload(seq, len), Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{}: send {seq} to {peer}: {e}", node.name()));
    }
}

fn receive_all(node: &Node, from: &str, count: u64) {
    for expected in 0..count {
        let message = node
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{}: message {expected} never arrived", node.name()));
        assert_eq!(&*message.from, from);
        assert_eq!(check(&message.data), expected, "{}: out of order", node.name());
    }
}

fn wait_connected(node: &Node, peer: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.connected_peers().iter().any(|p| p == peer) {
        assert!(Instant::now() < deadline, "{} never saw {peer} connect", node.name());
        thread::sleep(Duration::from_millis(5));
    }
}

/// The far node, when run by a test below (otherwise it returns at once).
///
/// `ATBUS_CHILD_MODE=exchange`: sends and receives `MESSAGES` with the parent,
/// then stops gracefully. `ATBUS_CHILD_MODE=count`: prints `GOT <seq>` for every
/// message until killed. Either prints `LISTEN <address>` once it listens.
#[test]
fn child_node() {
    let (Ok(mode), Ok(listen)) = (std::env::var("ATBUS_CHILD_MODE"), std::env::var("ATBUS_CHILD_LISTEN")) else {
        return;
    };
    let max_len: usize = std::env::var("ATBUS_CHILD_MAX_LEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let mut config = NodeConfig::new(CHILD, &[listen.as_str()]).expect("child config");
    config.runtime.first_core = 1;
    let node = Arc::new(Node::start(config).expect("child node starts"));
    println!("LISTEN {}", node.listen_addresses()[0]);
    match mode.as_str() {
        "exchange" => {
            wait_connected(&node, PARENT);
            let sender = {
                let node = node.clone();
                thread::spawn(move || send_all(&node, PARENT, 2, 0..MESSAGES, max_len))
            };
            receive_all(&node, PARENT, MESSAGES);
            sender.join().expect("child sender");
            node.stop(Duration::from_secs(30));
            println!("DONE");
        }
        "count" => loop {
            if let Some(message) = node.recv_timeout(Duration::from_secs(60)) {
                println!("GOT {}", check(&message.data));
            }
        },
        other => panic!("unknown ATBUS_CHILD_MODE {other}"),
    }
}

/// A running child and the lines it prints.
struct ChildNode {
    child: Child,
    lines: Receiver<String>,
}

impl ChildNode {
    fn spawn(mode: &str, listen: &str, max_len: usize) -> ChildNode {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "child_node", "--nocapture", "--test-threads", "1"])
            .env("ATBUS_CHILD_MODE", mode)
            .env("ATBUS_CHILD_LISTEN", listen)
            .env("ATBUS_CHILD_MAX_LEN", max_len.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("child starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildNode { child, lines }
    }

    /// The next line starting with `prefix`, without it.
    fn expect_line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    // libtest may have printed `test child_node ... ` first.
                    if let Some(at) = line.find(prefix) {
                        return line[at + prefix.len()..].trim().to_string();
                    }
                }
                Err(e) => panic!("child printed no {prefix:?} line: {e}"),
            }
        }
    }

    fn kill(mut self) {
        self.child.kill().expect("SIGKILL the child");
        self.child.wait().expect("reap the child");
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parent_node(core: usize) -> Node {
    // The parent dials; its own listener is not used.
    let mut config = NodeConfig::new(PARENT, &["tcp://127.0.0.1:0"]).expect("parent config");
    config.runtime.first_core = core;
    Node::start(config).expect("parent node starts")
}

fn two_processes(listen: &str, max_len: usize) {
    let mut child = ChildNode::spawn("exchange", listen, max_len);
    let address: Address = child.expect_line("LISTEN ").parse().expect("child address");
    let node = Arc::new(parent_node(0));
    node.add_route(CHILD, address).expect("route");
    let started = Instant::now();
    let sender = {
        let node = node.clone();
        thread::spawn(move || send_all(&node, CHILD, 1, 0..MESSAGES, max_len))
    };
    receive_all(&node, CHILD, MESSAGES);
    sender.join().expect("parent sender");
    child.expect_line("DONE");
    let status = child.child.wait().expect("child exits");
    assert!(status.success(), "child failed: {status}");
    println!(
        "{listen}: 2 x {MESSAGES} messages between processes in {:?}",
        started.elapsed()
    );
    assert!(node.try_recv().is_none(), "no duplicates");
    assert_eq!(node.stats().bad_frames, 0);
    node.stop(Duration::from_secs(1));
}

#[test]
fn tcp_two_processes() {
    two_processes("tcp://127.0.0.1:0", 4096);
}

#[test]
fn unix_two_processes() {
    let path = std::env::temp_dir().join(format!("atbus-proc-{}.sock", std::process::id()));
    two_processes(&format!("unix://{}", path.display()), 4096);
    let _ = std::fs::remove_file(path);
}

#[test]
fn udp_two_processes() {
    two_processes("udp://127.0.0.1:0", 2048);
}

/// Sends `range`, then waits until the child printed the last of it; returns
/// every sequence number the child printed meanwhile.
fn collect_until(child: &ChildNode, last: u64) -> Vec<u64> {
    let mut got = Vec::new();
    loop {
        let seq: u64 = child.expect_line("GOT ").parse().expect("sequence number");
        got.push(seq);
        if seq == last {
            return got;
        }
    }
}

fn kill_and_restart(listen: &str) {
    const BATCH: u64 = 2_000;
    let first = ChildNode::spawn("count", listen, 512);
    let address: Address = first.expect_line("LISTEN ").parse().expect("child address");
    let node = parent_node(0);
    node.add_route(CHILD, address.clone()).expect("route");

    send_all(&node, CHILD, 1, 0..BATCH, 512);
    let got = collect_until(&first, BATCH - 1);
    assert_eq!(got, (0..BATCH).collect::<Vec<_>>(), "first child: in order, once");
    first.kill();

    // Sent while the far end is dead: queued, then delivered to its successor.
    send_all(&node, CHILD, 2, BATCH..2 * BATCH, 512);
    thread::sleep(Duration::from_millis(300)); // a few failed reconnects
    let established = node.stats().connections_established;
    let second = ChildNode::spawn("count", &address.to_string(), 512);
    assert_eq!(second.expect_line("LISTEN "), address.to_string());
    let got = collect_until(&second, 2 * BATCH - 1);
    // Whatever the first child had not acknowledged when it died comes again,
    // then everything sent while it was down, in order, with no gap.
    let start = got[0];
    assert!(start <= BATCH, "messages {BATCH}..{start} were lost");
    assert_eq!(
        got,
        (start..2 * BATCH).collect::<Vec<_>>(),
        "second child: in order, no gap"
    );
    assert!(node.stats().connections_established > established, "reconnected");
    assert!(node.connected_peers().iter().any(|p| p == CHILD));
    drop(second);
    node.stop(Duration::from_millis(100));
}

#[test]
fn tcp_kill_and_restart() {
    // A fixed port, so the successor listens where the first child did.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    kill_and_restart(&format!("tcp://127.0.0.1:{port}"));
}

#[test]
fn unix_kill_and_restart() {
    let path = std::env::temp_dir().join(format!("atbus-restart-{}.sock", std::process::id()));
    kill_and_restart(&format!("unix://{}", path.display()));
    let _ = std::fs::remove_file(path);
}

#[test]
fn udp_kill_and_restart() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    kill_and_restart(&format!("udp://127.0.0.1:{port}"));
}
