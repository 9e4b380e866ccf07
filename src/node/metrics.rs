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
pub fn encode_text(node: &str, shards: &[ShardMetrics], stats: &NodeStats, connections: &[ConnReport]) -> String {
    let mut registry =
        Registry::with_prefix_and_labels("atbus", [("node".into(), node.to_string().into())].into_iter());
    // Per connection (as of the last one-second sample).
    for conn in connections {
        let sub = registry
            .sub_registry_with_label(("peer".into(), conn.peer.clone().into()))
            .sub_registry_with_label(("connection".into(), conn.connection.to_string().into()));
        let t = &conn.totals;
        let counters = [
            ("connection_sent_bytes", "Bytes written on the connection", t.tx_bytes),
            (
                "connection_sent_zero_copy_bytes",
                "Of connection_sent_bytes, bytes the socket took without a copy",
                t.tx_zero_copy_bytes,
            ),
            (
                "connection_received_bytes",
                "Bytes read from the connection",
                t.rx_bytes,
            ),
            (
                "connection_sent_frames",
                "Frames written on the connection",
                t.tx_frames,
            ),
            (
                "connection_received_frames",
                "Frames read from the connection",
                t.rx_frames,
            ),
            (
                "connection_sent_packets",
                "Stream packets sent, resends included",
                t.packets,
            ),
            (
                "connection_sent_fragments",
                "Fragments in connection_sent_packets",
                t.fragments,
            ),
            ("connection_lost_packets", "Stream packets declared lost", t.lost),
        ];
        for (name, help, value) in counters {
            sub.register(name, help, ConstCounter::new(value));
        }
        if let Some(rtt) = conn.smoothed_rtt_ms {
            sub.register(
                "connection_smoothed_rtt_milliseconds",
                "The stream layer's smoothed round-trip time",
                ConstGauge::new(rtt),
            );
        }
    }
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

/// Ping/pong round trips of one connection: enough for a mean and a
/// variance over any window (differences of sums).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct RttSums {
    /// Round trips measured.
    pub count: u64,
    /// Their sum, milliseconds.
    pub sum_ms: f64,
    /// Sum of their squares, ms².
    pub sum_sq_ms: f64,
}

impl RttSums {
    /// One round trip of `ms` milliseconds.
    pub fn observe(&mut self, ms: f64) {
        self.count += 1;
        self.sum_ms += ms;
        self.sum_sq_ms += ms * ms;
    }

    fn minus(&self, old: &Self) -> Self {
        Self {
            count: self.count.saturating_sub(old.count),
            sum_ms: self.sum_ms - old.sum_ms,
            sum_sq_ms: self.sum_sq_ms - old.sum_sq_ms,
        }
    }

    fn plus(&self, other: &Self) -> Self {
        Self {
            count: self.count + other.count,
            sum_ms: self.sum_ms + other.sum_ms,
            sum_sq_ms: self.sum_sq_ms + other.sum_sq_ms,
        }
    }

    /// Mean and (population) variance, if any round trip was measured.
    pub fn mean_variance(&self) -> Option<(f64, f64)> {
        (self.count > 0).then(|| {
            let n = self.count as f64;
            let mean = self.sum_ms / n;
            (mean, (self.sum_sq_ms / n - mean * mean).max(0.0))
        })
    }
}

/// Lifetime counters of one connection, kept by its shard with the
/// connection's write buffer (no atomics: one thread touches them).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct ConnCounts {
    /// Frames written (own and, on a relay, passed on).
    pub tx_frames: u64,
    /// Their bytes on the wire.
    pub tx_bytes: u64,
    /// Of those, bytes the socket took without a copy (large payloads on a
    /// Unix socket: `NodeConfig::unix_zero_copy`).
    pub tx_zero_copy_bytes: u64,
    /// Frames read.
    pub rx_frames: u64,
    /// Bytes read.
    pub rx_bytes: u64,
    /// Ping/pong round trips.
    pub rtt: RttSums,
    /// Stream packets sent (first sends and resends), from the stream layer.
    pub packets: u64,
    /// Fragments in them.
    pub fragments: u64,
    /// Packets declared lost.
    pub lost: u64,
}

