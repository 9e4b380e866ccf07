//! Service discovery: who exists, where to reach them, and through which relay.
//!
//! ```text
//!  records (proto: discovery_node / discovery_group; YAML with the same names)
//!     │
//!     ├── matching: gateway `match` rules, same host / same process, relay
//!     │             candidates from `advertise_relay`, rendezvous hashing
//!     │
//!     └── backends, one `Discovery` interface with a change stream:
//!           MemoryDiscovery (API, the embedded default) · FileDiscovery (YAML,
//!           reloaded on change) · EtcdDiscovery (lease + watch, feature `etcd`)
//! ```
//!
//! Matching rules (design.md, "Discovery record"): a `match` with no host and
//! no metadata matches everyone; empty strings and a zero pid mean "any"; label
//! and annotation maps match as subsets. Lower gateway `priority` wins, then
//! the order of gateways and addresses in the record.

mod backend;
#[cfg(feature = "etcd")]
mod etcd;
mod file;
mod matching;
pub(crate) mod validate;

use serde::{Deserialize, Deserializer};

pub use backend::{Change, Discovery, DiscoveryError, MemoryDiscovery, Subscription};
#[cfg(feature = "etcd")]
pub use etcd::{EtcdConfig, EtcdDiscovery};
pub use file::{FileDiscovery, parse_file};
pub use matching::{dial_candidates, relay_candidates, rendezvous, rendezvous_ranking, same_host, same_process};
pub use validate::{ValidationError, validate_group, validate_node};

pub use crate::proto::discovery_record::Record;
pub use crate::proto::{
    DiscoveryGateway as Gateway, DiscoveryGroup as GroupRecord, DiscoveryHost as Host, DiscoveryMatch as Match,
    DiscoveryMetadata as Metadata, DiscoveryNode as NodeRecord, DiscoveryRecord,
    DiscoveryRelaySelector as RelaySelector,
};

/// The embedded default discovery: one in-memory registry per process, which
/// every node uses unless its config names another source. Nodes of one
/// process find each other through it with no server.
pub fn embedded() -> std::sync::Arc<dyn Discovery> {
    static EMBEDDED: std::sync::LazyLock<std::sync::Arc<MemoryDiscovery>> =
        std::sync::LazyLock::new(|| std::sync::Arc::new(MemoryDiscovery::new()));
    EMBEDDED.clone()
}

/// `type` of a node that accepts and makes connections.
pub const TYPE_NODE: &str = "node";
/// `type` of a client on an untrusted network: it never dials out.
pub const TYPE_CLIENT: &str = "client";
/// `type` of a group record.
pub const TYPE_GROUP: &str = "group";

impl Record {
    /// The record's name (its key).
    pub fn name(&self) -> &str {
        match self {
            Self::Node(node) => &node.name,
            Self::Group(group) => &group.name,
        }
    }

    /// The node record, if this is one.
    pub fn as_node(&self) -> Option<&NodeRecord> {
        match self {
            Self::Node(node) => Some(node),
            Self::Group(_) => None,
        }
    }

    /// Checks the record, naming the field that is wrong.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Self::Node(node) => validate_node(node),
            Self::Group(group) => validate_group(group),
        }
    }
}

impl NodeRecord {
    /// Whether this is a client (`type: client`), which never dials out.
    pub fn is_client(&self) -> bool {
        self.r#type == TYPE_CLIENT
    }
}

/// Serde helper: a list, or a single scalar taken as a one-element list (the
/// seed's files write `address: ipv4://...`).
pub fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}
