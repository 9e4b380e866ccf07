//! The etcd backend against a real etcd server (Debian's etcd-server; installed
//! by scripts/install-deps.sh). Each test starts its own etcd on free loopback
//! ports with its own data directory and stops it afterwards.

#![cfg(feature = "etcd")]

mod etcd_server;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_server::EtcdServer;
use libatbus::discovery::{Discovery, EtcdConfig, EtcdDiscovery, NodeRecord, Record};

fn config(server: &EtcdServer, ttl: Duration) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![server.endpoint()],
        prefix: "/atbus-test/".into(),
        ttl,
        timeout: Duration::from_secs(1),
        max_backoff: Duration::from_millis(500),
    }
}

fn node(name: &str) -> Record {
    Record::Node(NodeRecord {
        name: name.into(),
        r#type: "node".into(),
        ..Default::default()
    })
}

fn eventually(what: &str, timeout: Duration, condition: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

#[test]
fn record_reaches_another_node_within_a_second_and_leaves_on_graceful_stop() {
    let server = EtcdServer::start("appear");
    let a = EtcdDiscovery::start(config(&server, Duration::from_secs(10))).unwrap();
    let b = EtcdDiscovery::start(config(&server, Duration::from_secs(10))).unwrap();
    assert!(a.wait_registered(Duration::from_secs(10)) && b.wait_registered(Duration::from_secs(10)));
    let published = Instant::now();
    a.publish(node("node-a")).unwrap();
    let took = eventually("node-a in b's cache", Duration::from_secs(1), || {
        b.get("node-a").is_some()
    });
    println!(
        "record visible to the other node after {:?}",
        published.elapsed().max(took)
    );
    a.shutdown();
    eventually("node-a gone after graceful stop", Duration::from_secs(2), || {
        b.get("node-a").is_none()
    });
}

/// Child-process half of `killed_node_disappears_after_its_lease_ttl`: publishes
/// and waits to be killed. Does nothing unless started by that test.
#[test]
fn child_publisher() {
    let Ok(endpoint) = std::env::var("ATBUS_TEST_CHILD_ETCD") else {
        return;
    };
    let cfg = EtcdConfig {
        endpoints: vec![endpoint],
        prefix: "/atbus-test/".into(),
        ttl: Duration::from_secs(2),
        ..EtcdConfig::default()
    };
    let d = EtcdDiscovery::start(cfg).unwrap();
    d.publish(node("doomed")).unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn killed_node_disappears_after_its_lease_ttl() {
    let server = EtcdServer::start("kill");
    let observer = EtcdDiscovery::start(config(&server, Duration::from_secs(10))).unwrap();
    assert!(observer.wait_registered(Duration::from_secs(10)));
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_publisher", "--nocapture"])
        .env("ATBUS_TEST_CHILD_ETCD", server.endpoint())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    eventually("the child's record", Duration::from_secs(10), || {
        observer.get("doomed").is_some()
    });
    child.kill().unwrap(); // SIGKILL: no graceful stop, no lease revoke
    child.wait().unwrap();
    let killed = Instant::now();
    eventually("the record to expire", Duration::from_secs(8), || {
        observer.get("doomed").is_none()
    });
    let gone = killed.elapsed();
    println!("killed node's record gone {gone:?} after the kill (ttl 2 s)");
    assert!(
        gone >= Duration::from_millis(1000),
        "removed before its lease could expire: {gone:?}"
    );
}

#[test]
fn etcd_outage_keeps_peers_and_reregisters_after() {
    let mut server = EtcdServer::start("outage");
    let a = EtcdDiscovery::start(config(&server, Duration::from_secs(3))).unwrap();
    let b = EtcdDiscovery::start(config(&server, Duration::from_secs(3))).unwrap();
    a.publish(node("node-a")).unwrap();
    b.publish(node("node-b")).unwrap();
    eventually("both registered and visible", Duration::from_secs(10), || {
        a.is_registered() && b.is_registered() && a.get("node-b").is_some() && b.get("node-a").is_some()
    });

    server.stop();
    eventually("both notice the outage", Duration::from_secs(10), || {
        !a.is_registered() && !b.is_registered()
    });
    // Five seconds without etcd (longer than the 3 s lease): the caches keep the peers.
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(5) {
        assert!(a.get("node-b").is_some(), "a forgot node-b during the outage");
        assert!(b.get("node-a").is_some(), "b forgot node-a during the outage");
        std::thread::sleep(Duration::from_millis(100));
    }

    server.resume();
    let took = eventually("re-registration", Duration::from_secs(15), || {
        a.is_registered() && b.is_registered()
    });
    println!("re-registered {took:?} after etcd came back");
    // A fresh client sees both records in etcd itself, not only in the caches.
    let c = EtcdDiscovery::start(config(&server, Duration::from_secs(3))).unwrap();
    eventually("a fresh client to see both", Duration::from_secs(10), || {
        c.is_registered() && c.get("node-a").is_some() && c.get("node-b").is_some()
    });
    // And the records stay past the old leases' lifetime: they are on new leases.
    std::thread::sleep(Duration::from_secs(4));
    assert!(c.get("node-a").is_some() && c.get("node-b").is_some());
}
