//! The data plane over real sockets: two nodes, each on its own pinned shard,
//! exchange 100 000 messages of random sizes each way on every transport.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libatbus::address::Address;
use libatbus::node::{Node, NodeConfig};
use libatbus::tls::{E2eStreams, TlsContext};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const MESSAGES: u64 = 100_000;

fn node(name: &str, listen: &str, core: usize) -> Node {
    node_tls(name, listen, core, None, 1)
}

fn node_tls(name: &str, listen: &str, core: usize, tls: Option<TlsContext>, shards: usize) -> Node {
    let mut config = NodeConfig::new(name, &[listen]).expect("config");
    config.runtime.first_core = core;
    config.runtime.shards = shards;
    config.tls = tls;
    Node::start(config).expect("node starts")
}

/// TLS identities for `names`, signed by one CA made for the test.
fn identities(names: &[&str]) -> Vec<TlsContext> {
    let owned: Vec<String> = names.iter().map(ToString::to_string).collect();
    let issued = libatbus::tls::issue("transports-test-ca", &owned).expect("certificates");
    names
        .iter()
        .map(|n| issued.context(n, E2eStreams::Only(Default::default())).expect("tls"))
        .collect()
}

/// Message `seq` of a run: its sequence number, then bytes derived from it.
fn payload(seq: u64, len: usize) -> Bytes {
    let mut data = Vec::with_capacity(len.max(8));
    data.extend_from_slice(&seq.to_le_bytes());
    data.extend((8..len).map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i) as u8));
    Bytes::from(data)
}

fn check(seq: u64, data: &[u8]) {
    assert!(data.len() >= 8, "message {seq} too short");
    let got = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    assert_eq!(got, seq, "messages out of order");
    for (i, b) in data.iter().enumerate().skip(8) {
        assert_eq!(
            *b,
            (seq as usize).wrapping_mul(31).wrapping_add(i) as u8,
            "message {seq} corrupted at {i}"
        );
    }
}

fn wait_connected(node: &Node, peer: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.connected_peers().iter().any(|p| p == peer) {
        assert!(Instant::now() < deadline, "{} never saw {peer} connect", node.name());
        thread::sleep(Duration::from_millis(5));
    }
}

fn sender(node: Arc<Node>, peer: String, seed: u64, max_len: usize) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut rng = SmallRng::seed_from_u64(seed);
        for seq in 0..MESSAGES {
            let len = rng.random_range(8..=max_len);
            node.send_blocking(&peer, 1, payload(seq, len), Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("send {seq} to {peer}: {e}"));
        }
    })
}

fn receiver(node: Arc<Node>, from: String) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for seq in 0..MESSAGES {
            let message = node
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|| panic!("{}: message {seq} never arrived", node.name()));
            assert_eq!(*message.from, *from);
            assert_eq!(message.stream_id, 1);
            check(seq, &message.data);
        }
    })
}

/// Nodes `a-<test>` and `b-<test>` (names are unique per process).
fn exchange(test: &str, listen_a: &str, listen_b: &str, max_len: usize) {
    let (name_a, name_b) = (format!("a-{test}"), format!("b-{test}"));
    let a = Arc::new(node(&name_a, listen_a, 0));
    let b = Arc::new(node(&name_b, listen_b, 1));
    exchange_between(a, b, max_len);
}

/// 100 000 messages each way between `a` and `b` (a dials b's first
/// listen address).
fn exchange_between(a: Arc<Node>, b: Arc<Node>, max_len: usize) {
    let (name_a, name_b) = (a.name().to_string(), b.name().to_string());
    let listen_a = a.listen_addresses()[0].to_string();
    let b_address: Address = b.listen_addresses()[0].clone();
    a.add_route(&name_b, b_address).expect("route");
    wait_connected(&b, &name_a);
    let started = Instant::now();
    let threads = [
        sender(a.clone(), name_b.clone(), 1, max_len),
        sender(b.clone(), name_a.clone(), 2, max_len),
        receiver(b.clone(), name_a.clone()),
        receiver(a.clone(), name_b.clone()),
    ];
    for t in threads {
        t.join().expect("no thread panicked");
    }
    println!("{listen_a}: 2 x {MESSAGES} messages in {:?}", started.elapsed());
    assert!(a.try_recv().is_none() && b.try_recv().is_none(), "no duplicates");
    assert_eq!(a.stats().bad_frames + b.stats().bad_frames, 0);
}

