//! The seed's cross-namespace example across real network namespaces: the
//! test makes two (`ip netns`), joined only by a veth pair. In namespace A:
//! etcd, relay1 and app1; in namespace B: relay2 and app2. Each app listens
//! on its namespace's loopback only, so nothing but the relays' veth
//! addresses crosses: app1 → relay1 (A's loopback) → relay2 (veth) → app2
//! (B's loopback). app1 sends 100 000 messages, app2 echoes each; app1
//! checks every echo arrives once and in order.
//!
//! Needs root (network namespaces); as another user the test says so and
//! passes without running (CI runs as root).

#![cfg(feature = "etcd")]

mod process;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libatbus::node::{Node, NodeConfig};
use process::Process;

const MESSAGES: u64 = 100_000;

/// A network namespace, deleted (with what runs in it) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: String) -> Netns {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// `argv` inside this namespace.
    fn command(&self, argv: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(argv);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn run(argv: &[&str]) {
    let status = Command::new(argv[0])
        .args(&argv[1..])
        .status()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(status.success(), "{argv:?} failed: {status}");
}

/// The apps, when run inside a namespace by the test below (otherwise it
/// returns at once): `echo` sends every message back; `send` sends
/// `MESSAGES` to `ATBUS_NETNS_PEER` and checks the echoes.
#[test]
fn netns_child() {
    let (Ok(role), Ok(config)) = (std::env::var("ATBUS_NETNS_ROLE"), std::env::var("ATBUS_NETNS_CONFIG")) else {
        return;
    };
    let node =
        std::sync::Arc::new(Node::start(NodeConfig::from_yaml_file(&config).expect("config")).expect("node starts"));
    println!("STARTED");
    if role == "echo" {
        loop {
            if let Some(m) = node.recv_timeout(Duration::from_secs(60)) {
                node.send_blocking(&m.from, m.stream_id, m.data, Duration::from_secs(60))
                    .expect("echo");
            }
        }
    }
    let peer = std::env::var("ATBUS_NETNS_PEER").expect("peer");
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = node.send(&peer, 2, Bytes::from_static(b"hello")) {
        assert!(Instant::now() < deadline, "{peer} never showed up: {e}");
        thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let sender = {
        let (node, peer) = (node.clone(), peer.clone());
        thread::spawn(move || {
            for seq in 0..MESSAGES {
                node.send_blocking(
                    &peer,
                    1,
                    Bytes::copy_from_slice(&seq.to_le_bytes()),
                    Duration::from_secs(60),
                )
                .expect("send");
            }
        })
    };
    let mut next = 0u64;
    while next < MESSAGES {
        let m = node
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("echo {next} never came"));
        if m.stream_id != 1 {
            continue;
        }
        let seq = u64::from_le_bytes(m.data[..8].try_into().expect("8 bytes"));
        assert_eq!(seq, next, "each echo once, in order");
        next += 1;
    }
    sender.join().expect("sender");
    println!(
        "DONE {MESSAGES} echoed in {:?} via {:?}",
        started.elapsed(),
        node.connected_peers()
    );
    node.stop(Duration::from_millis(500));
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("config");
    path
}

#[test]
fn cross_namespace_through_relays_across_network_namespaces() {
    if !std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
    {
        println!("not root: network namespaces cannot be made; not run");
        return;
    }
    let tag = std::process::id() % 100_000;
    let (a, b) = (
        Netns::new(format!("atbus-a-{tag}")),
        Netns::new(format!("atbus-b-{tag}")),
    );
    let (veth_a, veth_b) = (format!("vta{tag}"), format!("vtb{tag}"));
    run(&["ip", "link", "add", &veth_a, "type", "veth", "peer", "name", &veth_b]);
    run(&["ip", "link", "set", &veth_a, "netns", &a.name]);
    run(&["ip", "link", "set", &veth_b, "netns", &b.name]);
    let (ip_a, ip_b) = ("10.231.0.1", "10.231.0.2");
    run(&[
        "ip",
        "-n",
        &a.name,
        "addr",
        "add",
        &format!("{ip_a}/24"),
        "dev",
        &veth_a,
    ]);
    run(&[
        "ip",
        "-n",
        &b.name,
        "addr",
        "add",
        &format!("{ip_b}/24"),
        "dev",
        &veth_b,
    ]);
    run(&["ip", "-n", &a.name, "link", "set", &veth_a, "up"]);
    run(&["ip", "-n", &b.name, "link", "set", &veth_b, "up"]);

    let dir = std::env::temp_dir().join(format!("atbus-netns-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    // etcd in namespace A, on the veth address: both namespaces reach it.
    let etcd_url = format!("http://{ip_a}:2379");
    let _etcd = Process::spawn(
        "etcd",
        a.command(&[
            "etcd",
            "--name",
            "netns",
            "--data-dir",
            dir.join("etcd").to_str().expect("utf-8 path"),
            "--listen-client-urls",
            &etcd_url,
            "--advertise-client-urls",
            &etcd_url,
            "--listen-peer-urls",
            &format!("http://{ip_a}:2380"),
            "--initial-advertise-peer-urls",
            &format!("http://{ip_a}:2380"),
            "--initial-cluster",
            &format!("netns=http://{ip_a}:2380"),
        ]),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !a
        .command(&["bash", "-c", &format!("exec 3<>/dev/tcp/{ip_a}/2379")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(Instant::now() < deadline, "etcd did not start in {}", a.name);
        thread::sleep(Duration::from_millis(100));
    }
    let common = format!(
        "shards: 1\ndiscovery: {{ type: etcd, endpoints: [\"{etcd_url}\"], prefix: /netns/, ttl_seconds: 5 }}\ntimeouts_ms: {{ connect: 1000, reconnect_max: 500 }}\n"
    );
    let relay = |name: &str, ns: &str, veth: &str| {
        format!(
            "name: {name}\nlisten: [\"tcp://127.0.0.1:7000\", \"tcp://{veth}:7001\"]\nhost: {{ hostname: host-{name} }}\n\
             metadata: {{ namespace_name: {ns}, kind: relay }}\n\
             gateways:\n  - {{ priority: 1, address: [\"tcp://127.0.0.1:7000\"], match: {{ metadata: {{ namespace_name: {ns} }} }} }}\n\
             \x20 - {{ priority: 2, address: [\"tcp://{veth}:7001\"], match: {{ metadata: {{ kind: relay }} }} }}\n{common}"
        )
    };
    let app = |name: &str, ns: &str| {
        format!(
            "name: {name}\nlisten: [\"tcp://127.0.0.1:7100\"]\nhost: {{ hostname: host-{name} }}\n\
             metadata: {{ namespace_name: {ns}, kind: app }}\n\
             gateways:\n  - {{ priority: 1, address: [\"tcp://127.0.0.1:7100\"], match: {{ metadata: {{ namespace_name: {ns} }} }} }}\n\
             advertise_relay: {{ metadata: {{ namespace_name: {ns}, kind: relay }} }}\n{common}"
        )
    };
    let relay_bin = env!("CARGO_BIN_EXE_atbus-relay");
    let me = std::env::current_exe().expect("test binary");
    let me = me.to_str().expect("utf-8 path");
    let relay1 = write(&dir, "relay1.yaml", &relay("relay1", "ns1", ip_a));
    let relay2 = write(&dir, "relay2.yaml", &relay("relay2", "ns2", ip_b));
    let r1 = Process::spawn(
        "relay1",
        a.command(&[
            relay_bin,
            "--config",
            relay1.to_str().expect("path"),
            "--status-every",
            "0",
        ]),
    );
    let r2 = Process::spawn(
        "relay2",
        b.command(&[
            relay_bin,
            "--config",
            relay2.to_str().expect("path"),
            "--status-every",
            "0",
        ]),
    );
    r1.expect("# relay ", Duration::from_secs(20));
    r2.expect("# relay ", Duration::from_secs(20));
    let child = |ns: &Netns, name: &str, role: &str, config: &Path| {
        let mut command = ns.command(&[me, "--exact", "netns_child", "--nocapture", "--test-threads", "1"]);
        command
            .env("ATBUS_NETNS_ROLE", role)
            .env("ATBUS_NETNS_CONFIG", config)
            .env("ATBUS_NETNS_PEER", "app2");
        Process::spawn(name, command)
    };
    let app2 = child(&b, "app2", "echo", &write(&dir, "app2.yaml", &app("app2", "ns2")));
    app2.expect("STARTED", Duration::from_secs(20));
    let app1 = child(&a, "app1", "send", &write(&dir, "app1.yaml", &app("app1", "ns1")));
    let done = app1.expect("DONE ", Duration::from_secs(120));
    println!("network namespaces {} / {}: {done}", a.name, b.name);
    assert!(done.contains("relay1"), "app1 went through relay1: {done}");
    let _ = std::fs::remove_dir_all(&dir);
}
