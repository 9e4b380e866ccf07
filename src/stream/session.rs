//! One remote endpoint: its streams and the paths (connections) that carry them.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::recv::RecvStream;
use super::rtt::RttEstimator;
use super::send::SendStream;
use super::{
    CONTROL_STREAM, Config, Content, Event, FRAGMENT_OVERHEAD, Fragment, MAX_SACK_RANGES, PACKET_OVERHEAD, Packet,
    PathConfig, PathId, ProtocolError, SendError, StreamId, Transmit,
};
use crate::proto::{AcknowledgeData, AtbusPacketFlagType, CloseReasonData, OffsetRange, PacketData, StreamAcknowledge};

/// Counters of one path (see [`Session::path_stats`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathStats {
    /// Packets sent and not yet acknowledged or declared lost.
    pub in_flight_packets: usize,
    /// Their bytes.
    pub in_flight_bytes: usize,
    /// Consecutive retransmission timeouts without progress.
    pub rto_backoff: u32,
    /// Smoothed RTT, once measured.
    pub smoothed_rtt: Option<Duration>,
    /// Earliest armed timer.
    pub next_timeout: Option<Instant>,
    /// Packets sent on the path (first sends and resends), lifetime.
    pub sent_packets: u64,
    /// Their bytes (payload and packet overhead).
    pub sent_bytes: u64,
    /// Fragments in them.
    pub sent_fragments: u64,
    /// Packets declared lost (past the reorder threshold, or at an RTO).
    pub lost_packets: u64,
    /// Their bytes.
    pub lost_bytes: u64,
}

/// A packet in flight on a path.
#[derive(Debug)]
struct Sent {
    stream_id: StreamId,
    range: Range<u64>,
    sent_at: Instant,
    bytes: usize,
}

/// Timers of one path, as a fixed table; the path's deadline is the earliest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    /// Retransmission timeout of the oldest packet in flight.
    Rto = 0,
    /// A packet below a newer acknowledged one reaches its loss delay.
    Loss = 1,
    /// Pending acknowledgements are due (see [`Config::ack_delay`]).
    Ack = 2,
}

const TIMER_COUNT: usize = 3;

#[derive(Debug)]
struct Path {
    config: PathConfig,
    rtt: RttEstimator,
    in_flight: VecDeque<Sent>,
    in_flight_bytes: usize,
    /// Consecutive RTO expiries without progress.
    backoff: u32,
    /// Streams owed an acknowledgement on this path, with the timepoint to echo.
    pending_acks: Vec<(StreamId, i64)>,
    /// Packets received since this path last sent an acknowledgement.
    unacked_packets: u32,
    /// Highest received_max_offset the peer reported per stream on this path.
    sack_hint: HashMap<StreamId, u64>,
    timers: [Option<Instant>; TIMER_COUNT],
    /// Close packet to send before the path goes.
    closing: Option<CloseReasonData>,
    /// The connection's write buffer is full: no new data for this path.
    blocked: bool,
    /// Lifetime counters (see [`PathStats`]).
    sent_packets: u64,
    sent_bytes: u64,
    sent_fragments: u64,
    lost_packets: u64,
    lost_bytes: u64,
}

impl Path {
    fn payload_budget(&self) -> usize {
        self.config.mtu.saturating_sub(self.config.overhead + PACKET_OVERHEAD)
    }

    fn deadline(&self) -> Option<Instant> {
        self.timers.iter().flatten().min().copied()
    }
}

