//! Relays as real processes (`atbus-relay`), on a real etcd, reproducing the
//! seed's Kubernetes examples with loopback address ranges as the
//! "namespaces" (ns1 = 127.0.1.x, ns2 = 127.0.2.x, hub = 127.0.3.x); the
//! gateway `match` rules keep each namespace's apps reachable only from
//! inside it, exactly as in the seed's records.
//!
//! - `cross_namespace_*`: app1 (this process) → relay1 → relay2 → app2 (a
//!   child process echoing every message back): 100 000 messages in order,
//!   each echoed once; then a client behind a client relay reaches app1 with
//!   the name and token app1 allocated, and the same name with a forged
//!   token is refused UNAUTHORIZED.
//! - `cross_region_*`: app1 (CN) → relay1 → hub relay3 → relay2 → app2 (US).
//! - `a_relay_killed_mid_transfer_*`: two relays serve both apps; the one
//!   carrying the traffic is SIGKILLed mid-transfer: every message still
//!   arrives once, in order, and the time to resume is printed.

#![cfg(feature = "etcd")]

mod etcd_server;
mod process;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_server::EtcdServer;
use libatbus::node::{Node, NodeConfig};
use process::Process;

const ECHOED: u64 = 100_000;

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("atbus-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// One node's YAML: name, namespace metadata (and region label), gateways
/// `(priority, ip, match-yaml)`, each listened on, advertise_relay YAML.
struct Yaml<'a> {
    name: &'a str,
    namespace: &'a str,
    kind: &'a str,
    region: Option<&'a str>,
    gateways: Vec<(i32, &'a str, &'a str)>,
    advertise: Option<&'a str>,
}

impl Yaml<'_> {
    fn write(&self, dir: &Path, etcd: &str) -> PathBuf {
        let labels = self
            .region
            .map(|r| format!(", labels: {{ \"area.region\": \"{r}\" }}"))
            .unwrap_or_default();
        let mut listen = Vec::new();
        let mut gateways = String::new();
        for (priority, ip, rule) in &self.gateways {
            let address = format!("tcp://{ip}:{}", free_port(ip));
            gateways.push_str(&format!(
                "  - priority: {priority}\n    address: [\"{address}\"]\n    match: {rule}\n"
            ));
            listen.push(format!("\"{address}\""));
        }
        let advertise = self
            .advertise
            .map(|a| format!("advertise_relay: {a}\n"))
            .unwrap_or_default();
        let text = format!(
            "name: {name}\nlisten: [{listen}]\nshards: 1\nhost: {{ hostname: host-{name} }}\n\
             metadata: {{ namespace_name: {ns}, kind: {kind}{labels} }}\n\
             discovery: {{ type: etcd, endpoints: [\"{etcd}\"], prefix: /relay-test/, ttl_seconds: 5 }}\n\
             timeouts_ms: {{ connect: 1000, reconnect_max: 500, idle: 3000 }}\n\
             gateways:\n{gateways}{advertise}",
            name = self.name,
            listen = listen.join(", "),
            ns = self.namespace,
            kind = self.kind,
        );
        let path = dir.join(format!("{}.yaml", self.name));
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .expect("config file");
        path
    }
}

/// A relay process from its config.
fn relay_process(config: &Path) -> Process {
    let name = config
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut command = Command::new(env!("CARGO_BIN_EXE_atbus-relay"));
    command.arg("--config").arg(config).args(["--status-every", "0"]);
    let process = Process::spawn(&name, command);
    process.expect("# relay ", Duration::from_secs(30));
    process
}

/// An echo node (this test binary in child mode) from its config.
fn echo_process(config: &Path) -> Process {
    let name = config
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command
        .args(["--exact", "echo_child", "--nocapture", "--test-threads", "1"])
        .env("ATBUS_ECHO_CONFIG", config);
    let process = Process::spawn(&name, command);
    process.expect("ECHO READY", Duration::from_secs(30));
    process
}

/// The echo node, when run by a test below (otherwise it returns at once):
/// every message goes back to its sender on the same stream.
#[test]
fn echo_child() {
    let Ok(config) = std::env::var("ATBUS_ECHO_CONFIG") else {
        return;
    };
    let config = NodeConfig::from_yaml_file(&config).expect("echo config");
    let node = Node::start(config).expect("echo node starts");
    println!("ECHO READY");
    loop {
        if let Some(message) = node.recv_timeout(Duration::from_secs(60)) {
            node.send_blocking(&message.from, message.stream_id, message.data, Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("echo to {}: {e}", message.from));
        }
    }
}

