//! A node's state on one shard: endpoints (one per peer name, each a
//! `stream::Session`), their connections' write buffers, and the timers.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::{Message, NodeError, SendError, Shared};
use crate::address::Address;
use crate::frame::Encoder;
use crate::proto::{Body, FrameMessage, PingData};
use crate::runtime::{self, TaskClass};
use crate::stream::{Event, PacketFrame, PathConfig, PathId, Session, StreamId, Transmit};

thread_local! {
    static LOCAL: RefCell<Option<Rc<ShardState>>> = const { RefCell::new(None) };
}

/// The shard state of the node running on this thread, if any.
pub(super) fn local() -> Option<Rc<ShardState>> {
    LOCAL.with(|l| l.borrow().clone())
}

pub(super) struct ShardState {
    pub shared: Arc<Shared>,
    pub index: usize,
    pub encoder: Encoder,
    endpoints: RefCell<super::NameMap<Rc<Endpoint>>>,
    next_path: Cell<u64>,
    /// Messages the application queue had no room for, in arrival order.
    /// Messages the application queue had no room for (and whether each is
    /// urgent); while any wait, the sessions keep the rest.
    /// Indexed by "urgent": each class blocks only itself.
    undelivered: [RefCell<VecDeque<Message>>; 2],
    pub stopping: Cell<bool>,
    /// Messages went to the application since its last wake-up.
    app_wake: Cell<bool>,
    /// ... and an urgent one among them.
    app_wake_urgent: Cell<bool>,
    /// A task retries held messages (see `watch_held`).
    held_watch: Cell<bool>,
    /// For the node's message handler, if it has one.
    handle: super::Handle,
    /// Messages for the handler, run once the session that made them is
    /// no longer borrowed (the handler may send on it).
    handled: RefCell<VecDeque<Message>>,
    /// The handler is running (its sends must not run it again).
    in_handler: Cell<bool>,
    /// Wakes connection tasks at shutdown.
    pub shutdown: super::conn::Notify,
    /// Per peer: bumped when its dial loops must end (a new address list, or
    /// the peer is gone for good).
    dial_epochs: RefCell<super::NameMap<u64>>,
    /// Peers given up on: messages still queued for them are reported as
    /// undelivered, until a new route dials them again.
    forgotten: RefCell<std::collections::HashSet<Arc<str>>>,
    /// Tunnels through this shard's connections to relays.
    pub tunnels: super::relay::Tunnels,
}

impl ShardState {
    pub fn next_path_id(&self) -> PathId {
        let id = self.next_path.get();
        self.next_path.set(id + 1);
        PathId(id)
    }

    /// The endpoint of `peer`, made on first use.
    pub fn endpoint(self: &Rc<Self>, peer: &Arc<str>) -> Rc<Endpoint> {
        if let Some(endpoint) = self.endpoints.borrow().get(peer) {
            return endpoint.clone();
        }
        let endpoint = Rc::new(Endpoint {
            peer: peer.clone(),
            small_name: super::SmolStr::new(&**peer),
            state: RefCell::new(EndpointState {
                session: Session::new(self.shared.config.stream.clone(), Instant::now()),
                incarnation: None,
                paths: HashMap::new(),
                pending: BTreeMap::new(),
                urgent: Vec::new(),
                unreachable_since: Some(Instant::now()),
                e2e: BTreeMap::new(),
            }),
            queued: RefCell::new(self.shared.shard_route(peer)),
            held: RefCell::new(VecDeque::new()),
            held_bytes: Cell::new(0),
            last_error: RefCell::new(None),
            timer: super::conn::Notify::default(),
            timer_running: Cell::new(true),
        });
        self.endpoints.borrow_mut().insert(peer.clone(), endpoint.clone());
        runtime::spawn(TaskClass::Throughput, timer_task(self.clone(), endpoint.clone()));
        endpoint
    }

    fn deliver(&self, message: Message, urgent: bool) {
        self.shared.shard_metrics[self.index].received(message.data.len());
        if self.shared.handler.get().is_some() {
            self.shared.counters.received.fetch_add(1, Ordering::Relaxed);
            self.handled.borrow_mut().push_back(message);
            return;
        }
        let mut undelivered = self.undelivered[usize::from(urgent)].borrow_mut();
        if !undelivered.is_empty() {
            undelivered.push_back(message);
            return;
        }
        match self.shared.deliver(message, urgent) {
            Ok(()) => {
                self.app_wake.set(true);
                if urgent {
                    self.app_wake_urgent.set(true);
                }
            }
            Err(message) => {
                undelivered.push_back(message);
                self.watch_held();
            }
        }
    }

    /// While messages are held for a full application queue, retries every
    /// millisecond: a safety net under the reader's flag check, which has no
    /// fence (a fence per received message cost ~10 % of mem 64 B), so a
    /// wake-up lost in that window costs at most this delay.
    fn watch_held(&self) {
        if self.held_watch.replace(true) {
            return;
        }
        runtime::spawn(TaskClass::Throughput, async {
            loop {
                glommio::timer::sleep(Duration::from_millis(1)).await;
                let Some(state) = local() else { return };
                if state.undelivered.iter().all(|u| u.borrow().is_empty()) || state.stopping.get() {
                    state.held_watch.set(false);
                    return;
                }
                retry_delivery();
            }
        });
    }

    /// Runs the node's handler on the messages waiting for it, unless it is
    /// running already further up this stack (that call takes them).
    pub fn run_handler(&self) {
        let Some(handler) = self.shared.handler.get() else {
            return;
        };
        if self.in_handler.replace(true) {
            return;
        }
        loop {
            let next = self.handled.borrow_mut().pop_front();
            let Some(message) = next else { break };
            handler(&self.handle, message);
        }
        self.in_handler.set(false);
    }

    /// Wakes the application if messages went to it since the last call:
    /// once per frame or job, not per message.
    ///
    /// After an urgent message, the shard gives up the rest of its time
    /// slice: the reader may share this core (asleep, or preempted by the
    /// shard), and a shard busy with bulk work would otherwise keep it
    /// waiting for the scheduler's slice to end (milliseconds: the
    /// frame-sync tail).
    pub fn wake_app(&self) {
        let urgent = self.app_wake_urgent.replace(false);
        if self.app_wake.replace(false) {
            // A sleeping reader may run as soon as it is woken (it preempts
            // the shard), and answer before the shard goes on. A reader that
            // is awake answers through the inbox's wake-up byte as usual:
            // the window costs two writes of a line submitters share.
            let sleeping = self.shared.inbox.has_sleepers();
            if sleeping {
                runtime::expect_submissions();
            }
            if self.shared.inbox.wake() || urgent {
                std::thread::yield_now();
            }
            if sleeping {
                runtime::run_submitted_soon();
            }
        }
    }

