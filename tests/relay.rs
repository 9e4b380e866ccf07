//! Relays in one process over real sockets: the seed's cross-namespace
//! topology (app → own relay → other namespace's relay → app), the relay
//! policies, hop limits and unreachable destinations. Each node gets a host
//! of its own in its record, so routing never takes the in-process path.
//! (Separate processes and failover: tests/relay_processes.rs.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libatbus::discovery::{
    Discovery, Gateway, Host, Match, MemoryDiscovery, Metadata, NodeRecord, Record, RelaySelector,
};
use libatbus::node::{DiscoverySource, Node, NodeConfig, RelayPolicy};

/// `ATBUS_LOG=debug cargo test --test relay -- --nocapture` shows the
/// nodes' logs.
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("ATBUS_LOG").unwrap_or_default(),
        ))
        .with_test_writer()
        .try_init();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn metadata(namespace: &str, kind: &str) -> Metadata {
    Metadata {
        namespace_name: namespace.into(),
        kind: kind.into(),
        ..Metadata::default()
    }
}

fn only(metadata: Metadata) -> Option<Match> {
    Some(Match {
        host: None,
        metadata: Some(metadata),
    })
}

fn relay_of(namespace: &str) -> RelaySelector {
    RelaySelector {
        name: String::new(),
        metadata: Some(metadata(namespace, "relay")),
    }
}

/// A node with its own host, these gateways (each listened on), metadata
/// and relay selector.
struct Spec {
    name: &'static str,
    metadata: Metadata,
    gateways: Vec<(i32, Option<Match>)>,
    advertise: Option<RelaySelector>,
    forward: bool,
    policy: RelayPolicy,
    /// The gateways' scheme: `tcp` or `udp`.
    transport: &'static str,
}

fn start(spec: Spec, discovery: &Arc<MemoryDiscovery>) -> Node {
    let mut gateways = Vec::new();
    let mut listen = Vec::new();
    for (priority, rule) in spec.gateways {
        let address = match spec.transport {
            "udp" => format!("udp://127.0.0.1:{}", free_udp_port()),
            _ => format!("tcp://127.0.0.1:{}", free_port()),
        };
        listen.push(address.clone());
        gateways.push(Gateway {
            priority,
            address: vec![address],
            r#match: rule,
        });
    }
    let listen: Vec<&str> = listen.iter().map(String::as_str).collect();
    let mut config = NodeConfig::new(spec.name, &listen).expect("config");
    config.discovery = DiscoverySource(discovery.clone());
    config.host = Some(Host {
        hostname: format!("host-{}", spec.name),
        pid: 1,
    });
    config.metadata = spec.metadata;
    config.gateways = gateways;
    config.relay.forward = spec.forward;
    config.relay.policy = spec.policy;
    config.advertise_relay = spec.advertise;
    Node::start(config).expect("node starts")
}

fn app(name: &'static str, namespace: &str, policy: RelayPolicy) -> Spec {
    Spec {
        name,
        metadata: metadata(namespace, "app"),
        gateways: vec![(
            1,
            only(Metadata {
                namespace_name: namespace.into(),
                ..Metadata::default()
            }),
        )],
        advertise: Some(relay_of(namespace)),
        forward: false,
        policy,
        transport: "tcp",
    }
}

/// A namespace relay as in the seed: internal gateway for its namespace,
/// external one for every relay; `open`: a third that admits anyone.
fn relay(name: &'static str, namespace: &str, open: bool) -> Spec {
    let mut gateways = vec![
        (
            1,
            only(Metadata {
                namespace_name: namespace.into(),
                ..Metadata::default()
            }),
        ),
        (2, only(metadata("", "relay"))),
    ];
    if open {
        gateways.push((3, None));
    }
    Spec {
        name,
        metadata: metadata(namespace, "relay"),
        gateways,
        advertise: None,
        forward: true,
        policy: RelayPolicy::OwnRelay,
        transport: "tcp",
    }
}

fn forwarded(node: &Node) -> u64 {
    node.stats().relayed_frames
}

