//! Discovery: the seed's two Kubernetes topologies (who dials which address,
//! which relay), consistent hashing over relay replicas, and the file backend
//! reloading an edited file.

use std::collections::BTreeMap;
use std::time::Duration;

use libatbus::discovery::{
    Change, Discovery, DiscoveryError, FileDiscovery, NodeRecord, Record, dial_candidates, parse_file,
    relay_candidates, rendezvous,
};

/// The seed file's records by process key (app1, relaysvr1, ...).
fn topology(file: &str) -> BTreeMap<String, NodeRecord> {
    let text = std::fs::read_to_string(format!("{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"))).expect("seed file");
    parse_file(&text)
        .expect("the seed's example parses as written")
        .into_iter()
        .map(|(key, record)| match record {
            Record::Node(node) => (key, node),
            Record::Group(_) => panic!("no groups in the seed's examples"),
        })
        .collect()
}

/// First address `from` would dial to reach `to`, if any gateway matches.
fn dial<'a>(t: &'a BTreeMap<String, NodeRecord>, from: &str, to: &str) -> Option<&'a str> {
    dial_candidates(&t[to], &t[from]).first().copied()
}

/// The relay `from` advertises (by process key).
fn relay_of(t: &BTreeMap<String, NodeRecord>, from: &str) -> Option<String> {
    let relays = relay_candidates(&t[from], t.values());
    assert!(relays.len() <= 1, "{from}: ambiguous relays");
    let name = &relays.first()?.name;
    t.iter().find(|(_, n)| &n.name == name).map(|(k, _)| k.clone())
}

#[test]
fn cross_namespace_example_dials_the_intended_addresses() {
    let t = topology("discovery-cross-namespace.yaml");
    // Inside a namespace: internal addresses (priority 1).
    assert_eq!(dial(&t, "app1", "relaysvr1"), Some("ipv4://10.0.1.1:1234"));
    assert_eq!(dial(&t, "relaysvr1", "app1"), Some("ipv4://10.0.0.1:1234"));
    assert_eq!(dial(&t, "app2", "relaysvr2"), Some("ipv4://10.1.1.1:1234"));
    assert_eq!(dial(&t, "relaysvr2", "app2"), Some("ipv4://10.1.0.1:1234"));
    // Relay to relay across namespaces: the shared relay ingress (priority 2).
    assert_eq!(dial(&t, "relaysvr1", "relaysvr2"), Some("ipv4://172.17.0.1:1234"));
    assert_eq!(dial(&t, "relaysvr2", "relaysvr1"), Some("ipv4://172.16.0.1:1234"));
    // Apps cannot reach the other namespace directly: no app or relay gateway matches.
    for (from, to) in [
        ("app1", "app2"),
        ("app2", "app1"),
        ("app1", "relaysvr2"),
        ("app2", "relaysvr1"),
    ] {
        assert_eq!(dial(&t, from, to), None, "{from} -> {to}");
    }
    // Each app advertises its namespace's relay: app1 -> relaysvr1 -> relaysvr2 -> app2.
    assert_eq!(relay_of(&t, "app1").as_deref(), Some("relaysvr1"));
    assert_eq!(relay_of(&t, "app2").as_deref(), Some("relaysvr2"));
}

#[test]
fn cross_region_example_goes_through_the_hub() {
    let t = topology("discovery-cross-region.yaml");
    assert_eq!(dial(&t, "app1", "relaysvr1"), Some("ipv4://10.0.1.1:1234"));
    assert_eq!(dial(&t, "relaysvr2", "app2"), Some("ipv4://10.1.0.1:1234"));
    // Relays of different regions cannot meet directly...
    assert_eq!(dial(&t, "relaysvr1", "relaysvr2"), None);
    assert_eq!(dial(&t, "relaysvr2", "relaysvr1"), None);
    // ...but reach the region hub (relaysvr3, area.region=any) and it reaches them.
    assert_eq!(dial(&t, "relaysvr1", "relaysvr3"), Some("ipv4://192.18.0.1:1234"));
    assert_eq!(dial(&t, "relaysvr2", "relaysvr3"), Some("ipv4://192.18.0.1:1234"));
    assert_eq!(dial(&t, "relaysvr3", "relaysvr1"), Some("ipv4://192.16.0.1:1234"));
    assert_eq!(dial(&t, "relaysvr3", "relaysvr2"), Some("ipv4://192.17.0.1:1234"));
    // The chain app1 -> relaysvr1 -> relaysvr3 -> relaysvr2 -> app2, from advertise_relay.
    assert_eq!(relay_of(&t, "app1").as_deref(), Some("relaysvr1"));
    assert_eq!(relay_of(&t, "relaysvr1").as_deref(), Some("relaysvr3"));
    assert_eq!(relay_of(&t, "relaysvr2").as_deref(), Some("relaysvr3"));
    assert_eq!(relay_of(&t, "app2").as_deref(), Some("relaysvr2"));
}

#[test]
fn seed_names_fail_kubernetes_validation_with_a_clear_error() {
    let t = topology("discovery-cross-namespace.yaml");
    let err = Record::Node(t["app1"].clone()).validate().unwrap_err();
    assert_eq!(err.field, "name");
    assert!(err.to_string().contains("Namespace/Zone 1: App"), "{err}");
}