    /// Whether a peer's backlog of `left` bytes is low enough to wake a
    /// sender refused by `send_buffer`: an eighth of the buffer is free.
    /// Waking one for less makes it run (and, beside its shard on one
    /// core, preempt it) for a message or two at a time; waking it only at
    /// half cost unix 64 B a sixth of its throughput (perf/README item 18).
    fn wakes_refused(&self, left: usize) -> bool {
        let buffer = self.shared.config.send_buffer;
        left <= buffer - buffer / 8
    }

    /// The current dial epoch of `peer` (see `dial_epochs`).
    pub fn dial_epoch(&self, peer: &str) -> u64 {
        self.dial_epochs.borrow().get(peer).copied().unwrap_or(0)
    }

    /// The application queue is full: sessions keep their messages.
    fn app_blocked(&self, urgent: bool) -> bool {
        !self.undelivered[usize::from(urgent)].borrow().is_empty()
    }
}

/// Takes `len` bytes off a backlog counter, never below zero: a message
/// accepted under a route that was since replaced may be released against
/// the new route's counter.
fn release(counter: &std::sync::atomic::AtomicUsize, len: usize) -> usize {
    let before = counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(len)))
        .unwrap_or_else(|v| v);
    before.saturating_sub(len)
}

/// Write side of one connection, kept by its endpoint so that any task that
/// drives the session can encode frames for it.
pub(super) struct PathIo {
    /// Encoded frames not yet written (stream links), after `gathered`.
    pub out: BytesMut,
    /// Bytes to write before `out`: parts of frames and large payloads
    /// passed by reference (`Encoder::encode_gathered`), in order.
    pub gathered: VecDeque<Bytes>,
    /// Encoded frames not yet written, one datagram each (datagram links).
    pub datagrams: VecDeque<Bytes>,
    pub datagram: bool,
    /// The largest frame the path carries (its `PathConfig::mtu`): on a
    /// datagram link, the largest datagram.
    pub max_frame: usize,
    /// The link's writes start aligned (`Link::aligns_writes`): large
    /// payloads are placed in each write to match their sources.
    pub aligns: bool,
    /// Bytes buffered for one write before the session's data waits
    /// (`NodeConfig::write_batch`, or `tcp_write_batch` on TCP links).
    pub batch: usize,
    pub writer: Option<Waker>,
    /// Write what is buffered, then close.
    pub closing: bool,
    /// The connection is gone: the writer stops at once.
    pub dead: bool,
    /// Frames to encode for this path besides the session's (pings, pongs).
    pub control: Vec<FrameMessage>,
    /// The pair's latency path (urgent streams only).
    pub latency: bool,
    /// The head every frame carries (a tunnel through a relay).
    pub head: Option<crate::proto::MessageHead>,
    /// What went through this connection (see [`super::metrics::ConnSample`]).
    pub counts: super::metrics::ConnCounts,
}

impl PathIo {
    pub fn new(
        datagram: bool,
        max_frame: usize,
        aligns: bool,
        batch: usize,
        latency: bool,
        head: Option<crate::proto::MessageHead>,
    ) -> Self {
        Self {
            out: BytesMut::new(),
            gathered: VecDeque::new(),
            datagrams: VecDeque::new(),
            datagram,
            max_frame,
            aligns,
            batch,
            writer: None,
            closing: false,
            dead: false,
            control: Vec::new(),
            latency,
            head,
            counts: super::metrics::ConnCounts::default(),
        }
    }

    pub fn buffered(&self) -> usize {
        self.out.len()
            + self
                .gathered
                .iter()
                .chain(&self.datagrams)
                .map(Bytes::len)
                .sum::<usize>()
    }

    fn push_frame(&mut self, encoder: &Encoder, mut frame: FrameMessage) {
        if let Some(head) = &self.head {
            frame.head = Some(head.clone());
        }
        let result = encoder.encode(&frame, &mut self.out);
        self.encoded(result);
    }

    /// Encodes what the session has to send: stream packets straight from
    /// their fragments (one copy of each small payload; on stream links large
    /// ones go to the socket by reference), acknowledgements as frames.
    fn push_transmit(&mut self, encoder: &Encoder, transmit: Transmit) {
        match transmit {
            Transmit::Packet { packet, .. } => {
                let mut body = PacketFrame::new(self.head.as_ref(), &packet);
                if body.gathers() && self.aligns && !self.datagram {
                    // The writer takes everything buffered as one write.
                    body = body.aligned(self.buffered());
                }
                // Large payloads go to a stream socket by reference (a
                // gathering write) instead of a copy into the frame.
                let result = if !self.datagram && body.gathers() {
                    encoder.encode_gathered(&body, &mut self.out, &mut self.gathered)
                } else {
                    encoder.encode(&body, &mut self.out)
                };
                self.encoded(result);
            }
            ack @ Transmit::Ack { .. } => self.push_frame(encoder, ack.into_frame()),
        }
    }

    /// Counts a frame just appended to `out` (a datagram link takes it out
    /// as one datagram).
    fn encoded(&mut self, result: Result<usize, crate::frame::EncodeError>) {
        match result {
            Ok(n) => {
                self.counts.tx_frames += 1;
                self.counts.tx_bytes += n as u64;
                if self.datagram {
                    let datagram = self.out.split().freeze();
                    self.datagrams.push_back(datagram);
                }
            }
            // Only an oversized frame fails, and the session cuts by MTU.
            Err(e) => tracing::error!("cannot encode a frame: {e}"),
        }
    }

    /// Appends a frame encoded elsewhere (relays pass frames on as they
    /// are), and wakes the writer.
    pub fn push_encoded(&mut self, frame: &Bytes) {
        self.counts.tx_frames += 1;
        self.counts.tx_bytes += frame.len() as u64;
        if self.datagram {
            self.datagrams.push_back(frame.clone());
        } else {
            self.out.extend_from_slice(frame);
        }
        self.wake();
    }

    fn wake(&mut self) {
        if let Some(waker) = self.writer.take() {
            if self.latency {
                // Bulk tasks step aside at their next yield point.
                crate::runtime::latency_wanted();
            }
            waker.wake();
        }
    }
}

pub(super) struct EndpointState {
    pub session: Session,
    pub incarnation: Option<u64>,
    pub paths: HashMap<PathId, PathIo>,
    /// Messages from the cross-thread queue the session had no room for,
    /// per stream (a full stream holds back only itself).
    pending: BTreeMap<StreamId, VecDeque<(Bytes, bool)>>,
    urgent: Vec<StreamId>,
    /// Since when the peer has had no connection (`None`: connected).
    unreachable_since: Option<Instant>,
    /// End-to-end encrypted streams (see [`crate::tls`]).
    e2e: BTreeMap<StreamId, E2e>,
}