/// The sans-IO state of one remote endpoint.
///
/// Call order, for a driver:
/// 1. feed input: [`Session::handle_frame`] / [`Session::handle_packet`] /
///    [`Session::handle_ack`] for what arrived, [`Session::handle_timeout`] once
///    [`Session::poll_timeout`] has passed;
/// 2. drain [`Session::poll_transmit`] until `None` and send each on its path;
/// 3. drain [`Session::poll_event`] (messages, writability, finishes);
/// 4. sleep until the next input or [`Session::poll_timeout`].
#[derive(Debug)]
pub struct Session {
    config: Config,
    epoch: Instant,
    send: BTreeMap<StreamId, SendStream>,
    recv: BTreeMap<StreamId, RecvStream>,
    /// Delivered-but-not-polled message bytes per stream: they count against
    /// the receive window, so an application that stops reading stops the flow.
    queued: BTreeMap<StreamId, usize>,
    paths: BTreeMap<PathId, Path>,
    events: VecDeque<Event>,
    /// Messages (and the finish) of streams the peer flagged urgent: the
    /// application takes them first, and they do not wait for the others.
    urgent_events: VecDeque<Event>,
    /// Streams served first (see [`Session::set_stream_urgent`]).
    urgent: BTreeSet<StreamId>,
    /// Streams whose packets carry ENCRYPTED (see
    /// [`Session::set_stream_encrypted`]), and those the peer flagged so.
    encrypted: BTreeSet<StreamId>,
    peer_encrypted: BTreeSet<StreamId>,
    /// Received streams the peer flagged URGENT.
    peer_urgent: BTreeSet<StreamId>,
    /// Round-robin cursors.
    next_path: Option<PathId>,
    next_stream: Option<StreamId>,
    /// The paths and streams `poll_data` goes through, kept between calls
    /// so that a packet costs no allocation for them.
    scratch_paths: Vec<PathId>,
    scratch_streams: Vec<StreamId>,
}

