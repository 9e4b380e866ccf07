//! A node's YAML configuration file.
//!
//! ```yaml
//! name: alpha                      # Kubernetes name rules
//! listen: [tcp://127.0.0.1:0, unix:///tmp/alpha.sock]
//! shards: 1                        # 0: one per core
//! discovery: { type: file, path: /etc/atbus/discovery.yaml }
//! metadata: { namespace_name: game, labels: { zone: eu } }
//! limits: { recv_queue: 8192, send_window: 4194304, udp_mtu: 1400 }  # udp_loopback_mtu: false
//! timeouts_ms: { connect: 2000, idle: 5000, give_up: 30000 }
//! auth: { tokens: [s3cret-2026, s3cret-2025], clock_skew_s: 300, zero_rtt: true }
//! anonymous_listen: [tcp://0.0.0.0:7100]  # also admits anonymous clients
//! tls: { cert: alpha.pem, key: alpha.key, ca: ca.pem, e2e: [1, 2] }  # e2e: all | none | ids
//! admin: 127.0.0.1:9100            # /metrics /healthz /readyz /safe-to-delete /connections
//! relay: { forward: false, policy: own, max_hops: 8 }  # own | target; forward: this is a relay
//! advertise_relay: { metadata: { namespace_name: game, kind: relay } }
//! client: false                    # true: dial only own relays (type: client)
//! log: info                        # the binaries' log filter (ATBUS_LOG wins)
//! ```
//!
//! Every key is optional but `name`; unknown keys are errors (a typo never
//! passes silently). `${VAR}` anywhere in the text is replaced by the
//! environment variable `VAR` before parsing (a pod's name and IP from the
//! Kubernetes downward API, say); an unset variable is an error, and `$${`
//! stands for a literal `${`. Values are checked by [`NodeConfig::validate`], whose
//! errors name the field.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{DiscoverySource, NodeConfig, NodeError};
use crate::discovery::{Gateway, Host, Metadata};

/// The file's shape (see the module docs).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeFile {
    /// The node's name.
    pub name: String,
    /// Listen addresses.
    #[serde(deserialize_with = "crate::discovery::one_or_many")]
    pub listen: Vec<String>,
    /// Shards (0: one per core).
    pub shards: Option<usize>,
    /// Core of shard 0.
    pub first_core: Option<usize>,
    /// Pin shards to cores.
    pub pin: Option<bool>,
    /// glommio io memory per shard, bytes (3 × this is locked).
    pub io_memory: Option<usize>,
    /// Most a shard spins before it parks, adaptively, µs
    /// (`RuntimeConfig::adaptive_spin`, default 50; 0: park at once).
    pub adaptive_spin_us: Option<u64>,
    /// A fixed spin before every park instead, µs
    /// (`RuntimeConfig::spin_before_park`; burns that much CPU per wake-up).
    pub spin_us: Option<u64>,
    /// Where records live.
    pub discovery: DiscoveryFile,
    /// Published metadata.
    pub metadata: Option<Metadata>,
    /// Published host identity (default: this machine and process).
    pub host: Option<Host>,
    /// Published gateways (default: from the listen addresses).
    pub gateways: Vec<Gateway>,
    /// Queues and windows.
    pub limits: LimitsFile,
    /// Timers, in milliseconds.
    pub timeouts_ms: TimeoutsFile,
    /// Bad frames tolerated per connection.
    pub max_bad_frames: Option<u32>,
    /// A second connection per route for urgent streams.
    pub latency_path: Option<bool>,
    /// Tokens, resumption, anonymous dialling.
    pub auth: AuthFile,
    /// Listeners that also admit anonymous dialers.
    #[serde(deserialize_with = "crate::discovery::one_or_many")]
    pub anonymous_listen: Vec<String>,
    /// Certificates for end-to-end stream encryption and QUIC.
    pub tls: Option<TlsFile>,
    /// Admin HTTP endpoint, `host:port`.
    pub admin: Option<String>,
    /// Relay behaviour.
    pub relay: RelayFile,
    /// Relays this node recommends and uses (published in its record).
    pub advertise_relay: Option<crate::discovery::RelaySelector>,
    /// A client: dials only its own relays.
    pub client: Option<bool>,
    /// Log filter of the `atbus` / `atbus-relay` binaries (tracing
    /// `EnvFilter` syntax, e.g. `info` or `libatbus=debug`); the `ATBUS_LOG`
    /// environment variable wins over it. Default `warn`.
    pub log: Option<String>,
}