/// One end-to-end encrypted stream of an endpoint.
enum E2e {
    /// The TLS session, and ciphertext the session had no room for yet.
    Live(Box<crate::tls::E2eStream>, VecDeque<Bytes>),
    /// TLS failed: nothing more goes either way; why.
    Failed(String),
}

/// What became of a plaintext message handed to an endpoint.
enum Submitted {
    /// Taken (by the stream layer, or sealed and held as ciphertext).
    Taken,
    /// Dropped and to be reported: the stream's TLS failed.
    Refused(String),
}

impl EndpointState {
    /// Moves what the session has to send into the paths' write buffers
    /// (a path past its write batch is blocked until its writer catches up).
    fn transmit(&mut self, shard: &ShardState, now: Instant) {
        while let Some(transmit) = self.session.poll_transmit(now) {
            let id = transmit.path();
            let Some(path) = self.paths.get_mut(&id) else {
                continue;
            };
            path.push_transmit(&shard.encoder, transmit);
            if path.buffered() >= path.batch {
                self.session.set_path_blocked(id, true);
            }
        }
        for path in self.paths.values_mut() {
            if path.buffered() > 0 || path.closing {
                path.wake();
            }
        }
    }

    /// Hands one plaintext message to the session, sealing it first on an
    /// encrypted stream (one this node encrypts, or one the peer started
    /// encrypted). `WouldBlock` leaves the message with the caller.
    fn submit(
        &mut self,
        shard: &ShardState,
        peer: &str,
        stream_id: StreamId,
        data: Bytes,
    ) -> Result<Submitted, crate::stream::SendError> {
        let tls = shard.shared.config.tls.as_ref();
        let encrypted = self.e2e.contains_key(&stream_id)
            || tls.is_some_and(|t| t.encrypts(stream_id))
            || self.session.is_peer_encrypted(stream_id);
        if !encrypted {
            return self.session.send(stream_id, data).map(|()| Submitted::Taken);
        }
        let Some(tls) = tls else {
            return Ok(Submitted::Refused(
                "the peer encrypts this stream end to end and this node has no TLS configured".into(),
            ));
        };
        // Disconnected: plaintext waits as it is (the peer may come back as
        // a new process, which a TLS session sealed now could not reach).
        let full = matches!(self.e2e.get(&stream_id), Some(E2e::Live(stream, _)) if stream.is_full());
        if full || self.paths.is_empty() || !self.flush_cipher(stream_id) {
            return Err(crate::stream::SendError::WouldBlock {
                stream_id,
                window: self.session.config().send_window,
            });
        }
        let sealed = match self.e2e_stream(shard, tls, peer, stream_id) {
            Err(why) => return Ok(Submitted::Refused(why)),
            Ok(stream) => stream.seal(&data).map_err(|e| e.to_string()),
        };
        match sealed {
            Ok(cipher) => {
                self.queue_cipher(stream_id, cipher);
                Ok(Submitted::Taken)
            }
            Err(why) => {
                self.fail_e2e(shard, peer, stream_id, &why);
                Ok(Submitted::Refused(why))
            }
        }
    }

    /// The stream's TLS session, started (its first messages queued) when
    /// new; `Err` when it failed before.
    fn e2e_stream(
        &mut self,
        shard: &ShardState,
        tls: &crate::tls::TlsContext,
        peer: &str,
        stream_id: StreamId,
    ) -> Result<&mut crate::tls::E2eStream, String> {
        if !self.e2e.contains_key(&stream_id) {
            let (stream, first) =
                crate::tls::E2eStream::start(tls, &shard.shared.name, peer).map_err(|e| e.to_string())?;
            self.session.set_stream_encrypted(stream_id);
            self.e2e.insert(stream_id, E2e::Live(Box::new(stream), VecDeque::new()));
            self.queue_cipher(stream_id, first);
        }
        match self.e2e.get_mut(&stream_id) {
            Some(E2e::Live(stream, _)) => Ok(stream),
            Some(E2e::Failed(why)) => Err(why.clone()),
            None => Err("no TLS session".into()),
        }
    }

    /// Encrypts every stream's batch of sealed messages and hands the
    /// ciphertext to the session.
    fn flush_e2e(&mut self, shard: &ShardState, peer: &str) {
        if self.paths.is_empty() {
            return;
        }
        let ids: Vec<StreamId> = self.e2e.keys().copied().collect();
        for id in ids {
            let flushed = match self.e2e.get_mut(&id) {
                Some(E2e::Live(stream, _)) if stream.has_batch() => stream.flush().map_err(|e| e.to_string()),
                _ => Ok(Vec::new()),
            };
            match flushed {
                Ok(cipher) => self.queue_cipher(id, cipher),
                Err(why) => self.fail_e2e(shard, peer, id, &why),
            }
        }
    }

    /// Queues ciphertext behind what the session could not take yet.
    fn queue_cipher(&mut self, stream_id: StreamId, cipher: Vec<Bytes>) {
        if let Some(E2e::Live(_, backlog)) = self.e2e.get_mut(&stream_id) {
            backlog.extend(cipher);
        }
        self.flush_cipher(stream_id);
    }

    /// Moves held ciphertext into the session; whether none is left.
    fn flush_cipher(&mut self, stream_id: StreamId) -> bool {
        let Some(E2e::Live(_, backlog)) = self.e2e.get_mut(&stream_id) else {
            return true;
        };
        while let Some(chunk) = backlog.front() {
            if self.session.send(stream_id, chunk.clone()).is_err() {
                return false;
            }
            backlog.pop_front();
        }
        true
    }

    /// Takes one message of TLS bytes from the peer; returns the plaintext
    /// messages it completed.
    fn open(&mut self, shard: &ShardState, peer: &str, stream_id: StreamId, data: &[u8]) -> Vec<Bytes> {
        let Some(tls) = shard.shared.config.tls.as_ref() else {
            if let std::collections::btree_map::Entry::Vacant(entry) = self.e2e.entry(stream_id) {
                let why = "the peer encrypts this stream end to end and this node has no TLS configured";
                tracing::warn!(peer, stream_id, "{why}: its messages are dropped");
                shard.shared.counters.e2e_failures.fetch_add(1, Ordering::Relaxed);
                entry.insert(E2e::Failed(why.into()));
            }
            return Vec::new();
        };
        let opened = match self.e2e_stream(shard, tls, peer, stream_id) {
            Ok(stream) => stream.open(data).map_err(|e| e.to_string()),
            Err(_) => return Vec::new(),
        };
        match opened {
            Ok((plain, reply)) => {
                self.queue_cipher(stream_id, reply);
                plain
            }
            Err(why) => {
                self.fail_e2e(shard, peer, stream_id, &why);
                Vec::new()
            }
        }
    }

