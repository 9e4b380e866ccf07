//! Nodes in two processes: the test binary runs itself again as the far node
//! (`child_node`, driven by environment variables and a YAML config file).
//!
//! - `*_two_processes`: the far node is found by name in a discovery file;
//!   100 000 messages of random sizes each way on 4 streams, in order per
//!   stream. A name nobody publishes fails with a clear error.
//! - `old_protocol_version_is_refused`: a peer below the minimal protocol
//!   version gets UNSUPPORTED_VERSION with a reason.
//! - `*_kill_and_restart`: the far process is killed (SIGKILL) and started
//!   again on the same address; the connection comes back by itself and
//!   what was sent while it was down arrives, in order, nothing lost.

mod peer;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libatbus::address::Address;
use libatbus::node::{Node, NodeConfig, SendError};
use libatbus::proto::AtbusCloseReason;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const MESSAGES: u64 = 100_000;
/// Streams the messages are spread over (message `seq` goes on `seq % 4`).
const STREAMS: u64 = 4;
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

/// Sends `range` to `peer`, message `seq` on stream `seq % streams`.
fn send_all(node: &Node, peer: &str, seed: u64, range: std::ops::Range<u64>, max_len: usize, streams: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for seq in range {
        let len = rng.random_range(8..=max_len);
        let stream = (seq % streams) as i64;
        node.send_blocking(peer, stream, payload(seq, len), Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{}: send {seq} to {peer}: {e}", node.name()));
    }
}

/// Receives `count` messages from `from`, checking order per stream.
fn receive_all(node: &Node, from: &str, count: u64, streams: u64) {
    let mut next: Vec<u64> = (0..streams).collect();
    for received in 0..count {
        let message = node
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{}: {received} of {count} messages arrived", node.name()));
        assert_eq!(&*message.from, from);
        let stream = usize::try_from(message.stream_id).expect("application stream");
        assert!(stream < streams as usize, "stream {stream} was never used");
        assert_eq!(
            check(&message.data),
            next[stream],
            "{}: stream {stream} out of order",
            node.name()
        );
        next[stream] += streams;
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
    let (Ok(mode), Ok(config)) = (std::env::var("ATBUS_CHILD_MODE"), std::env::var("ATBUS_CHILD_CONFIG")) else {
        return;
    };
    let max_len: usize = std::env::var("ATBUS_CHILD_MAX_LEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let parent = std::env::var("ATBUS_PARENT").unwrap_or_default();
    let config = NodeConfig::from_yaml_file(&config).expect("child config file");
    let node = Arc::new(Node::start(config).expect("child node starts"));
    println!("LISTEN {}", node.listen_addresses()[0]);
    match mode.as_str() {
        "exchange" => {
            wait_connected(&node, &parent);
            let sender = {
                let (node, parent) = (node.clone(), parent.clone());
                thread::spawn(move || send_all(&node, &parent, 2, 0..MESSAGES, max_len, STREAMS))
            };
            receive_all(&node, &parent, MESSAGES, STREAMS);
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

/// A scratch directory for one test's files.
fn scratch(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("atbus-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn write(path: &std::path::Path, text: &str) {
    let mut file = std::fs::File::create(path).expect("create");
    file.write_all(text.as_bytes()).expect("write");
}

/// The child's YAML config: its name, address and discovery.
fn child_config(dir: &std::path::Path, listen: &str, discovery: Option<&str>) -> std::path::PathBuf {
    let path = dir.join("node-b.yaml");
    let discovery = discovery.map_or("{ type: embedded }".to_string(), |file| {
        format!("{{ type: file, path: {file} }}")
    });
    write(
        &path,
        &format!(
            "name: {CHILD}\nlisten: {listen}\nfirst_core: 1\ndiscovery: {discovery}\nlimits: {{ max_message_len: 65536 }}\n"
        ),
    );
    path
}

impl ChildNode {
    fn spawn(mode: &str, config: &std::path::Path, parent: &str, max_len: usize) -> ChildNode {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "child_node", "--nocapture", "--test-threads", "1"])
            .env("ATBUS_CHILD_MODE", mode)
            .env("ATBUS_CHILD_CONFIG", config)
            .env("ATBUS_PARENT", parent)
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

fn parent_node(name: &str, core: usize, discovery: Option<&std::path::Path>) -> Node {
    // The parent dials; its own listener is not used.
    let mut config = NodeConfig::new(name, &["tcp://127.0.0.1:0"]).expect("parent config");
    config.runtime.first_core = core;
    if let Some(file) = discovery {
        let backend = libatbus::discovery::FileDiscovery::open(file).expect("discovery file");
        config.discovery = libatbus::node::DiscoverySource(Arc::new(backend));
    }
    Node::start(config).expect("parent node starts")
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string()
}

/// A free TCP or UDP port on loopback (bound and released).
fn free_port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr())
    } else {
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr())
    }
    .expect("a free port")
    .port()
}

/// Node A (this process) and node B (a child) find each other by name in a
/// discovery file and exchange `MESSAGES` each way on `STREAMS` streams.
fn two_processes(test: &str, listen: &str, max_len: usize) {
    let parent = format!("a-{test}");
    let dir = scratch(test);
    let discovery = dir.join("discovery.yaml");
    write(
        &discovery,
        &format!(
            "{CHILD}:\n  discovery:\n    name: {CHILD}\n    host: {{ hostname: {} }}\n    gateway:\n      - priority: 0\n        address: [\"{listen}\"]\n",
            hostname()
        ),
    );
    let mut child = ChildNode::spawn(
        "exchange",
        &child_config(&dir, listen, Some("discovery.yaml")),
        &parent,
        max_len,
    );
    child.expect_line("LISTEN ");
    let node = Arc::new(parent_node(&parent, 0, Some(&discovery)));

    // A name nobody publishes: refused at once, with the name in the reason.
    let err = node
        .send("nobody-here", 0, Bytes::from_static(b"x"))
        .expect_err("unknown name");
    assert!(matches!(err, SendError::UnknownPeer(_)), "{err:?}");
    assert!(err.to_string().contains("\"nobody-here\""), "{err}");
    assert!(err.to_string().contains("not in discovery"), "{err}");

    let started = Instant::now();
    let sender = {
        let node = node.clone();
        thread::spawn(move || send_all(&node, CHILD, 1, 0..MESSAGES, max_len, STREAMS))
    };
    receive_all(&node, CHILD, MESSAGES, STREAMS);
    sender.join().expect("parent sender");
    child.expect_line("DONE");
    let status = child.child.wait().expect("child exits");
    assert!(status.success(), "child failed: {status}");
    println!(
        "{listen}: 2 x {MESSAGES} messages on {STREAMS} streams between processes in {:?}",
        started.elapsed()
    );
    assert!(node.try_recv().is_none(), "no duplicates");
    assert_eq!(node.stats().bad_frames, 0);
    node.stop(Duration::from_secs(1));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tcp_two_processes() {
    two_processes("tcp", &format!("tcp://127.0.0.1:{}", free_port(false)), 4096);
}

#[test]
fn unix_two_processes() {
    let path = std::env::temp_dir().join(format!("atbus-proc-{}.sock", std::process::id()));
    two_processes("unix", &format!("unix://{}", path.display()), 4096);
    let _ = std::fs::remove_file(path);
}

#[test]
fn udp_two_processes() {
    two_processes("udp", &format!("udp://127.0.0.1:{}", free_port(true)), 2048);
}

/// A peer that speaks a protocol version below the node's minimum is closed
/// with UNSUPPORTED_VERSION and a reason naming both versions.
#[test]
fn old_protocol_version_is_refused() {
    let dir = scratch("version");
    let listen = format!("tcp://127.0.0.1:{}", free_port(false));
    let child = ChildNode::spawn("count", &child_config(&dir, &listen, None), "a-version", 64);
    let address: Address = child.expect_line("LISTEN ").parse().expect("child address");
    let minimum = libatbus::frame::MIN_PROTOCOL_VERSION as i32;
    let mut old = std::net::TcpStream::connect(peer::socket_addr(&address)).expect("connect");
    old.write_all(&peer::encode(&peer::handshake_version("old-peer", minimum - 1)))
        .expect("write");
    let reason = peer::close_reason(old);
    assert_eq!(reason.code(), AtbusCloseReason::UnsupportedVersion, "{reason:?}");
    assert!(
        reason.message.contains(&format!("version {}", minimum - 1)) && reason.message.contains("below the minimum"),
        "clear reason: {}",
        reason.message
    );
    // The node goes on: a current peer still gets through.
    let mut current = std::net::TcpStream::connect(peer::socket_addr(&address)).expect("connect");
    current
        .write_all(&peer::encode(&peer::handshake("new-peer")))
        .expect("write");
    current
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = [0u8; 256];
    let n = std::io::Read::read(&mut current, &mut buf).expect("the node answers the handshake");
    assert!(n > 0, "the node closed a current peer");
    child.kill();
    let _ = std::fs::remove_dir_all(dir);
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

fn kill_and_restart(test: &str, listen: &str) {
    const BATCH: u64 = 2_000;
    let dir = scratch(test);
    let config = child_config(&dir, listen, None);
    let parent = format!("a-{test}");
    let first = ChildNode::spawn("count", &config, &parent, 512);
    let address: Address = first.expect_line("LISTEN ").parse().expect("child address");
    let node = parent_node(&parent, 0, None);
    node.add_route(CHILD, address.clone()).expect("route");

    send_all(&node, CHILD, 1, 0..BATCH, 512, 1);
    let got = collect_until(&first, BATCH - 1);
    assert_eq!(got, (0..BATCH).collect::<Vec<_>>(), "first child: in order, once");
    first.kill();

    // Sent while the far end is dead: queued, then delivered to its successor.
    send_all(&node, CHILD, 2, BATCH..2 * BATCH, 512, 1);
    thread::sleep(Duration::from_millis(300)); // a few failed reconnects
    let established = node.stats().connections_established;
    let second = ChildNode::spawn("count", &config, &parent, 512);
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
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tcp_kill_and_restart() {
    // A fixed port, so the successor listens where the first child did.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    kill_and_restart("tcp-restart", &format!("tcp://127.0.0.1:{port}"));
}

#[test]
fn unix_kill_and_restart() {
    let path = std::env::temp_dir().join(format!("atbus-restart-{}.sock", std::process::id()));
    kill_and_restart("unix-restart", &format!("unix://{}", path.display()));
    let _ = std::fs::remove_file(path);
}

#[test]
fn udp_kill_and_restart() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    kill_and_restart("udp-restart", &format!("udp://127.0.0.1:{port}"));
}
