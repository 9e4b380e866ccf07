//! The node: a named process on the bus. It owns a runtime of shards, listens
//! on its addresses, dials the peers it has routes to, and sends messages to
//! peers by name over streams.
//!
//! ```text
//!  Node (Send + Sync handle)
//!    send(to, stream, Bytes) ──► per-shard send queue ──► peer's home shard
//!    recv() ◄── bounded message queue ◄── every shard
//!
//!  shard (one thread, glommio):
//!    endpoint per peer name ── stream::Session ── paths = connections
//!    connection: reader task (decode → session) + writer task (batched writes)
//! ```
//!
//! A peer lives on one shard (its *home*, by hash of its name); connections
//! accepted on another shard are handed to the home shard right after the
//! handshake, before any stream data, and never move again.
//!
//! Same-process peers (`mem://name`) get each message's `Bytes` through the
//! peer's receive queue: no encoding, no copy, no socket.

#[cfg(feature = "admin")]
mod admin;
mod config_file;
mod conn;
mod inbox;
mod mem;
pub mod metrics;
mod relay;
pub mod routing;
mod shard;

pub use config_file::{DiscoveryFile, NodeFile, expand_env, init_logging};
pub use conn::HANDSHAKE_STREAM;
pub use routing::{NoRoute, Plan, RelayPolicy};
/// The type of [`Message::from`].
pub use smol_str::SmolStr;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use crossbeam_queue::ArrayQueue;

use crate::address::{Address, AddressError};
use crate::discovery::{Change, Discovery, Gateway, Host, Match, Metadata, NodeRecord, Record};
use crate::runtime::{Runtime, RuntimeConfig, RuntimeError, ShardHandle};
use crate::stream::{self, StreamId};

/// The largest UDP path MTU: a datagram payload of up to this many bytes
/// fits the largest IPv4 datagram (65 535 bytes with its headers) and a
/// reader's 64 KiB receive buffer.
pub const UDP_MTU_MAX: usize = 65_000;

/// Node settings.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The node's unique name (Kubernetes DNS-subdomain rules).
    pub name: String,
    /// Addresses to listen on (`tcp://127.0.0.1:0` picks a free port).
    pub listen: Vec<Address>,
    /// Shards and their executors.
    pub runtime: RuntimeConfig,
    /// Stream-layer windows and timers.
    pub stream: stream::Config,
    /// Frame-codec limits.
    pub frame: crate::frame::Config,
    /// Give up a dial after this long.
    pub connect_timeout: Duration,
    /// First and largest delay between redials (doubling, with jitter).
    pub reconnect_min: Duration,
    /// See `reconnect_min`.
    pub reconnect_max: Duration,
    /// A ping goes out on a connection quiet for this long.
    pub ping_interval: Duration,
    /// A connection that received nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Bad frames (hash mismatch, undecodable, protocol violation) a
    /// connection may send before it is closed with BAD_FRAME.
    pub max_bad_frames: u32,
    /// Bytes a connection buffers for one write before new stream data waits
    /// (TCP connections: `tcp_write_batch`). Unix stream connections also
    /// take it as their `SO_SNDBUF` (doubled by the kernel, capped at
    /// `net.core.wmem_max`).
    pub write_batch: usize,
    /// `write_batch` for TCP connections. Here (loopback, BBR: this
    /// kernel's default congestion control) writes of more than about two
    /// 64 KiB frames cost the sending core ~0.35 µs more per 16 KiB message,
    /// in the kernel's transmit path and the softirq work after it: tcp 16
    /// KiB moved 1.2-1.5x the messages with 64 KiB than with 256 KiB (128
    /// KiB as few as 256); under CUBIC the two read the same
    /// (perf/README.md item 33).
    pub tcp_write_batch: usize,
    /// Unix stream connections to a peer running as the same user write
    /// large payloads without copying them (`vmsplice` into a pipe, then
    /// `splice` into the socket): the peer reads them from the sender's
    /// pages, which stay held until it has (perf/README.md item 47: the
    /// sending core's time per 16 KiB message about halved). On by default.
    pub unix_zero_copy: bool,
    /// MTU of UDP paths (256 to [`UDP_MTU_MAX`]; 548 by default, the safe
    /// UDP payload on any route). See `udp_loopback_mtu` for loopback peers.
    pub udp_mtu: usize,
    /// UDP paths to a loopback address take the loopback route's MTU
    /// instead of `udp_mtu` when it is larger (65 507 bytes on Linux, capped
    /// at [`UDP_MTU_MAX`], `frame.max_frame_len` and `udp_window`): no hop
    /// there is narrower. On by default; off keeps `udp_mtu` everywhere.
    pub udp_loopback_mtu: bool,
    /// Bytes in flight per UDP path at most (keep it well under the kernel
    /// socket buffer, see [`crate::transport::UDP_SOCKET_BUFFER`]).
    pub udp_window: usize,
    /// MTU of TCP and Unix paths.
    pub stream_mtu: usize,
    /// Dial a second connection per route for urgent streams only
    /// ([`Node::send_urgent`]), so frame-sync messages never queue behind
    /// bulk bytes in kernel buffers. Costs one more socket per peer pair.
    pub latency_path: bool,
    /// Received messages queued for the application at most (each class:
    /// urgent and ordinary messages have a queue each). Past it the shard
    /// stops taking messages from the stream layer, whose receive window then
    /// holds the peer back. Same-process peers' messages have queues of
    /// their own of this size (made when the first such peer sends); past it
    /// their `send` answers `WouldBlock`.
    pub recv_queue: usize,
    /// Bytes per peer accepted from other threads and not yet taken by the
    /// stream layer (whose own bound is the stream's `send_window`); past it
    /// `send` answers `WouldBlock`, and [`Node::wait_writable`] returns once
    /// an eighth of it is free again.
    pub send_buffer: usize,
    /// Messages queued per shard from other threads at most.
    pub send_queue: usize,
    /// A peer with no connection for this long has what it was sent and did
    /// not acknowledge dropped and reported ([`Node::recv_undelivered`]);
    /// the node keeps dialling routes given by [`Node::add_route`].
    pub peer_give_up: Duration,
    /// Where the node publishes its record and looks peers up (default: the
    /// process's embedded in-memory registry, [`crate::discovery::embedded`]).
    pub discovery: DiscoverySource,
    /// Labels and namespace published in the node's record (gateway `match`
    /// rules of other nodes are checked against them).
    pub metadata: Metadata,
    /// Host identity published in the record; `None`: this machine's
    /// hostname and this process's pid. Same hostname and namespace means
    /// "same host" (unix), same pid too means "same process" (mem).
    pub host: Option<Host>,
    /// Gateways published in the record; empty: one per kind of listen
    /// address (unix ones for the same host only, tcp/udp for everyone).
    /// Set them when the bound addresses are not what others should dial
    /// (0.0.0.0, NAT, containers).
    pub gateways: Vec<Gateway>,
    /// Relays: whether this node is one, and which relay its own traffic
    /// takes when no gateway of a target fits ([`RelayConfig`]).
    pub relay: RelayConfig,
    /// The relays this node recommends for reaching it, and uses itself
    /// (published as the record's `advertise_relay`).
    pub advertise_relay: Option<crate::discovery::RelaySelector>,
    /// A client (`type: client` in its record): it dials only its own
    /// relays (`advertise_relay`) and reaches everything through them.
    pub client: bool,
    /// Tokens, 0-RTT resumption, anonymous dialling
    /// ([`crate::auth::AuthConfig`]).
    pub auth: crate::auth::AuthConfig,
    /// Listeners that also admit anonymous dialers (see
    /// [`crate::auth::AuthConfig::anonymous`]): each gets a temporary name
    /// (`anon-…`) and may talk to this node only. Bound like `listen`.
    pub anonymous_listen: Vec<Address>,
    /// The node's certificate and the CA it trusts ([`crate::tls`]), for
    /// end-to-end encrypted streams (which ones: the context's
    /// [`crate::tls::E2eStreams`]) and for `quic://`. `None`: streams are
    /// plain, a peer's encrypted stream is refused, and QUIC is off.
    pub tls: Option<crate::tls::TlsContext>,
    /// Address of the admin HTTP endpoint (`/metrics`, `/healthz`,
    /// `/readyz`, `/safe-to-delete`, `/connections`; feature `admin`).
    /// `None`: no endpoint.
    pub admin: Option<std::net::SocketAddr>,
}

/// A discovery backend shared by nodes (see [`NodeConfig::discovery`]).
#[derive(Clone)]
pub struct DiscoverySource(pub Arc<dyn Discovery>);

impl Default for DiscoverySource {
    fn default() -> Self {
        Self(crate::discovery::embedded())
    }
}

impl std::fmt::Debug for DiscoverySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiscoverySource(..)")
    }
}

