//! Pure matching: who may use which gateway, locality, relay choice.

use twox_hash::XxHash3_64;

use super::{Host, Match, Metadata, NodeRecord, RelaySelector};

/// `want` is a subset of `have`.
fn subset(
    want: &std::collections::BTreeMap<String, String>,
    have: &std::collections::BTreeMap<String, String>,
) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

fn field_matches(want: &str, have: &str) -> bool {
    want.is_empty() || want == have
}

impl Metadata {
    /// Whether `viewer` has every field this pattern sets (empty = any) and a
    /// superset of its labels and annotations.
    pub fn matches(&self, viewer: Option<&Metadata>) -> bool {
        let empty = Metadata::default();
        let have = viewer.unwrap_or(&empty);
        field_matches(&self.namespace_name, &have.namespace_name)
            && field_matches(&self.api_version, &have.api_version)
            && field_matches(&self.kind, &have.kind)
            && field_matches(&self.group, &have.group)
            && subset(&self.labels, &have.labels)
            && subset(&self.annotations, &have.annotations)
    }
}

impl Host {
    /// Whether `viewer` runs on this host (and process, if a pid is set).
    pub fn matches(&self, viewer: Option<&Host>) -> bool {
        let empty = Host::default();
        let have = viewer.unwrap_or(&empty);
        field_matches(&self.hostname, &have.hostname) && (self.pid == 0 || self.pid == have.pid)
    }
}

impl Match {
    /// Whether `viewer` may use what this rule guards. No host and no
    /// metadata: everyone.
    pub fn matches(&self, viewer: &NodeRecord) -> bool {
        self.host.as_ref().is_none_or(|h| h.matches(viewer.host.as_ref()))
            && self
                .metadata
                .as_ref()
                .is_none_or(|m| m.matches(viewer.metadata.as_ref()))
    }
}

impl RelaySelector {
    /// Whether `relay` is one this selector names.
    pub fn selects(&self, relay: &NodeRecord) -> bool {
        field_matches(&self.name, &relay.name)
            && self
                .metadata
                .as_ref()
                .is_none_or(|m| m.matches(relay.metadata.as_ref()))
    }
}

fn namespace(node: &NodeRecord) -> &str {
    node.metadata.as_ref().map_or("", |m| m.namespace_name.as_str())
}

/// Same host: equal namespace_name and hostname (and a hostname at all).
pub fn same_host(a: &NodeRecord, b: &NodeRecord) -> bool {
    match (&a.host, &b.host) {
        (Some(ha), Some(hb)) => !ha.hostname.is_empty() && ha.hostname == hb.hostname && namespace(a) == namespace(b),
        _ => false,
    }
}

/// Same process: same host and equal, known pid.
pub fn same_process(a: &NodeRecord, b: &NodeRecord) -> bool {
    same_host(a, b)
        && a.host
            .as_ref()
            .is_some_and(|h| h.pid != 0 && Some(h.pid) == b.host.as_ref().map(|h| h.pid))
}

/// The addresses `viewer` may dial to reach `target`, best first: gateways
/// whose `match` fits the viewer, lowest priority value first, then gateway
/// and address order. Empty: no direct route (a relay is needed).
pub fn dial_candidates<'a>(target: &'a NodeRecord, viewer: &NodeRecord) -> Vec<&'a str> {
    let mut gateways: Vec<_> = target
        .gateway
        .iter()
        .filter(|g| g.r#match.as_ref().is_none_or(|m| m.matches(viewer)))
        .collect();
    gateways.sort_by_key(|g| g.priority);
    gateways
        .iter()
        .flat_map(|g| g.address.iter().map(String::as_str))
        .collect()
}

/// Relays `viewer` recommends for reaching it (its `advertise_relay`), among
/// `records`, excluding itself, in name order.
pub fn relay_candidates<'a>(
    viewer: &NodeRecord,
    records: impl IntoIterator<Item = &'a NodeRecord>,
) -> Vec<&'a NodeRecord> {
    let Some(selector) = viewer.advertise_relay.as_ref() else {
        return Vec::new();
    };
    let mut relays: Vec<&NodeRecord> = records
        .into_iter()
        .filter(|r| r.name != viewer.name && selector.selects(r))
        .collect();
    relays.sort_by(|a, b| a.name.cmp(&b.name));
    relays
}

