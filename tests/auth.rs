//! Authentication over real sockets: tokens (1-RTT), resumption tickets
//! (0-RTT), rotation, anonymous dialers. Raw peers build their credentials
//! here with ring, from the layout documented in src/auth.rs (not with the
//! node's own code), so a wrong layout on either side shows.

mod peer;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use libatbus::address::Address;
use libatbus::auth::AuthConfig;
use libatbus::discovery::{Discovery, MemoryDiscovery};
use libatbus::node::{DiscoverySource, Node, NodeConfig};
use libatbus::proto::{
    AtbusCloseReason, Body, Fragment, FrameMessage, HandshakeAuth, HandshakeData, MessageHead, PacketContent,
    PacketData,
};
use peer::{Proxy, close_reason, encode, handshake_frame, socket_addr};
use prost::Message as _;

fn config(name: &str, tokens: &[&str], discovery: &Arc<MemoryDiscovery>) -> NodeConfig {
    let mut config = NodeConfig::new(name, &["tcp://127.0.0.1:0"]).expect("config");
    config.discovery = DiscoverySource(discovery.clone());
    config.latency_path = false;
    config.auth = AuthConfig {
        tokens: tokens.iter().map(ToString::to_string).collect(),
        ..AuthConfig::default()
    };
    config
}

fn tcp_address(node: &Node) -> Address {
    node.listen_addresses()
        .into_iter()
        .find(|a| matches!(a, Address::Tcp { .. }))
        .expect("a tcp listener")
}

fn now_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_micros() as i64
}

/// HMAC-SHA256(token, "atbus-v1 client" ‖ transcript), transcript as
/// documented in src/auth.rs.
fn signature(token: &str, dialer: &str, acceptor: &str, timestamp: i64, nonce: &[u8], incarnation: u64) -> Bytes {
    let mut msg = b"atbus-v1 client".to_vec();
    for part in [dialer.as_bytes(), acceptor.as_bytes()] {
        msg.extend_from_slice(&(part.len() as u32).to_le_bytes());
        msg.extend_from_slice(part);
    }
    msg.extend_from_slice(&timestamp.to_le_bytes());
    msg.extend_from_slice(nonce);
    msg.extend_from_slice(&incarnation.to_le_bytes());
    msg.push(0);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    Bytes::copy_from_slice(ring::hmac::sign(&key, &msg).as_ref())
}

/// A raw peer's handshake as `name` towards `acceptor`.
fn hello(name: &str, acceptor: &str, token: Option<&str>, timestamp: i64, nonce: [u8; 16]) -> FrameMessage {
    let auth = HandshakeAuth {
        timestamp_microseconds: timestamp,
        nonce: Bytes::copy_from_slice(&nonce),
        signatures: token
            .map(|t| vec![signature(t, name, acceptor, timestamp, &nonce, 7)])
            .unwrap_or_default(),
        ..HandshakeAuth::default()
    };
    handshake_frame(&HandshakeData {
        version: 3,
        minimal_version: 3,
        node_name: name.into(),
        incarnation: 7,
        auth: Some(auth),
        ..HandshakeData::default()
    })
}

/// One whole message on stream 1 at offset 0, optionally addressed.
fn data(text: &str, destination: Option<&str>) -> FrameMessage {
    let content = PacketContent {
        fragment: vec![Fragment {
            data: Bytes::copy_from_slice(text.as_bytes()),
            ..Default::default()
        }],
    };
    FrameMessage {
        head: destination.map(|d| MessageHead {
            destination: d.into(),
            ..MessageHead::default()
        }),
        body: Some(Body::Packet(PacketData {
            stream_id: 1,
            stream_offset: 0,
            content: Bytes::from(content.encode_to_vec()),
            ..Default::default()
        })),
    }
}

/// Connects, writes `frames`, returns the socket.
fn raw(address: &Address, frames: &[FrameMessage]) -> TcpStream {
    let mut socket = TcpStream::connect(socket_addr(address)).expect("connect");
    let mut wire = Vec::new();
    for frame in frames {
        wire.extend_from_slice(&encode(frame));
    }
    socket.write_all(&wire).expect("write");
    socket
}