    /// Ends a stream's TLS session for good, reporting what was sealed on
    /// it as possibly undelivered.
    fn fail_e2e(&mut self, shard: &ShardState, peer: &str, stream_id: StreamId, why: &str) {
        tracing::warn!(peer, stream_id, "end-to-end TLS failed: {why}");
        shard.shared.counters.e2e_failures.fetch_add(1, Ordering::Relaxed);
        let previous = self.e2e.insert(stream_id, E2e::Failed(why.to_string()));
        if let Some(E2e::Live(stream, _)) = previous
            && stream.sealed.0 > 0
        {
            shard.shared.report_undelivered(super::Undelivered {
                to: Arc::from(peer),
                stream_id,
                messages: stream.sealed.0,
                bytes: stream.sealed.1,
                reason: format!("end-to-end TLS failed (some may have been delivered before): {why}"),
            });
        }
    }
}

/// One remote node.
pub(super) struct Endpoint {
    pub peer: Arc<str>,
    /// `peer` as [`Message::from`] carries it.
    small_name: super::SmolStr,
    pub state: RefCell<EndpointState>,
    /// Bytes sent to this peer from other threads, not yet in the session.
    /// The route's byte counter (replaced when the route is made again).
    queued: RefCell<super::Backlog>,
    /// Relay: frames for this peer that wait for a connection to it, and
    /// their bytes.
    pub held: RefCell<VecDeque<Bytes>>,
    pub held_bytes: Cell<usize>,
    /// Why the last attempt to connect failed (told when messages are
    /// given up on).
    pub last_error: RefCell<Option<String>>,
    timer: super::conn::Notify,
    timer_running: Cell<bool>,
}

impl Endpoint {
    /// Adds a connection as a path of this endpoint's session.
    pub fn add_path(
        self: &Rc<Self>,
        shard: &Rc<ShardState>,
        id: PathId,
        config: PathConfig,
        io: PathIo,
        incarnation: u64,
    ) {
        let mut st = self.state.borrow_mut();
        if st.incarnation.is_some_and(|known| known != incarnation) {
            tracing::info!(peer = %self.peer, "peer restarted: resending unacknowledged data from the start");
            st.session.peer_restarted();
            // An encrypted stream's retained bytes belong to a TLS session
            // the new process does not have: drop them (reported) and let
            // the next message start a new session.
            let encrypted: Vec<StreamId> = st.e2e.keys().copied().collect();
            for stream_id in encrypted {
                let (chunks, bytes) = st.session.abandon_stream(stream_id);
                // Messages not encrypted yet go again, first, on the new
                // session.
                if let Some(E2e::Live(mut stream, _)) = st.e2e.remove(&stream_id) {
                    let again = stream.take_batch();
                    if !again.is_empty() {
                        let queue = st.pending.entry(stream_id).or_default();
                        for data in again.into_iter().rev() {
                            queue.push_front((data, false));
                        }
                    }
                }
                if chunks > 0 {
                    shard.shared.report_undelivered(super::Undelivered {
                        to: self.peer.clone(),
                        stream_id,
                        messages: chunks,
                        bytes,
                        reason: "the peer restarted during an end-to-end encrypted stream; unacknowledged \
                                 encrypted chunks (each one or more messages) were dropped"
                            .into(),
                    });
                }
            }
        }
        st.incarnation = Some(incarnation);
        st.session.add_path(id, config);
        st.paths.insert(id, io);
        st.unreachable_since = None;
        drop(st);
        if !self.timer_running.replace(true) {
            runtime::spawn(TaskClass::Throughput, timer_task(shard.clone(), self.clone()));
        }
    }

    /// Removes a dead connection: its unacknowledged data goes to the others.
    pub fn remove_path(&self, id: PathId) {
        let mut st = self.state.borrow_mut();
        st.session.remove_path(id);
        if let Some(mut path) = st.paths.remove(&id) {
            path.dead = true;
            path.wake();
        }
        if st.paths.is_empty() && st.unreachable_since.is_none() {
            st.unreachable_since = Some(Instant::now());
        }
    }

    pub fn has_paths(&self) -> bool {
        !self.state.borrow().paths.is_empty()
    }

    /// Queues a control frame (ping / pong) on a path.
    pub fn push_control(&self, id: PathId, frame: FrameMessage) {
        if let Some(path) = self.state.borrow_mut().paths.get_mut(&id) {
            path.control.push(frame);
        }
    }