impl ConnCounts {
    fn minus(&self, old: &Self) -> Self {
        Self {
            tx_frames: self.tx_frames.saturating_sub(old.tx_frames),
            tx_bytes: self.tx_bytes.saturating_sub(old.tx_bytes),
            tx_zero_copy_bytes: self.tx_zero_copy_bytes.saturating_sub(old.tx_zero_copy_bytes),
            rx_frames: self.rx_frames.saturating_sub(old.rx_frames),
            rx_bytes: self.rx_bytes.saturating_sub(old.rx_bytes),
            rtt: self.rtt.minus(&old.rtt),
            packets: self.packets.saturating_sub(old.packets),
            fragments: self.fragments.saturating_sub(old.fragments),
            lost: self.lost.saturating_sub(old.lost),
        }
    }

    fn plus(&self, other: &Self) -> Self {
        Self {
            tx_frames: self.tx_frames + other.tx_frames,
            tx_bytes: self.tx_bytes + other.tx_bytes,
            tx_zero_copy_bytes: self.tx_zero_copy_bytes + other.tx_zero_copy_bytes,
            rx_frames: self.rx_frames + other.rx_frames,
            rx_bytes: self.rx_bytes + other.rx_bytes,
            rtt: self.rtt.plus(&other.rtt),
            packets: self.packets + other.packets,
            fragments: self.fragments + other.fragments,
            lost: self.lost + other.lost,
        }
    }
}

/// One connection at one instant.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ConnSample {
    /// The peer's name.
    pub peer: String,
    /// The connection's id on its node.
    pub connection: u64,
    /// Its shard.
    pub shard: usize,
    /// Lifetime counters.
    pub counts: ConnCounts,
    /// The stream layer's smoothed RTT, ms.
    pub smoothed_rtt_ms: Option<f64>,
}

/// Node-wide lifetime counters at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct NodeCounts {
    /// Messages taken from the application for peers.
    pub messages_sent: u64,
    /// Their payload bytes.
    pub bytes_sent: u64,
    /// Messages handed to the application.
    pub messages_received: u64,
    /// Their payload bytes.
    pub bytes_received: u64,
    /// Frames passed on (relays).
    pub relayed_frames: u64,
}

impl NodeCounts {
    /// The sum of the shards' counters now.
    pub fn of(shards: &[ShardMetrics]) -> Self {
        let sum = |f: fn(&ShardMetrics) -> u64| shards.iter().map(f).sum();
        Self {
            messages_sent: sum(|m| m.messages_sent.get()),
            bytes_sent: sum(|m| m.bytes_sent.get()),
            messages_received: sum(|m| m.messages_received.get()),
            bytes_received: sum(|m| m.bytes_received.get()),
            relayed_frames: sum(|m| m.relay_frames.get()),
        }
    }
}

/// Everything the sampler took at one instant.
#[derive(Clone, Debug)]
pub struct Sample {
    /// When.
    pub at: std::time::Instant,
    /// Node totals.
    pub node: NodeCounts,
    /// Every connection then.
    pub connections: Vec<ConnSample>,
    /// Round trips (µs) measured since the previous sample (hdrhistogram).
    pub rtt_us: hdrhistogram::Histogram<u64>,
}

/// An empty round-trip histogram: 1 µs to 60 s, 3 significant digits.
pub fn rtt_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

/// Rates and latency over one window.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct WindowStats {
    /// The window asked for, seconds.
    pub window_s: u64,
    /// The span the samples actually cover (shorter right after start).
    pub span_s: f64,
    /// Application messages per second, each way (node only).
    pub messages_sent_per_s: f64,
    /// See `messages_sent_per_s`.
    pub messages_received_per_s: f64,
    /// Wire bytes per second, each way.
    pub bytes_sent_per_s: f64,
    /// See `bytes_sent_per_s`.
    pub bytes_received_per_s: f64,
    /// Frames per second, each way.
    pub frames_sent_per_s: f64,
    /// See `frames_sent_per_s`.
    pub frames_received_per_s: f64,
    /// Stream packets and fragments sent per second.
    pub packets_per_s: f64,
    /// See `packets_per_s`.
    pub fragments_per_s: f64,
    /// Packets declared lost over packets sent.
    pub loss_rate: f64,
    /// Mean ping/pong RTT, ms (`None`: no round trip in the window).
    pub rtt_mean_ms: Option<f64>,
    /// Its variance, ms².
    pub rtt_variance_ms2: Option<f64>,
    /// Percentiles of the window's round trips (node only), ms.
    pub rtt_p50_ms: Option<f64>,
    /// See `rtt_p50_ms`.
    pub rtt_p99_ms: Option<f64>,
    /// See `rtt_p50_ms`.
    pub rtt_max_ms: Option<f64>,
}