/// Rendezvous (highest-random-weight) hashing: the replica that serves `key`.
/// Adding or removing one of N replicas moves only the keys that replica wins
/// or held, about 1/N, so routes stay stable.
pub fn rendezvous<'a>(key: &str, replicas: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    replicas.into_iter().max_by_key(|replica| {
        (
            XxHash3_64::oneshot_with_seed(XxHash3_64::oneshot(replica.as_bytes()), key.as_bytes()),
            *replica,
        )
    })
}

/// Every replica ranked for `key` by the weights of [`rendezvous`], best
/// first: the first is the one `rendezvous` picks, the next is where the key
/// fails over to.
pub fn rendezvous_ranking<'a>(key: &str, replicas: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &'a str)> = replicas
        .into_iter()
        .map(|replica| {
            (
                XxHash3_64::oneshot_with_seed(XxHash3_64::oneshot(replica.as_bytes()), key.as_bytes()),
                replica,
            )
        })
        .collect();
    ranked.sort_by(|a, b| b.cmp(a));
    ranked.into_iter().map(|(_, replica)| replica).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Gateway;

    fn meta(ns: &str, kind: &str, labels: &[(&str, &str)]) -> Metadata {
        Metadata {
            namespace_name: ns.into(),
            kind: kind.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    fn node(name: &str, metadata: Metadata) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            metadata: Some(metadata),
            ..Default::default()
        }
    }

    #[test]
    fn empty_match_matches_everyone_and_maps_are_subsets() {
        let viewer = node("v", meta("ns", "app", &[("a", "1"), ("b", "2")]));
        assert!(Match::default().matches(&viewer));
        let m = |metadata| Match {
            host: None,
            metadata: Some(metadata),
        };
        assert!(m(meta("", "", &[("a", "1")])).matches(&viewer));
        assert!(!m(meta("", "", &[("a", "2")])).matches(&viewer));
        assert!(!m(meta("other", "", &[])).matches(&viewer));
        assert!(m(meta("ns", "app", &[])).matches(&viewer));
        assert!(
            !m(meta("", "", &[("c", "")])).matches(&viewer),
            "absent key never matches"
        );
    }

    #[test]
    fn gateways_by_priority_then_order() {
        let gw = |priority, address: &str, ns: &str| Gateway {
            priority,
            address: vec![address.into()],
            r#match: (!ns.is_empty()).then(|| Match {
                host: None,
                metadata: Some(meta(ns, "", &[])),
            }),
        };
        let target = NodeRecord {
            name: "t".into(),
            gateway: vec![
                gw(2, "tcp://b:1", ""),
                gw(1, "tcp://a:1", "ns1"),
                gw(2, "tcp://c:1", ""),
            ],
            ..Default::default()
        };
        let inside = node("v", meta("ns1", "", &[]));
        let outside = node("w", meta("ns2", "", &[]));
        assert_eq!(
            dial_candidates(&target, &inside),
            ["tcp://a:1", "tcp://b:1", "tcp://c:1"]
        );
        assert_eq!(dial_candidates(&target, &outside), ["tcp://b:1", "tcp://c:1"]);
    }

    #[test]
    fn locality() {
        let host = |hostname: &str, pid| {
            Some(Host {
                hostname: hostname.into(),
                pid,
            })
        };
        let mut a = node("a", meta("ns", "", &[]));
        let mut b = node("b", meta("ns", "", &[]));
        a.host = host("h1", 10);
        b.host = host("h1", 11);
        assert!(same_host(&a, &b) && !same_process(&a, &b));
        b.host = host("h1", 10);
        assert!(same_process(&a, &b));
        b.metadata = Some(meta("other", "", &[]));
        assert!(!same_host(&a, &b), "namespace differs");
        a.host = host("", 0);
        b.host = host("", 0);
        assert!(!same_host(&a, &b), "unknown hosts are never the same");
    }

    #[test]
    fn rendezvous_is_stable_and_total() {
        let replicas = ["r1", "r2", "r3"];
        assert_eq!(rendezvous("x", replicas), rendezvous("x", replicas));
        assert!(rendezvous("x", []).is_none());
    }
}