/// Every message `node` receives within `wait`, as (from, text).
fn drain(node: &Node, wait: Duration) -> Vec<(String, String)> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match node.recv_timeout(left) {
            Some(m) => got.push((m.from.to_string(), String::from_utf8_lossy(&m.data).into_owned())),
            None => break,
        }
    }
    got
}

fn expect_unauthorized(socket: TcpStream, says: &str) {
    let reason = close_reason(socket);
    assert_eq!(reason.code, AtbusCloseReason::Unauthorized as i32, "{reason:?}");
    assert!(
        reason.message.contains(says),
        "{:?} should say {says:?}",
        reason.message
    );
    assert!(
        !reason.message.contains("s3cret"),
        "a secret echoed: {:?}",
        reason.message
    );
}

/// Wrong token, no token, expired timestamp, replayed nonce: each refused
/// with UNAUTHORIZED and its data never delivered, while a correct peer on
/// the same listener gets through, before and after.
#[test]
fn bad_credentials_are_refused_and_nothing_of_theirs_is_delivered() {
    let discovery = Arc::new(MemoryDiscovery::new());
    let b = Node::start(config("auth-b1", &["s3cret"], &discovery)).expect("b");
    let at = tcp_address(&b);
    let now = now_micros();

    let good = hello("good-1", "auth-b1", Some("s3cret"), now, [1; 16]);
    let ok = raw(&at, &[good.clone(), data("from good-1", None)]);
    assert_eq!(
        drain(&b, Duration::from_secs(2)),
        vec![("good-1".into(), "from good-1".into())]
    );

    expect_unauthorized(
        raw(
            &at,
            &[
                hello("wrong-1", "auth-b1", Some("guess"), now, [2; 16]),
                data("w", None),
            ],
        ),
        "no signature matches",
    );
    expect_unauthorized(
        raw(&at, &[hello("none-1", "auth-b1", None, now, [3; 16]), data("n", None)]),
        "no credentials",
    );
    expect_unauthorized(
        raw(
            &at,
            &[
                handshake_frame(&HandshakeData {
                    version: 3,
                    minimal_version: 3,
                    node_name: "bare-1".into(),
                    incarnation: 7,
                    ..HandshakeData::default()
                }),
                data("b", None),
            ],
        ),
        "no credentials",
    );
    let old = now - 301_000_000;
    expect_unauthorized(
        raw(
            &at,
            &[
                hello("late-1", "auth-b1", Some("s3cret"), old, [4; 16]),
                data("l", None),
            ],
        ),
        "outside the 300 s window",
    );
    // Signed for another node: the acceptor's name is in the transcript.
    expect_unauthorized(
        raw(
            &at,
            &[
                hello("else-1", "auth-other", Some("s3cret"), now, [5; 16]),
                data("e", None),
            ],
        ),
        "no signature matches",
    );
    // The good peer's first flight again, byte for byte.
    expect_unauthorized(raw(&at, &[good, data("replayed", None)]), "replayed");

    assert!(
        drain(&b, Duration::from_millis(500)).is_empty(),
        "nothing from a refused peer"
    );
    let stats = b.stats();
    assert_eq!(stats.auth_failures, 6, "{stats:?}");

    // The listener still serves: a node with the token, and the first raw
    // peer's connection is still up.
    let a = Node::start(config("auth-a1", &["s3cret"], &discovery)).expect("a");
    a.add_route("auth-b1", at.clone()).expect("route");
    a.send("auth-b1", 1, Bytes::from_static(b"hello")).expect("send");
    assert_eq!(
        drain(&b, Duration::from_secs(3)),
        vec![("auth-a1".into(), "hello".into())]
    );
    drop(ok);
}