/// Waits until `node` resolves `peer` through discovery.
fn wait_known(node: &Node, peer: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.route_to(peer).is_none() {
        match node.send(peer, 99, Bytes::from_static(b"probe")) {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "{peer} never showed up: {e}"),
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one message once `node` finds `peer` in discovery.
fn send_when_known(node: &Node, peer: &str, stream: i64, data: &'static [u8]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = node.send(peer, stream, Bytes::from_static(data)) {
        assert!(Instant::now() < deadline, "{peer} never showed up: {e}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `count` numbered 64 B messages to `peer` on stream 1 and checks
/// that each comes back once, in order. `on_progress(received)` runs after
/// every echo. Returns the longest gap between two echoes.
fn echo_exchange(node: &Arc<Node>, peer: &str, count: u64, mut on_progress: impl FnMut(u64)) -> Duration {
    let sender = {
        let (node, peer) = (node.clone(), peer.to_string());
        thread::spawn(move || {
            for seq in 0..count {
                let mut data = vec![0u8; 64];
                data[..8].copy_from_slice(&seq.to_le_bytes());
                node.send_blocking(&peer, 1, Bytes::from(data), Duration::from_secs(60))
                    .unwrap_or_else(|e| panic!("send {seq}: {e}"));
            }
        })
    };
    let mut next = 0u64;
    let mut last = Instant::now();
    let mut longest = Duration::ZERO;
    while next < count {
        let message = node
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("echo {next} of {count} never came"));
        if message.stream_id != 1 {
            continue;
        }
        assert_eq!(&*message.from, peer);
        let seq = u64::from_le_bytes(message.data[..8].try_into().expect("8 bytes"));
        assert_eq!(seq, next, "each echo once, in order");
        longest = longest.max(last.elapsed());
        last = Instant::now();
        next += 1;
        on_progress(next);
    }
    sender.join().expect("sender");
    longest
}

const NS1: &str = "{ metadata: { namespace_name: ns1 } }";
const NS2: &str = "{ metadata: { namespace_name: ns2 } }";
const ANY_RELAY: &str = "{ metadata: { kind: relay } }";

/// The seed's cross-namespace example, then a client through a client relay.
#[test]
fn cross_namespace_through_relay_processes_and_an_allocated_client() {
    let etcd = EtcdServer::start("relay-ns");
    let dir = scratch("relay-ns");
    let url = etcd.endpoint();
    let relay = |name, ns, ip_in, ip_out, rule_in| Yaml {
        name,
        namespace: ns,
        kind: "relay",
        region: None,
        gateways: vec![(1, ip_in, rule_in), (2, ip_out, ANY_RELAY)],
        advertise: None,
    };
    let _relay1 = relay_process(&relay("relay1", "ns1", "127.0.1.2", "127.0.1.3", NS1).write(&dir, &url));
    let _relay2 = relay_process(&relay("relay2", "ns2", "127.0.2.2", "127.0.2.3", NS2).write(&dir, &url));
    let app = |name, ns, ip, rule| Yaml {
        name,
        namespace: ns,
        kind: "app",
        region: None,
        gateways: vec![(1, ip, rule)],
        advertise: Some(if ns == "ns1" {
            "{ metadata: { namespace_name: ns1, kind: relay } }"
        } else {
            "{ metadata: { namespace_name: ns2, kind: relay } }"
        }),
    };
    let _app2 = echo_process(&app("app2", "ns2", "127.0.2.1", NS2).write(&dir, &url));
    let app1 = Arc::new(
        Node::start(NodeConfig::from_yaml_file(app("app1", "ns1", "127.0.1.1", NS1).write(&dir, &url)).expect("app1"))
            .expect("app1 starts"),
    );
    wait_known(&app1, "app2");
    let started = Instant::now();
    let longest = echo_exchange(&app1, "app2", ECHOED, |_| {});
    println!(
        "cross-namespace: {ECHOED} messages app1 -> relay1 -> relay2 -> app2 and back in {:?} (longest gap {longest:?})",
        started.elapsed()
    );
    assert!(app1.connected_peers().contains(&"relay1".to_string()));

    // The client relay: reachable by anyone (an ingress), inside ns1.
    let _edge = relay_process(
        &Yaml {
            name: "edge1",
            namespace: "ns1",
            kind: "client-relay",
            region: None,
            gateways: vec![(1, "127.0.1.4", "{}")],
            advertise: None,
        }
        .write(&dir, &url),
    );
    let selector = libatbus::discovery::RelaySelector {
        name: String::new(),
        metadata: Some(libatbus::discovery::Metadata {
            kind: "client-relay".into(),
            ..Default::default()
        }),
    };
    let grant = app1
        .issue_client(None, 5, Duration::from_secs(600), Some(selector))
        .expect("grant");
    let client_yaml = |token: &str| {
        let path = dir.join(format!("client-{}.yaml", &token[..4]));
        let text = format!(
            "name: {name}\nclient: true\nshards: 1\nhost: {{ hostname: a-phone }}\n\
             metadata: {{ namespace_name: internet }}\nauth: {{ tokens: [\"{token}\"] }}\n\
             advertise_relay: {{ metadata: {{ kind: client-relay }} }}\n\
             discovery: {{ type: etcd, endpoints: [\"{url}\"], prefix: /relay-test/ }}\n\
             timeouts_ms: {{ connect: 500, give_up: 3000 }}\n",
            name = grant.name
        );
        std::fs::write(&path, text).expect("client config");
        path
    };
    let phone = Node::start(NodeConfig::from_yaml_file(client_yaml(&grant.token)).expect("client")).expect("client");
    // No probe on another stream: the grant allows stream 5 only.
    send_when_known(&phone, "app1", 5, b"hello from the phone");
    let got = loop {
        let m = app1
            .recv_timeout(Duration::from_secs(20))
            .expect("the client's message");
        if m.stream_id == 5 {
            break m;
        }
    };
    assert_eq!(&*got.from, grant.name.as_str());
    app1.send(&grant.name, 5, Bytes::from_static(b"welcome"))
        .expect("reply");
    let reply = phone
        .recv_timeout(Duration::from_secs(20))
        .expect("reply reaches the client");
    assert_eq!(&reply.data[..], b"welcome");
    phone.stop(Duration::from_millis(200));
    println!(
        "allocated client {} reached app1 through edge1 and got its reply",
        grant.name
    );

    let forged = Node::start(
        NodeConfig::from_yaml_file(client_yaml(
            "forged0000000000000000000000000000000000000000000000000000000000",
        ))
        .expect("forged client"),
    )
    .expect("forged client starts");
    send_when_known(&forged, "app1", 5, b"forged");
    let report = forged
        .recv_undelivered(Duration::from_secs(20))
        .expect("the forged client's message is reported undelivered");
    println!("forged client: {}", report.reason);
    assert!(report.reason.contains("Unauthorized"), "{}", report.reason);
    assert!(
        app1.recv_timeout(Duration::from_millis(500))
            .is_none_or(|m| m.stream_id == 99 || *m.from != *grant.name),
        "nothing of the forged client reaches app1"
    );
    forged.stop(Duration::from_millis(100));
    app1.stop(Duration::from_millis(500));
}

/// The seed's cross-region example: CN and US namespace relays meet at a
/// hub relay (region "any").
#[test]
fn cross_region_through_three_relay_processes() {
    let etcd = EtcdServer::start("relay-region");
    let dir = scratch("relay-region");
    let url = etcd.endpoint();
    let region_relay = |name, ns, region, ips: [&'static str; 3], rule_in, rule_region| Yaml {
        name,
        namespace: ns,
        kind: "relay",
        region: Some(region),
        gateways: vec![
            (1, ips[0], rule_in),
            (2, ips[1], rule_region),
            (
                3,
                ips[2],
                "{ metadata: { kind: relay, labels: { \"area.region\": \"any\" } } }",
            ),
        ],
        advertise: Some("{ metadata: { kind: relay, labels: { \"area.region\": \"any\" } } }"),
    };
    let _relay1 = relay_process(
        &region_relay(
            "relay1",
            "ns1",
            "CN",
            ["127.0.1.2", "127.0.1.3", "127.0.1.5"],
            NS1,
            "{ metadata: { kind: relay, labels: { \"area.region\": \"CN\" } } }",
        )
        .write(&dir, &url),
    );
    let _relay2 = relay_process(
        &region_relay(
            "relay2",
            "ns2",
            "US",
            ["127.0.2.2", "127.0.2.3", "127.0.2.5"],
            NS2,
            "{ metadata: { kind: relay, labels: { \"area.region\": \"US\" } } }",
        )
        .write(&dir, &url),
    );
    let relay3 = relay_process(
        &Yaml {
            name: "relay3",
            namespace: "ns3",
            kind: "relay",
            region: Some("any"),
            gateways: vec![
                (1, "127.0.3.2", "{ metadata: { namespace_name: ns3 } }"),
                (2, "127.0.3.3", ANY_RELAY),
            ],
            advertise: None,
        }
        .write(&dir, &url),
    );
    let app = |name, ns, region, ip, rule, relay_ns| Yaml {
        name,
        namespace: ns,
        kind: "app",
        region: Some(region),
        gateways: vec![(1, ip, rule)],
        advertise: Some(relay_ns),
    };
    let _app2 = echo_process(
        &app(
            "cr-app2",
            "ns2",
            "US",
            "127.0.2.1",
            NS2,
            "{ metadata: { namespace_name: ns2, kind: relay } }",
        )
        .write(&dir, &url),
    );
    let app1 = Arc::new(
        Node::start(
            NodeConfig::from_yaml_file(
                app(
                    "cr-app1",
                    "ns1",
                    "CN",
                    "127.0.1.1",
                    NS1,
                    "{ metadata: { namespace_name: ns1, kind: relay } }",
                )
                .write(&dir, &url),
            )
            .expect("cr-app1"),
        )
        .expect("app1 starts"),
    );
    wait_known(&app1, "cr-app2");
    let started = Instant::now();
    let longest = echo_exchange(&app1, "cr-app2", ECHOED, |_| {});
    println!(
        "cross-region: {ECHOED} messages cr-app1 -> relay1 -> relay3 -> relay2 -> cr-app2 and back in {:?} (longest gap {longest:?})",
        started.elapsed()
    );
    drop(relay3);
    app1.stop(Duration::from_millis(500));
}

/// Two relays serve both apps; the one carrying app1's traffic is killed
/// mid-transfer.
#[test]
fn a_relay_killed_mid_transfer_loses_nothing() {
    let etcd = EtcdServer::start("relay-kill");
    let dir = scratch("relay-kill");
    let url = etcd.endpoint();
    let only_relays = "{ metadata: { kind: relay } }";
    let relay = |name, ip| Yaml {
        name,
        namespace: "shared",
        kind: "relay",
        region: None,
        gateways: vec![(1, ip, "{}")],
        advertise: None,
    };
    let mut relays = [
        (
            "relay-a",
            relay_process(&relay("relay-a", "127.0.4.1").write(&dir, &url)),
        ),
        (
            "relay-b",
            relay_process(&relay("relay-b", "127.0.4.2").write(&dir, &url)),
        ),
    ];
    let app = |name, ns, ip| Yaml {
        name,
        namespace: ns,
        kind: "app",
        region: None,
        gateways: vec![(1, ip, only_relays)],
        advertise: Some("{ metadata: { kind: relay } }"),
    };
    let _app2 = echo_process(&app("ko-app2", "ns2", "127.0.2.1").write(&dir, &url));
    let app1 = Arc::new(
        Node::start(NodeConfig::from_yaml_file(app("ko-app1", "ns1", "127.0.1.1").write(&dir, &url)).expect("ko-app1"))
            .expect("app1 starts"),
    );
    wait_known(&app1, "ko-app2");
    // The relay rendezvous hashing gives app1's traffic to app2.
    let carrier = libatbus::discovery::rendezvous("ko-app2", ["relay-a", "relay-b"]).expect("a relay");
    let mut killed_at: Option<Instant> = None;
    let mut last_echo = Instant::now();
    let mut stall = Duration::ZERO;
    let mut received_at_kill = 0;
    let started = Instant::now();
    echo_exchange(&app1, "ko-app2", ECHOED, |received| {
        if killed_at.is_some() {
            // The longest wait for an echo after the kill: the failover.
            stall = stall.max(last_echo.elapsed());
        }
        last_echo = Instant::now();
        if received == ECHOED / 5 {
            let (_, process) = relays.iter_mut().find(|(n, _)| *n == carrier).expect("carrier");
            process.kill();
            killed_at = Some(Instant::now());
            received_at_kill = received;
        }
    });
    assert!(killed_at.is_some());
    let other = if carrier == "relay-a" { "relay-b" } else { "relay-a" };
    // The other relay carries the tunnel now (a connection that is just
    // being redialled is given a moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !app1.connected_peers().contains(&other.to_string()) {
        assert!(Instant::now() < deadline, "{:?}", app1.connected_peers());
        thread::sleep(Duration::from_millis(20));
    }
    println!(
        "failover: {carrier} SIGKILLed after {received_at_kill} echoes; echoes stopped for at most {stall:?} \
         until traffic went on through {other}; all {ECHOED} echoes once and in order in {:?}",
        started.elapsed()
    );
    app1.stop(Duration::from_millis(500));
}