#[test]
fn consistent_hashing_moves_about_one_nth() {
    let names: Vec<String> = (0..100_000).map(|i| format!("node-{i}.ns-{}", i % 7)).collect();
    let three = ["relay-0", "relay-1", "relay-2"];
    let four = ["relay-0", "relay-1", "relay-2", "relay-3"];
    let moved = |from: &[&str], to: &[&str]| {
        names
            .iter()
            .filter(|n| rendezvous(n, from.iter().copied()) != rendezvous(n, to.iter().copied()))
            .count() as f64
            / names.len() as f64
    };
    let up = moved(&three, &four);
    let down = moved(&four, &three);
    println!(
        "3 -> 4 replicas: {:.2}% moved; 4 -> 3: {:.2}% moved",
        up * 100.0,
        down * 100.0
    );
    assert!(up <= 1.0 / 4.0 + 0.05, "3 -> 4 moved {up}");
    assert!(down <= 1.0 / 4.0 + 0.05, "4 -> 3 moved {down}");
    // And the load is spread: every replica serves roughly a quarter.
    for replica in four {
        let share = names.iter().filter(|n| rendezvous(n, four) == Some(replica)).count() as f64 / 1e5;
        assert!((0.22..0.28).contains(&share), "{replica} serves {share}");
    }
}

const FILE_V1: &str = "
app-1:
  discovery:
    name: app-1
    metadata: { namespace_name: ns-1, kind: app }
    gateway:
      - priority: 1
        address: tcp://127.0.0.1:7001
group:
  discovery: { name: frontends, type: group, node_list: [app-1] }
";

const FILE_V2: &str = "
app-1:
  discovery:
    name: app-1
    metadata: { namespace_name: ns-1, kind: app }
    gateway:
      - priority: 1
        address: [tcp://127.0.0.1:7002, unix:///tmp/app-1.sock]
app-2:
  discovery: { name: app-2 }
";

/// Polls `condition` for up to ten seconds.
fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn addresses(discovery: &FileDiscovery, name: &str) -> Vec<String> {
    match discovery.get(name) {
        Some(Record::Node(node)) => node.gateway.iter().flat_map(|g| g.address.clone()).collect(),
        _ => Vec::new(),
    }
}

#[test]
fn file_backend_picks_up_an_edited_file() {
    let dir = std::env::temp_dir().join(format!("atbus-discovery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("discovery.yaml");
    std::fs::write(&path, FILE_V1).unwrap();
    let discovery = FileDiscovery::open(&path).expect("valid file");
    assert_eq!(discovery.snapshot().len(), 2);
    let sub = discovery.subscribe();

    // Edit in place: changes arrive without a restart, and as change events.
    std::fs::write(&path, FILE_V2).unwrap();
    eventually("the edit", || {
        discovery.get("app-2").is_some()
            && discovery.get("frontends").is_none()
            && addresses(&discovery, "app-1") == ["tcp://127.0.0.1:7002", "unix:///tmp/app-1.sock"]
    });
    let changes: Vec<Change> = std::iter::from_fn(|| sub.try_recv()).collect();
    assert!(changes.contains(&Change::Delete("frontends".into())), "{changes:?}");
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, Change::Put(Record::Node(n)) if n.name == "app-2"))
    );

    // A broken edit is ignored: the previous records stay.
    std::fs::write(&path, "app-3: { discovery: { name: Not_Valid } }").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(discovery.get("app-2").is_some());
    assert!(discovery.get("Not_Valid").is_none());

    // Replace by rename, as editors do.
    let tmp = dir.join("discovery.yaml.tmp");
    std::fs::write(&tmp, FILE_V1).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    eventually("the renamed file", || {
        discovery.get("frontends").is_some() && discovery.get("app-2").is_none()
    });

    // The process's own record survives reloads.
    discovery
        .publish(Record::Node(NodeRecord {
            name: "me".into(),
            ..Default::default()
        }))
        .unwrap();
    std::fs::write(&path, FILE_V2).unwrap();
    eventually("the second edit", || discovery.get("app-2").is_some());
    assert!(discovery.get("me").is_some());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn file_backend_refuses_a_bad_file_at_start() {
    let dir = std::env::temp_dir().join(format!("atbus-discovery-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("d.yaml");
    std::fs::write(&path, "a: { discovery: { name: a, gateway: [ { address: nope } ] } }").unwrap();
    let err = FileDiscovery::open(&path).unwrap_err();
    assert!(
        matches!(err, DiscoveryError::Invalid(ref e) if e.field == "gateway[0].address[0]"),
        "{err}"
    );
    std::fs::write(&path, "a: { discovery: { name: a, colour: blue } }").unwrap();
    let err = FileDiscovery::open(&path).unwrap_err();
    assert!(err.to_string().contains("colour"), "unknown fields are named: {err}");
    assert!(matches!(
        FileDiscovery::open(dir.join("missing.yaml")),
        Err(DiscoveryError::Io { .. })
    ));
    std::fs::remove_dir_all(&dir).ok();
}