/// `relay:` — see [`super::RelayConfig`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RelayFile {
    pub forward: Option<bool>,
    /// `own` or `target`.
    pub policy: Option<String>,
    pub max_hops: Option<u32>,
    /// Bytes held per next hop while it connects.
    pub hold: Option<usize>,
}

/// `tls:` — see [`crate::tls`]. Paths are relative to the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// The node's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA certificate(s) peers must be signed by (PEM).
    pub ca: PathBuf,
    /// Streams this node encrypts end to end: `all`, `none` (the default),
    /// or a list of stream ids.
    #[serde(default)]
    pub e2e: E2eStreamsFile,
}

/// `tls.e2e:` — `all`, `none` or a list of stream ids.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum E2eStreamsFile {
    /// `all`.
    Word(String),
    /// Stream ids.
    List(Vec<i64>),
}

impl Default for E2eStreamsFile {
    fn default() -> Self {
        Self::Word("none".into())
    }
}

/// `auth:` — see [`crate::auth::AuthConfig`].
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct AuthFile {
    pub tokens: Vec<String>,
    pub clock_skew_s: Option<u64>,
    pub replay_cache: Option<usize>,
    pub zero_rtt: Option<bool>,
    pub ticket_lifetime_s: Option<u64>,
    pub anonymous: Option<bool>,
}

impl std::fmt::Debug for AuthFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthFile")
            .field("tokens", &format_args!("[{} redacted]", self.tokens.len()))
            .finish_non_exhaustive()
    }
}

/// `discovery:` — which backend.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum DiscoveryFile {
    /// The process's in-memory registry.
    #[default]
    Embedded,
    /// A YAML file of records, reloaded on change.
    File {
        /// Its path (relative to the config file).
        path: PathBuf,
    },
    /// etcd (lease + watch).
    Etcd {
        /// `http://host:port` client URLs.
        endpoints: Vec<String>,
        /// Key prefix.
        #[serde(default)]
        prefix: Option<String>,
        /// Lease time to live, seconds.
        #[serde(default)]
        ttl_seconds: Option<u64>,
    },
}

/// `limits:` — see the matching [`NodeConfig`] and stream config fields.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct LimitsFile {
    pub recv_queue: Option<usize>,
    pub send_queue: Option<usize>,
    pub send_buffer: Option<usize>,
    pub send_window: Option<usize>,
    pub recv_window: Option<usize>,
    pub max_message_len: Option<usize>,
    pub max_streams: Option<usize>,
    pub udp_window: Option<usize>,
    pub udp_mtu: Option<usize>,
    pub udp_loopback_mtu: Option<bool>,
    pub stream_mtu: Option<usize>,
    pub write_batch: Option<usize>,
    pub tcp_write_batch: Option<usize>,
    pub unix_zero_copy: Option<bool>,
}

/// `timeouts_ms:` — milliseconds.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct TimeoutsFile {
    pub connect: Option<u64>,
    pub reconnect_min: Option<u64>,
    pub reconnect_max: Option<u64>,
    pub ping_interval: Option<u64>,
    pub idle: Option<u64>,
    pub give_up: Option<u64>,
}

fn set<T>(target: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *target = value;
    }
}

fn millis(target: &mut Duration, value: Option<u64>) {
    if let Some(ms) = value {
        *target = Duration::from_millis(ms);
    }
}

/// Replaces every `${NAME}` in `text` by `lookup(NAME)` (`$${` is a literal
/// `${`); an unknown or malformed reference is an error naming it.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, NodeError> {
    let bad = |reason: String| NodeError::Config { field: "file", reason };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        if rest[..at].ends_with('$') {
            out.push_str(&rest[..at]);
            out.push('{');
            rest = &rest[at + 2..];
            continue;
        }
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| bad(format!("unclosed ${{ in {:?}", &rest[at..rest.len().min(at + 40)])))?;
        let name = &after[..end];
        let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(bad(format!("${{{name}}}: not a variable name")));
        }
        let value = lookup(name).ok_or_else(|| bad(format!("${{{name}}}: the environment variable is not set")))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The binaries' logging: to stderr, filtered by `ATBUS_LOG`, else by the