impl WindowStats {
    fn from(window_s: u64, span: f64, node: Option<(&NodeCounts, &NodeCounts)>, conn: &ConnCounts) -> Self {
        let per_s = |v: u64| if span > 0.0 { v as f64 / span } else { 0.0 };
        let (messages_sent, messages_received) = node.map_or((0, 0), |(new, old)| {
            (
                new.messages_sent.saturating_sub(old.messages_sent),
                new.messages_received.saturating_sub(old.messages_received),
            )
        });
        let rtt = conn.rtt.mean_variance();
        Self {
            window_s,
            span_s: span,
            messages_sent_per_s: per_s(messages_sent),
            messages_received_per_s: per_s(messages_received),
            bytes_sent_per_s: per_s(conn.tx_bytes),
            bytes_received_per_s: per_s(conn.rx_bytes),
            frames_sent_per_s: per_s(conn.tx_frames),
            frames_received_per_s: per_s(conn.rx_frames),
            packets_per_s: per_s(conn.packets),
            fragments_per_s: per_s(conn.fragments),
            loss_rate: if conn.packets > 0 {
                conn.lost as f64 / conn.packets as f64
            } else {
                0.0
            },
            rtt_mean_ms: rtt.map(|(mean, _)| mean),
            rtt_variance_ms2: rtt.map(|(_, variance)| variance),
            rtt_p50_ms: None,
            rtt_p99_ms: None,
            rtt_max_ms: None,
        }
    }

    fn with_percentiles(mut self, hist: &hdrhistogram::Histogram<u64>) -> Self {
        if !hist.is_empty() {
            let ms = |us: u64| us as f64 / 1000.0;
            self.rtt_p50_ms = Some(ms(hist.value_at_quantile(0.5)));
            self.rtt_p99_ms = Some(ms(hist.value_at_quantile(0.99)));
            self.rtt_max_ms = Some(ms(hist.max()));
        }
        self
    }
}

/// One connection's windows and totals.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ConnReport {
    /// The peer.
    pub peer: String,
    /// The connection's id.
    pub connection: u64,
    /// Its shard.
    pub shard: usize,
    /// The stream layer's smoothed RTT now, ms.
    pub smoothed_rtt_ms: Option<f64>,
    /// Lifetime totals.
    pub totals: ConnCounts,
    /// Over the last 1, 5, 15 and 60 s.
    pub windows: Vec<WindowStats>,
}

/// What `/stats` answers: the node's and each connection's windows.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StatsReport {
    /// The node.
    pub node: String,
    /// Node lifetime totals.
    pub totals: NodeCounts,
    /// Node windows (connections summed; messages from the node counters).
    pub windows: Vec<WindowStats>,
    /// Per connection.
    pub connections: Vec<ConnReport>,
}

/// The windows reported, seconds.
pub const WINDOWS_S: [u64; 4] = [1, 5, 15, 60];

/// The last minute of samples, one a second (pure: the sampler feeds it).
#[derive(Debug, Default)]
pub struct Windows {
    samples: std::collections::VecDeque<Sample>,
}

impl Windows {
    /// Samples kept: enough for the longest window.
    const KEEP: usize = 61;