    /// Runs the session after input: timers, transmits into the paths' write
    /// buffers, events to the application.
    pub fn drive(&self, shard: &ShardState) {
        let now = Instant::now();
        let mut writable = false;
        let mut refused: Vec<(StreamId, usize, String)> = Vec::new();
        {
            let mut st = self.state.borrow_mut();
            let st = &mut *st;
            if st.session.poll_timeout().is_some_and(|t| t <= now) {
                st.session.handle_timeout(now);
            }

            if !st.pending.is_empty() {
                // Urgent streams first, then the others in id order.
                let mut streams: Vec<StreamId> = st.pending.keys().copied().collect();
                streams.sort_by_key(|id| !st.urgent.contains(id));
                for stream_id in streams {
                    let Some(queue) = st.pending.get_mut(&stream_id) else {
                        continue;
                    };
                    let mut queue = std::mem::take(queue);
                    while let Some((data, urgent)) = queue.front() {
                        let (len, urgent) = (data.len(), *urgent);
                        match st.submit(shard, &self.peer, stream_id, data.clone()) {
                            Err(_) => break,
                            Ok(Submitted::Taken) => {}
                            Ok(Submitted::Refused(why)) => refused.push((stream_id, len, why)),
                        }
                        queue.pop_front();
                        let left = release(&self.queued.borrow()[usize::from(urgent)], len);
                        writable |= shard.wakes_refused(left);
                    }
                    if queue.is_empty() {
                        st.pending.remove(&stream_id);
                    } else {
                        st.pending.insert(stream_id, queue);
                    }
                }
            }
            for path in st.paths.values_mut() {
                for frame in std::mem::take(&mut path.control) {
                    path.push_frame(&shard.encoder, frame);
                }
            }
            if !st.e2e.is_empty() {
                st.flush_e2e(shard, &self.peer);
            }
            st.transmit(shard, now);
            let mut e2e_output = false;
            loop {
                // Urgent messages pass while the ordinary queue is full.
                let urgent = (!shard.app_blocked(true))
                    .then(|| st.session.poll_urgent_event())
                    .flatten();
                // A full application queue leaves messages in the session,
                // counted against its receive window: the peer slows down.
                if urgent.is_none()
                    && let Some(Event::Message { stream_id, .. }) = st.session.peek_event()
                    && shard.app_blocked(st.session.is_peer_urgent(*stream_id))
                {
                    break;
                }
                let Some(event) = urgent.or_else(|| st.session.poll_event()) else {
                    break;
                };
                match event {
                    Event::Message { stream_id, data } => {
                        let urgent = st.session.is_peer_urgent(stream_id);
                        if st.session.is_peer_encrypted(stream_id) {
                            for data in st.open(shard, &self.peer, stream_id, &data) {
                                let message = Message {
                                    from: self.small_name.clone(),
                                    stream_id,
                                    data,
                                };
                                shard.deliver(message, urgent);
                            }
                            // Handshake replies went into the session.
                            e2e_output = true;
                            continue;
                        }
                        let message = Message {
                            from: self.small_name.clone(),
                            stream_id,
                            data,
                        };
                        shard.deliver(message, urgent);
                    }
                    // Room in the stream's window reaches a refused sender
                    // only once the messages held for the stream went in
                    // (they are the backlog it was refused for) and the
                    // backlog is down as far as its releases above wake at.
                    // (Waking on every acknowledgement woke it for a
                    // message or two of room.)
                    Event::Writable { stream_id } => {
                        let class = usize::from(st.urgent.contains(&stream_id));
                        writable |= !st.pending.contains_key(&stream_id)
                            && shard.wakes_refused(self.queued.borrow()[class].load(Ordering::Acquire));
                    }
                    Event::PathClosed { path, reason } => {
                        tracing::info!(peer = %self.peer, ?path, ?reason, "peer closed the connection");
                        if let Some(path) = st.paths.get_mut(&path) {
                            path.closing = true;
                            path.wake();
                        }
                    }
                    Event::Finished { .. } | Event::SendFinished { .. } => {}
                }
            }
            if e2e_output {
                // A handshake that just finished releases the batches.
                st.flush_e2e(shard, &self.peer);
                st.transmit(shard, now);
            }
        }
        for (stream_id, bytes, reason) in refused {
            shard.shared.report_undelivered(super::Undelivered {
                to: self.peer.clone(),
                stream_id,
                messages: 1,
                bytes: bytes as u64,
                reason,
            });
        }
        shard.wake_app();
        if writable {
            shard.shared.notify_writable();
        }
        self.timer.notify();
        shard.run_handler();
    }

    /// Queues a message; `WouldBlock` when the stream window is full.
    fn send(
        &self,
        shard: &ShardState,
        stream_id: StreamId,
        data: Bytes,
        urgent: bool,
    ) -> Result<(), crate::stream::SendError> {
        let mut st = self.state.borrow_mut();
        if urgent && !st.urgent.contains(&stream_id) {
            st.urgent.push(stream_id);
            st.session.set_stream_urgent(stream_id, true);
        }
        if st.pending.contains_key(&stream_id) {
            return Err(crate::stream::SendError::WouldBlock {
                stream_id,
                window: st.session.config().send_window,
            });
        }
        let len = data.len();
        match st.submit(shard, &self.peer, stream_id, data)? {
            Submitted::Taken => Ok(()),
            Submitted::Refused(reason) => {
                drop(st);
                shard.shared.report_undelivered(super::Undelivered {
                    to: self.peer.clone(),
                    stream_id,
                    messages: 1,
                    bytes: len as u64,
                    reason,
                });
                Ok(())
            }
        }
    }

    /// Closes every path with `reason` (a FINISH_CONNECTION goes out first).
    pub fn close_all(&self, reason: crate::proto::CloseReasonData) {
        let mut st = self.state.borrow_mut();
        let ids: Vec<PathId> = st.paths.keys().copied().collect();
        for id in ids {
            st.session.close_path(id, reason.clone());
            if let Some(path) = st.paths.get_mut(&id) {
                path.closing = true;
            }
        }
    }
}

/// Runs the endpoint's session timers.
/// Runs the endpoint's session timers, and gives up on what it holds for a
/// peer that had no connection for [`super::NodeConfig::peer_give_up`]
/// (reported as undelivered; dialling goes on). Ends with the shard, or
/// when the endpoint is dropped (peer forgotten).
async fn timer_task(shard: Rc<ShardState>, endpoint: Rc<Endpoint>) {
    let give_up = shard.shared.config.peer_give_up;
    loop {
        let current = shard
            .endpoints
            .borrow()
            .get(&endpoint.peer)
            .is_some_and(|e| Rc::ptr_eq(e, &endpoint));
        if shard.stopping.get() || !current {
            break;
        }
        let stale = {
            let st = endpoint.state.borrow();
            st.unreachable_since.is_some_and(|since| since.elapsed() >= give_up)
                && (!st.session.is_drained() || !st.pending.is_empty())
        };
        if stale {
            let reason = match endpoint.last_error.borrow().as_deref() {
                Some(last) => format!("no connection to {:?} for {give_up:?} (last: {last})", endpoint.peer),
                None => format!("no connection to {:?} for {give_up:?}", endpoint.peer),
            };
            abandon(&shard, &endpoint, &reason);
            endpoint.state.borrow_mut().unreachable_since = Some(Instant::now());
            shard.shared.notify_writable();
        }
        let deadline = endpoint.state.borrow().session.poll_timeout();
        let idle = Duration::from_secs(1).min(give_up);
        let wait = deadline.map_or(idle, |d| d.saturating_duration_since(Instant::now()).min(idle));
        if !wait.is_zero() {
            futures_lite::future::or(glommio::timer::sleep(wait), endpoint.timer.notified()).await;
        }
        if deadline.is_some_and(|d| d <= Instant::now()) {
            endpoint.drive(&shard);
        }
    }
}