#[test]
fn tcp_two_shards() {
    exchange("tcp", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", 4096);
}

#[test]
fn unix_two_shards() {
    let dir = std::env::temp_dir().join(format!("atbus-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    exchange(
        "unix",
        &format!("unix://{}", dir.join("a.sock").display()),
        &format!("unix://{}", dir.join("b.sock").display()),
        4096,
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `count` messages of [`payload`] from `from` arrive at `to` intact and in
/// order, none twice, and neither node saw a bad frame.
fn receive_in_order(from: &Node, to: &Node, count: u64) {
    for seq in 0..count {
        let message = to
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("message {seq} never arrived"));
        check(seq, &message.data);
    }
    assert!(to.try_recv().is_none(), "no duplicates");
    assert_eq!(from.stats().bad_frames + to.stats().bad_frames, 0);
}

/// Unix links place large payloads in each write where their sources sit
/// in a cache line (`fragment_type.padding`, `PacketFrame::aligned`) and,
/// with `unix_zero_copy` (the default), write them without a copy
/// (`transport/splice.rs`): payloads of 4 KiB to 40 KiB whose bytes start
/// at every offset in a line, sent while the socket fills up, all arrive
/// intact and in order, with zero-copy writes on and off; the connection's
/// counters show which way the bytes went.
#[test]
fn unix_large_payloads_from_any_alignment_arrive_intact() {
    for zero_copy in [true, false] {
        let dir = std::env::temp_dir().join(format!("atbus-unix-align-{}-{zero_copy}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let unix_node = |name: &str, core: usize| {
            let listen = format!("unix://{}", dir.join(format!("{name}.sock")).display());
            let mut config = NodeConfig::new(&format!("{name}-{zero_copy}"), &[listen.as_str()]).expect("config");
            config.runtime.first_core = core;
            config.unix_zero_copy = zero_copy;
            Arc::new(Node::start(config).expect("node starts"))
        };
        let a = unix_node("align-a", 0);
        let b = unix_node("align-b", 1);
        a.add_route(b.name(), b.listen_addresses()[0].clone()).expect("route");
        wait_connected(&b, a.name());
        const LARGE: u64 = 3_000;
        let sending = {
            let (a, to) = (a.clone(), b.name().to_string());
            thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(27);
                let mut total = 0;
                for seq in 0..LARGE {
                    let len = rng.random_range(4096..=40_000);
                    total += len as u64;
                    // The message's bytes start `skew` bytes into a cache line.
                    let skew = (seq % 64) as usize;
                    let mut backing = vec![0u8; len + 128];
                    let start = (64 - backing.as_ptr() as usize % 64 + skew) % 64;
                    backing[start..start + len].copy_from_slice(&payload(seq, len));
                    let data = Bytes::from(backing).slice(start..start + len);
                    assert_eq!(data.as_ptr() as usize % 64, skew);
                    a.send_blocking(&to, 1, data, Duration::from_secs(60))
                        .unwrap_or_else(|e| panic!("send {seq}: {e}"));
                }
                total
            })
        };
        receive_in_order(&a, &b, LARGE);
        let total = sending.join().expect("the sender finished");
        // Every payload (4 KiB and more) goes into a write by reference, and
        // every such write through the pipe when zero-copy writes are on.
        let sent = sent_totals(&a, |sent| {
            sent.bytes >= total && (!zero_copy || sent.zero_copy >= total)
        });
        println!(
            "unix_zero_copy {zero_copy}: {} of {} bytes written without a copy ({total} payload bytes)",
            sent.zero_copy, sent.bytes
        );
        if zero_copy {
            assert!(
                sent.zero_copy <= sent.bytes,
                "{} of {} bytes",
                sent.zero_copy,
                sent.bytes
            );
        } else {
            assert_eq!(sent.zero_copy, 0);
        }
        a.stop(Duration::from_millis(100));
        b.stop(Duration::from_millis(100));
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn unix_abstract_two_shards() {
    let tag = std::process::id();
    exchange(
        "abstract",
        &format!("unix://@atbus-a-{tag}"),
        &format!("unix://@atbus-b-{tag}"),
        1024,
    );
}

#[test]
fn udp_two_shards() {
    exchange("udp", "udp://127.0.0.1:0", "udp://127.0.0.1:0", 2048);
}

/// Nodes on UDP with `udp_mtu` on loopback too (`udp_loopback_mtu` off).
fn udp_node(name: &str, core: usize, loopback_mtu: bool) -> Node {
    let mut config = NodeConfig::new(name, &["udp://127.0.0.1:0"]).expect("config");
    config.runtime.first_core = core;
    config.udp_loopback_mtu = loopback_mtu;
    Node::start(config).expect("node starts")
}

/// Messages of up to 4 KiB over 548-byte datagrams: most span several.
#[test]
fn udp_small_datagrams_two_shards() {
    let a = Arc::new(udp_node("a-udp-small", 0, false));
    let b = Arc::new(udp_node("b-udp-small", 1, false));
    exchange_between(a, b, 4096);
}

/// What a node's connections wrote, summed.
#[derive(Default)]
struct SentTotals {
    frames: u64,
    bytes: u64,
    zero_copy: u64,
}

/// What `node` wrote on its connections, once the once-a-second sample
/// shows `enough`.
fn sent_totals(node: &Node, enough: impl Fn(&SentTotals) -> bool) -> SentTotals {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut sent = SentTotals::default();
        for c in node.stats_report().map(|r| r.connections).unwrap_or_default() {
            sent.frames += c.totals.tx_frames;
            sent.bytes += c.totals.tx_bytes;
            sent.zero_copy += c.totals.tx_zero_copy_bytes;
        }
        if enough(&sent) {
            return sent;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {} frames, {} bytes ({} without a copy) sampled",
            node.name(),
            sent.frames,
            sent.bytes,
            sent.zero_copy
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Bytes per frame `node` wrote on its connections, once the once-a-second
/// sample has seen `frames` of them.
fn bytes_per_frame(node: &Node, frames: u64) -> f64 {
    let sent = sent_totals(node, |sent| sent.frames >= frames);
    sent.bytes as f64 / sent.frames as f64
}

/// UDP paths to a loopback peer take the loopback route's MTU: 2 000
/// messages of 4-60 KiB arrive intact and in order in datagrams of tens of
/// KiB; with `udp_loopback_mtu` off the same go in datagrams of at most
/// 548 bytes.
#[test]
fn udp_loopback_paths_carry_large_datagrams() {
    for loopback_mtu in [true, false] {
        let a = Arc::new(udp_node(&format!("a-udp-lo-{loopback_mtu}"), 0, loopback_mtu));
        let b = Arc::new(udp_node(&format!("b-udp-lo-{loopback_mtu}"), 1, loopback_mtu));
        a.add_route(b.name(), b.listen_addresses()[0].clone()).expect("route");
        wait_connected(&b, a.name());
        const LARGE: u64 = 2_000;
        let sending = {
            let (a, to) = (a.clone(), b.name().to_string());
            thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(29);
                let mut total = 0u64;
                for seq in 0..LARGE {
                    let len = rng.random_range(4096..=60_000);
                    total += len as u64;
                    a.send_blocking(&to, 1, payload(seq, len), Duration::from_secs(60))
                        .unwrap_or_else(|e| panic!("send {seq}: {e}"));
                }
                total
            })
        };
        receive_in_order(&a, &b, LARGE);
        let total = sending.join().expect("the sender finished");
        // At least the frames the bytes took at the smallest datagrams.
        let per_frame = bytes_per_frame(&a, total / 65_000);
        println!("udp_loopback_mtu {loopback_mtu}: {per_frame:.0} bytes per datagram");
        if loopback_mtu {
            assert!(per_frame > 8_192.0, "{per_frame:.0} bytes per datagram");
        } else {
            assert!(per_frame <= 548.0, "{per_frame:.0} bytes per datagram");
        }
        a.stop(Duration::from_millis(100));
        b.stop(Duration::from_millis(100));
    }
}

#[test]
fn quic_two_shards() {
    let tls = identities(&["a-quic", "b-quic"]);
    let a = Arc::new(node_tls("a-quic", "quic://127.0.0.1:0", 0, Some(tls[0].clone()), 1));
    let b = Arc::new(node_tls("b-quic", "quic://127.0.0.1:0", 1, Some(tls[1].clone()), 1));
    exchange_between(a, b, 4096);
}

/// A QUIC connection accepted on shard 0 for a peer homed on shard 1 stays
/// on shard 0 (its socket is there) and is bridged to shard 1.
#[test]
fn quic_bridged_to_the_home_shard() {
    // A dialler's name that node b (2 shards) homes on shard 1.
    let name_a = (0..)
        .map(|i| format!("a-quic-bridge-{i}"))
        .find(|n| xxhash_rust::xxh3::xxh3_64(n.as_bytes()) % 2 == 1)
        .expect("a name");
    let tls = identities(&[&name_a, "b-quic-bridge"]);
    let a = Arc::new(node_tls(&name_a, "quic://127.0.0.1:0", 0, Some(tls[0].clone()), 1));
    let b = Arc::new(node_tls(
        "b-quic-bridge",
        "quic://127.0.0.1:0",
        0,
        Some(tls[1].clone()),
        2,
    ));
    exchange_between(a, b, 4096);
}

/// A node that dialled over QUIC before resumes the TLS session: its next
/// connection's first flight is 0-RTT data, accepted by the server.
#[test]
fn quic_reconnect_resumes_with_0rtt() {
    use std::sync::atomic::Ordering;
    let tls = identities(&["a-quic-0rtt", "b-quic-0rtt"]);
    let b = node_tls("b-quic-0rtt", "quic://127.0.0.1:0", 1, Some(tls[1].clone()), 1);
    let at = b.listen_addresses()[0].clone();
    let accepted_before = libatbus::transport::quic::ZERO_RTT_ACCEPTED.load(Ordering::Relaxed);
    for round in 0..2 {
        // The same identity (and so the same TLS session cache) each time.
        let a = node_tls("a-quic-0rtt", "quic://127.0.0.1:0", 0, Some(tls[0].clone()), 1);
        a.add_route("b-quic-0rtt", at.clone()).expect("route");
        a.send("b-quic-0rtt", 1, Bytes::from(format!("round {round}")))
            .expect("send");
        let got = b.recv_timeout(Duration::from_secs(10)).expect("delivered");
        assert_eq!(&got.data[..], format!("round {round}").as_bytes());
        a.stop(Duration::from_millis(100));
    }
    assert!(
        libatbus::transport::quic::ZERO_RTT_ACCEPTED.load(Ordering::Relaxed) > accepted_before,
        "a later connection used 0-RTT"
    );
}

/// A QUIC listener needs a certificate: a clear error, not a panic.
#[test]
fn quic_without_tls_is_a_clear_error() {
    let config = NodeConfig::new("quic-no-tls", &["quic://127.0.0.1:0"]).expect("config");
    let err = Node::start(config).expect_err("no certificate").to_string();
    assert!(err.contains("certificate"), "{err}");
}

#[test]
fn mem_two_shards() {
    let tag = std::process::id();
    let a = Arc::new(node("a-mem", &format!("mem://a-{tag}"), 0));
    let b = Arc::new(node("b-mem", &format!("mem://b-{tag}"), 1));
    a.add_route("b-mem", format!("mem://b-{tag}").parse().expect("addr"))
        .expect("route");
    b.add_route("a-mem", format!("mem://a-{tag}").parse().expect("addr"))
        .expect("route");
    let threads = [
        sender(a.clone(), "b-mem".into(), 1, 4096),
        sender(b.clone(), "a-mem".into(), 2, 4096),
        receiver(b.clone(), "a-mem".into()),
        receiver(a.clone(), "b-mem".into()),
    ];
    for t in threads {
        t.join().expect("no thread panicked");
    }
}

/// What the stream layer would refuse is refused at `send`, on every route,
/// before anything is queued.
#[test]
fn refused_messages_are_reported_to_the_caller() {
    use libatbus::node::SendError;
    use libatbus::stream::SendError as StreamError;
    let tag = std::process::id();
    let mut config = NodeConfig::new("refuser", &[&format!("mem://refuser-{tag}")]).expect("config");
    config.stream.max_message_len = 1024;
    config.stream.recv_window = 1024;
    let node = Node::start(config).expect("node starts");
    let sink = node_with("sink", &format!("mem://sink-{tag}"));
    node.add_route("far", "tcp://127.0.0.1:9".parse().expect("addr"))
        .expect("route");
    node.add_route("sink", format!("mem://sink-{tag}").parse().expect("addr"))
        .expect("route");
    for peer in ["far", "sink"] {
        let reserved = node.send(peer, -1, Bytes::from_static(b"x"));
        assert!(
            matches!(reserved, Err(SendError::ReservedStream { stream_id: -1, .. })),
            "{reserved:?}"
        );
        let empty = node.send(peer, 1, Bytes::new());
        assert!(
            matches!(
                empty,
                Err(SendError::Stream {
                    source: StreamError::EmptyMessage { .. },
                    ..
                })
            ),
            "{empty:?}"
        );
        let unknown = node.send("nobody", 1, Bytes::from_static(b"x"));
        assert!(matches!(unknown, Err(SendError::UnknownPeer(_))), "{unknown:?}");
    }
    // Too large for this node's stream layer (tcp route) / the sink's (mem).
    let large = node.send("far", 1, Bytes::from(vec![0u8; 2048]));
    assert!(
        matches!(
            large,
            Err(SendError::Stream {
                source: StreamError::MessageTooLarge {
                    len: 2048,
                    max: 1024,
                    ..
                },
                ..
            })
        ),
        "{large:?}"
    );
    let fits = node.send("sink", 1, Bytes::from(vec![0u8; 2048]));
    assert!(fits.is_ok(), "the sink's own limit is the default 4 MiB: {fits:?}");
    assert_eq!(
        sink.recv_timeout(Duration::from_secs(5)).map(|m| m.data.len()),
        Some(2048)
    );
    node.stop(Duration::from_millis(100));
    sink.stop(Duration::from_millis(100));
}

fn node_with(name: &str, listen: &str) -> Node {
    Node::start(NodeConfig::new(name, &[listen]).expect("config")).expect("node starts")
}

/// A frame-sync message overtakes a full queue of ordinary ones, on the wire
/// (latency path), on the sender (its own send budget) and at the receiver
/// (its own application queue); the ordinary ones still all arrive, in order.
#[test]
fn urgent_message_overtakes_a_full_ordinary_queue() {
    let tag = std::process::id();
    let mut config = NodeConfig::new("slow-reader", &[&format!("unix://@atbus-slow-{tag}")]).expect("config");
    config.recv_queue = 16;
    let reader = Node::start(config).expect("node starts");
    let writer = node("fast-writer", "tcp://127.0.0.1:0", 1);
    writer
        .add_route("slow-reader", reader.listen_addresses()[0].clone())
        .expect("route");
    const BULK: u64 = 500;
    for seq in 0..BULK {
        writer
            .send_blocking("slow-reader", 1, payload(seq, 1024), Duration::from_secs(10))
            .expect("bulk send");
    }
    // The reader's ordinary queue fills; the rest waits in its session.
    let deadline = Instant::now() + Duration::from_secs(10);
    while reader.stats().queued < 16 {
        assert!(Instant::now() < deadline, "bulk never arrived");
        thread::sleep(Duration::from_millis(5));
    }
    writer
        .send_urgent("slow-reader", 9, Bytes::from_static(b"tick"))
        .expect("urgent send");
    // It reaches the application although the ordinary queue is full.
    while reader.stats().queued < 17 {
        assert!(Instant::now() < deadline, "the tick never reached the application");
        thread::sleep(Duration::from_millis(5));
    }
    let first = reader.recv_timeout(Duration::from_secs(10)).expect("a message");
    assert_eq!(
        (first.stream_id, &first.data[..]),
        (9, &b"tick"[..]),
        "the tick comes first"
    );
    for seq in 0..BULK {
        let message = reader.recv_timeout(Duration::from_secs(10)).expect("bulk message");
        assert_eq!(message.stream_id, 1);
        check(seq, &message.data);
    }
    writer.stop(Duration::from_millis(100));
    reader.stop(Duration::from_millis(100));
}

/// A reader with a tiny application queue that stops now and then: the
/// sender is held back (same process: `WouldBlock` until the reader makes
/// room; over a connection: the shard keeps what does not fit), and every
/// message still arrives once and in order, however the reads and the
/// deliveries interleave.
#[test]
fn a_tiny_application_queue_with_a_stalling_reader_loses_nothing() {
    let tag = std::process::id();
    for transport in ["mem", "tcp"] {
        let listen = match transport {
            "mem" => format!("mem://tiny-queue-{tag}"),
            _ => "tcp://127.0.0.1:0".to_string(),
        };
        let mut config = NodeConfig::new(&format!("tiny-reader-{transport}"), &[&listen]).expect("config");
        config.recv_queue = 4;
        let reader = Node::start(config).expect("node starts");
        let writer = Arc::new(node(&format!("tiny-writer-{transport}"), "tcp://127.0.0.1:0", 1));
        let name = reader.name().to_string();
        writer
            .add_route(&name, reader.listen_addresses()[0].clone())
            .expect("route");
        const COUNT: u64 = 20_000;
        let sender = {
            let writer = writer.clone();
            let name = name.clone();
            thread::spawn(move || {
                for seq in 0..COUNT {
                    writer
                        .send_blocking(&name, 1, payload(seq, 32), Duration::from_secs(20))
                        .unwrap_or_else(|e| panic!("{transport}: send {seq}: {e}"));
                }
            })
        };
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for seq in 0..COUNT {
            // xorshift: a pause every ~500 messages, of up to 2 ms.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if rng % 500 == 0 {
                thread::sleep(Duration::from_micros(rng % 2000));
            }
            let message = reader
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("{transport}: message {seq} never came"));
            check(seq, &message.data);
        }
        sender.join().expect("sender");
        assert!(reader.try_recv().is_none(), "{transport}: nothing more");
        writer.stop(Duration::from_millis(100));
        reader.stop(Duration::from_millis(100));
    }
}

/// A node with a message handler answers on its shard: every message of a
/// peer reaches the handler once and in order, over a connection and from a
/// same-process peer, and the handler's replies (sent through its `Handle`,
/// never waiting) reach the sender's receive queue. A second handler is
/// refused.
#[test]
fn a_handler_answers_on_the_shard() {
    const COUNT: u64 = 10_000;
    let tag = std::process::id();
    for transport in ["tcp", "mem"] {
        let (server_listen, client_listen) = match transport {
            "mem" => (format!("mem://handler-s-{tag}"), format!("mem://handler-c-{tag}")),
            _ => ("tcp://127.0.0.1:0".to_string(), "tcp://127.0.0.1:0".to_string()),
        };
        let server = node(&format!("handler-server-{transport}"), &server_listen, 0);
        // Room for every echo: a handler never waits, and over mem a full
        // receive queue answers its send with `WouldBlock` (the reader thread
        // may lag); flow control is not what this test is about.
        let mut client_config =
            NodeConfig::new(&format!("handler-client-{transport}"), &[&client_listen]).expect("config");
        client_config.runtime.first_core = 1;
        client_config.runtime.shards = 1;
        client_config.recv_queue = COUNT as usize;
        let client = Arc::new(Node::start(client_config).expect("node starts"));
        let client_name = client.name().to_string();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        {
            let seen = seen.clone();
            let client_name = client_name.clone();
            server
                .set_handler(move |handle, message| {
                    assert_eq!(&*message.from, client_name.as_str());
                    let seq = u64::from_le_bytes(message.data[..8].try_into().expect("8 bytes"));
                    seen.lock().expect("lock").push(seq);
                    handle
                        .send(&message.from, message.stream_id, message.data)
                        .expect("echo from the handler");
                })
                .expect("first handler");
        }
        assert_eq!(server.set_handler(|_, _| {}), Err(libatbus::node::HandlerAlreadySet));
        client
            .add_route(server.name(), server.listen_addresses()[0].clone())
            .expect("route");
        if transport == "mem" {
            server
                .add_route(&client_name, client.listen_addresses()[0].clone())
                .expect("route back");
        }
        let reader = {
            let client = client.clone();
            thread::spawn(move || {
                for seq in 0..COUNT {
                    let message = client
                        .recv_timeout(Duration::from_secs(10))
                        .unwrap_or_else(|| panic!("{transport}: echo {seq} never came"));
                    check(seq, &message.data);
                }
            })
        };
        for seq in 0..COUNT {
            client
                .send_blocking(server.name(), 1, payload(seq, 64), Duration::from_secs(10))
                .expect("send");
        }
        reader.join().expect("every echo, in order");
        assert_eq!(*seen.lock().expect("lock"), (0..COUNT).collect::<Vec<_>>());
        assert_eq!(server.stats().messages_received, COUNT);
        assert!(server.try_recv().is_none(), "nothing went to the receive queue");
        client.stop(Duration::from_millis(100));
        server.stop(Duration::from_millis(100));
    }
}

/// Frame-sync traffic while 16 KiB bulk messages flood the same pair of
/// nodes, on every socket transport: urgent pings (latency path, echoed
/// with `send_urgent` by a handler on the far shard) and the bulk stream
/// each arrive once and in order. (How fast the pings come back is a
/// benchmark's business: `atbus bench --class`.)
#[test]
fn frame_sync_pings_and_a_bulk_flood_all_arrive_in_order() {
    let tag = std::process::id();
    let dir = std::env::temp_dir().join(format!("atbus-framesync-{tag}"));
    std::fs::create_dir_all(&dir).expect("socket directory");
    for transport in ["tcp", "unix", "udp"] {
        let listen = |side: &str| match transport {
            "unix" => format!("unix://{}", dir.join(format!("{side}.sock")).display()),
            other => format!("{other}://127.0.0.1:0"),
        };
        let a = Arc::new(node(&format!("fs-a-{transport}"), &listen("a"), 0));
        let b = node(&format!("fs-b-{transport}"), &listen("b"), 1);
        let bulk_seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        {
            let bulk_seen = bulk_seen.clone();
            b.set_handler(move |handle, message| match message.stream_id {
                9 => handle
                    .send_urgent(&message.from, 9, message.data)
                    .expect("urgent echo from the handler"),
                _ => {
                    let seq = bulk_seen.load(std::sync::atomic::Ordering::Relaxed);
                    check(seq, &message.data);
                    bulk_seen.store(seq + 1, std::sync::atomic::Ordering::Relaxed);
                }
            })
            .expect("handler");
        }
        a.add_route(b.name(), b.listen_addresses()[0].clone()).expect("route");
        wait_connected(&b, a.name());
        const BULK: u64 = 2_000;
        const PINGS: u64 = 2_000;
        let flood = {
            let (a, to) = (a.clone(), b.name().to_string());
            thread::spawn(move || {
                for seq in 0..BULK {
                    a.send_blocking(&to, 1, payload(seq, 16 * 1024), Duration::from_secs(60))
                        .unwrap_or_else(|e| panic!("bulk {seq}: {e}"));
                }
            })
        };
        for seq in 0..PINGS {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match a.send_urgent(b.name(), 9, payload(seq, 64)) {
                    Ok(()) => break,
                    Err(libatbus::node::SendError::WouldBlock { .. }) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_micros(100));
                    }
                    Err(e) => panic!("{transport}: ping {seq}: {e}"),
                }
            }
            let echo = a
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|| panic!("{transport}: echo {seq} never came"));
            assert_eq!(echo.stream_id, 9, "{transport}: only echoes come back");
            check(seq, &echo.data);
        }
        flood.join().expect("the flood went out");
        let deadline = Instant::now() + Duration::from_secs(60);
        while bulk_seen.load(std::sync::atomic::Ordering::Relaxed) < BULK {
            assert!(Instant::now() < deadline, "{transport}: bulk stalled");
            thread::sleep(Duration::from_millis(5));
        }
        assert!(a.try_recv().is_none(), "{transport}: no duplicate echoes");
        assert_eq!(a.stats().bad_frames + b.stats().bad_frames, 0);
        a.stop(Duration::from_millis(100));
        b.stop(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A receiving shard that falls behind its sender (here: a handler that
/// stalls it now and then, so the socket fills up) reads its backlog in
/// full reads straight into the frames' memory (`conn::FrameReader::fill`);
/// every 16 KiB message still arrives once, intact and in order, over tcp
/// and unix, whether frames end inside a read or across two.
#[test]
fn a_receiver_that_falls_behind_gets_every_message_intact() {
    let tag = std::process::id();
    let dir = std::env::temp_dir().join(format!("atbus-behind-{tag}"));
    std::fs::create_dir_all(&dir).expect("socket directory");
    for transport in ["tcp", "unix"] {
        let listen = |side: &str| match transport {
            "unix" => format!("unix://{}", dir.join(format!("{side}.sock")).display()),
            other => format!("{other}://127.0.0.1:0"),
        };
        let a = Arc::new(node(&format!("behind-a-{transport}"), &listen("a"), 0));
        let b = node(&format!("behind-b-{transport}"), &listen("b"), 1);
        const COUNT: u64 = 3_000;
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        {
            let seen = seen.clone();
            b.set_handler(move |_, message| {
                let seq = seen.load(std::sync::atomic::Ordering::Relaxed);
                check(seq, &message.data);
                assert_eq!(
                    message.data.len(),
                    16 * 1024 + (seq % 7) as usize,
                    "message {seq} resized"
                );
                seen.store(seq + 1, std::sync::atomic::Ordering::Relaxed);
                // Stall the shard now and then: the sender fills the socket.
                if seq % 500 == 0 {
                    thread::sleep(Duration::from_millis(100));
                }
            })
            .expect("handler");
        }
        a.add_route(b.name(), b.listen_addresses()[0].clone()).expect("route");
        wait_connected(&b, a.name());
        for seq in 0..COUNT {
            // Sizes that do not divide the packets evenly: frames end at
            // varying places within a read.
            a.send_blocking(
                b.name(),
                1,
                payload(seq, 16 * 1024 + (seq % 7) as usize),
                Duration::from_secs(60),
            )
            .unwrap_or_else(|e| panic!("{transport}: message {seq}: {e}"));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.load(std::sync::atomic::Ordering::Relaxed) < COUNT {
            assert!(Instant::now() < deadline, "{transport}: stalled");
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(b.stats().messages_received, COUNT, "{transport}: each message once");
        assert_eq!(a.stats().bad_frames + b.stats().bad_frames, 0);
        a.stop(Duration::from_millis(100));
        b.stop(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(dir);
}