/// `log:` of the node config file `config` (when given and readable), else
/// `warn`. A second call does nothing.
pub fn init_logging(config: Option<&Path>) {
    let from_file = config.and_then(|c| NodeFile::load(c).ok()).and_then(|f| f.log);
    let filter = std::env::var("ATBUS_LOG")
        .ok()
        .or(from_file)
        .unwrap_or_else(|| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

impl NodeFile {
    /// Parses YAML text after [`expand_env`] with the process environment;
    /// errors carry the line and the offending key.
    pub fn parse(text: &str) -> Result<Self, NodeError> {
        Self::parse_with_env(text, |name| std::env::var(name).ok())
    }

    /// As [`NodeFile::parse`], variables from `lookup`.
    pub fn parse_with_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<Self, NodeError> {
        let text = expand_env(text, lookup)?;
        yaml_serde::from_str(&text).map_err(|e| NodeError::Config {
            field: "file",
            reason: e.to_string(),
        })
    }

    /// Reads and parses a file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, NodeError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| NodeError::Config {
            field: "file",
            reason: format!("{}: {e}", path.display()),
        })?;
        Self::parse(&text).map_err(|e| match e {
            NodeError::Config { field, reason } => NodeError::Config {
                field,
                reason: format!("{}: {reason}", path.display()),
            },
            other => other,
        })
    }

    /// The node configuration this file describes (validated), with the
    /// discovery backend opened. `base`: directory relative paths start from.
    pub fn into_config(self, base: &Path) -> Result<NodeConfig, NodeError> {
        let listen: Vec<&str> = self.listen.iter().map(String::as_str).collect();
        let mut config = NodeConfig::new(&self.name, &listen)?;
        set(&mut config.runtime.shards, self.shards);
        set(&mut config.runtime.first_core, self.first_core);
        set(&mut config.runtime.pin, self.pin);
        set(&mut config.runtime.io_memory, self.io_memory);
        if let Some(us) = self.adaptive_spin_us {
            config.runtime.adaptive_spin = (us > 0).then(|| Duration::from_micros(us));
        }
        if let Some(us) = self.spin_us {
            config.runtime.spin_before_park = (us > 0).then(|| Duration::from_micros(us));
        }
        set(&mut config.metadata, self.metadata);
        config.host = self.host;
        config.gateways = self.gateways;
        set(&mut config.max_bad_frames, self.max_bad_frames);
        set(&mut config.latency_path, self.latency_path);
        let l = self.limits;
        set(&mut config.recv_queue, l.recv_queue);
        set(&mut config.send_queue, l.send_queue);
        set(&mut config.send_buffer, l.send_buffer);
        set(&mut config.stream.send_window, l.send_window);
        set(&mut config.stream.recv_window, l.recv_window);
        set(&mut config.stream.max_message_len, l.max_message_len);
        set(&mut config.stream.max_streams, l.max_streams);
        set(&mut config.udp_window, l.udp_window);
        set(&mut config.udp_mtu, l.udp_mtu);
        set(&mut config.udp_loopback_mtu, l.udp_loopback_mtu);
        set(&mut config.stream_mtu, l.stream_mtu);
        set(&mut config.write_batch, l.write_batch);
        set(&mut config.tcp_write_batch, l.tcp_write_batch);
        set(&mut config.unix_zero_copy, l.unix_zero_copy);
        let t = self.timeouts_ms;
        millis(&mut config.connect_timeout, t.connect);
        millis(&mut config.reconnect_min, t.reconnect_min);
        millis(&mut config.reconnect_max, t.reconnect_max);
        millis(&mut config.ping_interval, t.ping_interval);
        millis(&mut config.idle_timeout, t.idle);
        millis(&mut config.peer_give_up, t.give_up);
        let a = self.auth;
        config.auth.tokens = a.tokens;
        if let Some(s) = a.clock_skew_s {
            config.auth.clock_skew = Duration::from_secs(s);
        }
        set(&mut config.auth.replay_cache, a.replay_cache);
        set(&mut config.auth.zero_rtt, a.zero_rtt);
        if let Some(s) = a.ticket_lifetime_s {
            config.auth.ticket_lifetime = Duration::from_secs(s);
        }
        set(&mut config.auth.anonymous, a.anonymous);
        config.anonymous_listen = self
            .anonymous_listen
            .iter()
            .map(|a| a.parse())
            .collect::<Result<_, _>>()
            .map_err(NodeError::Address)?;
        if let Some(tls) = self.tls {
            let streams = match tls.e2e {
                E2eStreamsFile::Word(w) if w == "all" => crate::tls::E2eStreams::All,
                E2eStreamsFile::Word(w) if w == "none" => crate::tls::E2eStreams::Only(Default::default()),
                E2eStreamsFile::Word(other) => {
                    return Err(NodeError::Config {
                        field: "tls.e2e",
                        reason: format!("{other:?}: expected `all`, `none` or a list of stream ids"),
                    });
                }
                E2eStreamsFile::List(ids) => crate::tls::E2eStreams::Only(ids.into_iter().collect()),
            };
            let context = crate::tls::TlsContext::from_files(
                &base.join(&tls.cert),
                &base.join(&tls.key),
                &base.join(&tls.ca),
                streams,
            )
            .map_err(|e| NodeError::Config {
                field: "tls",
                reason: e.to_string(),
            })?;
            config.tls = Some(context);
        }
        if let Some(admin) = &self.admin {
            config.admin = Some(admin.parse().map_err(|e| NodeError::Config {
                field: "admin",
                reason: format!("{admin:?}: {e} (expected ip:port)"),
            })?);
        }
        let r = self.relay;
        set(&mut config.relay.forward, r.forward);
        set(&mut config.relay.max_hops, r.max_hops);
        set(&mut config.relay.hold, r.hold);
        if let Some(policy) = r.policy {
            config.relay.policy = policy.parse().map_err(|reason| NodeError::Config {
                field: "relay.policy",
                reason,
            })?;
        }
        config.advertise_relay = self.advertise_relay;
        set(&mut config.client, self.client);
        config.validate()?;
        config.discovery = open_discovery(self.discovery, base)?;
        Ok(config)
    }
}