/// Sets up the node on the current shard and binds its listeners here.
pub(super) fn install(
    shared: Arc<Shared>,
    index: usize,
    tcp_ports: Option<Vec<Address>>,
) -> Result<Vec<Address>, NodeError> {
    let state = Rc::new(ShardState {
        handle: super::Handle { shared: shared.clone() },
        handled: RefCell::new(VecDeque::new()),
        in_handler: Cell::new(false),
        encoder: Encoder::new(shared.config.frame.clone()),
        shared,
        index,
        endpoints: RefCell::new(super::name_map()),
        next_path: Cell::new(1),
        undelivered: [RefCell::new(VecDeque::new()), RefCell::new(VecDeque::new())],
        stopping: Cell::new(false),
        app_wake: Cell::new(false),
        app_wake_urgent: Cell::new(false),
        held_watch: Cell::new(false),
        shutdown: super::conn::Notify::default(),
        dial_epochs: RefCell::new(super::name_map()),
        forgotten: RefCell::new(std::collections::HashSet::new()),
        tunnels: super::relay::Tunnels::default(),
    });
    LOCAL.with(|l| *l.borrow_mut() = Some(state.clone()));
    // Shard 0 binds every listen address; the other shards bind the TCP
    // ones again (SO_REUSEPORT: the kernel spreads connections), on the
    // ports shard 0 got. Unix and UDP listeners stay on shard 0.
    let config = &state.shared.config;
    let entries: Vec<(Address, bool)> = config
        .listen
        .iter()
        .map(|a| (a.clone(), false))
        .chain(config.anonymous_listen.iter().map(|a| (a.clone(), true)))
        .filter(|(a, _)| !matches!(a, Address::Mem(_)))
        .collect();
    let addresses: Vec<(Address, bool)> = match &tcp_ports {
        None => entries,
        // Same order as shard 0 bound them.
        Some(bound) => bound
            .iter()
            .zip(entries.iter().map(|(_, anonymous)| *anonymous))
            .filter(|(a, _)| matches!(a, Address::Tcp { .. }))
            .map(|(a, anonymous)| (a.clone(), anonymous))
            .collect(),
    };
    let mut bound = Vec::new();
    for (address, anonymous) in addresses {
        let quic = config.tls.as_ref().map(crate::tls::TlsContext::quic_server);
        let listener = crate::transport::Listener::bind(&address, quic).map_err(|e| NodeError::Listen {
            address: address.clone(),
            reason: e.to_string(),
        })?;
        let local = listener.local_address(&address);
        bound.push(local.clone());
        runtime::spawn(
            TaskClass::Throughput,
            super::conn::listen(state.clone(), listener, local, anonymous),
        );
    }
    Ok(bound)
}

/// Dials `peer` from this shard at the first of `addresses` that answers,
/// and keeps redialling; with [`super::NodeConfig::latency_path`], a second
/// connection for urgent streams. `replace`: the loops dialling it so far end
/// (their connections stay until they drop).
///
/// `backlog`: the byte counter of the route this dial serves; an endpoint
/// kept from an earlier route of the same name takes it over.
pub(super) fn dial(peer: Arc<str>, addresses: Vec<Address>, replace: bool, backlog: Option<super::Backlog>) {
    let Some(state) = local() else {
        return;
    };
    if addresses.is_empty() {
        return;
    }
    if let Some(backlog) = backlog
        && let Some(endpoint) = state.endpoints.borrow().get(&peer)
    {
        *endpoint.queued.borrow_mut() = backlog;
    }
    state.forgotten.borrow_mut().remove(&peer);
    if replace {
        *state.dial_epochs.borrow_mut().entry(peer.clone()).or_default() += 1;
    }
    let epoch = state.dial_epoch(&peer);
    let addresses: Rc<[Address]> = addresses.into();
    // An anonymous dialer's second connection would be a second stranger.
    if state.shared.config.latency_path && !state.shared.config.auth.anonymous {
        let (state, peer, addresses) = (state.clone(), peer.clone(), addresses.clone());
        runtime::spawn(
            TaskClass::Throughput,
            super::conn::dial_loop(state, peer, addresses, epoch, true),
        );
    }
    runtime::spawn(
        TaskClass::Throughput,
        super::conn::dial_loop(state, peer, addresses, epoch, false),
    );
}

/// Gives up on `peer` (gone for good): its dial loops end, its connections
/// close, and every message accepted for it and not acknowledged is reported
/// to the application as undelivered.
pub(super) fn forget(peer: Arc<str>, reason: String) {
    let Some(state) = local() else {
        return;
    };
    *state.dial_epochs.borrow_mut().entry(peer.clone()).or_default() += 1;
    state.forgotten.borrow_mut().insert(peer.clone());
    // The endpoint stays (its stream offsets go on), so that reaching the
    // same peer again later cannot mix old and new data.
    let Some(endpoint) = state.endpoints.borrow().get(&peer).cloned() else {
        return;
    };
    abandon(&state, &endpoint, &reason);
    endpoint.close_all(crate::proto::CloseReasonData {
        code: crate::proto::AtbusCloseReason::Shutdown as i32,
        message: reason,
    });
    endpoint.drive(&state);
    state.shared.notify_writable();
}

/// Takes over a connection another shard accepted for a peer homed here.
pub(super) fn adopt(handoff: crate::transport::Handoff, peer: super::conn::Peer, leftover: Bytes, origin: String) {
    let Some(state) = local() else {
        return;
    };
    runtime::spawn(TaskClass::Throughput, async move {
        match handoff.adopt().await {
            Ok(connected) => super::conn::adopted(state, connected, peer, leftover, origin).await,
            Err(e) => tracing::warn!("cannot adopt connection {origin}: {e}"),
        }
    });
}

/// Direct send when the caller runs on the peer's home shard.
pub(super) fn send_local(
    shared: &Arc<Shared>,
    home: usize,
    to: &Arc<str>,
    stream_id: StreamId,
    data: &Bytes,
    urgent: bool,
) -> Option<Result<(), SendError>> {
    let state = local().filter(|s| Arc::ptr_eq(&s.shared, shared) && s.index == home)?;
    let endpoint = state.endpoint(to);
    let result = endpoint
        .send(&state, stream_id, data.clone(), urgent)
        .map_err(|e| match e {
            crate::stream::SendError::WouldBlock { .. } => SendError::WouldBlock {
                peer: to.to_string(),
                queue: "stream send_window",
            },
            source => SendError::Stream {
                peer: to.to_string(),
                source,
            },
        });
    if result.is_ok() {
        state.shared.shard_metrics[state.index].sent(data.len());
        endpoint.drive(&state);
    }
    Some(result)
}

/// Why this shard's part of the node is not safe to delete (see
/// [`super::Node::unsafe_to_delete`]).
pub(super) fn busy_reasons() -> Vec<String> {
    let Some(state) = local() else {
        return Vec::new();
    };
    let mut reasons = Vec::new();
    let queued = state.shared.send_queues[state.index].len() + state.shared.urgent_queues[state.index].len();
    if queued > 0 {
        reasons.push(format!("shard {}: {queued} message(s) not yet taken", state.index));
    }
    for endpoint in state.endpoints.borrow().values() {
        let st = endpoint.state.borrow();
        if !st.session.is_drained() || !st.pending.is_empty() {
            reasons.push(format!("{}: data not acknowledged yet", endpoint.peer));
        }
    }
    reasons
}