/// Relay settings of a node (see [`NodeConfig::relay`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    /// This node forwards frames addressed to other nodes (`atbus-relay`):
    /// it announces itself as a relay in its handshakes and passes frames on
    /// by their `head.destination`, without reading their streams.
    pub forward: bool,
    /// Own relay or the target's, when both could carry this node's traffic.
    pub policy: RelayPolicy,
    /// Relays a frame may pass; the relay that would exceed it drops the
    /// frame and answers the source with HOP_LIMIT.
    pub max_hops: u32,
    /// Bytes of frames a relay holds per next hop it is still connecting to
    /// (more are dropped: the senders' stream layers send them again).
    pub hold: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            forward: false,
            policy: RelayPolicy::OwnRelay,
            max_hops: 8,
            hold: 4 << 20,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            listen: Vec::new(),
            runtime: RuntimeConfig {
                shards: 1,
                ..RuntimeConfig::default()
            },
            stream: stream::Config::default(),
            frame: crate::frame::Config::default(),
            connect_timeout: Duration::from_secs(2),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
            ping_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            max_bad_frames: 8,
            write_batch: 256 * 1024,
            tcp_write_batch: 64 * 1024,
            unix_zero_copy: true,
            udp_mtu: stream::PathConfig::UDP_MTU,
            udp_loopback_mtu: true,
            udp_window: 512 * 1024,
            stream_mtu: stream::PathConfig::TCP_MTU,
            latency_path: true,
            recv_queue: 8192,
            send_buffer: 4 * 1024 * 1024,
            send_queue: 1 << 16,
            peer_give_up: Duration::from_secs(30),
            discovery: DiscoverySource::default(),
            metadata: Metadata::default(),
            host: None,
            gateways: Vec::new(),
            relay: RelayConfig::default(),
            advertise_relay: None,
            client: false,
            auth: crate::auth::AuthConfig::default(),
            anonymous_listen: Vec::new(),
            tls: None,
            admin: None,
        }
    }
}

impl NodeConfig {
    /// A configuration with this name and listen addresses, defaults otherwise.
    pub fn new(name: &str, listen: &[&str]) -> Result<Self, NodeError> {
        let listen = listen
            .iter()
            .map(|a| a.parse::<Address>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(NodeError::Address)?;
        Ok(Self {
            name: name.to_string(),
            listen,
            ..Self::default()
        })
    }

    /// Checks every field; the error names the one that is wrong.
    pub fn validate(&self) -> Result<(), NodeError> {
        if let Err(reason) = crate::discovery::validate::dns_subdomain(&self.name) {
            return Err(NodeError::Config {
                field: "name",
                reason: format!("{:?}: {reason}", self.name),
            });
        }
        self.stream.validate().map_err(|e| NodeError::Config {
            field: "stream",
            reason: e.to_string(),
        })?;
        self.frame.validate().map_err(|e| NodeError::Config {
            field: "frame",
            reason: e.to_string(),
        })?;
        let checks: [(&'static str, bool); 11] = [
            ("connect_timeout", !self.connect_timeout.is_zero()),
            ("peer_give_up", !self.peer_give_up.is_zero()),
            (
                "reconnect_min",
                !self.reconnect_min.is_zero() && self.reconnect_min <= self.reconnect_max,
            ),
            (
                "idle_timeout",
                self.idle_timeout > self.ping_interval && !self.ping_interval.is_zero(),
            ),
            ("udp_mtu", (256..=UDP_MTU_MAX).contains(&self.udp_mtu)),
            ("udp_window", self.udp_window >= self.udp_mtu),
            (
                "stream_mtu",
                self.stream_mtu >= 256 && self.stream_mtu <= self.frame.max_frame_len,
            ),
            ("write_batch", self.write_batch >= self.stream_mtu),
            ("tcp_write_batch", self.tcp_write_batch >= self.stream_mtu),
            // A spin of more than 10 ms before each park is a core burnt,
            // not a latency gain.
            (
                "runtime.adaptive_spin",
                self.runtime.adaptive_spin.is_none_or(|d| d <= MAX_SPIN),
            ),
            (
                "runtime.spin_before_park",
                self.runtime.spin_before_park.is_none_or(|d| d <= MAX_SPIN),
            ),
        ];
        for (field, ok) in checks {
            if !ok {
                return Err(NodeError::Config {
                    field,
                    reason: "out of range (see NodeConfig docs)".into(),
                });
            }
        }
        let auth = &self.auth;
        let auth_checks: [(&'static str, bool); 4] = [
            ("auth.tokens", auth.tokens.iter().all(|t| !t.is_empty())),
            ("auth.clock_skew", !auth.clock_skew.is_zero()),
            ("auth.replay_cache", auth.replay_cache > 0),
            ("auth.ticket_lifetime", !auth.ticket_lifetime.is_zero()),
        ];
        for (field, ok) in auth_checks {
            if !ok {
                return Err(NodeError::Config {
                    field,
                    reason: "empty or zero (see AuthConfig docs)".into(),
                });
            }
        }
        if self.relay.max_hops == 0 || self.relay.max_hops > 64 {
            return Err(NodeError::Config {
                field: "relay.max_hops",
                reason: format!("{}: expected 1 to 64", self.relay.max_hops),
            });
        }
        if self.client && self.relay.forward {
            return Err(NodeError::Config {
                field: "client",
                reason: "a client cannot be a relay (relay.forward)".into(),
            });
        }
        if self.recv_queue == 0 || self.send_queue == 0 || self.send_buffer == 0 {
            return Err(NodeError::Config {
                field: "recv_queue/send_queue/send_buffer",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// Runs on a shard thread for every received message once set (see
/// [`Node::set_handler`]).
pub type Handler = Arc<dyn Fn(&Handle, Message) + Send + Sync>;

/// A handle to a running node for code that runs on its shards (a
/// [`Handler`]): it sends, it does not receive. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("node", &self.shared.name).finish()
    }
}

impl Handle {
    /// The node's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Like [`Node::send`]. From a shard thread, a message to a peer homed
    /// on that shard goes straight into its stream, and a full stream is
    /// `WouldBlock` at once: a handler must not wait.
    pub fn send(&self, peer: &str, stream_id: StreamId, data: Bytes) -> Result<(), SendError> {
        self.shared.send_to(peer, stream_id, data, false, true)
    }

    /// Like [`Node::send_urgent`].
    pub fn send_urgent(&self, peer: &str, stream_id: StreamId, data: Bytes) -> Result<(), SendError> {
        self.shared.send_to(peer, stream_id, data, true, true)
    }
}

/// [`Node::set_handler`] was called before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this node has a message handler already")]
pub struct HandlerAlreadySet;

/// A message received from a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The sending node (names up to 23 bytes are held inline).
    pub from: SmolStr,
    /// The stream it came on.
    pub stream_id: StreamId,
    /// The payload (a slice of the receive buffer, or the sender's own
    /// `Bytes` for same-process peers).
    pub data: Bytes,
}

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A configuration field is invalid.
    #[error("node config: {field}: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An address did not parse.
    #[error("node config: {0}")]
    Address(AddressError),
    /// The runtime did not start.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A listen address could not be bound.
    #[error("cannot listen on {address}: {reason}")]
    Listen {
        /// The address.
        address: Address,
        /// The cause.
        reason: String,
    },
    /// The node's record could not be published.
    #[error("node {name:?}: cannot publish its discovery record: {source}")]
    Discovery {
        /// The node.
        name: String,
        /// The cause.
        source: crate::discovery::DiscoveryError,
    },
    /// Another node of this process has the same name.
    #[error("a node named {0:?} already runs in this process")]
    Duplicate(String),
}

/// Why a message was not accepted. Nothing is accepted and then silently lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No route to this name and no connection from it, and discovery does
    /// not know it.
    #[error("unknown peer {0:?}: not in discovery, no route added, no connection from it")]
    UnknownPeer(String),
    /// Discovery knows the node, but none of its gateways fits this node and
    /// no relay offers a way (ROUTER_NOT_FOUND), or a group has no members.
    #[error("no route: {0}")]
    NoRoute(String),
    /// A message to a group reached some members and not others. Retry the
    /// `failed` ones by name (or use [`Node::send_blocking`], which does).
    #[error(
        "multicast to {group:?}: {} member(s) took the message, {} did not (first: {})",
        delivered.len(),
        failed.len(),
        failed.first().map_or(String::new(), |(name, e)| format!("{name}: {e}"))
    )]
    Multicast {
        /// The group.
        group: String,
        /// Members that took it.
        delivered: Vec<String>,
        /// Members that did not, and why.
        failed: Vec<(String, SendError)>,
    },
    /// Stream ids below 0 belong to the bus itself (control, handshake).
    #[error("send to {peer:?}: stream {stream_id} is reserved (application streams are 0 and up)")]
    ReservedStream {
        /// The peer.
        peer: String,
        /// The stream asked for.
        stream_id: StreamId,
    },
    /// A queue on the way is full (`stream.send_window` for the stream,
    /// `send_buffer` / `send_queue` on the way to the shard, the peer's
    /// `recv_queue` for same-process peers); wait with
    /// [`Node::wait_writable`].
    #[error("send to {peer:?}: {queue} is full (would block)")]
    WouldBlock {
        /// The peer.
        peer: String,
        /// Which bound was hit.
        queue: &'static str,
    },
    /// The stream layer refused the message.
    #[error("send to {peer:?}: {source}")]
    Stream {
        /// The peer.
        peer: String,
        /// The reason.
        source: stream::SendError,
    },
    /// The node is stopping.
    #[error("node stopped")]
    Stopped,
}

/// What the stream layer would refuse of any message, checked before it is
/// queued: empty, or longer than `max`.
fn check_message(peer: &str, stream_id: StreamId, data: &Bytes, max: usize) -> Result<(), SendError> {
    let refused = if data.is_empty() {
        stream::SendError::EmptyMessage { stream_id }
    } else if data.len() > max {
        stream::SendError::MessageTooLarge {
            stream_id,
            len: data.len(),
            max,
        }
    } else {
        return Ok(());
    };
    Err(SendError::Stream {
        peer: peer.to_string(),
        source: refused,
    })
}

/// Messages this node accepted for a peer and then had to drop, because the
/// peer is gone for good (its discovery record was withdrawn or expired):
/// read them with [`Node::recv_undelivered`]. Counted per stream. The peer
/// may have received some of them (they were not acknowledged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undelivered {
    /// The peer.
    pub to: Arc<str>,
    /// The stream.
    pub stream_id: StreamId,
    /// Messages dropped.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Why.
    pub reason: String,
}