    /// Adds the newest sample.
    pub fn push(&mut self, sample: Sample) {
        if self.samples.len() == Self::KEEP {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// The oldest sample at most `seconds` before the newest.
    fn base(&self, seconds: u64) -> Option<&Sample> {
        let newest = self.samples.back()?;
        let horizon = std::time::Duration::from_secs(seconds) + std::time::Duration::from_millis(500);
        self.samples
            .iter()
            .find(|s| newest.at.saturating_duration_since(s.at) <= horizon)
    }

    /// Windows of the node and its connections, as of the newest sample.
    pub fn report(&self, node: &str) -> Option<StatsReport> {
        let newest = self.samples.back()?;
        let key = |c: &ConnSample| (c.peer.clone(), c.connection);
        let mut node_windows = Vec::new();
        let mut per_conn: std::collections::BTreeMap<(String, u64), Vec<WindowStats>> = Default::default();
        for seconds in WINDOWS_S {
            let Some(base) = self.base(seconds) else { continue };
            let span = newest.at.saturating_duration_since(base.at).as_secs_f64();
            let old: std::collections::HashMap<(String, u64), &ConnCounts> =
                base.connections.iter().map(|c| (key(c), &c.counts)).collect();
            let mut sum = ConnCounts::default();
            for conn in &newest.connections {
                let delta = match old.get(&key(conn)) {
                    Some(old) => conn.counts.minus(old),
                    // New in the window: all of it is in the window.
                    None => conn.counts,
                };
                sum = sum.plus(&delta);
                per_conn
                    .entry(key(conn))
                    .or_default()
                    .push(WindowStats::from(seconds, span, None, &delta));
            }
            // Round trips after `base` (each sample holds those since the
            // previous one).
            let mut rtt = rtt_histogram();
            for later in self.samples.iter().filter(|s| s.at > base.at) {
                let _ = rtt.add(&later.rtt_us);
            }
            node_windows
                .push(WindowStats::from(seconds, span, Some((&newest.node, &base.node)), &sum).with_percentiles(&rtt));
        }
        let connections = newest
            .connections
            .iter()
            .map(|c| ConnReport {
                peer: c.peer.clone(),
                connection: c.connection,
                shard: c.shard,
                smoothed_rtt_ms: c.smoothed_rtt_ms,
                totals: c.counts,
                windows: per_conn.remove(&key(c)).unwrap_or_default(),
            })
            .collect();
        Some(StatsReport {
            node: node.to_string(),
            totals: newest.node,
            windows: node_windows,
            connections,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// (peer, connection id, bytes sent, packets, lost, round trips ms).
    type Conn<'a> = (&'a str, u64, u64, u64, u64, &'a [f64]);

    fn sample(at: Instant, sent: u64, conns: &[Conn<'_>]) -> Sample {
        let mut rtt_us = rtt_histogram();
        for &(_, _, _, _, _, rtts) in conns {
            if let Some(&last) = rtts.last() {
                let _ = rtt_us.record((last * 1000.0) as u64);
            }
        }
        Sample {
            rtt_us,
            at,
            node: NodeCounts {
                messages_sent: sent,
                ..NodeCounts::default()
            },
            connections: conns
                .iter()
                .map(|&(peer, id, tx_bytes, packets, lost, rtts)| {
                    let mut rtt = RttSums::default();
                    for &ms in rtts {
                        rtt.observe(ms);
                    }
                    ConnSample {
                        peer: peer.into(),
                        connection: id,
                        shard: 0,
                        counts: ConnCounts {
                            tx_bytes,
                            packets,
                            lost,
                            rtt,
                            ..ConnCounts::default()
                        },
                        smoothed_rtt_ms: None,
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn windows_are_differences_over_their_span() {
        let t0 = Instant::now();
        let mut w = Windows::default();
        // 61 seconds of a steady 1000 B/s, 10 packets/s with 1 lost, and a
        // round trip of 10 ms each second; the last second carries 5000 B.
        for i in 0..=60u64 {
            let extra = if i == 60 { 4000 } else { 0 };
            let rtts: Vec<f64> = (0..=i).map(|_| 10.0).collect();
            w.push(sample(
                t0 + Duration::from_secs(i),
                i * 100,
                &[("b", 1, i * 1000 + extra, i * 10, i, &rtts)],
            ));
        }
        let report = w.report("a").expect("a report");
        let by = |s: u64| report.windows.iter().find(|x| x.window_s == s).expect("window").clone();
        assert_eq!(by(1).bytes_sent_per_s, 5000.0);
        assert!((by(60).bytes_sent_per_s - (60_000.0 + 4000.0) / 60.0).abs() < 1e-9);
        assert_eq!(by(5).messages_sent_per_s, 100.0);
        assert!((by(15).loss_rate - 0.1).abs() < 1e-9);
        assert_eq!(by(15).rtt_mean_ms, Some(10.0));
        assert_eq!(by(15).rtt_variance_ms2, Some(0.0));
        let p50 = by(15).rtt_p50_ms.expect("percentiles");
        assert!((p50 - 10.0).abs() < 0.05, "{p50}");
        assert_eq!(report.connections.len(), 1);
        assert_eq!(report.connections[0].windows.len(), 4);
    }

    #[test]
    fn a_new_connection_counts_from_zero_and_variance_is_right() {
        let t0 = Instant::now();
        let mut w = Windows::default();
        w.push(sample(t0, 0, &[]));
        w.push(sample(
            t0 + Duration::from_secs(1),
            0,
            &[("c", 7, 300, 0, 0, &[2.0, 4.0])],
        ));
        let report = w.report("a").expect("report");
        let one = &report.windows[0];
        assert_eq!(one.bytes_sent_per_s, 300.0);
        assert_eq!(one.rtt_mean_ms, Some(3.0));
        assert_eq!(one.rtt_variance_ms2, Some(1.0));
        assert_eq!(one.loss_rate, 0.0);
        assert!(Windows::default().report("a").is_none());
    }
}
