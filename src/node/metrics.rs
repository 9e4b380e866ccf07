//! What a node counts, per shard (each shard thread increments its own
//! atomics, never shared with another writer), and its Prometheus text
//! (prometheus-client) for the admin endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::NodeStats;

/// Upper bounds (ms) of the connection latency histogram: the seed's
/// buckets, 0–60 by 15, 60–180 by 30, 180–320 by 60, 320–800 by 120,
/// 800–2000 by 300, and above.
pub const RTT_BUCKETS_MS: [f64; 19] = [
    15.0, 30.0, 45.0, 60.0, 90.0, 120.0, 150.0, 180.0, 240.0, 300.0, 320.0, 440.0, 560.0, 680.0, 800.0, 1100.0, 1400.0,
    1700.0, 2000.0,
];

/// A counter with one writer (its shard's thread): increments are a plain
/// load and store, not a locked read-modify-write; readers on other
/// threads see a recent value.
#[derive(Debug, Default)]
pub struct ShardCounter(AtomicU64);

impl ShardCounter {
    /// Adds `n`. Only the owning shard's thread calls this.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0
            .store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// The value now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One shard's counters.
#[derive(Debug)]
pub struct ShardMetrics {
    /// Messages the shard took from the application for peers.
    pub messages_sent: ShardCounter,
    /// Their payload bytes.
    pub bytes_sent: ShardCounter,
    /// Messages the shard handed to the application.
    pub messages_received: ShardCounter,
    /// Their payload bytes.
    pub bytes_received: ShardCounter,
    /// Ping/pong round trips of the shard's connections, in milliseconds
    /// (one observation per pong: not on the message path).
    pub rtt_ms: Histogram,
    /// Relay: frames passed on to another node.
    pub relay_frames: ShardCounter,
    /// Their bytes (whole frames).
    pub relay_bytes: ShardCounter,
    /// Relay: frames dropped (no route, hop limit, next hop's buffer full)
    /// and tunnelled frames a full tunnel queue refused.
    pub relay_dropped: ShardCounter,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        Self {
            messages_sent: ShardCounter::default(),
            bytes_sent: ShardCounter::default(),
            messages_received: ShardCounter::default(),
            bytes_received: ShardCounter::default(),
            rtt_ms: Histogram::new(RTT_BUCKETS_MS),
            relay_frames: ShardCounter::default(),
            relay_bytes: ShardCounter::default(),
            relay_dropped: ShardCounter::default(),
        }
    }
}

impl ShardMetrics {
    /// One message taken for sending.
    #[inline]
    pub fn sent(&self, bytes: usize) {
        self.messages_sent.add(1);
        self.bytes_sent.add(bytes as u64);
    }

    /// One frame passed on by a relay.
    #[inline]
    pub fn relayed(&self, bytes: usize) {
        self.relay_frames.add(1);
        self.relay_bytes.add(bytes as u64);
    }

    /// One message delivered.
    #[inline]
    pub fn received(&self, bytes: usize) {
        self.messages_received.add(1);
        self.bytes_received.add(bytes as u64);
    }
}

/// The node's metrics in the Prometheus text format: per-shard series
/// (label `shard`) and the node's lifetime counters, all labelled `node`.
pub fn encode_text(node: &str, shards: &[ShardMetrics], stats: &NodeStats) -> String {
    let mut registry =
        Registry::with_prefix_and_labels("atbus", [("node".into(), node.to_string().into())].into_iter());
    for (index, shard) in shards.iter().enumerate() {
        let sub = registry.sub_registry_with_label(("shard".into(), index.to_string().into()));
        let counters = [
            (
                "messages_sent",
                "Messages taken from the application for peers",
                &shard.messages_sent,
            ),
            ("bytes_sent", "Payload bytes of messages_sent", &shard.bytes_sent),
            (
                "messages_received",
                "Messages handed to the application",
                &shard.messages_received,
            ),
            (
                "bytes_received",
                "Payload bytes of messages_received",
                &shard.bytes_received,
            ),
            (
                "relay_forwarded_frames",
                "Frames this relay passed on to another node",
                &shard.relay_frames,
            ),
            (
                "relay_forwarded_bytes",
                "Bytes of relay_forwarded_frames",
                &shard.relay_bytes,
            ),
            (
                "relay_dropped_frames",
                "Frames dropped by this relay (no route, hop limit, full buffer; the ends resend)",
                &shard.relay_dropped,
            ),
        ];
        for (name, help, counter) in counters {
            sub.register(name, help, ConstCounter::new(counter.get()));
        }
        sub.register(
            "connection_rtt_milliseconds",
            "Ping/pong round trip of the node's connections",
            shard.rtt_ms.clone(),
        );
    }
    let counters = [
        (
            "connections_established",
            "Connections whose handshake completed",
            stats.connections_established,
        ),
        ("connections_closed", "Connections that ended", stats.connections_closed),
        (
            "connections_closed_bad_frame",
            "Connections closed for bad frames",
            stats.closed_bad_frame,
        ),
        ("bad_frames", "Bad frames received", stats.bad_frames),
        (
            "handshake_failures",
            "Connections refused at the handshake",
            stats.handshake_failures,
        ),
        (
            "auth_failures",
            "Connections refused or closed as UNAUTHORIZED",
            stats.auth_failures,
        ),
        (
            "e2e_failures",
            "End-to-end encrypted streams whose TLS failed",
            stats.e2e_failures,
        ),
        (
            "messages_taken",
            "Messages the application took from the node",
            stats.messages_received,
        ),
    ];
    for (name, help, value) in counters {
        registry.register(name, help, ConstCounter::new(value));
    }
    registry.register(
        "queued_messages",
        "Messages waiting in the application queues",
        ConstGauge::new(i64::try_from(stats.queued).unwrap_or(i64::MAX)),
    );
    let mut text = String::new();
    if encode(&mut text, &registry).is_err() {
        text.clear();
    }
    text
}