/// How this node reaches a peer (see [`Node::route_to`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteInfo {
    /// Same process: in memory.
    Mem,
    /// Dialled at these addresses (best first), from discovery or
    /// [`Node::add_route`] (then empty: see the routes added).
    Dial(Vec<Address>),
    /// A group: its members.
    Group(Vec<String>),
}

/// Node-wide counters (lifetime totals).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Connections whose handshake completed.
    pub connections_established: u64,
    /// Connections that ended for any reason.
    pub connections_closed: u64,
    /// Connections closed because of bad frames.
    pub closed_bad_frame: u64,
    /// Bad frames received (all connections).
    pub bad_frames: u64,
    /// Connections refused at the handshake.
    pub handshake_failures: u64,
    /// Connections refused or closed for wrong, expired or replayed
    /// credentials, or an anonymous peer overstepping (UNAUTHORIZED).
    pub auth_failures: u64,
    /// End-to-end encrypted streams whose TLS failed (bad certificate,
    /// wrong name, undecryptable data, no TLS configured here).
    pub e2e_failures: u64,
    /// Messages the application took (`recv_timeout` / `try_recv`).
    pub messages_received: u64,
    /// Messages waiting in the application queues now (both classes).
    pub queued: u64,
    /// Relay: frames passed on to other nodes.
    pub relayed_frames: u64,
    /// Relay: frames dropped (no route, hop limit, full buffers; the ends
    /// resend what matters).
    pub relay_dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    established: AtomicU64,
    closed: AtomicU64,
    closed_bad_frame: AtomicU64,
    bad_frames: AtomicU64,
    handshake_failures: AtomicU64,
    auth_failures: AtomicU64,
    e2e_failures: AtomicU64,
    received: AtomicU64,
}

/// Maps keyed by peer name, hashed with foldhash (randomly seeded per map;
/// names come from peers). SipHash was 1.5 % of the 64 B send path and
/// xxh3's streaming hasher 9 %.
pub(super) type NameMap<V> = HashMap<Arc<str>, V, foldhash::fast::RandomState>;

/// An empty [`NameMap`].
pub(super) fn name_map<V>() -> NameMap<V> {
    HashMap::with_hasher(foldhash::fast::RandomState::default())
}

/// Bytes sent to one peer from other threads and not yet taken by its
/// session, per class (index: urgent), each bounded by `send_buffer`: a bulk
/// backlog never makes a frame-sync send wait.
pub(super) type Backlog = Arc<[AtomicUsize; 2]>;

/// How a peer is reached.
#[derive(Clone, Debug)]
enum Route {
    /// Through the stream layer on the peer's home shard; `queued` counts
    /// the bytes on their way there (see [`NodeConfig::send_buffer`]).
    /// `learned`: the addresses dialled, when they came from discovery (the
    /// route then follows the record: redialled when it changes, dropped
    /// when it goes).
    Shard {
        home: usize,
        queued: Backlog,
        learned: Option<Arc<[Address]>>,
    },
    /// Same process: straight into its queue.
    Mem(Arc<mem::MemTarget>),
    /// A group from discovery: its member names.
    Group(Arc<[Arc<str>]>),
}

/// One message on its way from another thread to a shard.
#[derive(Debug)]
struct Outgoing {
    to: Arc<str>,
    stream_id: StreamId,
    data: Bytes,
    /// 0 ordinary, 1 urgent. A whole word, not a `bool`: with a bool and
    /// its padding, the moves of each popped message were copies of odd
    /// widths that the next loads could not take from the store buffer,
    /// and the draining shard stalled on them (tcp 64 B).
    class: usize,
}

/// A name with no route: the message comes back to the caller.
struct Unrouted(Bytes);

/// "Some queue or window freed space": a generation counter that shards bump
/// on every drain (lock-free), and a condvar only for threads that wait.
#[derive(Debug, Default)]
struct Writable {
    generation: AtomicU64,
    waiters: AtomicUsize,
    lock: Mutex<()>,
    cvar: Condvar,
}

impl Writable {
    fn notify(&self) {
        // SeqCst pairs with `wait`: either the waiter sees the new generation,
        // or this sees the waiter and wakes it under the lock.
        self.generation.fetch_add(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0
            && let Ok(_guard) = self.lock.lock()
        {
            self.cvar.notify_all();
        }
    }

    fn wait(&self, since: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock().ok();
        let current = loop {
            let current = self.generation.load(Ordering::SeqCst);
            let left = deadline.saturating_duration_since(Instant::now());
            if current != since || left.is_zero() {
                break current;
            }
            // A poisoned lock: no sleeping, the caller retries.
            let Some(held) = guard.take() else { break current };
            match self.cvar.wait_timeout(held, left) {
                Ok((held, _)) => guard = Some(held),
                Err(_) => break current,
            }
        };
        drop(guard);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        current
    }
}

/// State shared by the handle and every shard.
struct Shared {
    name: Arc<str>,
    /// `name` as [`Message::from`] carries it.
    small_name: SmolStr,
    incarnation: u64,
    config: NodeConfig,
    shards: Vec<ShardHandle>,
    peers: RwLock<NameMap<Route>>,
    /// Received messages for the application (those of streams the peer
    /// flagged urgent are read first).
    inbox: Arc<inbox::AppInbox>,
    /// Set once: received messages go to it, on the receiving shard, instead
    /// of `inbox` (shared with same-process senders' routes).
    handler: Arc<std::sync::OnceLock<Handler>>,
    /// Per class (ordinary, urgent): a shard holds messages because that
    /// application queue was full.
    app_blocked: [AtomicBool; 2],
    /// How many looks `recv_timeout` takes before sleeping (see
    /// [`RECV_SPINS`]); written only when it changes.
    recv_spins: AtomicU32,
    /// Sleeps since `recv_spins` reached nought (see [`RECV_PROBE`]).
    recv_quiet: AtomicU32,
    send_queues: Vec<ArrayQueue<Outgoing>>,
    /// Per shard: urgent messages from other threads, drained first.
    urgent_queues: Vec<ArrayQueue<Outgoing>>,
    /// Per shard: a drain of its send queue is scheduled and has not started
    /// yet (one job and one wake-up per burst, not per message).
    drain_scheduled: Vec<AtomicBool>,
    /// Bumped whenever some window or queue frees space.
    writable: Writable,
    /// Same-process senders waiting for room in this node's queue.
    mem_waiters: Mutex<Vec<std::sync::Weak<Shared>>>,
    /// Per class: some same-process sender found that queue full.
    mem_waiting: [AtomicBool; 2],
    listening: Mutex<Vec<Address>>,
    // Padded: senders of same-process peers bump `received` on every
    // message; the flags the receiving thread reads must not share its line.
    counters: crossbeam_utils::CachePadded<Counters>,
    /// Shared with same-process senders' routes (see [`mem::MemTarget`]).
    stopping: Arc<AtomicBool>,
    discovery: Arc<dyn Discovery>,
    /// This node's discovery record (set once the listeners are bound).
    record: std::sync::OnceLock<NodeRecord>,
    /// Tokens, replay cache, ticket keys, tickets held.
    auth: crate::auth::Authority,
    /// Per shard: what it counted (see [`metrics`]).
    shard_metrics: Vec<metrics::ShardMetrics>,
    undelivered_tx: Sender<Undelivered>,
    undelivered_rx: Receiver<Undelivered>,
    /// Connections per peer now (relays pick live next hops).
    live: RwLock<NameMap<u32>>,
    /// Relay: the peer whose connection a node's traffic came in on (replies
    /// to clients go back there).
    reverse: RwLock<NameMap<Arc<str>>>,
    /// Relay: next hops discovery gave per destination (cleared on every
    /// discovery change).
    forward_plans: RwLock<NameMap<Arc<[Arc<str>]>>>,
    /// Round trips (µs) since the stats sampler last took them (one per
    /// pong: once a second per connection, off the message path).
    rtt_us: Mutex<hdrhistogram::Histogram<u64>>,
    /// The last minute of per-second samples ([`metrics::Windows`]).
    windows: Mutex<metrics::Windows>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Shared {
    /// Sends to a node, or (with `groups`) to a group's members. A name with
    /// no route yet is looked up in discovery once.
    fn send_to(
        self: &Arc<Self>,
        peer: &str,
        stream_id: StreamId,
        data: Bytes,
        urgent: bool,
        groups: bool,
    ) -> Result<(), SendError> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(SendError::Stopped);
        }
        if stream_id < 0 {
            return Err(SendError::ReservedStream {
                peer: peer.to_string(),
                stream_id,
            });
        }
        let mut data = data;
        // No route: the first send to this name, or a discovery change
        // dropped the route (a group's route goes with every change of its
        // record, perhaps right after `resolve` made it): look it up again.
        for _ in 0..RESOLVE_TRIES {
            match self.send_routed(peer, stream_id, data, urgent, groups) {
                // Not `Ok(result) => return result`: that copied the whole
                // 72-byte result with 16-byte loads, the first of which
                // waited for the 8-byte store of its tag to leave the store
                // buffer, behind the queue push's stores to a line the
                // receiving core holds (mem 64 B: 58 of the sending thread's
                // 100 ns per message, perf/README.md item 38).
                Ok(Ok(())) => return Ok(()),
                Ok(Err(error)) => return Err(error),
                Err(Unrouted(back)) => {
                    data = back;
                    self.resolve(peer)?;
                }
            }
        }
        self.send_routed(peer, stream_id, data, urgent, groups)
            .unwrap_or_else(|_| Err(SendError::UnknownPeer(peer.to_string())))
    }

