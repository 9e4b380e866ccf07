//! Pure routing: how this node reaches a node it knows from discovery.
//!
//! Same process → `mem`; same host (equal namespace and hostname) → the
//! target's `unix` addresses; else the addresses of the target's gateways
//! whose `match` fits this node, lowest priority value first. Nothing fits:
//! the relay step decides (relays arrive with the relay service), and without
//! one the answer is ROUTER_NOT_FOUND.

use crate::address::Address;
use crate::discovery::{NodeRecord, dial_candidates, same_host, same_process};

/// How to reach a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// It runs in this process: hand messages over in memory.
    Mem,
    /// Dial these addresses, best first (the next one after a failure).
    Dial(Vec<Address>),
}

/// The relay step: asked for a way to `target` when none of its gateways fits
/// `viewer`. The relay service plugs in here.
pub trait RelayStep: Send + Sync {
    /// Addresses of a relay that carries traffic to `target`, or `None`.
    fn route(&self, target: &NodeRecord, viewer: &NodeRecord) -> Option<Vec<Address>>;
}

/// No gateway of the target fits this node and no relay step offered a way.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "ROUTER_NOT_FOUND: no gateway of {target:?} matches node {viewer:?} ({gateways} gateway(s) checked) and no relay offers a route"
)]
pub struct NoRoute {
    /// The node asked for.
    pub target: String,
    /// This node.
    pub viewer: String,
    /// Gateways the target publishes.
    pub gateways: usize,
}

/// Plans the route from `viewer` to `target`.
pub fn plan(target: &NodeRecord, viewer: &NodeRecord, relay: Option<&dyn RelayStep>) -> Result<Plan, NoRoute> {
    if same_process(target, viewer) {
        return Ok(Plan::Mem);
    }
    let mut candidates: Vec<Address> = Vec::new();
    for address in dial_candidates(target, viewer)
        .into_iter()
        .filter_map(|a| a.parse::<Address>().ok())
        .filter(|a| !matches!(a, Address::Mem(_)))
    {
        // An address in several gateways is dialled once, at its best rank.
        if !candidates.contains(&address) {
            candidates.push(address);
        }
    }
    let local = same_host(target, viewer);
    let (unix, network): (Vec<Address>, Vec<Address>) = candidates.into_iter().partition(Address::is_unix);
    if local && !unix.is_empty() {
        return Ok(Plan::Dial(unix));
    }
    if !network.is_empty() {
        return Ok(Plan::Dial(network));
    }
    if let Some(addresses) = relay.and_then(|r| r.route(target, viewer)).filter(|a| !a.is_empty()) {
        return Ok(Plan::Dial(addresses));
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
        assert_eq!(plan(&target, &viewer, None), Ok(Plan::Mem));
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
            plan(&target, &viewer, None),
            Ok(Plan::Dial(addresses(&["unix:///tmp/t.sock"])))
        );
        // Another namespace on the same hostname is another host.
        let elsewhere = node("v", "h1", 7, "other", vec![]);
        assert_eq!(
            plan(&target, &elsewhere, None),
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
            plan(&target, &viewer, None),
            Ok(Plan::Dial(addresses(&[
                "tcp://10.0.0.1:1",
                "udp://10.0.0.1:2",
                "tcp://10.0.0.9:1"
            ])))
        );
    }

    struct FixedRelay;
    impl RelayStep for FixedRelay {
        fn route(&self, _target: &NodeRecord, _viewer: &NodeRecord) -> Option<Vec<Address>> {
            Some(addresses(&["tcp://192.0.2.1:9"]))
        }
    }

    #[test]
    fn nothing_fits_asks_the_relay_step_then_fails_clearly() {
        let gws = vec![gateway(0, &["tcp://10.9.9.9:1"], Some("private"))];
        let target = node("t", "h1", 42, "ns", gws);
        let viewer = node("v", "h2", 7, "ns", vec![]);
        let err = plan(&target, &viewer, None).expect_err("no route");
        assert!(err.to_string().starts_with("ROUTER_NOT_FOUND"), "{err}");
        assert_eq!(err.gateways, 1);
        assert_eq!(
            plan(&target, &viewer, Some(&FixedRelay)),
            Ok(Plan::Dial(addresses(&["tcp://192.0.2.1:9"])))
        );
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
            match plan(&target, &viewer, None) {
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