/// Sends `count` numbered messages `from` → `to` on stream 1 and checks
/// they all arrive, in order, once.
fn exchange(from: &Node, to: &Node, count: u64) {
    let started = Instant::now();
    let sender = {
        let from_name = from.name().to_string();
        let to_name = to.name().to_string();
        let _ = from_name;
        move |node: &Node| {
            for i in 0..count {
                let mut data = vec![0u8; 64];
                data[..8].copy_from_slice(&i.to_le_bytes());
                node.send_blocking(&to_name, 1, Bytes::from(data), Duration::from_secs(30))
                    .unwrap_or_else(|e| panic!("send {i}: {e}"));
            }
        }
    };
    std::thread::scope(|scope| {
        scope.spawn(|| sender(from));
        let mut next = 0u64;
        while next < count {
            let message = to
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|| panic!("message {next} of {count} did not arrive"));
            assert_eq!(&*message.from, from.name());
            let got = u64::from_le_bytes(message.data[..8].try_into().expect("8 bytes"));
            assert_eq!(got, next, "in order, once");
            next += 1;
        }
    });
    println!(
        "{} -> {}: {count} messages in {:?}",
        from.name(),
        to.name(),
        started.elapsed()
    );
}

#[test]
fn cross_namespace_through_two_relays() {
    logs();
    let discovery = Arc::new(MemoryDiscovery::new());
    let relay1 = start(relay("relay1", "ns1", false), &discovery);
    let relay2 = start(relay("relay2", "ns2", false), &discovery);
    let app1 = start(app("app1", "ns1", RelayPolicy::OwnRelay), &discovery);
    let app2 = start(app("app2", "ns2", RelayPolicy::OwnRelay), &discovery);
    exchange(&app1, &app2, 100_000);
    exchange(&app2, &app1, 10_000);
    assert!(forwarded(&relay1) > 0 && forwarded(&relay2) > 0);
    let names: BTreeMap<&str, Vec<String>> = [("app1", app1.connected_peers()), ("app2", app2.connected_peers())]
        .into_iter()
        .collect();
    println!("{names:?}");
    for node in [&app1, &app2, &relay1, &relay2] {
        node.stop(Duration::from_millis(200));
    }
    drop(discovery.snapshot());
}

/// Frames `relay` forwarded while `work` ran.
/// The same over UDP connections: tunnel frames of up to 32 KiB pass
/// relays whose UDP paths (loopback: the route's MTU) carry them whole.
#[test]
fn cross_namespace_through_two_relays_over_udp() {
    logs();
    let discovery = Arc::new(MemoryDiscovery::new());
    let udp = |spec: Spec| Spec {
        transport: "udp",
        ..spec
    };
    let relay1 = start(udp(relay("udp-relay1", "uns1", false)), &discovery);
    let relay2 = start(udp(relay("udp-relay2", "uns2", false)), &discovery);
    let app1 = start(udp(app("udp-app1", "uns1", RelayPolicy::OwnRelay)), &discovery);
    let app2 = start(udp(app("udp-app2", "uns2", RelayPolicy::OwnRelay)), &discovery);
    exchange(&app1, &app2, 100_000);
    exchange(&app2, &app1, 10_000);
    assert!(forwarded(&relay1) > 0 && forwarded(&relay2) > 0);
    for node in [&app1, &app2, &relay1, &relay2] {
        assert_eq!(node.stats().bad_frames, 0, "{}", node.name());
        node.stop(Duration::from_millis(200));
    }
}

fn forwarded_during(relay: &Node, work: impl FnOnce()) -> u64 {
    let before = forwarded(relay);
    work();
    forwarded(relay) - before
}

/// Both policies, checked by which relay passed the traffic on: relay2 lets
/// anyone in, so a node preferring the target's relay goes straight there,
/// and one preferring its own goes through relay1 first.
#[test]
fn own_relay_and_target_relay_policies_take_their_paths() {
    logs();
    let discovery = Arc::new(MemoryDiscovery::new());
    let relay1 = start(relay("pol-relay1", "ns1", false), &discovery);
    let relay2 = start(relay("pol-relay2", "ns2", true), &discovery);
    let own = start(app("app-own", "ns1", RelayPolicy::OwnRelay), &discovery);
    let target = start(app("app-target", "ns1", RelayPolicy::TargetRelay), &discovery);
    let app2 = start(app("pol-app2", "ns2", RelayPolicy::OwnRelay), &discovery);

    // The target-policy node first, while nothing else goes through relay1.
    let mut via_relay2 = 0;
    let via_relay1 = forwarded_during(&relay1, || {
        via_relay2 = forwarded_during(&relay2, || exchange(&target, &app2, 2_000));
    });
    assert_eq!(via_relay1, 0, "target policy: nothing through relay1");
    // 2 000 × 64 B fill at least four 32 KiB tunnel frames.
    assert!(via_relay2 >= 4, "target policy: relay2 carried {via_relay2} frames");
    let via_relay1 = forwarded_during(&relay1, || exchange(&own, &app2, 2_000));
    assert!(via_relay1 >= 4, "own policy: relay1 carried {via_relay1} frames");
    assert!(target.connected_peers().contains(&"pol-relay2".to_string()));
    assert!(!target.connected_peers().contains(&"pol-relay1".to_string()));
}