    /// Sends along the route `peer` has, with one map lookup; `Unrouted`
    /// gives the message back when there is none.
    fn send_routed(
        self: &Arc<Self>,
        peer: &str,
        stream_id: StreamId,
        data: Bytes,
        urgent: bool,
        groups: bool,
    ) -> Result<Result<(), SendError>, Unrouted> {
        let Ok(peers) = self.peers.read() else {
            return Ok(Err(SendError::Stopped));
        };
        let Some((to, route)) = peers.get_key_value(peer) else {
            return Err(Unrouted(data));
        };
        Ok(match route {
            // Under the read lock: it never waits, and a clone of the route
            // would be two more atomic writes per message.
            Route::Mem(target) => mem::send(self, target, peer, stream_id, data, urgent),
            Route::Group(_) if !groups => Err(SendError::NoRoute(format!("{peer:?} is a group: groups do not nest"))),
            Route::Group(members) => {
                let members = members.clone();
                drop(peers);
                self.multicast(peer, &members, stream_id, &data, urgent)
            }
            Route::Shard { home, queued, .. } => {
                let home = *home;
                // Checked here: once queued for the shard, a refusal could
                // no longer reach the caller.
                if let Err(e) = check_message(peer, stream_id, &data, self.config.stream.max_message_len) {
                    return Ok(Err(e));
                }
                if let Some(result) = shard::send_local(self, home, to, stream_id, &data, urgent) {
                    return Ok(result);
                }
                // Bounded per peer in bytes; one message always fits an empty
                // buffer, whatever its size.
                let len = data.len();
                let queued = &queued[usize::from(urgent)];
                let before = queued.fetch_add(len, Ordering::AcqRel);
                if before > 0 && before + len > self.config.send_buffer {
                    queued.fetch_sub(len, Ordering::AcqRel);
                    return Ok(Err(SendError::WouldBlock {
                        peer: peer.to_string(),
                        queue: "send_buffer",
                    }));
                }
                let outgoing = Outgoing {
                    to: to.clone(),
                    stream_id,
                    data,
                    class: usize::from(urgent),
                };
                let inbox = if urgent {
                    &self.urgent_queues[home]
                } else {
                    &self.send_queues[home]
                };
                if let Err(outgoing) = inbox.push(outgoing) {
                    queued.fetch_sub(len, Ordering::AcqRel);
                    drop(outgoing);
                    return Ok(Err(SendError::WouldBlock {
                        peer: peer.to_string(),
                        queue: "send_queue",
                    }));
                }
                drop(peers);
                if urgent {
                    self.shards[home].hurry();
                }
                if !self.drain_scheduled[home].swap(true, Ordering::AcqRel) {
                    self.shards[home].submit(shard::drain_send_queue);
                }
                Ok(())
            }
        })
    }

    /// One message to every member of a group, each once.
    fn multicast(
        self: &Arc<Self>,
        group: &str,
        members: &[Arc<str>],
        stream_id: StreamId,
        data: &Bytes,
        urgent: bool,
    ) -> Result<(), SendError> {
        let mut delivered = Vec::with_capacity(members.len());
        let mut failed = Vec::new();
        for member in members {
            let result = self.send_to(member, stream_id, data.clone(), urgent, false);
            match result {
                Ok(()) => delivered.push(member.to_string()),
                Err(e) => failed.push((member.to_string(), e)),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(SendError::Multicast {
                group: group.to_string(),
                delivered,
                failed,
            })
        }
    }

    fn stats(&self) -> NodeStats {
        let c = &self.counters;
        NodeStats {
            connections_established: c.established.load(Ordering::Relaxed),
            connections_closed: c.closed.load(Ordering::Relaxed),
            closed_bad_frame: c.closed_bad_frame.load(Ordering::Relaxed),
            bad_frames: c.bad_frames.load(Ordering::Relaxed),
            handshake_failures: c.handshake_failures.load(Ordering::Relaxed),
            auth_failures: c.auth_failures.load(Ordering::Relaxed),
            e2e_failures: c.e2e_failures.load(Ordering::Relaxed),
            messages_received: c.received.load(Ordering::Relaxed),
            queued: self.inbox.total() as u64,
            relayed_frames: self.shard_metrics.iter().map(|m| m.relay_frames.get()).sum(),
            relay_dropped: self.shard_metrics.iter().map(|m| m.relay_dropped.get()).sum(),
        }
    }

    /// Runs `job` on every shard; the answers that came by `deadline`, and
    /// how many shards did not answer (a stopped shard drops the job).
    fn ask_shards<T: Send + 'static>(&self, job: fn() -> T, deadline: Instant) -> (Vec<T>, usize) {
        let (tx, rx) = crossbeam_channel::unbounded();
        for shard in &self.shards {
            let tx = tx.clone();
            shard.submit(move || {
                let _ = tx.send(job());
            });
        }
        drop(tx);
        let mut answers = Vec::with_capacity(self.shards.len());
        while answers.len() < self.shards.len() {
            match rx.recv_deadline(deadline) {
                Ok(answer) => answers.push(answer),
                Err(_) => break,
            }
        }
        let missing = self.shards.len() - answers.len();
        (answers, missing)
    }

    fn connected_peers(&self) -> Vec<String> {
        let (answers, _) = self.ask_shards(shard::connected_peers, Instant::now() + Duration::from_secs(10));
        let mut names: Vec<String> = answers.into_iter().flatten().collect();
        names.sort();
        names
    }

    /// See [`Node::issue_client`].
    fn issue_client(
        &self,
        name: Option<&str>,
        stream_id: StreamId,
        ttl: Duration,
        relay: Option<crate::discovery::RelaySelector>,
    ) -> Result<crate::grant::ClientGrant, NodeError> {
        if stream_id < 0 {
            return Err(NodeError::Config {
                field: "stream_id",
                reason: format!("{stream_id}: application streams are 0 and up"),
            });
        }
        if let Some(name) = name
            && self.discovery.get(name).is_some()
        {
            return Err(NodeError::Config {
                field: "name",
                reason: format!("{name:?} is taken in discovery"),
            });
        }
        let now = crate::auth::now_micros() / 1_000_000;
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        let grant = crate::grant::ClientGrant::issue(&self.name, name, stream_id, now, ttl);
        self.discovery
            .publish(Record::Node(grant.record(relay)))
            .map_err(|source| NodeError::Discovery {
                name: grant.name.clone(),
                source,
            })?;
        tracing::info!(node = %self.name, client = %grant.name, stream = stream_id, "client allocated");
        Ok(grant)
    }

    fn metrics_text(&self) -> String {
        let connections = self
            .windows
            .lock()
            .ok()
            .and_then(|w| w.report(&self.name))
            .map(|r| r.connections)
            .unwrap_or_default();
        metrics::encode_text(&self.name, &self.shard_metrics, &self.stats(), &connections)
    }