impl Session {
    /// A session with no paths yet. `now` is the origin of the timepoints this
    /// session writes on the wire.
    pub fn new(config: Config, now: Instant) -> Self {
        Self {
            config,
            epoch: now,
            send: BTreeMap::new(),
            recv: BTreeMap::new(),
            queued: BTreeMap::new(),
            paths: BTreeMap::new(),
            events: VecDeque::new(),
            urgent_events: VecDeque::new(),
            urgent: BTreeSet::new(),
            peer_urgent: BTreeSet::new(),
            encrypted: BTreeSet::new(),
            peer_encrypted: BTreeSet::new(),
            next_path: None,
            next_stream: None,
            scratch_paths: Vec::new(),
            scratch_streams: Vec::new(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Adds a path (a connection to this endpoint).
    pub fn add_path(&mut self, id: PathId, config: PathConfig) {
        self.paths.insert(
            id,
            Path {
                config,
                rtt: RttEstimator::new(self.config.initial_rtt),
                in_flight: VecDeque::new(),
                in_flight_bytes: 0,
                backoff: 0,
                pending_acks: Vec::new(),
                unacked_packets: 0,
                sack_hint: HashMap::new(),
                timers: [None; TIMER_COUNT],
                closing: None,
                blocked: false,
                sent_packets: 0,
                sent_bytes: 0,
                sent_fragments: 0,
                lost_packets: 0,
                lost_bytes: 0,
            },
        );
    }

    /// Stops (or resumes) new stream data on a path, for a connection whose
    /// write buffer is full. Acknowledgements and close packets still go out.
    pub fn set_path_blocked(&mut self, id: PathId, blocked: bool) {
        if let Some(path) = self.paths.get_mut(&id) {
            path.blocked = blocked;
        }
    }

    /// Marks a stream urgent (frame-sync traffic): its data goes out before
    /// any other stream's on every path, in packets flagged URGENT.
    pub fn set_stream_urgent(&mut self, stream_id: StreamId, urgent: bool) {
        if urgent {
            self.urgent.insert(stream_id);
        } else {
            self.urgent.remove(&stream_id);
        }
    }

    /// Marks a stream end-to-end encrypted: its packets carry ENCRYPTED, so
    /// the peer (and relays) know its content is TLS bytes.
    pub fn set_stream_encrypted(&mut self, stream_id: StreamId) {
        self.encrypted.insert(stream_id);
    }

    /// Whether the peer's packets on `stream_id` carry ENCRYPTED.
    pub fn is_peer_encrypted(&self, stream_id: StreamId) -> bool {
        self.peer_encrypted.contains(&stream_id)
    }

    /// Whether the peer sends `stream_id` as urgent (its packets carry the
    /// URGENT flag): the application may want its messages first.
    pub fn is_peer_urgent(&self, stream_id: StreamId) -> bool {
        self.peer_urgent.contains(&stream_id)
    }

    /// Ids of the live paths.
    pub fn paths(&self) -> impl Iterator<Item = PathId> + '_ {
        self.paths.keys().copied()
    }

    /// Smoothed RTT of a path, if it has one.
    pub fn path_rtt(&self, id: PathId) -> Option<Duration> {
        self.paths.get(&id).filter(|p| p.rtt.has_sample()).map(|p| p.rtt.get())
    }

    /// Counters of one path, for metrics and diagnostics.
    pub fn path_stats(&self, id: PathId) -> Option<PathStats> {
        let path = self.paths.get(&id)?;
        Some(PathStats {
            in_flight_packets: path.in_flight.len(),
            in_flight_bytes: path.in_flight_bytes,
            rto_backoff: path.backoff,
            smoothed_rtt: path.rtt.has_sample().then(|| path.rtt.get()),
            next_timeout: path.deadline(),
            sent_packets: path.sent_packets,
            sent_bytes: path.sent_bytes,
            sent_fragments: path.sent_fragments,
            lost_packets: path.lost_packets,
            lost_bytes: path.lost_bytes,
        })
    }

    /// A path died: whatever it had in flight is sent again on the others.
    pub fn remove_path(&mut self, id: PathId) {
        let Some(path) = self.paths.remove(&id) else {
            return;
        };
        for sent in path.in_flight {
            if let Some(stream) = self.send.get_mut(&sent.stream_id) {
                stream.requeue(sent.range);
            }
        }
    }

    /// Closes a path gracefully: a FINISH_CONNECTION packet carrying `reason`
    /// goes out on it (from `poll_transmit`), then the path is removed.
    pub fn close_path(&mut self, id: PathId, reason: CloseReasonData) {
        if let Some(path) = self.paths.get_mut(&id) {
            path.closing = Some(reason);
        }
    }

    /// The peer is a new incarnation (it restarted): forget what it acknowledged
    /// and resend every retained message from the first one, with RESET_OFFSET.
    pub fn peer_restarted(&mut self) {
        self.recv.clear();
        self.peer_urgent.clear();
        self.peer_encrypted.clear();
        self.queued.clear();
        for path in self.paths.values_mut() {
            path.in_flight.clear();
            path.in_flight_bytes = 0;
            path.pending_acks.clear();
            path.unacked_packets = 0;
            path.sack_hint.clear();
            path.timers = [None; TIMER_COUNT];
        }
        for stream in self.send.values_mut() {
            stream.restart();
        }
    }

    /// Queues a message on a stream. `WouldBlock` when the stream's send window
    /// is full: an [`Event::Writable`] follows once acknowledgements free space.
    pub fn send(&mut self, stream_id: StreamId, data: Bytes) -> Result<(), SendError> {
        let window = self.config.send_window;
        let max = self.config.max_message_len;
        self.send
            .entry(stream_id)
            .or_insert_with(|| SendStream::new(stream_id, window))
            .push(data, max)
    }

    /// Finishes the sending side of a stream: no more messages; the peer gets
    /// [`Event::Finished`] after the last one, and this side gets
    /// [`Event::SendFinished`] once the peer acknowledged everything.
    pub fn finish(&mut self, stream_id: StreamId) -> Result<(), SendError> {
        let window = self.config.send_window;
        self.send
            .entry(stream_id)
            .or_insert_with(|| SendStream::new(stream_id, window))
            .finish()
    }

    /// Bytes sent on `stream_id` and not yet acknowledged.
    pub fn unacknowledged(&self, stream_id: StreamId) -> u64 {
        self.send.get(&stream_id).map_or(0, SendStream::retained)
    }

    /// Gives up on the peer's unacknowledged data: for each send stream with
    /// messages not fully acknowledged, drops them and returns (stream,
    /// messages, bytes). Offsets go on (see `SendStream::abandon`), so the
    /// same peer can be reached again later without confusing old and new
    /// data. Receive state stays (what arrived was delivered).
    pub fn abandon(&mut self) -> Vec<(StreamId, u64, u64)> {
        let dropped = self
            .send
            .iter_mut()
            .filter_map(|(id, stream)| {
                let (messages, bytes) = stream.abandon();
                (messages > 0).then_some((*id, messages, bytes))
            })
            .collect();
        self.queued.clear();
        for path in self.paths.values_mut() {
            path.in_flight.clear();
            path.in_flight_bytes = 0;
        }
        dropped
    }

    /// Drops one stream's unacknowledged data (as [`Session::abandon`] does
    /// for all): returns the messages and bytes dropped. The stream's
    /// offsets go on, its next packet with RESET_OFFSET.
    pub fn abandon_stream(&mut self, stream_id: StreamId) -> (u64, u64) {
        let Some(stream) = self.send.get_mut(&stream_id) else {
            return (0, 0);
        };
        let dropped = stream.abandon();
        for path in self.paths.values_mut() {
            let before = path.in_flight.len();
            path.in_flight.retain(|sent| sent.stream_id != stream_id);
            if path.in_flight.len() != before {
                path.in_flight_bytes = path.in_flight.iter().map(|s| s.bytes).sum();
            }
        }
        dropped
    }

    /// Whether every stream's data has been acknowledged by the peer.
    pub fn is_drained(&self) -> bool {
        self.send.values().all(SendStream::is_drained)
    }

    fn timepoint(&self, now: Instant) -> i64 {
        i64::try_from(now.saturating_duration_since(self.epoch).as_micros()).unwrap_or(i64::MAX)
    }

    /// Dispatches one decoded frame body that arrived on `path`.
    pub fn handle_frame(
        &mut self,
        now: Instant,
        path: PathId,
        frame: crate::proto::FrameMessage,
    ) -> Result<(), ProtocolError> {
        use crate::proto::Body;
        match frame.body {
            Some(Body::Packet(data)) => self.handle_packet(now, path, Packet::from_data(data)?),
            Some(Body::Acknowledge(ack)) => self.handle_ack(now, path, ack),
            Some(Body::Ping(_)) | Some(Body::Pong(_)) | None => Ok(()),
        }
    }

    /// A packet arrived on `path`.
    pub fn handle_packet(&mut self, now: Instant, path_id: PathId, packet: Packet) -> Result<(), ProtocolError> {
        if packet.has_flag(AtbusPacketFlagType::FinishConnection) {
            let reason = packet.fragments.into_iter().find_map(Fragment::into_close_reason);
            self.remove_path(path_id);
            self.events.push_back(Event::PathClosed { path: path_id, reason });
            return Ok(());
        }
        let Some(path) = self.paths.get_mut(&path_id) else {
            return Err(ProtocolError::UnknownPath { path: path_id });
        };
        let offset = packet.offset;
        let stream_id = packet.stream_id;
        if !self.recv.contains_key(&stream_id) && self.recv.len() >= self.config.max_streams {
            return Err(ProtocolError::TooManyStreams {
                max: self.config.max_streams,
            });
        }
        if packet.has_flag(AtbusPacketFlagType::Urgent) {
            self.peer_urgent.insert(stream_id);
        }
        if packet.has_flag(AtbusPacketFlagType::Encrypted) {
            self.peer_encrypted.insert(stream_id);
        }
        let recv = self.recv.entry(stream_id).or_default();
        if packet.has_flag(AtbusPacketFlagType::ResetOffset) {
            recv.reset_to(offset);
        }
        let queued = self.queued.get(&stream_id).copied().unwrap_or(0);
        let window = self.config.recv_window.saturating_sub(queued) as u64;
        let limit = recv_limit(recv, window);
        let fin = packet.has_flag(AtbusPacketFlagType::FinishStream);
        let contiguous = recv.ack_offset();
        let events = if self.peer_urgent.contains(&stream_id) {
            &mut self.urgent_events
        } else {
            &mut self.events
        };
        let mut delivered = 0;
        let mut deliver = |data: Bytes| {
            delivered += data.len();
            events.push_back(Event::Message { stream_id, data });
        };
        recv.insert(offset, packet.fragments, fin, limit, &mut deliver);
        match path.pending_acks.iter_mut().find(|(id, _)| *id == stream_id) {
            Some(entry) => entry.1 = packet.timepoint,
            None => path.pending_acks.push((stream_id, packet.timepoint)),
        }
        path.unacked_packets = path.unacked_packets.saturating_add(1);
        // A lone packet's acknowledgement may wait a little for data going
        // back (see `Config::ack_delay`); a burst, a hole (the sender needs
        // the selective ranges to resend), a packet that moved nothing (a
        // resend: the sender is waiting) or a stream's end may not.
        let hole = recv.max_received() > recv.ack_offset();
        let stale = recv.ack_offset() == contiguous;
        let at_once = path.unacked_packets >= 2 || hole || stale || fin;
        let due = if at_once { now } else { now + self.config.ack_delay };
        let timer = &mut path.timers[Timer::Ack as usize];
        *timer = Some(timer.map_or(due, |t| t.min(due)));
        while let Some(data) = recv.next_message() {
            deliver(data);
        }
        if delivered > 0 {
            *self.queued.entry(stream_id).or_default() += delivered;
        }
        // The stream stays as a tombstone: late duplicates must not restart it.
        if recv.take_finish() {
            events.push_back(Event::Finished { stream_id });
        }
        Ok(())
    }

    /// An acknowledgement arrived on `path`.
    pub fn handle_ack(&mut self, now: Instant, path_id: PathId, ack: AcknowledgeData) -> Result<(), ProtocolError> {
        let Some(stream_ack) = ack.acknowledge else {
            return Ok(());
        };
        let stream_id = stream_ack.stream_id;
        let acknowledged = u64::try_from(stream_ack.acknowledge_offset).map_err(|_| ProtocolError::NegativeOffset)?;
        let max_received = u64::try_from(stream_ack.received_max_offset)
            .map_err(|_| ProtocolError::NegativeOffset)?
            .max(acknowledged);
        let Some(stream) = self.send.get_mut(&stream_id) else {
            return Ok(());
        };
        let before = stream.acked();
        let writable = stream.on_ack(acknowledged).map_err(|()| ProtocolError::AckBeyondSent {
            stream_id,
            acknowledged,
        })?;
        let mut max_received = max_received;
        // With a full list of ranges, what lies above the last one is unknown:
        // loss detection must not treat it as missing.
        if let Some(last) = stream_ack.received_ranges.get(MAX_SACK_RANGES - 1) {
            max_received = max_received.min(u64::try_from(last.end).map_err(|_| ProtocolError::NegativeOffset)?);
        }
        for range in stream_ack.received_ranges.iter().take(MAX_SACK_RANGES) {
            let (Ok(start), Ok(end)) = (u64::try_from(range.start), u64::try_from(range.end)) else {
                return Err(ProtocolError::NegativeOffset);
            };
            if start >= end {
                continue;
            }
            stream.on_sack(start..end).map_err(|()| ProtocolError::AckBeyondSent {
                stream_id,
                acknowledged: end,
            })?;
            max_received = max_received.max(end);
        }
        let progressed = stream.acked() > before;
        if writable {
            self.events.push_back(Event::Writable { stream_id });
        }
        if progressed && stream.is_finished_and_acked() {
            self.events.push_back(Event::SendFinished { stream_id });
        }
        // RTT sample: the peer echoes the timepoint of the packet it answers.
        let echoed = ack.timepoint_microseconds;
        let now_us = self.timepoint(now);
        if let Some(path) = self.paths.get_mut(&path_id) {
            if echoed > 0 && echoed <= now_us {
                path.rtt.update(Duration::from_micros((now_us - echoed) as u64));
            }
            if progressed {
                path.backoff = 0;
            }
            let hint = path.sack_hint.entry(stream_id).or_insert(0);
            *hint = (*hint).max(max_received);
        }
        // Data acknowledged here may have been carried by any path.
        let ids: Vec<PathId> = self.paths.keys().copied().collect();
        for id in ids {
            self.scan_in_flight(now, id);
        }
        Ok(())
    }

    /// Walks `path_id`'s packets in flight from the oldest: acknowledged ones
    /// are dropped; lost ones are dropped and their ranges queued again; the
    /// walk stops at the first packet still outstanding. A packet is lost when
    /// the peer reported data at least three packets' payload beyond it, or
    /// when it sits below reported data for longer than the loss delay (the
    /// loss timer covers that wait). Amortised O(1) per packet.
    fn scan_in_flight(&mut self, now: Instant, path_id: PathId) {
        let Self { paths, send, .. } = self;
        let Some(path) = paths.get_mut(&path_id) else {
            return;
        };
        let reorder_bytes = (path.payload_budget() * 3) as u64;
        let loss_delay = path.rtt.loss_delay();
        path.timers[Timer::Loss as usize] = None;
        while let Some(sent) = path.in_flight.front() {
            let stream = send.get_mut(&sent.stream_id);
            let received = stream.as_ref().is_none_or(|s| s.is_received(&sent.range));
            if !received {
                let hint = path.sack_hint.get(&sent.stream_id).copied().unwrap_or(0);
                if sent.range.end > hint {
                    break;
                }
                if hint - sent.range.end < reorder_bytes && now < sent.sent_at + loss_delay {
                    path.timers[Timer::Loss as usize] = Some(sent.sent_at + loss_delay);
                    break;
                }
                if let Some(stream) = stream {
                    stream.requeue(sent.range.clone());
                }
                path.lost_packets += 1;
                path.lost_bytes += sent.bytes as u64;
            }
            path.in_flight_bytes -= sent.bytes;
            path.in_flight.pop_front();
        }
        self.arm_rto(path_id);
    }

    fn arm_rto(&mut self, path_id: PathId) {
        let (min, max) = (self.config.min_rto, self.config.max_rto);
        if let Some(path) = self.paths.get_mut(&path_id) {
            let rto = path.rtt.rto(min, max) * 2u32.saturating_pow(path.backoff.min(16));
            path.timers[Timer::Rto as usize] = path.in_flight.front().map(|sent| sent.sent_at + rto.min(max));
        }
    }

    /// Earliest deadline of any timer, if one is armed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.paths.values().filter_map(Path::deadline).min()
    }

    /// Runs the timers that expired by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let ids: Vec<PathId> = self.paths.keys().copied().collect();
        for id in ids {
            if self.paths.get(&id).and_then(Path::deadline).is_none_or(|t| t > now) {
                continue;
            }
            // Loss timer, and acknowledged packets out of the way.
            self.scan_in_flight(now, id);
            let (min, max) = (self.config.min_rto, self.config.max_rto);
            let Self { paths, send, .. } = self;
            let Some(path) = paths.get_mut(&id) else {
                continue;
            };
            if path.timers[Timer::Rto as usize].is_some_and(|t| t <= now) {
                // Everything sent more than one RTO ago is presumed lost.
                let rto = path.rtt.rto(min, max);
                while let Some(sent) = path.in_flight.front() {
                    if sent.sent_at + rto > now {
                        break;
                    }
                    if let Some(stream) = send.get_mut(&sent.stream_id) {
                        stream.requeue(sent.range.clone());
                    }
                    path.lost_packets += 1;
                    path.lost_bytes += sent.bytes as u64;
                    path.in_flight_bytes -= sent.bytes;
                    path.in_flight.pop_front();
                }
                path.backoff = path.backoff.saturating_add(1);
                self.arm_rto(id);
            }
        }
    }