/// Bulk messages moved between two looks at the urgent queue.
const URGENT_CHECK: usize = 32;

/// Moves messages from the cross-thread queues into their sessions: urgent
/// ones first, and sent on at once; then bulk ones, looking at the urgent
/// queue every few messages. (A budget per job, yielding to the
/// connections' tasks, cost 15 % of tcp 64 B throughput and gained nothing
/// measurable for the latency class under bulk: not kept.)
pub(super) fn drain_send_queue() {
    let Some(state) = local() else {
        return;
    };
    // Cleared before popping: a message pushed after the last pop schedules
    // another drain.
    state.shared.drain_scheduled[state.index].store(false, Ordering::Release);
    let mut drain = Drain::new(&state);
    let urgent = &state.shared.urgent_queues[state.index];
    let bulk = &state.shared.send_queues[state.index];
    // A sender refused by a full queue looks again once it is half empty.
    let crowded = |q: &crossbeam_queue::ArrayQueue<super::Outgoing>| q.len() * 2 >= q.capacity();
    drain.freed = crowded(urgent) || crowded(bulk);
    loop {
        if !urgent.is_empty() {
            // Out now, ahead of the bulk moved so far.
            let before = std::mem::take(&mut drain.touched);
            drain.last = None;
            while let Some(outgoing) = urgent.pop() {
                drain.take(outgoing);
            }
            drain.freed |= Drain::drive(std::mem::replace(&mut drain.touched, before), &state);
            drain.last = None;
        }
        let mut batch = 0;
        while batch < URGENT_CHECK {
            let Some(outgoing) = bulk.pop() else { break };
            drain.take(outgoing);
            batch += 1;
        }
        if batch < URGENT_CHECK && urgent.is_empty() {
            break;
        }
    }
    let Drain {
        touched,
        dropped,
        mut freed,
        ..
    } = drain;
    freed |= Drain::drive(touched, &state);
    let left = !bulk.is_empty() || !urgent.is_empty();
    if left && !state.shared.drain_scheduled[state.index].swap(true, Ordering::AcqRel) {
        state.shared.shards[state.index].submit(drain_send_queue);
    }
    report_dropped(&state, dropped);
    if freed {
        state.shared.notify_writable();
    }
}

/// Moves everything queued for this shard into sessions, without a budget
/// (the node is stopping).
fn drain_all(state: &Rc<ShardState>) {
    let mut drain = Drain::new(state);
    for queue in [
        &state.shared.urgent_queues[state.index],
        &state.shared.send_queues[state.index],
    ] {
        while let Some(outgoing) = queue.pop() {
            drain.take(outgoing);
        }
    }
    for (endpoint, released) in &drain.touched {
        let _ = Drain::release(endpoint, *released, state);
    }
    report_dropped(state, drain.dropped);
}

/// Reports messages a drain dropped for peers gone for good.
fn report_dropped(state: &ShardState, dropped: BTreeMap<(Arc<str>, StreamId), (u64, u64)>) {
    for ((to, stream_id), (messages, bytes)) in dropped {
        state.shared.report_undelivered(super::Undelivered {
            to,
            stream_id,
            messages,
            bytes,
            reason: "the peer is gone for good (its route was dropped)".into(),
        });
    }
}

/// One drain job's bookkeeping.
struct Drain<'a> {
    state: &'a Rc<ShardState>,
    /// Endpoints given messages, to drive once, with the bytes (ordinary,
    /// urgent) their sessions took: released from the senders' backlog
    /// counters once per drain, not per message (each release is a write to
    /// a line the sending thread writes too).
    touched: Vec<(Rc<Endpoint>, [usize; 2])>,
    /// The last message's peer name (the route's own `Arc`, shared by all
    /// its messages) and its place in `touched`: a burst to one peer looks
    /// its endpoint up once, not by name per message.
    last: Option<(Arc<str>, usize)>,
    /// Messages for peers gone for good, per stream.
    dropped: BTreeMap<(Arc<str>, StreamId), (u64, u64)>,
    any_forgotten: bool,
    freed: bool,
}

impl<'a> Drain<'a> {
    fn new(state: &'a Rc<ShardState>) -> Self {
        Self {
            state,
            touched: Vec::new(),
            last: None,
            dropped: BTreeMap::new(),
            any_forgotten: !state.forgotten.borrow().is_empty(),
            freed: false,
        }
    }

    /// Hands one message to its endpoint's session (or holds it there).
    fn take(&mut self, outgoing: super::Outgoing) {
        let state = self.state;
        let len = outgoing.data.len();
        if self.any_forgotten && state.forgotten.borrow().contains(&outgoing.to) {
            self.freed = true;
            let entry = self
                .dropped
                .entry((outgoing.to.clone(), outgoing.stream_id))
                .or_default();
            entry.0 += 1;
            // Its byte counter went with the dropped route.
            entry.1 += len as u64;
            return;
        }
        let slot = match &self.last {
            Some((to, slot)) if Arc::ptr_eq(to, &outgoing.to) => *slot,
            _ => {
                let endpoint = state.endpoint(&outgoing.to);
                let slot = match self.touched.iter().position(|(t, _)| Rc::ptr_eq(t, &endpoint)) {
                    Some(slot) => slot,
                    None => {
                        self.touched.push((endpoint, [0; 2]));
                        self.touched.len() - 1
                    }
                };
                self.last = Some((outgoing.to.clone(), slot));
                slot
            }
        };
        let endpoint = &self.touched[slot].0;
        let metrics = &state.shared.shard_metrics[state.index];
        let (class, urgent) = (outgoing.class, outgoing.class == 1);
        let taken = match endpoint.send(state, outgoing.stream_id, outgoing.data.clone(), urgent) {
            Ok(()) => {
                metrics.sent(len);
                len
            }
            Err(crate::stream::SendError::WouldBlock { .. }) => {
                metrics.sent(len);
                // Accepted already: held until the window opens (still
                // counted in `queued`, which bounds it).
                endpoint
                    .state
                    .borrow_mut()
                    .pending
                    .entry(outgoing.stream_id)
                    .or_default()
                    .push_back((outgoing.data, urgent));
                0
            }
            Err(e) => {
                tracing::warn!(peer = %outgoing.to, "message refused by the stream layer: {e}");
                len
            }
        };
        self.touched[slot].1[class] += taken;
    }

    /// Releases what the sessions took and runs each touched endpoint once.
    /// Whether a sender refused by `send_buffer` should look again.
    fn drive(touched: Vec<(Rc<Endpoint>, [usize; 2])>, state: &ShardState) -> bool {
        let mut freed = false;
        for (endpoint, released) in touched {
            freed |= Self::release(&endpoint, released, state);
            endpoint.drive(state);
        }
        freed
    }