    /// A pong's round trip, for the windows' percentiles.
    fn record_rtt(&self, rtt: Duration) {
        if let Ok(mut hist) = self.rtt_us.lock() {
            let _ = hist.record(u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1));
        }
    }

    /// Takes one sample of the node and its connections (the sampler
    /// thread, once a second).
    fn sample(&self) {
        let (answers, _) = self.ask_shards(shard::connection_samples, Instant::now() + Duration::from_millis(500));
        let rtt_us = self
            .rtt_us
            .lock()
            .map(|mut h| std::mem::replace(&mut *h, metrics::rtt_histogram()))
            .unwrap_or_else(|_| metrics::rtt_histogram());
        let sample = metrics::Sample {
            at: Instant::now(),
            node: metrics::NodeCounts::of(&self.shard_metrics),
            connections: answers.into_iter().flatten().collect(),
            rtt_us,
        };
        if let Ok(mut windows) = self.windows.lock() {
            windows.push(sample);
        }
    }

    /// The node's and its connections' windows (1/5/15/60 s) and totals.
    fn stats_report(&self) -> Option<metrics::StatsReport> {
        self.windows.lock().ok()?.report(&self.name)
    }

    fn is_ready(&self) -> bool {
        self.record.get().is_some() && !self.stopping.load(Ordering::Acquire)
    }

    fn unsafe_to_delete(&self, timeout: Duration) -> Vec<String> {
        let (answers, missing) = self.ask_shards(shard::busy_reasons, Instant::now() + timeout);
        let mut reasons: Vec<String> = answers.into_iter().flatten().collect();
        if missing > 0 {
            reasons.push(format!("{missing} shard(s) did not answer within {timeout:?}"));
        }
        reasons
    }

    fn route_to(&self, peer: &str) -> Option<RouteInfo> {
        let peers = self.peers.read().ok()?;
        Some(match peers.get(peer)? {
            Route::Mem(_) => RouteInfo::Mem,
            Route::Shard { learned, .. } => {
                RouteInfo::Dial(learned.as_deref().map(<[Address]>::to_vec).unwrap_or_default())
            }
            Route::Group(members) => RouteInfo::Group(members.iter().map(ToString::to_string).collect()),
        })
    }

    fn home_shard(&self, name: &str) -> usize {
        (twox_hash::XxHash3_64::oneshot(name.as_bytes()) % self.shards.len() as u64) as usize
    }

    /// The byte counter of `peer`'s route through its home shard, made (with
    /// the route) when missing. A `mem://` route is left alone.
    fn shard_route(&self, peer: &Arc<str>) -> Backlog {
        let home = self.home_shard(peer);
        let fresh = || Route::Shard {
            home,
            queued: Backlog::default(),
            learned: None,
        };
        let Ok(mut peers) = self.peers.write() else {
            return Backlog::default();
        };
        match peers.entry(peer.clone()).or_insert_with(fresh) {
            Route::Shard { queued, .. } => queued.clone(),
            Route::Mem(_) | Route::Group(_) => Backlog::default(),
        }
    }

    fn notify_writable(&self) {
        self.writable.notify();
    }

    /// The route from this node to `target` (relays looked up among every
    /// record discovery knows); `None` before the node has its record.
    fn plan(&self, target: &NodeRecord) -> Option<Result<Plan, NoRoute>> {
        let me = self.record.get()?;
        let records: Vec<NodeRecord> = self
            .discovery
            .snapshot()
            .into_iter()
            .filter_map(|r| match r {
                Record::Node(node) => Some(node),
                Record::Group(_) => None,
            })
            .collect();
        Some(routing::plan(target, me, &records, self.config.relay.policy))
    }

    /// Looks `peer` up in discovery and makes its route (dialling if need
    /// be). Another thread may have made it meanwhile: then that one stands.
    fn resolve(&self, peer: &str) -> Result<(), SendError> {
        let record = self
            .discovery
            .get(peer)
            .ok_or_else(|| SendError::UnknownPeer(peer.to_string()))?;
        let name: Arc<str> = Arc::from(peer);
        let route = match record {
            Record::Group(group) => {
                if group.node_list.is_empty() {
                    return Err(SendError::NoRoute(format!("group {peer:?} has no members")));
                }
                Route::Group(group.node_list.iter().map(|m| Arc::from(m.as_str())).collect())
            }
            Record::Node(target) => {
                let plan = self.plan(&target).ok_or(SendError::Stopped)?;
                match plan.map_err(|e| SendError::NoRoute(e.to_string()))? {
                    Plan::Mem => {
                        let local = mem::lookup_node(peer).ok_or_else(|| {
                            SendError::NoRoute(format!(
                                "{peer:?}: its record says it runs in this process, but no such node does"
                            ))
                        })?;
                        Route::Mem(Arc::new(mem::MemTarget::new(self, &local)))
                    }
                    Plan::Dial(addresses) => Route::Shard {
                        home: self.home_shard(peer),
                        queued: Backlog::default(),
                        learned: Some(addresses.into()),
                    },
                }
            }
        };
        let Ok(mut peers) = self.peers.write() else {
            return Err(SendError::Stopped);
        };
        if peers.contains_key(peer) {
            return Ok(());
        }
        if let Route::Shard {
            home,
            learned: Some(addresses),
            queued,
        } = &route
        {
            let (peer, addresses, queued) = (name.clone(), addresses.to_vec(), queued.clone());
            self.shards[*home].submit(move || shard::dial(peer, addresses, false, Some(queued)));
        }
        tracing::debug!(node = %self.name, peer, "route from discovery: {route:?}");
        peers.insert(name, route);
        Ok(())
    }

    /// Follows discovery: routes learned from a record are redialled when
    /// it changes and dropped when it goes (queued messages are then
    /// reported as undelivered); group routes are looked up again.
    fn on_discovery_change(&self, change: &Change) {
        let name = match change {
            Change::Put(record) => record.name(),
            Change::Delete(name) => name.as_str(),
        };
        if let Ok(mut plans) = self.forward_plans.write() {
            plans.clear();
        }
        let Ok(mut peers) = self.peers.write() else {
            return;
        };
        let Some(route) = peers.get(name).cloned() else {
            return;
        };
        let peer: Arc<str> = Arc::from(name);
        match (route, change) {
            (Route::Group(_), _) => {
                peers.remove(name);
            }
            (Route::Mem(_), Change::Delete(_)) => {
                peers.remove(name);
            }
            (Route::Mem(_), Change::Put(_)) => {}
            (
                Route::Shard {
                    home, learned: Some(_), ..
                },
                Change::Delete(_),
            ) => {
                peers.remove(name);
                let reason = format!("{name:?} is gone: its discovery record was withdrawn or expired");
                self.shards[home].submit(move || shard::forget(peer, reason));
            }
            (
                Route::Shard {
                    home,
                    queued,
                    learned: Some(old),
                },
                Change::Put(Record::Node(target)),
            ) => {
                let Some(plan) = self.plan(target) else { return };
                match plan {
                    Ok(Plan::Dial(addresses)) if *old != *addresses => {
                        tracing::info!(node = %self.name, peer = name, "record changed: dialling {addresses:?}");
                        peers.insert(
                            peer.clone(),
                            Route::Shard {
                                home,
                                queued: queued.clone(),
                                learned: Some(addresses.clone().into()),
                            },
                        );
                        self.shards[home].submit(move || shard::dial(peer, addresses, true, Some(queued)));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(node = %self.name, peer = name, "record changed, no route any more: {e}");
                        peers.remove(name);
                        let reason = e.to_string();
                        self.shards[home].submit(move || shard::forget(peer, reason));
                    }
                }
            }
            (Route::Shard { .. }, _) => {}
        }
    }

    fn report_undelivered(&self, report: Undelivered) {
        tracing::warn!(
            node = %self.name,
            peer = %report.to,
            stream = report.stream_id,
            messages = report.messages,
            "messages dropped: {}",
            report.reason
        );
        let _ = self.undelivered_tx.send(report);
    }

    /// Hands a received message to the application; `Err` gives it back when
    /// the queue is full (the caller holds it and retries later).
    /// The caller wakes the application afterwards ([`inbox::AppInbox::wake`]).
    fn deliver(&self, message: Message, urgent: bool) -> Result<(), Message> {
        match self.inbox.push(message, urgent) {
            Ok(()) => Ok(()),
            Err(message) => {
                let blocked = &self.app_blocked[usize::from(urgent)];
                blocked.store(true, Ordering::SeqCst);
                std::sync::atomic::fence(Ordering::SeqCst);
                // The application may have read the queue down before the
                // flag was up, and will not look at it again: retry here.
                // (A lost race is caught by the shard's retry timer.)
                if self.has_room(urgent) && blocked.swap(false, Ordering::SeqCst) {
                    self.retry_delivery();
                }
                Err(message)
            }
        }
    }

    /// The application queue of this class is at most half full: enough
    /// room that waking whoever waits for it moves a batch, not one message.
    fn has_room(&self, urgent: bool) -> bool {
        self.inbox.len(urgent) <= self.inbox.capacity() / 2
    }

    /// The same for same-process senders' queue of this class.
    fn mem_has_room(&self, urgent: bool) -> bool {
        self.inbox.mem_len(urgent) <= self.inbox.capacity() / 2
    }

    /// The next queued message (urgent ones first), and whether it is urgent.
    fn take_message(&self) -> Option<(Message, bool)> {
        self.inbox.take()
    }

    /// Looks again until `wait` has passed, giving up the core between
    /// looks (see [`MEM_RECV_WAIT`]).
    fn take_mem_soon(&self, wait: Duration) -> Option<(Message, bool)> {
        let until = Instant::now() + wait;
        loop {
            std::thread::yield_now();
            if let Some(taken) = self.take_message() {
                return Some(taken);
            }
            if Instant::now() >= until {
                return None;
            }
        }
    }

    fn retry_delivery(&self) {
        for shard in &self.shards {
            shard.submit(shard::retry_delivery);
        }
    }

    /// The application took a message of this class: count it, wake whoever
    /// waits for room once the queue is half empty. Counted here, by the
    /// reading thread, so that senders of same-process peers write nothing of
    /// this node's per message.
    fn on_app_read(&self, urgent: bool) {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let class = usize::from(urgent);
        // No fence here: the shard re-checks after raising a flag, and
        // retries on a timer while it holds messages (`watch_held`).
        // Loads first: a swap is a write, and a write per received message
        // pulls the cache line away from the senders that read beside it.
        let blocked = self.app_blocked[class].load(Ordering::Acquire);
        let waiting = self.mem_waiting[class].load(Ordering::Acquire);
        if !(blocked || waiting) {
            return;
        }
        if blocked && self.has_room(urgent) && self.app_blocked[class].swap(false, Ordering::SeqCst) {
            self.retry_delivery();
        }
        if waiting && self.mem_has_room(urgent) && self.mem_waiting[class].swap(false, Ordering::SeqCst) {
            let waiters = self
                .mem_waiters
                .lock()
                .map(|mut w| std::mem::take(&mut *w))
                .unwrap_or_default();
            for waiter in waiters.iter().filter_map(std::sync::Weak::upgrade) {
                waiter.notify_writable();
            }
        }
    }
}

