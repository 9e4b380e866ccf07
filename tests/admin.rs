//! The admin HTTP endpoint over a real socket: exact counts in /metrics
//! after a known exchange, the seed's latency buckets, health and
//! readiness, and /safe-to-delete following unacknowledged data.

#![cfg(feature = "admin")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libatbus::address::Address;
use libatbus::discovery::MemoryDiscovery;
use libatbus::node::{DiscoverySource, Node, NodeConfig};

fn start(name: &str, listen: &[&str], discovery: &Arc<MemoryDiscovery>) -> Node {
    let mut config = NodeConfig::new(name, listen).expect("config");
    config.discovery = DiscoverySource(discovery.clone());
    config.latency_path = false;
    config.ping_interval = Duration::from_millis(100);
    config.admin = Some("127.0.0.1:0".parse().expect("address"));
    Node::start(config).expect("node")
}

/// GET `path`: (status, body).
fn get(at: SocketAddr, path: &str) -> (u16, String) {
    let mut socket = TcpStream::connect(at).expect("admin endpoint answers");
    socket.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(socket, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").expect("request");
    let mut response = String::new();
    socket.read_to_string(&mut response).expect("response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the series `name{...labels...}` summed over shards.
fn value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// `a` sends `count` messages of 100 B to `b` over tcp; `b` receives them.
fn exchange(a: &Node, b: &Node, count: u32) {
    a.add_route(b.name(), tcp(b)).expect("route");
    for i in 0..count {
        let mut data = vec![0u8; 100];
        data[..4].copy_from_slice(&i.to_le_bytes());
        a.send_blocking(b.name(), 1, Bytes::from(data), Duration::from_secs(10))
            .expect("send");
    }
    for _ in 0..count {
        b.recv_timeout(Duration::from_secs(10)).expect("delivered");
    }
}

fn tcp(node: &Node) -> Address {
    node.listen_addresses()[0].clone()
}

#[test]
fn metrics_count_a_known_exchange_exactly() {
    let discovery = Arc::new(MemoryDiscovery::new());
    let a = start("admin-a", &["tcp://127.0.0.1:0"], &discovery);
    let b = start("admin-b", &["tcp://127.0.0.1:0"], &discovery);
    exchange(&a, &b, 1000);
    // Pings every 100 ms: wait for round trips to be recorded.
    let b_admin = b.admin_address().expect("admin runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (status, body) = get(b_admin, "/metrics");
        assert_eq!(status, 200);
        if value(&body, "atbus_connection_rtt_milliseconds_count") >= 1.0 || Instant::now() > deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(value(&metrics, "atbus_messages_received_total"), 1000.0, "{metrics}");
    assert_eq!(value(&metrics, "atbus_bytes_received_total"), 100_000.0);
    assert_eq!(value(&metrics, "atbus_messages_taken_total"), 1000.0);
    assert!(
        value(&metrics, "atbus_connection_rtt_milliseconds_count") >= 1.0,
        "{metrics}"
    );
    for bound in [
        "15.0", "30.0", "45.0", "60.0", "90.0", "120.0", "150.0", "180.0", "240.0", "300.0", "320.0", "440.0", "560.0",
        "680.0", "800.0", "1100.0", "1400.0", "1700.0", "2000.0", "+Inf",
    ] {
        assert!(
            metrics.contains(&format!("le=\"{bound}\"")),
            "bucket {bound} missing:\n{metrics}"
        );
    }
    let (_, sent) = get(a.admin_address().expect("admin"), "/metrics");
    assert_eq!(value(&sent, "atbus_messages_sent_total"), 1000.0, "{sent}");
    assert_eq!(value(&sent, "atbus_bytes_sent_total"), 100_000.0);

    assert_eq!(get(b_admin, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(b_admin, "/readyz").0, 200);
    let (status, connections) = get(b_admin, "/connections");
    assert_eq!(status, 200);
    assert!(connections.contains("\"admin-a\""), "{connections}");
    b.stop(Duration::ZERO);
    assert!(TcpStream::connect(b_admin).is_err(), "the endpoint stops with the node");
}

#[test]
fn safe_to_delete_waits_for_acknowledgements() {
    let discovery = Arc::new(MemoryDiscovery::new());
    let a = start("admin-c", &["tcp://127.0.0.1:0"], &discovery);
    let at = a.admin_address().expect("admin");
    assert_eq!(get(at, "/safe-to-delete"), (200, "yes\n".into()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let address = format!("tcp://127.0.0.1:{port}");
    a.add_route("admin-d", address.parse().expect("address"))
        .expect("route");
    a.send("admin-d", 1, Bytes::from_static(b"pending")).expect("accepted");
    let (status, body) = get(at, "/safe-to-delete");
    assert_eq!(status, 409, "{body}");
    assert!(body.starts_with("no: ") && body.contains("admin-d"), "{body}");
    // The peer comes up: the message is delivered and acknowledged.
    let d = start("admin-d", &[&address], &discovery);
    d.recv_timeout(Duration::from_secs(30)).expect("delivered");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(at, "/safe-to-delete");
        if status == 200 {
            assert_eq!(body, "yes\n");
            break;
        }
        assert!(Instant::now() < deadline, "still {status}: {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `/stats`: the windows (1, 5, 15, 60 s) follow a known exchange, per node
/// and per connection, with round-trip mean, variance and percentiles;
/// `/metrics` carries the per-connection series.
#[test]
fn stats_windows_follow_a_known_exchange() {
    let discovery = Arc::new(MemoryDiscovery::new());
    let a = start("admin-e", &["tcp://127.0.0.1:0"], &discovery);
    let b = start("admin-f", &["tcp://127.0.0.1:0"], &discovery);
    exchange(&a, &b, 2000);
    let b_admin = b.admin_address().expect("admin runs");
    // Samples come once a second; round trips every 100 ms.
    let deadline = Instant::now() + Duration::from_secs(15);
    let stats: serde_json::Value = loop {
        let (status, body) = get(b_admin, "/stats");
        if status == 200 {
            let stats: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            let rtt = &stats["windows"][1]["rtt_mean_ms"];
            if stats["windows"].as_array().is_some_and(|w| w.len() == 4) && rtt.is_number() {
                break stats;
            }
        }
        assert!(Instant::now() < deadline, "no full /stats: {status} {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let windows: Vec<u64> = stats["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .filter_map(|w| w["window_s"].as_u64())
        .collect();
    assert_eq!(windows, [1, 5, 15, 60]);
    assert_eq!(stats["totals"]["messages_received"], 2000);
    assert_eq!(stats["totals"]["bytes_received"], 200_000);
    // A window's rate times its span is what arrived in it: never more than
    // the 2000 messages (the part before the first sample is outside).
    let w60 = &stats["windows"][3];
    let span = w60["span_s"].as_f64().expect("span");
    let rate = w60["messages_received_per_s"].as_f64().expect("rate");
    assert!(rate * span <= 2000.5, "{w60}");
    let variance = stats["windows"][3]["rtt_variance_ms2"].as_f64().expect("variance");
    assert!(variance >= 0.0);
    assert!(
        stats["windows"][3]["rtt_p99_ms"].as_f64().is_some_and(|p| p > 0.0),
        "{stats}"
    );
    // The connection from admin-e: at least the 200 000 payload bytes in.
    let connections = stats["connections"].as_array().expect("connections");
    let from_e = connections
        .iter()
        .find(|c| c["peer"] == "admin-e")
        .unwrap_or_else(|| panic!("no connection from admin-e: {stats}"));
    assert!(
        from_e["totals"]["rx_bytes"].as_u64().is_some_and(|b| b >= 200_000),
        "{from_e}"
    );
    assert!(from_e["totals"]["rtt"]["count"].as_u64().is_some_and(|n| n >= 1));
    assert_eq!(from_e["windows"].as_array().map(Vec::len), Some(4));
    let (_, metrics) = get(b_admin, "/metrics");
    assert!(
        value(&metrics, "atbus_connection_received_bytes_total") >= 200_000.0,
        "{metrics}"
    );
    assert!(metrics.contains("peer=\"admin-e\""), "{metrics}");
}