/// Token rotation: B accepts the old token, then old and new, then only
/// the new one; each dialler is a node of its own.
#[test]
fn token_rotation_accepts_both_during_overlap_and_old_is_refused_after() {
    let discovery = Arc::new(MemoryDiscovery::new());
    let b = Node::start(config("rot-b", &["old-s3cret"], &discovery)).expect("b");
    let at = tcp_address(&b);
    let dial = |name: &str, token: &str| {
        let a = Node::start(config(name, &[token], &discovery)).expect("a");
        a.add_route("rot-b", at.clone()).expect("route");
        a.send("rot-b", 1, Bytes::from(name.to_string())).expect("send");
        a
    };
    let old1 = dial("rot-old1", "old-s3cret");
    assert_eq!(
        drain(&b, Duration::from_secs(3)),
        vec![("rot-old1".into(), "rot-old1".into())]
    );

    b.set_tokens(&["new-s3cret".into(), "old-s3cret".into()])
        .expect("rotate");
    assert_eq!(
        discovery
            .get("rot-b")
            .and_then(|r| r.as_node().cloned())
            .expect("record")
            .tokens,
        vec!["new-s3cret".to_string(), "old-s3cret".to_string()],
        "the record publishes the tokens"
    );
    let old2 = dial("rot-old2", "old-s3cret");
    let new1 = dial("rot-new1", "new-s3cret");
    let mut got = drain(&b, Duration::from_secs(3));
    got.sort();
    assert_eq!(
        got,
        vec![
            ("rot-new1".into(), "rot-new1".into()),
            ("rot-old2".into(), "rot-old2".into())
        ]
    );

    b.set_tokens(&["new-s3cret".into()]).expect("rotate");
    let failures = b.stats().auth_failures;
    let old3 = dial("rot-old3", "old-s3cret");
    let new2 = dial("rot-new2", "new-s3cret");
    assert_eq!(
        drain(&b, Duration::from_secs(3)),
        vec![("rot-new2".into(), "rot-new2".into())]
    );
    assert!(b.stats().auth_failures > failures, "the old token was refused");
    assert_eq!(old3.stats().connections_established, 0);
    for node in [old1, old2, new1, old3, new2] {
        node.stop(Duration::ZERO);
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Time to the first delivered message over a link with 50 ms each way:
/// a full handshake costs one round trip before the data (about 150 ms),
/// resumption with a ticket none (about 50 ms). Then the 0-RTT flight,
/// captured on the wire and sent again, is refused and its data not
/// delivered a second time.
#[test]
fn zero_rtt_saves_the_round_trip_and_its_replay_is_refused() {
    const DELAY: Duration = Duration::from_millis(50);
    let discovery = Arc::new(MemoryDiscovery::new());
    let b = Node::start(config("rtt-b", &["s3cret"], &discovery)).expect("b");
    let proxy = Proxy::start(socket_addr(&tcp_address(&b)), DELAY);
    let mut a_config = config("rtt-a", &["s3cret"], &discovery);
    // Room to queue a message between the cut and the redial.
    a_config.reconnect_min = Duration::from_millis(400);
    a_config.reconnect_max = Duration::from_millis(800);
    let a = Node::start(a_config).expect("a");

    a.add_route("rtt-b", proxy.address()).expect("route");
    a.send("rtt-b", 1, Bytes::from_static(b"first")).expect("send");
    let full = first_delivery(&proxy, &b, 0, "first");

    // Cut the link; once A noticed, queue a message, which then rides in
    // the redial's first flight with the ticket.
    let closed = a.stats().connections_closed;
    proxy.cut();
    wait_for("A to notice the cut", || a.stats().connections_closed > closed);
    a.send("rtt-b", 1, Bytes::from_static(b"second")).expect("send");
    let resumed = first_delivery(&proxy, &b, 1, "second");

    eprintln!("first delivery: full handshake {full:?}, 0-RTT {resumed:?} (one way {DELAY:?})");
    assert!(
        full >= DELAY * 3 - Duration::from_millis(5) && full < DELAY * 3 + Duration::from_millis(120),
        "full handshake: {full:?}, expected about 3 x {DELAY:?} (1 RTT + the data's way)"
    );
    assert!(
        resumed >= DELAY - Duration::from_millis(5) && resumed < DELAY * 2,
        "0-RTT: {resumed:?}, expected about {DELAY:?} (the data's way only)"
    );

    // Replay the second connection's client bytes straight to B.
    let flight = proxy.captured.lock().expect("lock")[1].clone();
    assert!(!flight.is_empty());
    let mut replay = TcpStream::connect(socket_addr(&tcp_address(&b))).expect("connect");
    replay.write_all(&flight).expect("write");
    expect_unauthorized(replay, "replayed");
    assert!(
        drain(&b, Duration::from_millis(500)).is_empty(),
        "the replayed data is not delivered again"
    );
    a.stop(Duration::ZERO);
}

/// How long after the proxy accepted connection `index` B got `text`.
fn first_delivery(proxy: &Proxy, b: &Node, index: usize, text: &str) -> Duration {
    let message = b.recv_timeout(Duration::from_secs(10)).expect("delivered");
    let at = Instant::now();
    assert_eq!(&message.data[..], text.as_bytes());
    let accepted = proxy.accepted.lock().expect("lock");
    assert_eq!(accepted.len(), index + 1, "one connection per dial");
    at.saturating_duration_since(accepted[index])
}

/// An anonymous node gets a temporary name on a listener that allows it and
/// talks with that node; a listener that does not allow it refuses it; an
/// anonymous peer addressing another node is cut off.
#[test]
fn anonymous_peers_only_where_allowed_and_only_to_their_node() {
    let discovery = Arc::new(MemoryDiscovery::new());
    let mut b_config = config("anon-b", &["s3cret"], &discovery);
    b_config.anonymous_listen = vec!["tcp://127.0.0.1:0".parse().expect("address")];
    let b = Node::start(b_config).expect("b");
    let listening = b.listen_addresses();
    assert_eq!(listening.len(), 2);
    let (named, open) = (listening[0].clone(), listening[1].clone());

    let client_config = |name: &str| {
        let mut c = config(name, &[], &discovery);
        c.listen.clear();
        c.auth.anonymous = true;
        c
    };
    let c = Node::start(client_config("anon-client")).expect("client");
    c.add_route("anon-b", open.clone()).expect("route");
    c.send("anon-b", 1, Bytes::from_static(b"hi from nobody"))
        .expect("send");
    let message = b.recv_timeout(Duration::from_secs(3)).expect("delivered");
    assert!(message.from.starts_with("anon-"), "{}", message.from);
    assert_ne!(&*message.from, "anon-client");
    assert_eq!(&message.data[..], b"hi from nobody");
    assert_eq!(c.assigned_name("anon-b").as_deref(), Some(&*message.from));
    b.send(&message.from, 1, Bytes::from_static(b"hi anonymous"))
        .expect("reply");
    let reply = c.recv_timeout(Duration::from_secs(3)).expect("reply delivered");
    assert_eq!((&*reply.from, &reply.data[..]), ("anon-b", &b"hi anonymous"[..]));

    // The named listener refuses anonymous dialers.
    let failures = b.stats().auth_failures;
    let refused = Node::start(client_config("anon-refused")).expect("client");
    refused.add_route("anon-b", named).expect("route");
    refused
        .send("anon-b", 1, Bytes::from_static(b"let me in"))
        .expect("send");
    wait_for("the refusal", || b.stats().auth_failures > failures);
    assert!(drain(&b, Duration::from_millis(500)).is_empty());
    assert_eq!(refused.stats().connections_established, 0);
    refused.stop(Duration::ZERO);

    // A raw anonymous peer addressing another node through B.
    let anonymous = HandshakeData {
        version: 3,
        minimal_version: 3,
        incarnation: 9,
        auth: Some(HandshakeAuth {
            timestamp_microseconds: now_micros(),
            nonce: Bytes::from_static(&[8; 16]),
            anonymous: true,
            ..HandshakeAuth::default()
        }),
        ..HandshakeData::default()
    };
    let socket = raw(
        &open,
        &[
            handshake_frame(&anonymous),
            data("for someone else", Some("anon-other")),
        ],
    );
    expect_unauthorized(socket, "may talk to \"anon-b\" only");
    assert!(drain(&b, Duration::from_millis(500)).is_empty());
    c.stop(Duration::ZERO);
}

/// A ticket the acceptor cannot honour (it restarted: new ticket keys) is
/// refused; the dialer redials at once with a full handshake and the message
/// that rode in the refused flight arrives, once.
#[test]
fn a_refused_ticket_falls_back_to_a_full_handshake_and_loses_nothing() {
    let discovery = Arc::new(MemoryDiscovery::new());
    let b1 = Node::start(config("fallback-b", &["s3cret"], &discovery)).expect("b");
    let at = tcp_address(&b1);
    let mut a_config = config("fallback-a", &["s3cret"], &discovery);
    a_config.reconnect_min = Duration::from_millis(300);
    a_config.reconnect_max = Duration::from_millis(600);
    let a = Node::start(a_config).expect("a");
    a.add_route("fallback-b", at.clone()).expect("route");
    a.send("fallback-b", 1, Bytes::from_static(b"one")).expect("send");
    assert_eq!(
        drain(&b1, Duration::from_secs(2)),
        vec![("fallback-a".into(), "one".into())]
    );

    // B restarts on the same address while A holds a ticket from the old B.
    let closed = a.stats().connections_closed;
    b1.stop(Duration::ZERO);
    drop(b1);
    wait_for("A to notice", || a.stats().connections_closed > closed);
    let mut b2_config = config("fallback-b", &["s3cret"], &discovery);
    b2_config.listen = vec![at.clone()];
    let b2 = Node::start(b2_config).expect("b restarts");
    a.send("fallback-b", 1, Bytes::from_static(b"two")).expect("send");
    assert_eq!(
        drain(&b2, Duration::from_secs(3)),
        vec![("fallback-a".into(), "two".into())]
    );
    let stats = b2.stats();
    assert_eq!(stats.auth_failures, 1, "the stale ticket was refused once: {stats:?}");
    a.stop(Duration::ZERO);
}

/// Tokens over unix and udp links as well (the datagram handshake resends
/// its first flight until answered).
#[test]
fn tokens_on_unix_and_udp_links() {
    let discovery = Arc::new(MemoryDiscovery::new());
    for (scheme, listen) in [("unix", "unix://@auth-unix-b"), ("udp", "udp://127.0.0.1:0")] {
        let b_name = format!("{scheme}-auth-b");
        let mut b_config = config(&b_name, &["s3cret"], &discovery);
        b_config.listen = vec![listen.parse().expect("address")];
        b_config.latency_path = true;
        let b = Node::start(b_config).expect("b");
        let at = b.listen_addresses()[0].clone();
        let mut good = config(&format!("{scheme}-auth-a"), &["s3cret"], &discovery);
        good.latency_path = true;
        let good = Node::start(good).expect("a");
        let bad = Node::start(config(&format!("{scheme}-auth-x"), &["wrong"], &discovery)).expect("x");
        for node in [&good, &bad] {
            node.add_route(&b_name, at.clone()).expect("route");
            node.send(&b_name, 1, Bytes::from_static(b"bulk")).expect("send");
            node.send_urgent(&b_name, 2, Bytes::from_static(b"urgent"))
                .expect("send");
        }
        let mut got = drain(&b, Duration::from_secs(3));
        got.sort();
        let from = format!("{scheme}-auth-a");
        assert_eq!(
            got,
            vec![(from.clone(), "bulk".to_string()), (from, "urgent".to_string())],
            "{scheme}"
        );
        assert!(b.stats().auth_failures >= 1, "{scheme}: {:?}", b.stats());
        assert_eq!(bad.stats().connections_established, 0, "{scheme}");
        for node in [good, bad, b] {
            node.stop(Duration::ZERO);
        }
    }
}