fn open_discovery(file: DiscoveryFile, base: &Path) -> Result<DiscoverySource, NodeError> {
    let failed = |reason: String| NodeError::Config {
        field: "discovery",
        reason,
    };
    Ok(match file {
        DiscoveryFile::Embedded => DiscoverySource::default(),
        DiscoveryFile::File { path } => {
            let path = base.join(path);
            let backend = crate::discovery::FileDiscovery::open(&path).map_err(|e| failed(e.to_string()))?;
            DiscoverySource(Arc::new(backend))
        }
        #[cfg(feature = "etcd")]
        DiscoveryFile::Etcd {
            endpoints,
            prefix,
            ttl_seconds,
        } => {
            let mut etcd = crate::discovery::EtcdConfig {
                endpoints,
                ..Default::default()
            };
            set(&mut etcd.prefix, prefix);
            if let Some(ttl) = ttl_seconds {
                etcd.ttl = Duration::from_secs(ttl);
            }
            let backend = crate::discovery::EtcdDiscovery::start(etcd).map_err(|e| failed(e.to_string()))?;
            DiscoverySource(Arc::new(backend))
        }
        #[cfg(not(feature = "etcd"))]
        DiscoveryFile::Etcd { .. } => {
            return Err(failed("this build has no etcd support (feature `etcd`)".into()));
        }
    })
}

impl NodeConfig {
    /// A configuration from a YAML file (see [`NodeFile`]).
    pub fn from_yaml_file(path: impl AsRef<Path>) -> Result<Self, NodeError> {
        let path = path.as_ref();
        let base = path.parent().unwrap_or(Path::new("."));
        NodeFile::load(path)?.into_config(base)
    }