fn record(name: &str, namespace: &str, advertise: Option<RelaySelector>) -> Record {
    Record::Node(NodeRecord {
        name: name.into(),
        r#type: "node".into(),
        host: Some(Host {
            hostname: format!("host-{name}"),
            pid: 1,
        }),
        metadata: Some(metadata(namespace, "app")),
        gateway: vec![Gateway {
            priority: 1,
            address: vec![format!("tcp://127.0.0.1:{}", free_port())],
            r#match: only(metadata("nobody", "")),
        }],
        advertise_relay: advertise,
        ..NodeRecord::default()
    })
}

fn by_name(name: &str) -> RelaySelector {
    RelaySelector {
        name: name.into(),
        metadata: None,
    }
}

/// Sends one message to `to` and waits for the give-up report; its reason.
fn undeliverable(app: &Node, to: &str) -> String {
    app.send(to, 1, Bytes::from_static(b"lost"))
        .unwrap_or_else(|e| panic!("send to {to}: {e}"));
    let report = app
        .recv_undelivered(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no report for {to}"));
    assert_eq!(report.messages, 1);
    report.reason
}

fn quick_app(name: &'static str, namespace: &str, advertise: RelaySelector, discovery: &Arc<MemoryDiscovery>) -> Node {
    let mut config = NodeConfig::new(name, &["tcp://127.0.0.1:0"]).expect("config");
    config.discovery = DiscoverySource(discovery.clone());
    config.host = Some(Host {
        hostname: format!("host-{name}"),
        pid: 1,
    });
    config.metadata = metadata(namespace, "app");
    config.advertise_relay = Some(advertise);
    config.peer_give_up = Duration::from_secs(2);
    Node::start(config).expect("node starts")
}

/// A destination no relay can reach: the first relay answers
/// ROUTER_NOT_FOUND on the tunnel, and the sender's give-up report says so.
#[test]
fn an_unreachable_destination_gets_router_not_found() {
    logs();
    let discovery = Arc::new(MemoryDiscovery::new());
    let relay_a = start(relay("relay-a", "ns1", false), &discovery);
    let app = quick_app("lonely", "ns1", relay_of("ns1"), &discovery);
    // "island" names relay-a as its relay, but relay-a cannot dial it.
    discovery
        .publish(record("island", "void", Some(relay_of("ns1"))))
        .expect("publish");
    let reason = undeliverable(&app, "island");
    println!("{reason}");
    assert!(
        reason.contains("RouterNotFound") && reason.contains("relay-a"),
        "{reason}"
    );
    assert!(relay_a.stats().relay_dropped > 0);
    assert!(app.stats().handshake_failures > 0);
}

/// Three relays that each send "ghost" on to the next: the frame goes round
/// until the hop limit, where it is dropped and the sender told HOP_LIMIT.
#[test]
fn a_relay_loop_ends_at_the_hop_limit() {
    logs();
    let discovery = Arc::new(MemoryDiscovery::new());
    let mut relays = Vec::new();
    for (name, next) in [("loop-a", "loop-b"), ("loop-b", "loop-c"), ("loop-c", "loop-a")] {
        let mut spec = relay(name, "ns1", false);
        spec.advertise = Some(by_name(next));
        relays.push(start(spec, &discovery));
    }
    let app = quick_app("looper", "ns1", by_name("loop-a"), &discovery);
    discovery
        .publish(record("ghost", "void", Some(by_name("nowhere"))))
        .expect("publish");
    let reason = undeliverable(&app, "ghost");
    println!("{reason}");
    assert!(reason.contains("HopLimit"), "{reason}");
    let dropped: u64 = relays.iter().map(|r| r.stats().relay_dropped).sum();
    assert!(dropped > 0);
    // Each attempt passes at most max_hops relays.
    let passed: u64 = relays.iter().map(forwarded).sum();
    let attempts = app.stats().handshake_failures.max(1);
    assert!(
        passed <= attempts * 3 * 8 + 64,
        "{passed} frames forwarded for {attempts} attempts"
    );
}

fn client(grant: &libatbus::grant::ClientGrant, token: &str, discovery: &Arc<MemoryDiscovery>) -> Node {
    let mut config = NodeConfig::new(&grant.name, &[]).expect("config");
    config.discovery = DiscoverySource(discovery.clone());
    config.host = Some(Host {
        hostname: "a-phone".into(),
        pid: 1,
    });
    config.metadata = metadata("internet", "client");
    config.client = true;
    config.auth.tokens = vec![token.to_string()];
    config.advertise_relay = Some(RelaySelector {
        name: String::new(),
        metadata: Some(metadata("", "client-relay")),
    });
    config.peer_give_up = Duration::from_secs(2);
    config.connect_timeout = Duration::from_millis(500);
    Node::start(config).expect("client starts")
}

/// A server allocates a client (name, stream, token) in discovery; the
/// client reaches it through a client relay and gets its reply. The same
/// name with a forged token, another stream, or another destination is
/// closed UNAUTHORIZED, and nothing of it reaches the server.
#[test]
fn an_allocated_client_gets_through_and_a_forged_one_does_not() {
    logs();
    let discovery = Arc::new(MemoryDiscovery::new());
    let server = start(
        Spec {
            name: "game-server",
            metadata: metadata("ns1", "app"),
            gateways: vec![(1, only(metadata("ns1", "")))],
            advertise: None,
            forward: false,
            policy: RelayPolicy::OwnRelay,
            transport: "tcp",
        },
        &discovery,
    );
    let edge = start(
        Spec {
            name: "edge-relay",
            metadata: metadata("ns1", "client-relay"),
            gateways: vec![(1, None)],
            advertise: None,
            forward: true,
            policy: RelayPolicy::OwnRelay,
            transport: "tcp",
        },
        &discovery,
    );
    let selector = RelaySelector {
        name: String::new(),
        metadata: Some(metadata("", "client-relay")),
    };
    let grant = server
        .issue_client(None, 7, Duration::from_secs(600), Some(selector))
        .expect("grant");
    assert!(
        server
            .issue_client(Some(&grant.name), 7, Duration::from_secs(1), None)
            .is_err()
    );

    let phone = client(&grant, &grant.token, &discovery);
    phone
        .send("game-server", 7, Bytes::from_static(b"hello"))
        .expect("send");
    let got = server
        .recv_timeout(Duration::from_secs(10))
        .expect("the client's message");
    assert_eq!(
        (&*got.from, got.stream_id, &got.data[..]),
        (grant.name.as_str(), 7, &b"hello"[..])
    );
    server
        .send(&grant.name, 7, Bytes::from_static(b"welcome"))
        .expect("reply");
    let reply = phone.recv_timeout(Duration::from_secs(10)).expect("the server's reply");
    assert_eq!((&*reply.from, &reply.data[..]), ("game-server", &b"welcome"[..]));
    assert!(forwarded(&edge) > 0, "through the client relay");

    // Another stream: the relay closes the client.
    let failures = edge.stats().auth_failures;
    phone
        .send("game-server", 8, Bytes::from_static(b"sneaky"))
        .expect("queued");
    wait_for(|| edge.stats().auth_failures > failures, "the relay refuses stream 8");
    phone.stop(Duration::from_millis(100));

    // The same name with a forged token.
    let failures = edge.stats().auth_failures;
    let forged = client(
        &grant,
        "0000000000000000000000000000000000000000000000000000000000000000",
        &discovery,
    );
    let reason = undeliverable(&forged, "game-server");
    println!("{reason}");
    assert!(reason.contains("Unauthorized"), "{reason}");
    assert!(edge.stats().auth_failures > failures);
    forged.stop(Duration::from_millis(100));

    // Nothing but the first message reached the server.
    assert!(server.recv_timeout(Duration::from_millis(300)).is_none());
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
