//! End-to-end stream encryption over real sockets, watched by a tap on the
//! wire: encrypted streams never show their plaintext, plain streams do, and
//! a peer outside the CA gets nothing through.

mod peer;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libatbus::address::Address;
use libatbus::discovery::MemoryDiscovery;
use libatbus::node::{DiscoverySource, Node, NodeConfig};
use libatbus::tls::{E2eStreams, Issued, TlsContext, issue};
use peer::{Proxy, socket_addr};

fn context(issued: &Issued, name: &str, streams: E2eStreams) -> TlsContext {
    issued.context(name, streams).expect("tls context")
}

fn start(name: &str, tls: Option<TlsContext>, discovery: &Arc<MemoryDiscovery>) -> Node {
    let mut config = NodeConfig::new(name, &["tcp://127.0.0.1:0"]).expect("config");
    config.discovery = DiscoverySource(discovery.clone());
    config.latency_path = false;
    config.tls = tls;
    Node::start(config).expect("node")
}

fn tcp_address(node: &Node) -> Address {
    node.listen_addresses()
        .into_iter()
        .find(|a| matches!(a, Address::Tcp { .. }))
        .expect("tcp")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn recv_all(node: &Node, count: usize) -> Vec<(i64, Bytes)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = node
            .recv_timeout(left)
            .unwrap_or_else(|| panic!("only {} of {count} arrived", got.len()));
        got.push((m.stream_id, m.data));
    }
    got
}

const SECRET: &[u8] = b"launch-code-0000-plaintext-marker";
const VISIBLE: &[u8] = b"plain-stream-marker-everyone-sees";

/// Stream 1 is encrypted (both ways), stream 2 is not: the tap finds the
/// plain marker and never the secret one, in either direction, while every
/// message arrives whole and in order.
#[test]
fn encrypted_stream_shows_no_plaintext_on_the_wire() {
    let issued = issue("e2e-test-ca", &["e2e-a".into(), "e2e-b".into()]).expect("certificates");
    let only_1 = || E2eStreams::Only(BTreeSet::from([1]));
    let discovery = Arc::new(MemoryDiscovery::new());
    let b = start("e2e-b", Some(context(&issued, "e2e-b", only_1())), &discovery);
    let proxy = Proxy::start(socket_addr(&tcp_address(&b)), Duration::ZERO);
    let a = start("e2e-a", Some(context(&issued, "e2e-a", only_1())), &discovery);
    a.add_route("e2e-b", proxy.address()).expect("route");

    let big: Vec<u8> = SECRET.iter().copied().cycle().take(256 * 1024).collect();
    for i in 0..200u32 {
        let mut m = SECRET.to_vec();
        m.extend_from_slice(&i.to_le_bytes());
        a.send("e2e-b", 1, Bytes::from(m)).expect("send");
    }
    a.send("e2e-b", 1, Bytes::from(big.clone())).expect("send big");
    a.send("e2e-b", 2, Bytes::from_static(VISIBLE)).expect("send plain");
    let got = recv_all(&b, 202);
    let encrypted: Vec<&Bytes> = got.iter().filter(|(s, _)| *s == 1).map(|(_, d)| d).collect();
    assert_eq!(encrypted.len(), 201);
    for (i, m) in encrypted.iter().take(200).enumerate() {
        assert_eq!(&m[..SECRET.len()], SECRET);
        assert_eq!(&m[SECRET.len()..], &(i as u32).to_le_bytes());
    }
    assert_eq!(&encrypted[200][..], &big[..]);
    assert!(got.iter().any(|(s, d)| *s == 2 && &d[..] == VISIBLE));

    // B answers on the encrypted stream: A's side of the session decrypts.
    b.send("e2e-a", 1, Bytes::from_static(b"launch-code-reply-secret"))
        .expect("reply");
    let reply = a.recv_timeout(Duration::from_secs(5)).expect("reply arrives");
    assert_eq!(
        (reply.stream_id, &reply.data[..]),
        (1, &b"launch-code-reply-secret"[..])
    );

    std::thread::sleep(Duration::from_millis(100));
    let out = proxy.captured.lock().expect("lock").concat();
    let back = proxy.captured_back.lock().expect("lock").concat();
    assert!(out.len() > big.len(), "the tap saw the traffic ({} bytes)", out.len());
    assert!(contains(&out, VISIBLE), "the tap sees plain streams");
    assert!(
        !contains(&out, &SECRET[..16]),
        "plaintext of the encrypted stream on the wire"
    );
    assert!(
        !contains(&back, b"launch-code-reply"),
        "plaintext of the reply on the wire"
    );
    assert_eq!(a.stats().e2e_failures + b.stats().e2e_failures, 0);
}