/// A running node. Cheap to share (`Send + Sync`); stop it with
/// [`Node::stop`] (dropping it stops it too).
#[derive(Debug)]
pub struct Node {
    shared: Arc<Shared>,
    runtime: Mutex<Option<Runtime>>,
    #[cfg(feature = "admin")]
    admin: Mutex<Option<admin::AdminServer>>,
}

/// At most this many looks at the receive queues before `recv_timeout`
/// sleeps, [`RECV_PAUSES`] apart (a few µs in all). Adaptive: each sleep
/// the looks did not avoid takes one off (down to none, see
/// [`RECV_PROBE`]), a look that finds a message restores them all.
/// Messages from another core (a same-process sender, a busy shard) come
/// within the spin; a shard beside the reader on its core cannot deliver
/// while the reader spins, and a reply over a socket takes tens of µs:
/// spinning then only delays the shard.
const RECV_SPINS: u32 = 7;

/// With no looks left, every this many sleeps still takes one, so that a
/// reader whose messages start coming from another core finds out. A
/// reader beside its shard took a look of [`RECV_PAUSES`] before each of
/// its sleeps (one per read of the shard's, on a stream): ~4 % of that
/// core at unix 16 KiB (perf/README.md item 40).
const RECV_PROBE: u32 = 8;

/// The looks the next `recv_timeout` takes, after one that took `budget`
/// and found a message in them or not.
fn adapt_recv_spins(budget: u32, found: bool) -> u32 {
    if found { RECV_SPINS } else { budget.saturating_sub(1) }
}

/// The looks a reader with no budget left takes before its sleep after
/// `quiet` such sleeps.
fn probe_looks(quiet: u32) -> u32 {
    u32::from(quiet % RECV_PROBE == RECV_PROBE - 1)
}

/// The longest spin before parking a config may ask for
/// (`RuntimeConfig::adaptive_spin`, `spin_before_park`).
const MAX_SPIN: Duration = Duration::from_millis(10);

/// Lookups of a route that discovery changes keep dropping before `send`
/// gives up on it.
const RESOLVE_TRIES: usize = 3;

/// How long `recv_timeout` keeps looking, yielding its core between looks,
/// before it sleeps when the last message came from a same-process peer
/// (once per quiet spell: a look that runs dry is not repeated until such
/// a message comes again).
/// Such a peer answers in well under a microsecond, but a sleeping reader's
/// wake-up takes tens (futex wake and reschedule; ~20-50 µs on a VM): with
/// the short spin alone, two same-process threads in a request-reply loop
/// settled into waking each other every message (mem RTT p50 47 µs against
/// 1 µs for a bare channel, perf/README.md item 17). Yielding keeps it from
/// holding back another thread of its core.
const MEM_RECV_WAIT: Duration = Duration::from_micros(100);

/// Pauses between two looks. Looking reads the lines the sender writes: a
/// reader looking after every few pauses takes them from the sender on
/// every message (mem 64 B: 10 M msgs/s with 1, 2, 4, ... pauses, 18-19 M
/// with 64, perf/README.md).
const RECV_PAUSES: u32 = 64;

