//! Pure routing: how this node reaches a node it knows from discovery.
//!
//! Same process → `mem`; same host (equal namespace and hostname) → the
//! target's `unix` addresses; else the addresses of the target's gateways
//! whose `match` fits this node, lowest priority value first. Nothing fits:
//! through a relay (`relay://name`, a tunnel inside this node's connection
//! to that relay), chosen by [`RelayPolicy`] among
//!
//! - *own* relays: those this node's `advertise_relay` selects, and
//! - *target's* relays: those the target's `advertise_relay` selects,
//!
//! keeping only relays with a gateway that fits this node, and ranking
//! replicas by rendezvous hashing on the target's name (routes stay put when
//! replicas come and go; the next in the ranking is the failover). Without
//! any, the answer is ROUTER_NOT_FOUND.
//!
//! A client (`type: client`) dials nothing but its own relays: everything
//! else goes through them.

use crate::address::Address;
use crate::discovery::{NodeRecord, dial_candidates, relay_candidates, rendezvous_ranking, same_host, same_process};

/// How to reach a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// It runs in this process: hand messages over in memory.
    Mem,
    /// Dial these addresses, best first (the next one after a failure);
    /// `relay://` ones go through that relay.
    Dial(Vec<Address>),
}

/// Which relay carries traffic when no gateway of the target fits this
/// node (design.md: "prefer my own upstream relay, or go straight to the
/// target's relay").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RelayPolicy {
    /// Through this node's own relay (`advertise_relay`); the target's relay
    /// only when this node has none it can reach.
    #[default]
    OwnRelay,
    /// Straight to the target's relay when one of its gateways fits this
    /// node; this node's own relay otherwise.
    TargetRelay,
}

impl std::str::FromStr for RelayPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "own" | "own_relay" | "upstream" => Ok(Self::OwnRelay),
            "target" | "target_relay" => Ok(Self::TargetRelay),
            other => Err(format!("relay policy {other:?}: expected \"own\" or \"target\"")),
        }
    }
}

/// No gateway of the target fits this node and no relay offers a way.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "ROUTER_NOT_FOUND: no gateway of {target:?} matches node {viewer:?} ({gateways} gateway(s) checked) and no relay reachable from {viewer:?} serves it"
)]
pub struct NoRoute {
    /// The node asked for.
    pub target: String,
    /// This node.
    pub viewer: String,
    /// Gateways the target publishes.
    pub gateways: usize,
}

/// The addresses `viewer` may dial to reach `target` directly, best first
/// (unix ones on the same host); empty: none.
fn direct(target: &NodeRecord, viewer: &NodeRecord) -> Vec<Address> {
    let mut candidates: Vec<Address> = Vec::new();
    for address in dial_candidates(target, viewer)
        .into_iter()
        .filter_map(|a| a.parse::<Address>().ok())
        .filter(|a| !matches!(a, Address::Mem(_) | Address::Relay(_)))
    {
        // An address in several gateways is dialled once, at its best rank.
        if !candidates.contains(&address) {
            candidates.push(address);
        }
    }
    let local = same_host(target, viewer);
    let (unix, network): (Vec<Address>, Vec<Address>) = candidates.into_iter().partition(Address::is_unix);
    if local && !unix.is_empty() { unix } else { network }
}

/// Relays `selector_of` advertises that `viewer` can reach, ranked for
/// `target` (best first).
fn reachable_relays<'a>(
    selector_of: &NodeRecord,
    target: &str,
    viewer: &NodeRecord,
    records: &'a [NodeRecord],
) -> Vec<&'a str> {
    let relays: Vec<&str> = relay_candidates(selector_of, records)
        .into_iter()
        .filter(|r| r.name != viewer.name && r.name != target && !direct(r, viewer).is_empty())
        .map(|r| r.name.as_str())
        .collect();
    rendezvous_ranking(target, relays)
}