    /// A configuration from YAML text; relative paths start at the current
    /// directory.
    pub fn from_yaml(text: &str) -> Result<Self, NodeError> {
        NodeFile::parse(text)?.into_config(Path::new("."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_variables_are_expanded_and_missing_ones_named() {
        let env = |name: &str| match name {
            "POD_NAME" => Some("app-0".to_string()),
            "POD_IP" => Some("10.1.2.3".to_string()),
            _ => None,
        };
        let text = "name: ${POD_NAME}\nlisten: [tcp://${POD_IP}:7000]\n# $${literal}\n";
        assert_eq!(
            expand_env(text, env).expect("expands"),
            "name: app-0\nlisten: [tcp://10.1.2.3:7000]\n# ${literal}\n"
        );
        let file = NodeFile::parse_with_env(text, env).expect("parses");
        assert_eq!(file.name, "app-0");
        for (bad, says) in [
            ("${NOPE}", "NOPE"),
            ("${1X}", "not a variable"),
            ("x ${OPEN", "unclosed"),
        ] {
            let err = expand_env(bad, env).expect_err(bad).to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_full_file_becomes_a_config() {
        let config = NodeConfig::from_yaml(
            "name: alpha\n\
             listen: [tcp://127.0.0.1:0, unix://@alpha-test]\n\
             shards: 2\n\
             adaptive_spin_us: 20\n\
             metadata: { namespace_name: game, labels: { zone: eu } }\n\
             limits: { recv_queue: 100, send_window: 65536, udp_mtu: 1200, udp_loopback_mtu: false,\n\
                       unix_zero_copy: false,\n\
                       write_batch: 131072, tcp_write_batch: 98304 }\n\
             timeouts_ms: { connect: 300, idle: 9000 }\n\
             latency_path: false\n\
             auth: { tokens: [t1, t2], clock_skew_s: 60, zero_rtt: false }\n\
             anonymous_listen: tcp://127.0.0.1:0\n",
        )
        .expect("valid");
        assert_eq!(config.auth.tokens, vec!["t1".to_string(), "t2".to_string()]);
        assert_eq!(config.auth.clock_skew, Duration::from_secs(60));
        assert!(!config.auth.zero_rtt);
        assert_eq!(config.anonymous_listen.len(), 1);
        assert_eq!(config.name, "alpha");
        assert_eq!(config.listen.len(), 2);
        assert_eq!(config.runtime.shards, 2);
        assert_eq!(config.runtime.adaptive_spin, Some(Duration::from_micros(20)));
        assert_eq!(config.runtime.spin_before_park, None);
        let parking = NodeConfig::from_yaml("name: a\nadaptive_spin_us: 0\nspin_us: 0\n").expect("valid");
        assert_eq!(
            (parking.runtime.adaptive_spin, parking.runtime.spin_before_park),
            (None, None)
        );
        let fixed = NodeConfig::from_yaml("name: a\nspin_us: 30\n").expect("valid");
        assert_eq!(fixed.runtime.spin_before_park, Some(Duration::from_micros(30)));
        assert_eq!(config.recv_queue, 100);
        assert_eq!(config.stream.send_window, 65536);
        assert_eq!(config.udp_mtu, 1200);
        assert!(!config.udp_loopback_mtu);
        assert!(NodeConfig::default().udp_loopback_mtu, "on by default");
        assert!(!config.unix_zero_copy);
        assert!(NodeConfig::default().unix_zero_copy, "on by default");
        assert_eq!((config.write_batch, config.tcp_write_batch), (131_072, 98_304));
        assert_eq!(config.connect_timeout, Duration::from_millis(300));
        assert_eq!(config.idle_timeout, Duration::from_secs(9));
        assert!(!config.latency_path);
        assert_eq!(config.metadata.labels.get("zone").map(String::as_str), Some("eu"));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("name: Not_Valid\n", "name"),
            ("name: a\nlisten: [sctp://x:1]\n", "sctp"),
            ("name: a\nlisten_on: [tcp://x:1]\n", "listen_on"),
            ("name: a\nlimits: { recv_queue: 0 }\n", "recv_queue"),
            ("name: a\nlimits: { tcp_write_batch: 4096 }\n", "tcp_write_batch"),
            ("name: a\nadaptive_spin_us: 20000\n", "adaptive_spin"),
            ("name: a\nspin_us: 20000\n", "spin_before_park"),
            (
                "name: a\ntimeouts_ms: { idle: 10, ping_interval: 1000 }\n",
                "idle_timeout",
            ),
            ("name: a\ndiscovery: { type: zookeeper }\n", "zookeeper"),
            (
                "name: a\ndiscovery: { type: file, path: /nonexistent/d.yaml }\n",
                "/nonexistent/d.yaml",
            ),
            ("name: [a\n", "file"),
            ("name: a\nauth: { tokens: [\"\"] }\n", "auth.tokens"),
            ("name: a\nauth: { clock_skew_s: 0 }\n", "auth.clock_skew"),
            ("name: a\nauth: { token: x }\n", "token"),
            ("name: a\nadmin: localhost\n", "admin"),
            (
                "name: a\ntls: { cert: /nonexistent/a.pem, key: k, ca: c }\n",
                "/nonexistent/a.pem",
            ),
            ("name: a\ntls: { cert: a, key: k, ca: c, e2e: some }\n", "tls.e2e"),
        ];
        for (text, expected) in cases {
            let err = NodeConfig::from_yaml(text).expect_err(text).to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}