/// A node whose certificate comes from another CA starts an encrypted
/// stream: the TLS handshake fails, nothing is delivered, both sides count
/// it, and the sender is told its messages were not delivered.
#[test]
fn a_peer_outside_the_ca_gets_nothing_through() {
    let ours = issue("e2e-ours", &["e2e-d".into()]).expect("certificates");
    let theirs = issue("e2e-theirs", &["e2e-c".into()]).expect("certificates");
    let discovery = Arc::new(MemoryDiscovery::new());
    let d = start("e2e-d", Some(context(&ours, "e2e-d", E2eStreams::All)), &discovery);
    let c = start("e2e-c", Some(context(&theirs, "e2e-c", E2eStreams::All)), &discovery);
    c.add_route("e2e-d", tcp_address(&d)).expect("route");
    c.send("e2e-d", 5, Bytes::from_static(b"let me in")).expect("send");
    let undelivered = c.recv_undelivered(Duration::from_secs(5)).expect("reported");
    assert_eq!((&*undelivered.to, undelivered.stream_id), ("e2e-d", 5));
    eprintln!("reported: {}", undelivered.reason);
    assert!(undelivered.reason.contains("TLS"), "{}", undelivered.reason);
    assert!(
        d.recv_timeout(Duration::from_millis(500)).is_none(),
        "nothing delivered"
    );
    assert!(d.stats().e2e_failures >= 1 || c.stats().e2e_failures >= 1);

    // A node without TLS refuses an encrypted stream too.
    let plain = start("e2e-plain", None, &discovery);
    c.add_route("e2e-plain", tcp_address(&plain)).expect("route");
    c.send("e2e-plain", 5, Bytes::from_static(b"hello?")).expect("send");
    std::thread::sleep(Duration::from_millis(500));
    assert!(plain.recv_timeout(Duration::from_millis(200)).is_none());
    assert!(plain.stats().e2e_failures >= 1, "{:?}", plain.stats());
}

/// The receiving node restarts in the middle of an encrypted stream: the
/// sender drops what the old process's TLS session held, starts a new
/// session with the new process, and later messages arrive decrypted.
#[test]
fn an_encrypted_stream_survives_a_peer_restart() {
    let issued = issue("e2e-restart-ca", &["e2e-ra".into(), "e2e-rb".into()]).expect("certificates");
    let discovery = Arc::new(MemoryDiscovery::new());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let listen = format!("tcp://127.0.0.1:{port}");
    let start_b = || {
        let mut config = NodeConfig::new("e2e-rb", &[&listen]).expect("config");
        config.discovery = DiscoverySource(discovery.clone());
        config.latency_path = false;
        config.tls = Some(context(&issued, "e2e-rb", E2eStreams::All));
        Node::start(config).expect("b")
    };
    let b1 = start_b();
    let a = start("e2e-ra", Some(context(&issued, "e2e-ra", E2eStreams::All)), &discovery);
    a.add_route("e2e-rb", listen.parse().expect("address")).expect("route");
    for i in 0..100u32 {
        a.send("e2e-rb", 1, Bytes::from(format!("before-{i}"))).expect("send");
    }
    let got = recv_all(&b1, 100);
    assert_eq!(&got[99].1[..], b"before-99");
    b1.stop(Duration::ZERO);
    drop(b1);
    let b2 = start_b();
    for i in 0..100u32 {
        a.send("e2e-rb", 1, Bytes::from(format!("after-{i}"))).expect("send");
    }
    let got = recv_all(&b2, 100);
    for (i, (stream, data)) in got.iter().enumerate() {
        assert_eq!((*stream, &data[..]), (1, format!("after-{i}").as_bytes()));
    }
    assert_eq!(a.stats().e2e_failures + b2.stats().e2e_failures, 0);
}