impl Node {
    /// Validates `config`, starts the shards and binds every listen address.
    pub fn start(config: NodeConfig) -> Result<Node, NodeError> {
        config.validate()?;
        let runtime = Runtime::start(&config.runtime)?;
        let inbox = Arc::new(inbox::AppInbox::new(config.recv_queue));
        let shards = runtime.shards().to_vec();
        let send_queues = shards.iter().map(|_| ArrayQueue::new(config.send_queue)).collect();
        let urgent_queues = shards.iter().map(|_| ArrayQueue::new(config.send_queue)).collect();
        let shards_len = shards.len();
        let (undelivered_tx, undelivered_rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            name: Arc::from(config.name.as_str()),
            small_name: SmolStr::new(&config.name),
            incarnation: fastrand::u64(1..),
            shards,
            // Room for many peers at once: a grown map moves to a fresh
            // allocation, and a small one tends to sit beside small hot
            // objects of other threads (a cache line shared by accident).
            peers: RwLock::new({
                let mut peers = name_map();
                peers.reserve(64);
                peers
            }),
            inbox,
            handler: Arc::new(std::sync::OnceLock::new()),
            app_blocked: [AtomicBool::new(false), AtomicBool::new(false)],
            recv_spins: AtomicU32::new(RECV_SPINS),
            recv_quiet: AtomicU32::new(0),
            send_queues,
            urgent_queues,
            drain_scheduled: (0..shards_len).map(|_| AtomicBool::new(false)).collect(),
            writable: Writable::default(),
            mem_waiters: Mutex::new(Vec::new()),
            mem_waiting: [AtomicBool::new(false), AtomicBool::new(false)],
            listening: Mutex::new(Vec::new()),
            counters: crossbeam_utils::CachePadded::new(Counters::default()),
            stopping: Arc::new(AtomicBool::new(false)),
            discovery: config.discovery.0.clone(),
            record: std::sync::OnceLock::new(),
            auth: crate::auth::Authority::new(config.auth.clone()),
            shard_metrics: (0..shards_len).map(|_| metrics::ShardMetrics::default()).collect(),
            undelivered_tx,
            undelivered_rx,
            live: RwLock::new(name_map()),
            reverse: RwLock::new(name_map()),
            forward_plans: RwLock::new(name_map()),
            rtt_us: Mutex::new(metrics::rtt_histogram()),
            windows: Mutex::new(metrics::Windows::default()),
            config,
        });
        let node = Node {
            shared: shared.clone(),
            runtime: Mutex::new(Some(runtime)),
            #[cfg(feature = "admin")]
            admin: Mutex::new(None),
        };
        // Shard 0 first (it picks the ports), then the others.
        let mut shard0: Option<Vec<Address>> = None;
        for shard in &shared.shards {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let (shared_for_shard, index, ports) = (shared.clone(), shard.index(), shard0.clone());
            shard.submit(move || {
                let _ = tx.send(shard::install(shared_for_shard, index, ports));
            });
            let bound = match rx.recv() {
                Ok(result) => result?,
                Err(_) => {
                    return Err(NodeError::Runtime(RuntimeError::Wakeup {
                        shard: shard.index(),
                        source: std::io::Error::other("the shard stopped during start"),
                    }));
                }
            };
            if shard0.is_none() {
                if let Ok(mut listening) = shared.listening.lock() {
                    listening.extend(bound.iter().cloned());
                }
                shard0 = Some(bound);
            }
        }
        mem::register(&shared)?;
        let bound = node.listen_addresses();
        let record = own_record(&shared.config, &bound);
        if let Err(e) = crate::discovery::validate_node(&record) {
            node.stop(Duration::ZERO);
            return Err(NodeError::Config {
                field: "gateways/metadata/host",
                reason: e.to_string(),
            });
        }
        let _ = shared.record.set(record.clone());
        // Subscribed before publishing: no change in between is missed.
        let changes = shared.discovery.subscribe();
        let published = NodeRecord {
            tokens: shared.config.auth.tokens.clone(),
            ..record
        };
        // A client publishes nothing: its name may be a grant a server
        // registered (crate::grant), which must stay as the server wrote it.
        if !shared.config.client
            && let Err(source) = shared.discovery.publish(Record::Node(published))
        {
            node.stop(Duration::ZERO);
            return Err(NodeError::Discovery {
                name: shared.config.name.clone(),
                source,
            });
        }
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name(format!("atbus-{}-discovery", shared.name))
            .spawn(move || follow_discovery(&weak, &changes))
            .map_err(|e| {
                node.stop(Duration::ZERO);
                NodeError::Runtime(RuntimeError::Wakeup { shard: 0, source: e })
            })?;
        {
            let weak = Arc::downgrade(&shared);
            std::thread::Builder::new()
                .name(format!("atbus-{}-stats", shared.name))
                .spawn(move || sample_every_second(&weak))
                .map_err(|e| {
                    node.stop(Duration::ZERO);
                    NodeError::Runtime(RuntimeError::Wakeup { shard: 0, source: e })
                })?;
        }
        if let Some(address) = shared.config.admin {
            #[cfg(feature = "admin")]
            match admin::start(&shared, address) {
                Ok(server) => {
                    if let Ok(mut slot) = node.admin.lock() {
                        *slot = Some(server);
                    }
                }
                Err(e) => {
                    node.stop(Duration::ZERO);
                    return Err(e);
                }
            }
            #[cfg(not(feature = "admin"))]
            {
                node.stop(Duration::ZERO);
                return Err(NodeError::Config {
                    field: "admin",
                    reason: format!("{address}: this build has no admin endpoint (feature `admin`)"),
                });
            }
        }
        Ok(node)
    }

    /// The admin endpoint's bound address, when it runs.
    pub fn admin_address(&self) -> Option<std::net::SocketAddr> {
        #[cfg(feature = "admin")]
        {
            self.admin.lock().ok()?.as_ref().map(|a| a.address)
        }
        #[cfg(not(feature = "admin"))]
        {
            None
        }
    }

    /// How this node reaches `peer` now, if it has a route (routes are made
    /// on the first send to a name, or by [`Node::add_route`]).
    pub fn route_to(&self, peer: &str) -> Option<RouteInfo> {
        self.shared.route_to(peer)
    }

    /// This node's discovery record, as published but without its tokens
    /// (they are published too, see [`crate::auth::AuthConfig::tokens`]).
    pub fn record(&self) -> Option<&NodeRecord> {
        self.shared.record.get()
    }

    /// Replaces the tokens this node accepts and signs with, and publishes
    /// them in its record (rotation: add the new token on every node, then
    /// remove the old one; both are valid in between). Connections already
    /// up stay; resumption tickets issued so far are retired (their holders
    /// redial once with a full handshake).
    pub fn set_tokens(&self, tokens: &[String]) -> Result<(), NodeError> {
        if tokens.iter().any(String::is_empty) {
            return Err(NodeError::Config {
                field: "auth.tokens",
                reason: "a token is empty".into(),
            });
        }
        self.shared.auth.set_tokens(tokens);
        if let Some(record) = self.shared.record.get() {
            let published = NodeRecord {
                tokens: tokens.to_vec(),
                ..record.clone()
            };
            self.shared
                .discovery
                .publish(Record::Node(published))
                .map_err(|source| NodeError::Discovery {
                    name: self.shared.config.name.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Allocates a client on an untrusted network ([`crate::grant`]): a
    /// name (`name`, or a random `client-…`), the one stream it may use
    /// (`stream_id`, to this node only), and a token, valid for `ttl`;
    /// registered in discovery (the client's relays and this node check
    /// it). `relay`: the relays the client goes through. Hand the grant to
    /// the client over a channel you trust.
    pub fn issue_client(
        &self,
        name: Option<&str>,
        stream_id: StreamId,
        ttl: Duration,
        relay: Option<crate::discovery::RelaySelector>,
    ) -> Result<crate::grant::ClientGrant, NodeError> {
        self.shared.issue_client(name, stream_id, ttl, relay)
    }

    /// Rates, loss and latency of the node and of each connection over the
    /// last 1, 5, 15 and 60 s, and lifetime totals (what the admin
    /// endpoint's `/stats` serves). Sampled once a second; `None` until
    /// the first sample.
    pub fn stats_report(&self) -> Option<metrics::StatsReport> {
        self.shared.stats_report()
    }

    /// The node's metrics in the Prometheus text format (what the admin
    /// endpoint's `/metrics` serves).
    pub fn metrics_text(&self) -> String {
        self.shared.metrics_text()
    }

    /// Whether the node is up: listeners bound, record published, not
    /// stopping.
    pub fn is_ready(&self) -> bool {
        self.shared.is_ready()
    }

    /// Why this node may not be deleted now (empty: it may): messages
    /// queued for a shard, or streams whose data a peer has not
    /// acknowledged. Asks every shard; a shard that does not answer within
    /// `timeout` counts as busy.
    pub fn unsafe_to_delete(&self, timeout: Duration) -> Vec<String> {
        self.shared.unsafe_to_delete(timeout)
    }

    /// The temporary name `peer` gave this node when it dialled it
    /// anonymously ([`crate::auth::AuthConfig::anonymous`]).
    pub fn assigned_name(&self, peer: &str) -> Option<String> {
        self.shared.auth.assigned_name(peer)
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The addresses actually bound (ports filled in).
    pub fn listen_addresses(&self) -> Vec<Address> {
        self.shared.listening.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Tells the node how to reach `peer`: it dials `address` now and redials
    /// whenever the connection drops, until the node stops. Several routes to
    /// one peer make several connections (one stream can use them all).
    pub fn add_route(&self, peer: &str, address: Address) -> Result<(), SendError> {
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(SendError::Stopped);
        }
        let peer: Arc<str> = Arc::from(peer);
        if let Address::Mem(name) = &address {
            let target = mem::lookup(name).ok_or_else(|| SendError::UnknownPeer(format!("{peer} (mem://{name})")))?;
            if let Ok(mut peers) = self.shared.peers.write() {
                peers.insert(peer, Route::Mem(Arc::new(mem::MemTarget::new(&self.shared, &target))));
            }
            return Ok(());
        }
        let home = self.shared.home_shard(&peer);
        let queued = self.shared.shard_route(&peer);
        self.shared.shards[home].submit(move || shard::dial(peer, vec![address], false, Some(queued)));
        Ok(())
    }

    /// Queues `data` as one message on `stream_id` to `peer`. `WouldBlock`
    /// when a bound is hit (see [`SendError::WouldBlock`]).
    pub fn send(&self, peer: &str, stream_id: StreamId, data: Bytes) -> Result<(), SendError> {
        self.send_with(peer, stream_id, data, false)
    }

    /// Like [`Node::send`], for frame-sync traffic (small messages, up to a
    /// datagram's 548 B): the stream becomes urgent for good. Its data goes
    /// out before any other stream's on its connections, written at once
    /// (connection writers run in the shard's latency task class), in packets
    /// flagged URGENT, which the receiving node queues ahead of ordinary
    /// messages. Mark a stream urgent from its first message: messages sent
    /// on it before could be read after later urgent ones.
    pub fn send_urgent(&self, peer: &str, stream_id: StreamId, data: Bytes) -> Result<(), SendError> {
        self.send_with(peer, stream_id, data, true)
    }

    /// From now on, every received message goes to `handler` instead of the
    /// receive queue: called on the shard thread that received it (messages
    /// of one peer and stream in order, on one shard; from same-process
    /// peers, on the shard their sender's name hashes to). Messages queued
    /// before stay for [`Node::recv_timeout`]. The handler must not block:
    /// it runs the shard's connections' turn. Replies go through the
    /// [`Handle`] it gets, which never waits: a full stream is `WouldBlock`.
    ///
    /// This is the thread-per-core way to use the bus: no hand-off between
    /// the shard and an application thread on either side, which is most of
    /// a round trip on a loaded machine (perf/RESULTS.md).
    pub fn set_handler(
        &self,
        handler: impl Fn(&Handle, Message) + Send + Sync + 'static,
    ) -> Result<(), HandlerAlreadySet> {
        self.shared
            .handler
            .set(Arc::new(handler))
            .map_err(|_| HandlerAlreadySet)
    }

    /// A handle for code that runs on this node's shards.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    fn send_with(&self, peer: &str, stream_id: StreamId, data: Bytes, urgent: bool) -> Result<(), SendError> {
        self.shared.send_to(peer, stream_id, data, urgent, true)
    }

    /// Waits until some queue or window frees space, or `timeout` passes.
    /// Returns at once if space was freed since `since` (a value from
    /// [`Node::writable_generation`]).
    pub fn wait_writable(&self, since: u64, timeout: Duration) -> u64 {
        self.shared.writable.wait(since, timeout)
    }

    /// Current writability generation (see [`Node::wait_writable`]).
    pub fn writable_generation(&self) -> u64 {
        self.shared.writable.generation.load(Ordering::SeqCst)
    }

    /// Sends, waiting while the way is full, up to `timeout` in total.
    pub fn send_blocking(
        &self,
        peer: &str,
        stream_id: StreamId,
        data: Bytes,
        timeout: Duration,
    ) -> Result<(), SendError> {
        let deadline = Instant::now() + timeout;
        loop {
            let generation = self.writable_generation();
            match self.send(peer, stream_id, data.clone()) {
                Err(SendError::WouldBlock { .. }) if Instant::now() < deadline => {
                    self.wait_writable(generation, Duration::from_millis(50).min(deadline - Instant::now()));
                }
                // A group: retry the members that were full, only them.
                Err(SendError::Multicast {
                    group,
                    mut delivered,
                    failed,
                }) => {
                    let mut still = Vec::new();
                    for (member, error) in failed {
                        let retried = match error {
                            SendError::WouldBlock { .. } => self.send_blocking(
                                &member,
                                stream_id,
                                data.clone(),
                                deadline.saturating_duration_since(Instant::now()),
                            ),
                            other => Err(other),
                        };
                        match retried {
                            Ok(()) => delivered.push(member),
                            Err(e) => still.push((member, e)),
                        }
                    }
                    return if still.is_empty() {
                        Ok(())
                    } else {
                        Err(SendError::Multicast {
                            group,
                            delivered,
                            failed: still,
                        })
                    };
                }
                other => return other,
            }
        }
    }

    /// The next report of messages dropped after they were accepted (see
    /// [`Undelivered`]), waiting up to `timeout`.
    pub fn recv_undelivered(&self, timeout: Duration) -> Option<Undelivered> {
        self.shared.undelivered_rx.recv_timeout(timeout).ok()
    }

    /// The next received message, waiting up to `timeout`; messages of
    /// urgent streams come first.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Message> {
        let shared = &self.shared;
        let mut taken = shared.take_message();
        if taken.is_none() {
            // A short spin before sleeping: a burst's next message is
            // usually a moment away, and a sleeping reader costs the
            // delivering thread a wake-up (see RECV_SPINS).
            let budget = shared.recv_spins.load(Ordering::Relaxed);
            let quiet = (budget == 0).then(|| shared.recv_quiet.load(Ordering::Relaxed));
            for _ in 0..quiet.map_or(budget, probe_looks) {
                for _ in 0..RECV_PAUSES {
                    std::hint::spin_loop();
                }
                taken = shared.take_message();
                if taken.is_some() {
                    break;
                }
            }
            let adapted = adapt_recv_spins(budget, taken.is_some());
            if adapted != budget {
                shared.recv_spins.store(adapted, Ordering::Relaxed);
            }
            // Racy between readers, as the budget is: a count of quiet
            // sleeps, not a lock (it only spaces the probes out).
            if let Some(quiet) = quiet
                && adapted == 0
            {
                shared.recv_quiet.store(quiet.wrapping_add(1), Ordering::Relaxed);
            }
        }
        if taken.is_none() && shared.inbox.expects_mem() {
            taken = shared.take_mem_soon(timeout.min(MEM_RECV_WAIT));
            if taken.is_none() {
                // Gone quiet: the next calls sleep at once, until a
                // same-process message comes again.
                shared.inbox.stop_expecting_mem();
            }
        }
        if taken.is_none() {
            taken = shared.inbox.wait(timeout);
        }
        let (message, urgent) = taken?;
        shared.on_app_read(urgent);
        Some(message)
    }

    /// The next received message, if one is queued (urgent ones first).
    pub fn try_recv(&self) -> Option<Message> {
        let (message, urgent) = self.shared.take_message()?;
        self.shared.on_app_read(urgent);
        Some(message)
    }

    /// Lifetime counters.
    pub fn stats(&self) -> NodeStats {
        self.shared.stats()
    }

    /// Names of the peers with a live connection.
    pub fn connected_peers(&self) -> Vec<String> {
        self.shared.connected_peers()
    }

    /// Stops gracefully: every connection is closed with SHUTDOWN after
    /// what is queued was written (bounded by `linger`), then the shards stop.
    pub fn stop(&self, linger: Duration) {
        if self.shared.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        #[cfg(feature = "admin")]
        if let Ok(mut admin) = self.admin.lock()
            && let Some(mut server) = admin.take()
        {
            server.stop();
        }
        // Withdrawn first: peers stop routing here before connections close.
        if self.shared.record.get().is_some()
            && !self.shared.config.client
            && let Err(e) = self.shared.discovery.withdraw(&self.shared.name)
        {
            tracing::warn!(node = %self.shared.name, "cannot withdraw the discovery record: {e}");
        }
        mem::unregister(&self.shared);
        let (tx, rx) = crossbeam_channel::unbounded();
        for shard in &self.shared.shards {
            let tx = tx.clone();
            shard.submit(move || shard::shutdown(linger, tx));
        }
        drop(tx);
        for _ in 0..self.shared.shards.len() {
            if rx.recv_timeout(linger + Duration::from_secs(1)).is_err() {
                break;
            }
        }
        if let Ok(mut runtime) = self.runtime.lock()
            && let Some(mut runtime) = runtime.take()
        {
            runtime.stop();
        }
    }
}

/// The watcher thread: applies discovery changes until the node stops.
/// The stats sampler: one sample a second until the node stops.
fn sample_every_second(node: &std::sync::Weak<Shared>) {
    let mut next = Instant::now();
    loop {
        next += Duration::from_secs(1);
        while Instant::now() < next {
            match node.upgrade() {
                Some(shared) if !shared.stopping.load(Ordering::Acquire) => {}
                _ => return,
            }
            std::thread::sleep(
                next.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100)),
            );
        }
        match node.upgrade() {
            Some(shared) if !shared.stopping.load(Ordering::Acquire) => shared.sample(),
            _ => return,
        }
    }
}

