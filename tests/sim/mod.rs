//! A deterministic simulated network for the stream layer: two sessions, A and
//! B, joined by paths whose links drop, duplicate, delay, jitter and reorder
//! frames from a seeded RNG, enforce an MTU, and can die. Frames go through the
//! real codec on the way (encode, then datagram decode), so the MTU check
//! covers everything that reaches the wire.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use libatbus::frame::{Config as CodecConfig, Encoder, decode_datagram};
use libatbus::proto::MessageHead;
use libatbus::stream::{Config, Event, PathConfig, PathId, Session, StreamId, Transmit};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Head every frame carries (as a connection would fill it).
pub const HEAD_OVERHEAD: usize = 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    A,
    B,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// Behaviour of one path, both directions.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub mtu: usize,
    pub delay: Duration,
    pub jitter: Duration,
    pub loss: f64,
    pub duplicate: f64,
    /// Probability that a frame is held back by an extra delay (reordering).
    pub reorder: f64,
}

impl LinkConfig {
    pub fn clean(mtu: usize, delay: Duration) -> Self {
        Self {
            mtu,
            delay,
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
        }
    }
}

/// One transmission, as logged.
#[derive(Clone, Debug)]
pub struct Sent {
    pub at: Instant,
    pub from: Side,
    pub path: PathId,
    pub stream_id: StreamId,
    pub offset: u64,
    pub len: usize,
    pub is_ack: bool,
    pub dropped: bool,
}

type DropFilter = Box<dyn FnMut(Side, &Transmit) -> bool>;

/// A frame on its way: (arrival time, tie-breaker, receiving side, path, bytes).
type InTransit = Reverse<(Instant, u64, Side, PathId, Bytes)>;

pub struct Sim {
    pub seed: u64,
    pub now: Instant,
    pub start: Instant,
    rng: SmallRng,
    pub a: Session,
    pub b: Session,
    links: BTreeMap<PathId, (LinkConfig, bool)>,
    in_transit: BinaryHeap<InTransit>,
    seq: u64,
    encoder: Encoder,
    codec: CodecConfig,
    pub log: Vec<Sent>,
    pub drop_filter: Option<DropFilter>,
    pub protocol_errors: usize,
}

impl Sim {
    pub fn new(seed: u64, config: Config) -> Self {
        let start = Instant::now();
        let codec = CodecConfig { max_frame_len: 1 << 20 };
        Self {
            seed,
            now: start,
            start,
            rng: SmallRng::seed_from_u64(seed),
            a: Session::new(config.clone(), start),
            b: Session::new(config, start),
            links: BTreeMap::new(),
            in_transit: BinaryHeap::new(),
            seq: 0,
            encoder: Encoder::new(codec.clone()),
            codec,
            log: Vec::new(),
            drop_filter: None,
            protocol_errors: 0,
        }
    }

    pub fn add_link(&mut self, id: PathId, link: LinkConfig) {
        let path = PathConfig {
            mtu: link.mtu,
            overhead: HEAD_OVERHEAD,
            window: None,
            urgent_only: false,
        };
        self.a.add_path(id, path.clone());
        self.b.add_path(id, path);
        self.links.insert(id, (link, true));
    }

    /// The link dies: frames in transit on it are lost, nothing more passes.
    /// With `notify`, both sessions are told (as a transport error would).
    pub fn kill_link(&mut self, id: PathId, notify: bool) {
        if let Some(link) = self.links.get_mut(&id) {
            link.1 = false;
        }
        let kept: Vec<_> = self.in_transit.drain().filter(|Reverse(entry)| entry.3 != id).collect();
        self.in_transit.extend(kept);
        if notify {
            self.a.remove_path(id);
            self.b.remove_path(id);
        }
    }

    pub fn session(&mut self, side: Side) -> &mut Session {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Sends everything both sessions have to send now.
    pub fn flush(&mut self) {
        for side in [Side::A, Side::B] {
            let now = self.now;
            while let Some(transmit) = self.session(side).poll_transmit(now) {
                self.transmit(side, transmit);
            }
        }
    }

    fn transmit(&mut self, from: Side, transmit: Transmit) {
        let path = transmit.path();
        let (stream_id, offset, len, is_ack) = match &transmit {
            Transmit::Packet { packet, .. } => (
                packet.stream_id,
                packet.offset,
                packet.fragments.iter().map(|f| f.data.len()).sum(),
                false,
            ),
            Transmit::Ack { ack, .. } => (ack.acknowledge.as_ref().map_or(0, |a| a.stream_id), 0, 0, true),
        };
        let filtered = match self.drop_filter.as_mut() {
            Some(filter) => filter(from, &transmit),
            None => false,
        };
        let mut frame = transmit.into_frame();
        frame.head = Some(MessageHead {
            source: "node-aaaa".into(),
            destination: "node-bbbb".into(),
            ..Default::default()
        });
        let mut wire = BytesMut::new();
        self.encoder
            .encode(&frame, &mut wire)
            .expect("frame fits the codec maximum");
        let (link, alive) = self.links.get(&path).cloned().expect("transmit on a known path");
        assert!(
            wire.len() <= link.mtu,
            "seed {:#x}: frame of {} bytes exceeds path MTU {}",
            self.seed,
            wire.len(),
            link.mtu
        );
        let lost = filtered || !alive || self.rng.random_bool(link.loss);
        self.log.push(Sent {
            at: self.now,
            from,
            path,
            stream_id,
            offset,
            len,
            is_ack,
            dropped: lost,
        });
        if lost {
            return;
        }
        let wire = wire.freeze();
        let copies = if self.rng.random_bool(link.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let mut delay = link.delay;
            if !link.jitter.is_zero() {
                delay += link.jitter.mul_f64(self.rng.random::<f64>());
            }
            if self.rng.random_bool(link.reorder) {
                delay += link.delay / 2 + link.jitter;
            }
            self.seq += 1;
            self.in_transit
                .push(Reverse((self.now + delay, self.seq, from.other(), path, wire.clone())));
        }
    }

    /// Moves time to the next arrival or timer and processes everything due.
    /// Returns false when nothing at all is pending (the network is idle).
    pub fn advance(&mut self) -> bool {
        let next = [
            self.in_transit.peek().map(|Reverse(entry)| entry.0),
            self.a.poll_timeout(),
            self.b.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next else {
            return false;
        };
        self.now = self.now.max(next);
        while let Some(Reverse(entry)) = self.in_transit.peek() {
            if entry.0 > self.now {
                break;
            }
            let Some(Reverse((_, _, to, path, wire))) = self.in_transit.pop() else {
                break;
            };
            let frame = decode_datagram(&self.codec, wire).expect("the simulator never corrupts frames");
            let now = self.now;
            if self.session(to).handle_frame(now, path, frame).is_err() {
                self.protocol_errors += 1;
            }
        }
        let now = self.now;
        for side in [Side::A, Side::B] {
            if self.session(side).poll_timeout().is_some_and(|t| t <= now) {
                self.session(side).handle_timeout(now);
            }
        }
        true
    }

    /// Drains one side's events.
    pub fn events(&mut self, side: Side) -> Vec<Event> {
        std::iter::from_fn(|| self.session(side).poll_event()).collect()
    }
}