    /// Next frame to send, with the path to send it on: acknowledgements
    /// first, then stream data round-robin over paths and streams.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(transmit) = self.poll_control(now) {
            return Some(transmit);
        }
        if let Some(transmit) = self.poll_ack(now) {
            return Some(transmit);
        }
        let transmit = self.poll_data(now)?;
        // Data leaves on this path now: its acknowledgements go with it.
        if let Transmit::Packet { path, .. } = &transmit
            && let Some(path) = self.paths.get_mut(path)
            && !path.pending_acks.is_empty()
        {
            path.timers[Timer::Ack as usize] = Some(now);
        }
        Some(transmit)
    }

    fn poll_control(&mut self, now: Instant) -> Option<Transmit> {
        let id = self
            .paths
            .iter()
            .find(|(_, p)| p.closing.is_some())
            .map(|(id, _)| *id)?;
        let path = self.paths.get_mut(&id)?;
        if !path.pending_acks.is_empty() {
            // What arrived on the path is acknowledged before it closes (a
            // delayed acknowledgement would go with it, and the peer report
            // delivered data as lost).
            path.timers[Timer::Ack as usize] = Some(now);
            return None;
        }
        let reason = path.closing.take()?;
        self.remove_path(id);
        Some(Transmit::Packet {
            path: id,
            packet: Packet {
                stream_id: CONTROL_STREAM,
                offset: 0,
                flags: AtbusPacketFlagType::FinishConnection as i32,
                timepoint: 0,
                fragments: vec![Fragment::closing(reason)],
            },
        })
    }

    fn poll_ack(&mut self, now: Instant) -> Option<Transmit> {
        for (id, path) in self.paths.iter_mut() {
            if path.timers[Timer::Ack as usize].is_none_or(|t| t > now) {
                continue;
            }
            let Some((stream_id, echo)) = path.pending_acks.pop() else {
                path.timers[Timer::Ack as usize] = None;
                continue;
            };
            if path.pending_acks.is_empty() {
                path.timers[Timer::Ack as usize] = None;
                path.unacked_packets = 0;
            }
            let Some(recv) = self.recv.get(&stream_id) else {
                continue;
            };
            let (acknowledge_offset, received_max_offset) = (recv.ack_offset(), recv.max_received());
            let received_ranges = recv
                .sack_ranges(MAX_SACK_RANGES)
                .map(|r| OffsetRange {
                    start: r.start as i64,
                    end: r.end as i64,
                })
                .collect();
            return Some(Transmit::Ack {
                path: *id,
                ack: AcknowledgeData {
                    acknowledge: Some(StreamAcknowledge {
                        stream_id,
                        acknowledge_offset: acknowledge_offset as i64,
                        received_max_offset: received_max_offset as i64,
                        received_ranges,
                    }),
                    timepoint_microseconds: echo,
                    forward_for: None,
                },
            });
        }
        None
    }

    fn poll_data(&mut self, now: Instant) -> Option<Transmit> {
        if self.paths.is_empty() || !self.send.values().any(SendStream::has_unsent) {
            return None;
        }
        let mut path_ids = std::mem::take(&mut self.scratch_paths);
        let mut stream_ids = std::mem::take(&mut self.scratch_streams);
        let transmit = self.poll_data_in(now, &mut path_ids, &mut stream_ids);
        self.scratch_paths = path_ids;
        self.scratch_streams = stream_ids;
        transmit
    }

    /// [`Session::poll_data`] with its scratch lists.
    fn poll_data_in(
        &mut self,
        now: Instant,
        path_ids: &mut Vec<PathId>,
        stream_ids: &mut Vec<StreamId>,
    ) -> Option<Transmit> {
        rotate_into(path_ids, self.paths.keys().copied(), self.next_path);
        // Healthy paths pick first: the oldest unsent data (often a hole the
        // receiver waits for) must not go to a path that may be dead. Among
        // them, latency paths first (they only take urgent streams).
        path_ids.sort_by_key(|id| {
            self.paths
                .get(id)
                .map_or((true, true), |p| (p.backoff > 0, !p.config.urgent_only))
        });
        // Urgent streams keep to a healthy latency path when there is one;
        // a latency path takes other streams only when it is the last path.
        let latency_up = self.paths.values().any(|p| p.config.urgent_only && p.backoff == 0);
        let ordinary_up = self.paths.values().any(|p| !p.config.urgent_only);
        let timepoint = self.timepoint(now);
        for &path_id in path_ids.iter() {
            let path = self.paths.get_mut(&path_id)?;
            let only_urgent = path.config.urgent_only && ordinary_up;
            let no_urgent = !path.config.urgent_only && latency_up;
            let path_window = path.config.window.unwrap_or(self.config.path_window);
            let budget = path.payload_budget();
            if path.blocked || budget <= FRAGMENT_OVERHEAD || path.in_flight_bytes + budget > path_window {
                continue;
            }
            // A path in RTO backoff may be dead: it only carries one probe at a
            // time, and the other paths carry the rest.
            if path.backoff > 0 && !path.in_flight.is_empty() {
                continue;
            }
            let urgent = &self.urgent;
            rotate_into(
                stream_ids,
                self.send
                    .iter()
                    .filter(|(id, s)| {
                        // Latency paths: urgent only; ordinary ones: none.
                        let allowed = if urgent.contains(id) { !no_urgent } else { !only_urgent };
                        allowed && s.has_unsent()
                    })
                    .map(|(id, _)| *id),
                self.next_stream,
            );
            if !self.urgent.is_empty() {
                // Stable: round-robin order holds within each class.
                stream_ids.sort_by_key(|id| !self.urgent.contains(id));
            }
            for &stream_id in stream_ids.iter() {
                let Some(chunk) = self.send.get_mut(&stream_id).and_then(|s| s.next_chunk(budget)) else {
                    continue;
                };
                let bytes = chunk.range.end.saturating_sub(chunk.range.start) as usize + PACKET_OVERHEAD;
                path.in_flight.push_back(Sent {
                    stream_id,
                    range: chunk.range,
                    sent_at: now,
                    bytes,
                });
                path.in_flight_bytes += bytes;
                path.sent_packets += 1;
                path.sent_bytes += bytes as u64;
                path.sent_fragments += chunk.fragments.len() as u64;
                self.next_path = Some(path_id);
                self.next_stream = Some(stream_id);
                if path.timers[Timer::Rto as usize].is_none() {
                    self.arm_rto(path_id);
                }
                return Some(Transmit::Packet {
                    path: path_id,
                    packet: Packet {
                        stream_id,
                        offset: chunk.offset,
                        flags: chunk.flags
                            | if self.urgent.contains(&stream_id) {
                                AtbusPacketFlagType::Urgent as i32
                            } else {
                                0
                            }
                            | if self.encrypted.contains(&stream_id) {
                                AtbusPacketFlagType::Encrypted as i32
                            } else {
                                0
                            },
                        timepoint,
                        fragments: chunk.fragments,
                    },
                });
            }
        }
        None
    }

    /// The event [`Session::poll_event`] would return next, left in place.
    pub fn peek_event(&self) -> Option<&Event> {
        self.urgent_events.front().or_else(|| self.events.front())
    }

    /// Next event for the application: those of urgent streams (see
    /// [`Session::is_peer_urgent`]) first.
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.urgent_events.pop_front().or_else(|| self.events.pop_front())?;
        Some(self.taken(event))
    }

    /// Next event of an urgent stream only: an application whose ordinary
    /// queue is full still takes these.
    pub fn poll_urgent_event(&mut self) -> Option<Event> {
        let event = self.urgent_events.pop_front()?;
        Some(self.taken(event))
    }

    /// Bookkeeping of an event handed to the application.
    fn taken(&mut self, event: Event) -> Event {
        if let Event::Message { stream_id, data } = &event
            && let Some(queued) = self.queued.get_mut(stream_id)
        {
            *queued = queued.saturating_sub(data.len());
        }
        event
    }
}

/// The receive window's end for a stream: `window` bytes past the next message
/// to deliver.
fn recv_limit(recv: &RecvStream, window: u64) -> u64 {
    recv.deliver_offset().saturating_add(window)
}

/// `items` in order, starting just after `after` (round robin).
fn rotate_into<T: Copy + Ord>(dst: &mut Vec<T>, items: impl Iterator<Item = T>, after: Option<T>) {
    dst.clear();
    dst.extend(items);
    if let Some(after) = after {
        let split = dst.partition_point(|item| *item <= after);
        dst.rotate_left(split);
    }
}

impl Packet {
    /// Builds from a received `packet_data`, decoding its content.
    pub fn from_data(data: PacketData) -> Result<Self, ProtocolError> {
        let offset = u64::try_from(data.stream_offset).map_err(|_| ProtocolError::NegativeOffset)?;
        let content = Content::decode_packet(data.content).map_err(ProtocolError::Content)?;
        Ok(Self {
            stream_id: data.stream_id,
            offset,
            flags: data.flags,
            timepoint: data.timepoint_microseconds,
            fragments: content.fragments,
        })
    }
}