fn follow_discovery(node: &std::sync::Weak<Shared>, changes: &crate::discovery::Subscription) {
    loop {
        let change = changes.recv_timeout(Duration::from_millis(200));
        let Some(shared) = node.upgrade() else { return };
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        if changes.take_lagged() {
            // Changes were lost: look every learned route up again.
            let names: Vec<Arc<str>> = shared
                .peers
                .read()
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default();
            for name in names {
                let change = match shared.discovery.get(&name) {
                    Some(record) => Change::Put(record),
                    None => Change::Delete(name.to_string()),
                };
                shared.on_discovery_change(&change);
            }
        }
        if let Some(change) = change {
            shared.on_discovery_change(&change);
        }
    }
}

/// The record a node publishes: its name, host, metadata and gateways (from
/// the config, else one per kind of bound address).
fn own_record(config: &NodeConfig, bound: &[Address]) -> NodeRecord {
    let host = config.host.clone().unwrap_or_else(|| Host {
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string()),
        pid: i64::from(std::process::id()),
    });
    let gateway = if config.gateways.is_empty() {
        let (unix, network): (Vec<&Address>, Vec<&Address>) = bound
            .iter()
            .filter(|a| !matches!(a, Address::Mem(_)))
            .partition(|a| a.is_unix());
        let mut gateways = Vec::new();
        if !unix.is_empty() {
            gateways.push(Gateway {
                priority: 0,
                address: unix.iter().map(ToString::to_string).collect(),
                r#match: Some(Match {
                    host: Some(Host {
                        hostname: host.hostname.clone(),
                        pid: 0,
                    }),
                    metadata: None,
                }),
            });
        }
        if !network.is_empty() {
            gateways.push(Gateway {
                priority: 10,
                address: network.iter().map(ToString::to_string).collect(),
                r#match: None,
            });
        }
        gateways
    } else {
        config.gateways.clone()
    };
    NodeRecord {
        name: config.name.clone(),
        r#type: if config.client {
            crate::discovery::TYPE_CLIENT
        } else {
            crate::discovery::TYPE_NODE
        }
        .to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        host: Some(host),
        metadata: Some(config.metadata.clone()),
        gateway,
        advertise_relay: config.advertise_relay.clone(),
        ..NodeRecord::default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recv_spins_shrink_on_sleeps_and_come_back_on_a_find() {
        let mut budget = RECV_SPINS;
        for expected in (0..RECV_SPINS).rev() {
            budget = adapt_recv_spins(budget, false);
            assert_eq!(budget, expected);
        }
        assert_eq!(adapt_recv_spins(budget, false), 0);
        assert_eq!(adapt_recv_spins(0, true), RECV_SPINS);
    }

    /// With no budget, one sleep in `RECV_PROBE` still takes a look.
    #[test]
    fn a_quiet_reader_still_looks_now_and_then() {
        let looks: Vec<u32> = (0..3 * RECV_PROBE).map(probe_looks).collect();
        assert_eq!(looks.iter().sum::<u32>(), 3);
        for (quiet, &look) in looks.iter().enumerate() {
            assert_eq!(look == 1, quiet as u32 % RECV_PROBE == RECV_PROBE - 1);
        }
    }

    /// An idle reader stops spinning; a same-process message still arrives.
    #[test]
    fn an_idle_reader_spins_less_and_still_receives() {
        let a = Node::start(NodeConfig::new("spin-a", &["mem://spin-a"]).unwrap()).unwrap();
        let b = Node::start(NodeConfig::new("spin-b", &["mem://spin-b"]).unwrap()).unwrap();
        for _ in 0..RECV_SPINS {
            assert!(b.recv_timeout(Duration::from_millis(1)).is_none());
        }
        assert_eq!(b.shared.recv_spins.load(Ordering::Relaxed), 0);
        a.add_route("spin-b", b.listen_addresses()[0].clone()).unwrap();
        a.send("spin-b", 1, Bytes::from_static(b"ping")).unwrap();
        let got = b.recv_timeout(Duration::from_secs(5)).expect("the message");
        assert_eq!(&got.data[..], b"ping");
        a.stop(Duration::from_millis(100));
        b.stop(Duration::from_millis(100));
    }
}
