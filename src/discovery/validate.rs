//! Record validation: names and label syntax by Kubernetes rules, addresses by
//! scheme. Errors name the record and the field.

use super::{GroupRecord, Metadata, NodeRecord, TYPE_CLIENT, TYPE_GROUP, TYPE_NODE};
use crate::address::Address;

/// A record field that breaks the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("discovery record {record:?}: {field}: {reason}")]
pub struct ValidationError {
    /// Name of the record.
    pub record: String,
    /// Path of the field, e.g. `gateway[1].address[0]`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn err(record: &str, field: impl Into<String>, reason: impl Into<String>) -> ValidationError {
    ValidationError {
        record: record.to_string(),
        field: field.into(),
        reason: reason.into(),
    }
}

fn is_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// Kubernetes DNS subdomain (RFC 1123): at most 253 characters of lowercase
/// alphanumerics, `-` and `.`, starting and ending alphanumeric.
pub(crate) fn dns_subdomain(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 253 {
        return Err(format!("must be 1 to 253 characters, got {}", value.len()));
    }
    if !value.chars().all(|c| is_alnum(c) || c == '-' || c == '.') {
        return Err(format!(
            "{value:?} may contain only lowercase letters, digits, '-' and '.'"
        ));
    }
    if !value.starts_with(is_alnum) || !value.ends_with(is_alnum) {
        return Err(format!("{value:?} must start and end with a lowercase letter or digit"));
    }
    Ok(())
}

/// Kubernetes label name / value segment: at most 63 characters of
/// alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
fn label_segment(value: &str, allow_empty: bool) -> Result<(), String> {
    if value.is_empty() {
        return if allow_empty {
            Ok(())
        } else {
            Err("must not be empty".into())
        };
    }
    if value.len() > 63 {
        return Err(format!("{value:?} is longer than 63 characters"));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !value.chars().all(ok) {
        return Err(format!("{value:?} may contain only letters, digits, '-', '_' and '.'"));
    }
    if !value.starts_with(|c: char| c.is_ascii_alphanumeric()) || !value.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(format!("{value:?} must start and end with a letter or digit"));
    }
    Ok(())
}

/// Kubernetes label / annotation key: `[prefix/]name`, prefix a DNS subdomain.
fn label_key(key: &str) -> Result<(), String> {
    match key.split_once('/') {
        Some((prefix, name)) => {
            dns_subdomain(prefix).map_err(|e| format!("prefix of {key:?}: {e}"))?;
            label_segment(name, false)
        }
        None => label_segment(key, false),
    }
}

fn validate_metadata(record: &str, field: &str, metadata: &Metadata) -> Result<(), ValidationError> {
    for (key, value) in &metadata.labels {
        label_key(key).map_err(|e| err(record, format!("{field}.labels key"), e))?;
        label_segment(value, true).map_err(|e| err(record, format!("{field}.labels[{key}]"), e))?;
    }
    for key in metadata.annotations.keys() {
        label_key(key).map_err(|e| err(record, format!("{field}.annotations key"), e))?;
    }
    if !metadata.namespace_name.is_empty() {
        dns_subdomain(&metadata.namespace_name).map_err(|e| err(record, format!("{field}.namespace_name"), e))?;
    }
    Ok(())
}

/// Checks a node record.
pub fn validate_node(node: &NodeRecord) -> Result<(), ValidationError> {
    let name = node.name.as_str();
    dns_subdomain(name).map_err(|e| err(name, "name", e))?;
    if ![TYPE_NODE, TYPE_CLIENT, ""].contains(&node.r#type.as_str()) {
        return Err(err(
            name,
            "type",
            format!("{:?} is not \"node\" or \"client\"", node.r#type),
        ));
    }
    if let Some(metadata) = &node.metadata {
        validate_metadata(name, "metadata", metadata)?;
    }
    for (g, gateway) in node.gateway.iter().enumerate() {
        if gateway.address.is_empty() {
            return Err(err(name, format!("gateway[{g}].address"), "no address"));
        }
        for (a, address) in gateway.address.iter().enumerate() {
            address
                .parse::<Address>()
                .map_err(|e| err(name, format!("gateway[{g}].address[{a}]"), e.to_string()))?;
        }
        if let Some(metadata) = gateway.r#match.as_ref().and_then(|m| m.metadata.as_ref()) {
            validate_metadata(name, &format!("gateway[{g}].match.metadata"), metadata)?;
        }
    }
    if let Some(relay) = &node.advertise_relay {
        if !relay.name.is_empty() {
            dns_subdomain(&relay.name).map_err(|e| err(name, "advertise_relay.name", e))?;
        }
        if let Some(metadata) = &relay.metadata {
            validate_metadata(name, "advertise_relay.metadata", metadata)?;
        }
    }
    Ok(())
}

/// Checks a group record.
pub fn validate_group(group: &GroupRecord) -> Result<(), ValidationError> {
    let name = group.name.as_str();
    dns_subdomain(name).map_err(|e| err(name, "name", e))?;
    if ![TYPE_GROUP, ""].contains(&group.r#type.as_str()) {
        return Err(err(name, "type", format!("{:?} is not \"group\"", group.r#type)));
    }
    for (i, member) in group.node_list.iter().enumerate() {
        dns_subdomain(member).map_err(|e| err(name, format!("node_list[{i}]"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Gateway;

    fn node(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn names_follow_dns_subdomain_rules() {
        assert!(validate_node(&node("app-1.ns-2")).is_ok());
        for bad in ["", "App", "-a", "a-", "a_b", "Namespace/Zone 1: App", &"a".repeat(254)] {
            let e = validate_node(&node(bad)).unwrap_err();
            assert_eq!(e.field, "name", "{bad}: {e}");
        }
    }

    #[test]
    fn labels_and_addresses_name_the_field() {
        let mut n = node("app");
        n.metadata = Some(Metadata {
            labels: [("area.region".to_string(), "CN".to_string())].into(),
            ..Default::default()
        });
        n.gateway = vec![Gateway {
            priority: 1,
            address: vec!["tcp://10.0.0.1:1".into(), "bogus".into()],
            r#match: None,
        }];
        let e = validate_node(&n).unwrap_err();
        assert_eq!(e.field, "gateway[0].address[1]");
        assert!(e.to_string().contains("\"app\""), "{e}");
        n.gateway[0].address.pop();
        assert!(validate_node(&n).is_ok());
        n.metadata
            .as_mut()
            .unwrap()
            .labels
            .insert("bad key!".into(), "x".into());
        assert_eq!(validate_node(&n).unwrap_err().field, "metadata.labels key");
        n.metadata.as_mut().unwrap().labels.clear();
        n.metadata
            .as_mut()
            .unwrap()
            .labels
            .insert("example.com/tier".into(), "-x".into());
        assert_eq!(
            validate_node(&n).unwrap_err().field,
            "metadata.labels[example.com/tier]"
        );
    }

    #[test]
    fn types_and_groups() {
        let mut n = node("c");
        n.r#type = "robot".into();
        assert_eq!(validate_node(&n).unwrap_err().field, "type");
        let g = GroupRecord {
            name: "g".into(),
            r#type: "group".into(),
            node_list: vec!["a".into(), "B".into()],
            ..Default::default()
        };
        assert_eq!(validate_group(&g).unwrap_err().field, "node_list[1]");
    }
}