/// Plans the route from `viewer` to `target`; `records`: every node record
/// discovery knows (where relays are found).
pub fn plan(
    target: &NodeRecord,
    viewer: &NodeRecord,
    records: &[NodeRecord],
    policy: RelayPolicy,
) -> Result<Plan, NoRoute> {
    if same_process(target, viewer) {
        return Ok(Plan::Mem);
    }
    let own_relay = viewer
        .advertise_relay
        .as_ref()
        .is_some_and(|selector| selector.selects(target));
    if !viewer.is_client() || own_relay {
        let addresses = direct(target, viewer);
        if !addresses.is_empty() {
            return Ok(Plan::Dial(addresses));
        }
    }
    let own = reachable_relays(viewer, &target.name, viewer, records);
    let theirs = if viewer.is_client() {
        Vec::new()
    } else {
        reachable_relays(target, &target.name, viewer, records)
    };
    let (first, second) = match policy {
        RelayPolicy::OwnRelay => (own, theirs),
        RelayPolicy::TargetRelay => (theirs, own),
    };
    let relays = if first.is_empty() { second } else { first };
    if !relays.is_empty() {
        return Ok(Plan::Dial(
            relays
                .into_iter()
                .map(|name| Address::Relay(name.to_string()))
                .collect(),
        ));
    }
    Err(NoRoute {
        target: target.name.clone(),
        viewer: viewer.name.clone(),
        gateways: target.gateway.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{Gateway, Host, Match, Metadata};
    use proptest::prelude::*;

    fn node(name: &str, hostname: &str, pid: i64, namespace: &str, gateways: Vec<Gateway>) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            r#type: "node".into(),
            host: Some(Host {
                hostname: hostname.into(),
                pid,
            }),
            metadata: Some(Metadata {
                namespace_name: namespace.into(),
                ..Metadata::default()
            }),
            gateway: gateways,
            ..NodeRecord::default()
        }
    }

    fn gateway(priority: i32, addresses: &[&str], only_namespace: Option<&str>) -> Gateway {
        Gateway {
            priority,
            address: addresses.iter().map(|a| a.to_string()).collect(),
            r#match: only_namespace.map(|ns| Match {
                host: None,
                metadata: Some(Metadata {
                    namespace_name: ns.into(),
                    ..Metadata::default()
                }),
            }),
        }
    }

    fn addresses(list: &[&str]) -> Vec<Address> {
        list.iter().map(|a| a.parse().expect("address")).collect()
    }

    #[test]
    fn same_process_is_mem() {
        let gws = vec![gateway(0, &["tcp://10.0.0.1:1", "unix:///tmp/t.sock"], None)];
        let target = node("t", "h1", 42, "ns", gws);
        let viewer = node("v", "h1", 42, "ns", vec![]);
        assert_eq!(plan(&target, &viewer, &[], RelayPolicy::OwnRelay), Ok(Plan::Mem));
    }

    #[test]
    fn same_host_prefers_unix_whatever_the_priority() {
        let gws = vec![
            gateway(0, &["tcp://10.0.0.1:1"], None),
            gateway(5, &["unix:///tmp/t.sock"], None),
        ];
        let target = node("t", "h1", 42, "ns", gws);
        let viewer = node("v", "h1", 7, "ns", vec![]);
        assert_eq!(
            plan(&target, &viewer, &[], RelayPolicy::OwnRelay),
            Ok(Plan::Dial(addresses(&["unix:///tmp/t.sock"])))
        );
        // Another namespace on the same hostname is another host.
        let elsewhere = node("v", "h1", 7, "other", vec![]);
        assert_eq!(
            plan(&target, &elsewhere, &[], RelayPolicy::OwnRelay),
            Ok(Plan::Dial(addresses(&["tcp://10.0.0.1:1"])))
        );
    }

    #[test]
    fn other_host_uses_matching_gateways_by_priority() {
        let gws = vec![
            gateway(9, &["tcp://10.0.0.9:1"], None),
            gateway(1, &["tcp://10.0.0.1:1", "udp://10.0.0.1:2"], Some("ns")),
            gateway(0, &["tcp://10.9.9.9:1"], Some("private")),
            gateway(0, &["unix:///tmp/t.sock"], None),
        ];
        let target = node("t", "h1", 42, "ns", gws);
        let viewer = node("v", "h2", 7, "ns", vec![]);
        assert_eq!(
            plan(&target, &viewer, &[], RelayPolicy::OwnRelay),
            Ok(Plan::Dial(addresses(&[
                "tcp://10.0.0.1:1",
                "udp://10.0.0.1:2",
                "tcp://10.0.0.9:1"
            ])))
        );
    }

    /// The seed's example by process key, with each record named by its key
    /// (the seed's display names are not node names).
    fn seed(text: &str) -> std::collections::BTreeMap<String, NodeRecord> {
        crate::discovery::parse_file(text)
            .expect("seed example parses")
            .into_iter()
            .filter_map(|(key, record)| {
                let mut node = record.as_node()?.clone();
                node.name = key.clone();
                node.host = Some(Host {
                    hostname: format!("host-{key}"),
                    pid: 1,
                });
                Some((key, node))
            })
            .collect()
    }

    /// The hop `from` takes towards `to` under `policy`: a relay name, or
    /// "direct".
    fn hop(t: &std::collections::BTreeMap<String, NodeRecord>, from: &str, to: &str, policy: RelayPolicy) -> String {
        let records: Vec<NodeRecord> = t.values().cloned().collect();
        match plan(&t[to], &t[from], &records, policy) {
            Ok(Plan::Dial(list)) => match &list[0] {
                Address::Relay(name) => name.clone(),
                _ => "direct".into(),
            },
            other => format!("{other:?}"),
        }
    }

    /// Follows hops from `from` until `to` is dialled directly.
    fn walk(
        t: &std::collections::BTreeMap<String, NodeRecord>,
        from: &str,
        to: &str,
        policy: RelayPolicy,
    ) -> Vec<String> {
        let mut path = vec![from.to_string()];
        let mut at = from.to_string();
        while path.len() < 8 {
            let next = hop(t, &at, to, policy);
            if next == "direct" {
                path.push(to.to_string());
                return path;
            }
            path.push(next.clone());
            at = next;
        }
        path
    }

    #[test]
    fn cross_namespace_goes_through_both_namespace_relays() {
        let t = seed(include_str!("../../tests/data/discovery-cross-namespace.yaml"));
        for policy in [RelayPolicy::OwnRelay, RelayPolicy::TargetRelay] {
            assert_eq!(
                walk(&t, "app1", "app2", policy),
                ["app1", "relaysvr1", "relaysvr2", "app2"]
            );
            assert_eq!(
                walk(&t, "app2", "app1", policy),
                ["app2", "relaysvr2", "relaysvr1", "app1"]
            );
        }
    }

    #[test]
    fn cross_region_goes_through_the_hub() {
        let t = seed(include_str!("../../tests/data/discovery-cross-region.yaml"));
        assert_eq!(
            walk(&t, "app1", "app2", RelayPolicy::OwnRelay),
            ["app1", "relaysvr1", "relaysvr3", "relaysvr2", "app2"]
        );
        assert_eq!(
            walk(&t, "app2", "app1", RelayPolicy::OwnRelay),
            ["app2", "relaysvr2", "relaysvr3", "relaysvr1", "app1"]
        );
    }

    fn relay_node(name: &str, namespace: &str, gateways: Vec<Gateway>) -> NodeRecord {
        let mut record = node(name, &format!("host-{name}"), 1, namespace, gateways);
        if let Some(m) = record.metadata.as_mut() {
            m.kind = "relay".into();
        }
        record
    }

    fn selector(namespace: &str) -> crate::discovery::RelaySelector {
        crate::discovery::RelaySelector {
            name: String::new(),
            metadata: Some(Metadata {
                namespace_name: namespace.into(),
                kind: "relay".into(),
                ..Metadata::default()
            }),
        }
    }

    #[test]
    fn the_policy_picks_own_or_target_relay_when_both_are_reachable() {
        // Both relays let anyone in; the apps cannot reach each other.
        let r1 = relay_node("r1", "ns1", vec![gateway(1, &["tcp://10.0.1.1:1"], None)]);
        let r2 = relay_node("r2", "ns2", vec![gateway(1, &["tcp://10.1.1.1:1"], None)]);
        let mut a1 = node(
            "a1",
            "h1",
            1,
            "ns1",
            vec![gateway(1, &["tcp://10.0.0.1:1"], Some("ns1"))],
        );
        a1.advertise_relay = Some(selector("ns1"));
        let mut a2 = node(
            "a2",
            "h2",
            1,
            "ns2",
            vec![gateway(1, &["tcp://10.1.0.1:1"], Some("ns2"))],
        );
        a2.advertise_relay = Some(selector("ns2"));
        let records = vec![r1, r2, a1.clone(), a2.clone()];
        assert_eq!(
            plan(&a2, &a1, &records, RelayPolicy::OwnRelay),
            Ok(Plan::Dial(vec![Address::Relay("r1".into())]))
        );
        assert_eq!(
            plan(&a2, &a1, &records, RelayPolicy::TargetRelay),
            Ok(Plan::Dial(vec![Address::Relay("r2".into())]))
        );
        // Without a relay of its own, "own" falls back to the target's.
        let mut lone = a1.clone();
        lone.advertise_relay = None;
        assert_eq!(
            plan(&a2, &lone, &records, RelayPolicy::OwnRelay),
            Ok(Plan::Dial(vec![Address::Relay("r2".into())]))
        );
    }

    #[test]
    fn replicas_are_ranked_by_rendezvous_and_all_kept_for_failover() {
        let relays: Vec<NodeRecord> = (0..4)
            .map(|i| {
                relay_node(
                    &format!("r{i}"),
                    "ns",
                    vec![gateway(1, &[&format!("tcp://10.0.1.{i}:1")], None)],
                )
            })
            .collect();
        let mut viewer = node("v", "hv", 1, "other", vec![]);
        viewer.advertise_relay = Some(selector("ns"));
        let mut records = relays.clone();
        records.push(viewer.clone());
        let mut firsts = std::collections::BTreeSet::new();
        for t in 0..64 {
            let target = node(
                &format!("t{t}"),
                "ht",
                1,
                "private",
                vec![gateway(1, &["tcp://10.9.0.1:1"], Some("private"))],
            );
            let Ok(Plan::Dial(list)) = plan(&target, &viewer, &records, RelayPolicy::OwnRelay) else {
                panic!("no plan");
            };
            assert_eq!(list.len(), 4, "every replica is a failover");
            let names: Vec<&str> = list
                .iter()
                .map(|a| match a {
                    Address::Relay(n) => n.as_str(),
                    other => panic!("{other}"),
                })
                .collect();
            assert_eq!(
                Some(names[0]),
                crate::discovery::rendezvous(&target.name, relays.iter().map(|r| r.name.as_str()))
            );
            firsts.insert(names[0].to_string());
        }
        assert_eq!(firsts.len(), 4, "targets spread over the replicas");
    }

    #[test]
    fn a_client_dials_only_its_relays() {
        let r = relay_node("r", "edge", vec![gateway(1, &["tcp://10.0.1.1:1"], None)]);
        let open = node("server", "hs", 1, "ns", vec![gateway(1, &["tcp://10.0.0.1:1"], None)]);
        let mut client = node("c", "hc", 1, "edge", vec![]);
        client.r#type = crate::discovery::TYPE_CLIENT.into();
        client.advertise_relay = Some(selector("edge"));
        let records = vec![r.clone(), open.clone(), client.clone()];
        // The server is open to everyone, yet the client goes through its relay.
        assert_eq!(
            plan(&open, &client, &records, RelayPolicy::TargetRelay),
            Ok(Plan::Dial(vec![Address::Relay("r".into())]))
        );
        // Its relay it dials directly.
        assert_eq!(
            plan(&r, &client, &records, RelayPolicy::OwnRelay),
            Ok(Plan::Dial(addresses(&["tcp://10.0.1.1:1"])))
        );
    }

    #[test]
    fn nothing_fits_and_no_relay_fails_clearly() {
        let gws = vec![gateway(0, &["tcp://10.9.9.9:1"], Some("private"))];
        let target = node("t", "h1", 42, "ns", gws);
        let viewer = node("v", "h2", 7, "ns", vec![]);
        let err = plan(&target, &viewer, &[], RelayPolicy::OwnRelay).expect_err("no route");
        assert!(err.to_string().starts_with("ROUTER_NOT_FOUND"), "{err}");
        assert_eq!(err.gateways, 1);
    }

    proptest! {
        /// Every planned address is one the target publishes in a gateway
        /// that admits the viewer, never a mem address, and unix only on the
        /// same host.
        #[test]
        fn plans_only_admitted_addresses(
            same_host_flag in any::<bool>(),
            specs in proptest::collection::vec((0i32..4, any::<bool>(), any::<bool>(), 1u16..50), 0..6),
        ) {
            let gws: Vec<Gateway> = specs
                .iter()
                .map(|&(priority, unix, restricted, port)| {
                    let address = if unix { format!("unix:///tmp/p{port}.sock") } else { format!("tcp://10.0.0.1:{port}") };
                    gateway(priority, &[address.as_str()], restricted.then_some("private"))
                })
                .collect();
            let target = node("t", "h1", 42, "ns", gws.clone());
            let viewer = node("v", if same_host_flag { "h1" } else { "h2" }, 7, "ns", vec![]);
            match plan(&target, &viewer, &[], RelayPolicy::OwnRelay) {
                Ok(Plan::Mem) => prop_assert!(false, "different pids are never mem"),
                Ok(Plan::Dial(list)) => {
                    prop_assert!(!list.is_empty());
                    for address in &list {
                        let text = address.to_string();
                        prop_assert!(gws.iter().any(|g| g.r#match.is_none() && g.address.contains(&text)));
                        if address.is_unix() {
                            prop_assert!(same_host_flag);
                        }
                    }
                    let priorities: Vec<i32> = list
                        .iter()
                        .filter_map(|a| gws.iter().filter(|g| g.r#match.is_none() && g.address.contains(&a.to_string())).map(|g| g.priority).min())
                        .collect();
                    if !list[0].is_unix() {
                        prop_assert!(priorities.windows(2).all(|w| w[0] <= w[1]), "{priorities:?}");
                    }
                }
                Err(_) => {
                    let open = gws.iter().filter(|g| g.r#match.is_none());
                    let usable = open.clone().any(|g| g.address[0].starts_with("tcp")) || (same_host_flag && open.clone().any(|g| g.address[0].starts_with("unix")));
                    prop_assert!(!usable, "a usable gateway was ignored");
                }
            }
        }
    }
}