    /// Whether a counter fell low enough to wake a refused sender
    /// (`ShardState::wakes_refused`).
    fn release(endpoint: &Endpoint, released: [usize; 2], state: &ShardState) -> bool {
        let mut freed = false;
        for (class, len) in released.into_iter().enumerate() {
            if len > 0 {
                let left = release(&endpoint.queued.borrow()[class], len);
                freed |= state.wakes_refused(left);
            }
        }
        freed
    }
}

/// The application made room: hand over held messages, then let sessions
/// deliver again.
pub(super) fn retry_delivery() {
    let Some(state) = local() else {
        return;
    };
    for urgent in [true, false] {
        let mut undelivered = state.undelivered[usize::from(urgent)].borrow_mut();
        while let Some(message) = undelivered.pop_front() {
            if let Err(message) = state.shared.deliver(message, urgent) {
                undelivered.push_front(message);
                break;
            }
            state.app_wake.set(true);
        }
    }
    state.wake_app();
    let endpoints: Vec<Rc<Endpoint>> = state.endpoints.borrow().values().cloned().collect();
    for endpoint in endpoints {
        endpoint.drive(&state);
    }
}

/// A message from a same-process peer, for this node's handler.
pub(super) fn handle_mem(message: Message) {
    let Some(state) = local() else {
        return;
    };
    state.deliver(message, false);
    state.run_handler();
}

/// Every connection of this shard, with its counters (the stats sampler).
pub(super) fn connection_samples() -> Vec<super::metrics::ConnSample> {
    let Some(state) = local() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for endpoint in state.endpoints.borrow().values() {
        let st = endpoint.state.borrow();
        for (id, path) in &st.paths {
            let stats = st.session.path_stats(*id);
            let mut counts = path.counts;
            if let Some(stats) = &stats {
                counts.packets = stats.sent_packets;
                counts.fragments = stats.sent_fragments;
                counts.lost = stats.lost_packets;
            }
            out.push(super::metrics::ConnSample {
                peer: endpoint.peer.to_string(),
                connection: id.0,
                shard: state.index,
                counts,
                smoothed_rtt_ms: stats.and_then(|s| s.smoothed_rtt).map(|d| d.as_secs_f64() * 1000.0),
            });
        }
    }
    out
}

pub(super) fn connected_peers() -> Vec<String> {
    let Some(state) = local() else {
        return Vec::new();
    };
    state
        .endpoints
        .borrow()
        .values()
        .filter(|e| e.has_paths())
        .map(|e| e.peer.to_string())
        .collect()
}

/// Graceful stop on this shard: close every connection with SHUTDOWN after
/// flushing, wait up to `linger`, then report.
pub(super) fn shutdown(linger: Duration, done: crossbeam_channel::Sender<()>) {
    let Some(state) = local() else {
        let _ = done.send(());
        return;
    };
    runtime::spawn(TaskClass::Throughput, async move {
        let deadline = Instant::now() + linger;
        // Let queued data drain first, also to peers still being dialled
        // (what is left after `linger` is reported as undelivered).
        loop {
            let endpoints: Vec<Rc<Endpoint>> = state.endpoints.borrow().values().cloned().collect();
            let inbox_empty =
                state.shared.send_queues[state.index].is_empty() && state.shared.urgent_queues[state.index].is_empty();
            let busy = !inbox_empty
                || endpoints.iter().any(|e| {
                    let st = e.state.borrow();
                    !st.session.is_drained() || !st.pending.is_empty()
                });
            if !busy || Instant::now() >= deadline {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        // Messages still queued go into their sessions, to be reported below.
        drain_all(&state);
        let reason = crate::proto::CloseReasonData {
            code: crate::proto::AtbusCloseReason::Shutdown as i32,
            message: "node stopping".into(),
        };
        let endpoints: Vec<Rc<Endpoint>> = state.endpoints.borrow().values().cloned().collect();
        for endpoint in &endpoints {
            endpoint.close_all(reason.clone());
            endpoint.drive(&state);
        }
        // Give the writers a moment to send the close packets.
        let close_deadline = Instant::now() + Duration::from_millis(100).min(linger);
        while endpoints.iter().any(|e| e.has_paths()) && Instant::now() < close_deadline {
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
        super::relay::close_all(&state);
        // Whatever the peers did not acknowledge within the linger is lost:
        // say so.
        for endpoint in &endpoints {
            abandon(&state, endpoint, "the node stopped before the peer acknowledged it");
        }
        state.stopping.set(true);
        state.shutdown.notify();
        LOCAL.with(|l| *l.borrow_mut() = None);
        let _ = done.send(());
    });
}

/// Drops what `endpoint` still holds for its peer (not acknowledged, or not
/// yet taken by the session) and reports it per stream as undelivered.
fn abandon(state: &ShardState, endpoint: &Endpoint, reason: &str) {
    let mut dropped: BTreeMap<StreamId, (u64, u64)> = BTreeMap::new();
    {
        let mut st = endpoint.state.borrow_mut();
        for (stream_id, messages, bytes) in st.session.abandon() {
            let entry = dropped.entry(stream_id).or_default();
            entry.0 += messages;
            entry.1 += bytes;
        }
        for (stream_id, held) in std::mem::take(&mut st.pending) {
            let entry = dropped.entry(stream_id).or_default();
            for (data, urgent) in held {
                entry.0 += 1;
                entry.1 += data.len() as u64;
                let _ = release(&endpoint.queued.borrow()[usize::from(urgent)], data.len());
            }
        }
    }
    for (stream_id, (messages, bytes)) in dropped {
        state.shared.report_undelivered(super::Undelivered {
            to: endpoint.peer.clone(),
            stream_id,
            messages,
            bytes,
            reason: reason.to_string(),
        });
    }
}

/// A ping frame carrying `now` (µs since `epoch`).
pub(super) fn ping_frame(epoch: Instant, pong: bool, echo: Option<i64>) -> FrameMessage {
    let timepoint = echo.unwrap_or_else(|| i64::try_from(epoch.elapsed().as_micros()).unwrap_or(i64::MAX));
    let data = PingData {
        timepoint_microseconds: timepoint,
    };
    FrameMessage {
        head: None,
        body: Some(if pong { Body::Pong(data) } else { Body::Ping(data) }),
    }
}

pub(super) fn is_stopping(state: &ShardState) -> bool {
    state.stopping.get() || state.shared.stopping.load(Ordering::Acquire) && state.shutdown.is_set()
}
