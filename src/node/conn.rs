//! Connections: listening, dialling with backoff, the handshake, and the
//! reader / writer tasks that move frames between a [`Link`] and its
//! endpoint's session.
//!
//! Lifecycle of one connection:
//! 1. both sides send `handshake_data` at once (datagram links resend it
//!    every 200 ms until the peer's arrives);
//! 2. the peer's name picks the endpoint; a connection that landed on a
//!    shard other than the peer's home is handed to it (the socket moves
//!    once, before any stream data);
//! 3. the connection becomes a path of the endpoint's session: the reader
//!    feeds frames in, the writer writes what the session produced, batched;
//! 4. it ends on EOF or error (unacknowledged data goes to the other paths),
//!    on too many bad frames (BAD_FRAME), on silence (IDLE_TIMEOUT), or on
//!    a graceful close (the peer's FINISH_CONNECTION, or SHUTDOWN).

use std::collections::VecDeque;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use prost::Message as _;

use super::shard::{self, Endpoint, PathIo, ShardState};
use crate::address::Address;
use crate::auth::{self, AuthError, Pending};
use crate::frame::{self, DecodeError, Decoder};
use crate::proto::{
    AtbusCloseReason, AtbusPacketFlagType, AtbusPacketType, AtbusProtocolConst, Body, CloseReasonData, Fragment,
    FrameMessage, HandshakeAuth, HandshakeData, PacketContent, PacketData,
};
use crate::runtime::{self, TaskClass};
use crate::stream::{PathConfig, PathId};
use crate::transport::{self, Connected, Link, Listener, UdpDemux};

/// Internal stream carrying the handshake.
pub const HANDSHAKE_STREAM: i64 = -2;

pub use crate::runtime::Notify;

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The socket failed or the peer closed it.
    Io(String),
    /// We closed it with this reason (sent to the peer first).
    Closed(CloseReasonData),
    /// The peer closed it with FINISH_CONNECTION.
    PeerClosed,
    /// The peer refused our handshake with this reason.
    Refused(CloseReasonData),
    /// We sent 0-RTT data with a resumption ticket and the connection ended
    /// before the peer accepted it: redial at once with a full handshake
    /// (the data goes again on the next connection).
    ResumptionFailed,
    /// The connection moved to the peer's home shard.
    HandedOff,
    /// The node is stopping.
    Shutdown,
}

fn reason(code: AtbusCloseReason, message: impl Into<String>) -> CloseReasonData {
    CloseReasonData {
        code: code as i32,
        message: message.into(),
    }
}

/// Accepts connections until the node stops.
/// `anonymous`: the listener also admits anonymous dialers.
pub(super) async fn listen(state: Rc<ShardState>, listener: Listener, local: Address, anonymous: bool) {
    if let Listener::Udp(socket) = listener {
        // Latency paths' datagrams come through it too.
        return runtime::run_in(TaskClass::Latency, listen_udp(state, socket, local, anonymous)).await;
    }
    tracing::info!(node = %state.shared.name, shard = state.index, "listening on {local}");
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            state.shutdown.notified().await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(connected)) => {
                let state = state.clone();
                let origin = local.to_string();
                runtime::spawn(TaskClass::Throughput, async move {
                    run(state, connected, Dial::Accepted { anonymous }, origin).await;
                });
            }
            Some(Err(e)) => {
                // EMFILE and friends: the listener stays; back off a little.
                tracing::warn!("accept on {local} failed: {e}");
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
        }
        if shard::is_stopping(&state) {
            break;
        }
    }
}

async fn listen_udp(state: Rc<ShardState>, socket: Rc<glommio::net::UdpSocket>, local: Address, anonymous: bool) {
    tracing::info!(node = %state.shared.name, shard = state.index, "listening on {local}");
    let demux = Rc::new(UdpDemux::new(socket, 4096));
    let mut buf = vec![0u8; 65_536];
    loop {
        let next = futures_lite::future::or(async { Some(demux.next(&mut buf).await) }, async {
            state.shutdown.notified().await;
            None
        })
        .await;
        match next {
            None => break,
            Some(Ok(Some(link))) => {
                let state = state.clone();
                let demux = demux.clone();
                let peer = link.peer_addr();
                runtime::spawn(TaskClass::Throughput, async move {
                    let end = run_link(
                        state,
                        Rc::new(link),
                        Dial::Accepted { anonymous },
                        format!("udp://{peer}"),
                    )
                    .await;
                    if matches!(end, Some(End::HandedOff)) {
                        demux.moved(peer);
                    } else {
                        demux.forget(peer);
                    }
                });
            }
            Some(Ok(None)) => {}
            Some(Err(e)) => {
                tracing::debug!("udp receive on {local}: {e}");
            }
        }
    }
}

/// Dials `peer` at the first of `addresses`, and again whenever the
/// connection ends, moving to the next address after a failure, with
/// exponential backoff and jitter, until the node stops or the peer's dial
/// epoch moves on (new addresses, or the peer is gone). `latency`: the
/// connection is the pair's latency path (urgent streams only).
pub(super) async fn dial_loop(
    state: Rc<ShardState>,
    peer: Arc<str>,
    addresses: Rc<[Address]>,
    epoch: u64,
    latency: bool,
) {
    let config = &state.shared.config;
    if latency && addresses.iter().all(|a| matches!(a, Address::Relay(_))) {
        // Through relays a peer pair has one tunnel per relay: urgent
        // streams share it (the relays' own connections are bulk anyway).
        return;
    }
    let mut backoff = config.reconnect_min;
    let mut failures = 0u32;
    let mut next = 0usize;
    let mut resumption_failed = false;
    loop {
        if shard::is_stopping(&state) || state.dial_epoch(&peer) != epoch {
            break;
        }
        let address = &addresses[next % addresses.len()];
        let started = Instant::now();
        let dialed = futures_lite::future::or(async { Some(dial_address(&state, &peer, address).await) }, async {
            state.shutdown.notified().await;
            None
        })
        .await;
        match dialed {
            None => break,
            Some(Ok(_)) if state.dial_epoch(&peer) != epoch => break,
            Some(Ok(connected)) => {
                failures = 0;
                let dial = Dial::Out {
                    peer: peer.clone(),
                    latency,
                    zero_rtt: !resumption_failed,
                };
                let end = run(state.clone(), connected, dial, address.to_string()).await;
                if matches!(end, Some(End::Shutdown)) {
                    break;
                }
                match &end {
                    Some(End::Refused(reason) | End::Closed(reason)) => {
                        let why = format!("{address}: {:?} {}", reason.code(), reason.message);
                        *state.endpoint(&peer).last_error.borrow_mut() = Some(why);
                    }
                    Some(End::Io(e)) => {
                        *state.endpoint(&peer).last_error.borrow_mut() = Some(format!("{address}: {e}"))
                    }
                    _ => {}
                }
                if matches!(end, Some(End::ResumptionFailed)) && !resumption_failed {
                    // Tickets of this peer are no good (it restarted or
                    // rotated its keys): one full handshake right away.
                    tracing::info!(peer = %peer, "0-RTT resumption refused; redialling with a full handshake");
                    state.shared.auth.drop_tickets(&peer);
                    resumption_failed = true;
                    continue;
                }
                resumption_failed = false;
                if started.elapsed() > config.reconnect_max {
                    backoff = config.reconnect_min;
                }
                if matches!(address, Address::Relay(_))
                    && addresses.len() > 1
                    && matches!(end, Some(End::Io(_)))
                    && started.elapsed() > config.reconnect_min
                {
                    // The relay's connection went (the relay died, most
                    // likely): straight on through the next one.
                    tracing::info!(peer = %peer, "{address} lost; going on through the next relay");
                    next += 1;
                    continue;
                }
            }
            Some(Err(e)) => {
                *state.endpoint(&peer).last_error.borrow_mut() = Some(format!("{address}: {e}"));
                failures += 1;
                next += 1;
                if failures == 1 {
                    tracing::warn!(peer = %peer, "cannot connect to {address}: {e}; retrying with backoff");
                } else {
                    tracing::debug!(peer = %peer, "cannot connect to {address}: {e}");
                }
            }
        }
        // Full jitter over [backoff/2, backoff].
        let wait = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
        futures_lite::future::or(glommio::timer::sleep(wait), state.shutdown.notified()).await;
        backoff = (backoff * 2).min(config.reconnect_max);
    }
}

/// Connects to `address`; QUIC with this node's certificate, expecting
/// `peer`'s.
async fn dial_address(state: &Rc<ShardState>, peer: &Arc<str>, address: &Address) -> io::Result<Connected> {
    let config = &state.shared.config;
    if let Address::Relay(relay) = address {
        return super::relay::open(state, relay, peer).await.map(Connected::Tunnel);
    }
    let Address::Quic { host, port } = address else {
        return transport::connect(address, config.connect_timeout).await;
    };
    let tls = config.tls.as_ref().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{address}: QUIC needs the node's certificate (NodeConfig::tls)"),
        )
    })?;
    let remote = transport::resolve(host, *port)?;
    transport::quic::connect(remote, peer, tls.quic_client(), config.connect_timeout)
        .await
        .map(Connected::Quic)
}

/// Which side of a connection this node is.
#[derive(Clone, Debug)]
enum Dial {
    /// We dialled `peer`; `latency`: as the pair's latency path; `zero_rtt`:
    /// a held resumption ticket may be used.
    Out {
        peer: Arc<str>,
        latency: bool,
        zero_rtt: bool,
    },
    /// A listener accepted it; `anonymous`: anonymous dialers are allowed.
    Accepted { anonymous: bool },
}

/// What the handshake settled about the peer.
#[derive(Debug)]
pub(super) struct Peer {
    /// The peer's handshake; `node_name` is the name it goes by here (the
    /// one given to an anonymous dialer), `latency_path` what this path is.
    pub hello: HandshakeData,
    /// An anonymous dialer: it may talk to this node only.
    pub anonymous: bool,
    /// Accepting side of a datagram link: our reply, sent again when the
    /// peer repeats its handshake (the first reply was lost).
    pub reply: Option<FrameMessage>,
    /// Dialling side that sent 0-RTT data: the reply is still to come.
    pub awaiting: Option<Pending>,
    /// A client on an untrusted network, admitted with the grant a server
    /// allocated it: its frames are checked against it.
    pub grant: Option<Arc<crate::grant::ClientGrant>>,
}

async fn run(state: Rc<ShardState>, connected: Connected, dial: Dial, origin: String) -> Option<End> {
    match connected {
        Connected::Tcp(link) => run_link(state, Rc::new(link), dial, origin).await,
        Connected::Unix(link) => run_link(state, Rc::new(link), dial, origin).await,
        Connected::Udp(link) => run_link(state, Rc::new(link), dial, origin).await,
        Connected::Quic(link) => run_link(state, Rc::new(link), dial, origin).await,
        Connected::Bridged(link) => run_link(state, Rc::new(link), dial, origin).await,
        Connected::Tunnel(link) => run_link(state, Rc::new(link), dial, origin).await,
    }
}

/// Serves a tunnel another node opened through a relay (see
/// [`super::relay::tunnelled`]).
pub(super) async fn accept_tunnel(state: Rc<ShardState>, connected: Connected, origin: String) {
    let end = run(state, connected, Dial::Accepted { anonymous: false }, origin.clone()).await;
    if let Some(End::Io(e)) = end {
        tracing::debug!("tunnel {origin}: {e}");
    }
}

/// Whether `frame` is a dialler's first handshake (it opens a connection).
pub(super) fn opens_connection(frame: &FrameMessage) -> bool {
    matches!(parse_hello(frame), Some(Ok(hello)) if !hello.acknowledge)
}

/// Whether `frame` closes a connection (FINISH_CONNECTION).
pub(super) fn is_close(frame: &FrameMessage) -> bool {
    matches!(&frame.body, Some(Body::Packet(p)) if p.flags & AtbusPacketFlagType::FinishConnection as i32 != 0)
}

/// Our handshake. `auth`: credentials (dialling) or the answer to them
/// (accepting). An anonymous dialer sends no name and no record; a record
/// never carries the node's tokens.
fn hello_frame(state: &ShardState, acknowledge: bool, latency_path: bool, auth: Option<HandshakeAuth>) -> FrameMessage {
    let anonymous = auth.as_ref().is_some_and(|a| a.anonymous);
    let record = match state.shared.record.get() {
        Some(record) if !anonymous => {
            let mut record = record.clone();
            record.tokens.clear();
            Bytes::from(record.encode_to_vec())
        }
        _ => Bytes::new(),
    };
    let hello = HandshakeData {
        version: AtbusProtocolConst::Version as i32,
        minimal_version: crate::frame::MIN_PROTOCOL_VERSION as i32,
        node_name: if anonymous {
            String::new()
        } else {
            state.shared.name.to_string()
        },
        incarnation: state.shared.incarnation,
        acknowledge,
        record,
        latency_path,
        auth,
        relay: state.shared.config.relay.forward,
    };
    let content = PacketContent {
        fragment: vec![Fragment {
            packet_type: AtbusPacketType::Handshake as i32,
            data: Bytes::from(hello.encode_to_vec()),
            ..Default::default()
        }],
    };
    FrameMessage {
        head: None,
        body: Some(Body::Packet(PacketData {
            stream_id: HANDSHAKE_STREAM,
            content: Bytes::from(content.encode_to_vec()),
            ..Default::default()
        })),
    }
}

pub(super) fn close_frame(reason: CloseReasonData) -> FrameMessage {
    let content = PacketContent {
        fragment: vec![Fragment {
            close_reason: Some(reason),
            ..Default::default()
        }],
    };
    FrameMessage {
        head: None,
        body: Some(Body::Packet(PacketData {
            stream_id: crate::stream::CONTROL_STREAM,
            flags: AtbusPacketFlagType::FinishConnection as i32,
            content: Bytes::from(content.encode_to_vec()),
            ..Default::default()
        })),
    }
}

/// The peer's handshake, if `frame` is one.
fn parse_hello(frame: &FrameMessage) -> Option<Result<HandshakeData, String>> {
    let Some(Body::Packet(packet)) = &frame.body else {
        return None;
    };
    if packet.stream_id != HANDSHAKE_STREAM {
        return None;
    }
    let parsed = PacketContent::decode(packet.content.clone())
        .map_err(|e| format!("undecodable handshake content: {e}"))
        .and_then(|content| {
            content
                .fragment
                .into_iter()
                .find(|f| f.packet_type == AtbusPacketType::Handshake as i32)
                .ok_or_else(|| "handshake packet without a handshake fragment".to_string())
        })
        .and_then(|f| HandshakeData::decode(f.data).map_err(|e| format!("undecodable handshake_data: {e}")));
    Some(parsed)
}

/// The reason in a FINISH_CONNECTION packet, if `frame` is one.
fn parse_close(frame: &FrameMessage) -> Option<CloseReasonData> {
    let Some(Body::Packet(packet)) = &frame.body else {
        return None;
    };
    if packet.flags & AtbusPacketFlagType::FinishConnection as i32 == 0 {
        return None;
    }
    let content = PacketContent::decode(packet.content.clone()).ok()?;
    Some(
        content
            .fragment
            .into_iter()
            .find_map(|f| f.close_reason)
            .unwrap_or_else(|| reason(AtbusCloseReason::Unknown, "no reason given")),
    )
}

async fn write_frame<L: Link>(state: &ShardState, link: &L, frame: &FrameMessage) -> io::Result<()> {
    let mut buf = BytesMut::new();
    let headed;
    let frame = match link.frame_head() {
        Some(head) => {
            headed = FrameMessage {
                head: Some(head.clone()),
                body: frame.body.clone(),
            };
            &headed
        }
        None => frame,
    };
    state
        .encoder
        .encode(frame, &mut buf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    write_all(link, &buf).await
}

async fn write_all<L: Link>(link: &L, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = link.send(buf).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes"));
        }
        if link.is_datagram() {
            return Ok(());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// A datagram path's MTU: [`NodeConfig::udp_mtu`], or to a loopback peer
/// the loopback route's (no hop can be narrower; perf/README.md item 29),
/// within a frame this node accepts and the bytes a UDP path keeps in
/// flight.
///
/// [`NodeConfig::udp_mtu`]: super::NodeConfig::udp_mtu
fn datagram_mtu<L: Link>(link: &L, config: &super::NodeConfig) -> usize {
    let route = if config.udp_loopback_mtu {
        link.loopback_mtu()
    } else {
        None
    };
    match route {
        Some(route) => route
            .min(super::UDP_MTU_MAX)
            .min(config.frame.max_frame_len)
            .min(config.udp_window)
            .max(config.udp_mtu),
        None => config.udp_mtu,
    }
}

/// Datagrams a read takes at most: those already waiting after the one it
/// waited for, up to this many in all, and no more once it holds
/// [`DATAGRAM_BYTES_PER_READ`] (bounds on one pass of the connection's work,
/// so latency paths, other connections and timers get their turn).
const DATAGRAMS_PER_READ: usize = 64;

/// Bytes of datagrams after which a read takes no more: a stream link's
/// read buffer's worth.
const DATAGRAM_BYTES_PER_READ: usize = 256 * 1024;

/// Bytes of datagrams a bulk writer sends between yields to the latency
/// queue.
const DATAGRAM_BYTES_PER_YIELD: usize = 64 * 1024;

/// Reads frames from a link: stream links through the streaming decoder,
/// datagram links one frame per datagram.
struct FrameReader {
    decoder: Decoder,
    buf: Vec<u8>,
    datagram: bool,
    config: frame::Config,
    /// The last burst's datagrams' frames, until taken.
    pending: VecDeque<Result<FrameMessage, DecodeError>>,
    /// An error a read met after it had datagrams to return: the next
    /// read's (a connected UDP socket reports a peer's ICMP refusal once).
    deferred: Option<io::Error>,
    /// The last read filled all the room it had: more is probably waiting
    /// (see [`FrameReader::fill`]).
    streaming: bool,
}

impl FrameReader {
    fn new(config: &frame::Config, datagram: bool) -> Self {
        Self {
            decoder: Decoder::new(config.clone()),
            buf: vec![0u8; if datagram { 65_536 } else { 256 * 1024 }],
            datagram,
            config: config.clone(),
            pending: VecDeque::new(),
            deferred: None,
            streaming: false,
        }
    }

    /// Reads once from the link without decoding more than a datagram; `Ok(0)`
    /// when a stream link was closed.
    async fn fill<L: Link>(&mut self, link: &L) -> io::Result<usize> {
        if self.datagram {
            if let Some(e) = self.deferred.take() {
                return Err(e);
            }
            let datagram = link.recv_datagram(&mut self.buf).await?;
            let mut n = datagram.len().max(1);
            self.pending.push_back(frame::decode_datagram(&self.config, datagram));
            // And what came with it (perf/README.md item 29).
            while self.pending.len() < DATAGRAMS_PER_READ && n < DATAGRAM_BYTES_PER_READ {
                match link.recv_datagram_now(&mut self.buf).await {
                    None => break,
                    Some(Ok(datagram)) => {
                        n += datagram.len().max(1);
                        self.pending.push_back(frame::decode_datagram(&self.config, datagram));
                    }
                    Some(Err(e)) => {
                        self.deferred = Some(e);
                        break;
                    }
                }
            }
            return Ok(n);
        }
        // A reader behind its sender (the last read filled its room) reads
        // straight into the decoder's buffer, which becomes the frames: no
        // copy. Only while bytes are already there: after a read that came
        // back short the reader first waits for readiness (glommio's
        // io_uring poll), which lets bytes gather (perf/README.md item 23:
        // reading again at once made tcp's reads smaller and cost it 10 %).
        if self.streaming
            && link.recvs_uninit()
            && let Some(read) = self.read_in_place(link, true)
        {
            return read;
        }
        // A short read (the reader caught up) waits for readiness, as
        // glommio's read does, then reads into the decoder's buffer too when
        // its memory can be taken back: no copy from the scratch buffer
        // (perf/README.md item 28). Never into fresh memory: that costs small
        // messages page faults (item 13).
        if link.recvs_uninit()
            && self.decoder.room_in_place(self.buf.len())
            && link.readable().await?
            && let Some(read) = self.read_in_place(link, false)
        {
            return read;
        }
        let n = link.recv(&mut self.buf).await?;
        self.decoder.extend(&self.buf[..n]);
        self.streaming = n == self.buf.len();
        self.decoder.set_presize(!self.streaming);
        Ok(n)
    }

    /// One non-blocking read straight into the decoder's buffer; `None` when
    /// no bytes wait (or there is no room). `presize`: whether the decoder
    /// reserves each frame's length again after a short read (for a next
    /// read that copies in).
    fn read_in_place<L: Link>(&mut self, link: &L, presize: bool) -> Option<io::Result<usize>> {
        let room = self.decoder.read_room(self.buf.len());
        let len = room.len();
        // No room (a desynchronised stream): a zero-length read would look
        // like the peer closing.
        if len == 0 {
            return None;
        }
        let read = link.try_recv_uninit(room)?;
        Some(read.inspect(|&n| {
            // SAFETY: the link initialised `n` bytes of the room.
            unsafe { self.decoder.filled(n) };
            self.streaming = n == len;
            self.decoder.set_presize(presize && !self.streaming);
        }))
    }

    /// The next complete frame (or error) of what was read, if any. What
    /// follows stays buffered, undecoded.
    fn next_frame(&mut self) -> Option<Result<FrameMessage, DecodeError>> {
        if self.datagram {
            return self.pending.pop_front();
        }
        self.decoder.decode().transpose()
    }

    /// Reads once; returns the frames (and errors) that completed.
    async fn read<L: Link>(&mut self, link: &L, out: &mut Vec<Result<FrameMessage, DecodeError>>) -> io::Result<usize> {
        let n = self.fill(link).await?;
        if n > 0 {
            self.decode_buffered(out);
        }
        Ok(n)
    }

    fn decode_buffered(&mut self, out: &mut Vec<Result<FrameMessage, DecodeError>>) {
        while let Some(frame) = self.next_frame() {
            let fatal = frame.as_ref().is_err_and(DecodeError::is_fatal);
            out.push(frame);
            if fatal {
                break;
            }
        }
    }
}

/// Runs one connection to its end.
async fn run_link<L: Link>(state: Rc<ShardState>, link: Rc<L>, dial: Dial, origin: String) -> Option<End> {
    let datagram = link.is_datagram();
    let mut reader = FrameReader::new(&state.shared.config.frame, datagram);
    let peer = match handshake(&state, &*link, &mut reader, &dial, &origin).await {
        Ok(peer) => peer,
        Err(end) => {
            if !matches!(end, End::Shutdown) {
                state.shared.counters.handshake_failures.fetch_add(1, Ordering::Relaxed);
            }
            return Some(end);
        }
    };
    let home = state.shared.home_shard(&peer.hello.node_name);
    if home != state.index || link.shares_socket() {
        // The peer lives on another shard: move the socket there, with the
        // bytes already read, before any stream data flows. An accepted UDP
        // peer moves to a connected socket of its own even on this shard:
        // the listener's socket queues every peer's datagrams in one line,
        // a latency path's behind a bulk one's (perf/README.md item 29).
        return match link.handoff() {
            Ok(handoff) => {
                let leftover = reader.decoder.buffer_mut().split().freeze();
                state.shared.shards[home].submit(move || shard::adopt(handoff, peer, leftover, origin));
                Some(End::HandedOff)
            }
            Err(e) => {
                tracing::warn!("cannot hand connection {origin} to shard {home}: {e}");
                link.shutdown().await;
                Some(End::Io(e.to_string()))
            }
        };
    }
    Some(established(state, link, reader, peer, origin).await)
}

/// A connection on the peer's home shard, handshake done, with its reader
/// holding whatever arrived after the handshake.
pub(super) async fn adopted(state: Rc<ShardState>, connected: Connected, peer: Peer, leftover: Bytes, origin: String) {
    match connected {
        Connected::Tcp(link) => adopted_link(state, link, peer, &leftover, origin).await,
        Connected::Unix(link) => adopted_link(state, link, peer, &leftover, origin).await,
        Connected::Udp(link) => adopted_link(state, link, peer, &leftover, origin).await,
        Connected::Quic(link) => adopted_link(state, link, peer, &leftover, origin).await,
        Connected::Bridged(link) => adopted_link(state, link, peer, &leftover, origin).await,
        Connected::Tunnel(link) => adopted_link(state, link, peer, &leftover, origin).await,
    }
}

/// [`adopted`] for one kind of link: a stream link's reader starts with the
/// bytes read after the handshake (a datagram link has none: each datagram
/// was a whole frame).
async fn adopted_link<L: Link>(state: Rc<ShardState>, link: L, peer: Peer, leftover: &[u8], origin: String) {
    let datagram = link.is_datagram();
    let mut reader = FrameReader::new(&state.shared.config.frame, datagram);
    if !datagram {
        reader.decoder.extend(leftover);
    }
    established(state, Rc::new(link), reader, peer, origin).await;
}

/// Serves an established connection in its task class: a latency path's
/// reader and writer run in the latency queue, ahead of bulk work.
async fn established<L: Link>(
    state: Rc<ShardState>,
    link: Rc<L>,
    reader: FrameReader,
    peer: Peer,
    origin: String,
) -> End {
    let class = if peer.hello.latency_path {
        if let Err(e) = link.set_latency() {
            // It still works, only without preempting bulk work.
            tracing::warn!(node = %state.shared.name, "latency path {origin}: {e}");
        }
        TaskClass::Latency
    } else {
        if let Err(e) = link.size_send_buffer(state.shared.config.write_batch) {
            // It still works, with writes stopping short more often.
            tracing::warn!(node = %state.shared.name, "{origin}: cannot size the send buffer: {e}");
        }
        if state.shared.config.unix_zero_copy {
            link.allow_zero_copy();
        }
        TaskClass::Throughput
    };
    runtime::run_in(class, serve(state, link, reader, peer, origin)).await
}

async fn serve<L: Link>(
    state: Rc<ShardState>,
    link: Rc<L>,
    mut reader: FrameReader,
    mut peer: Peer,
    origin: String,
) -> End {
    let datagram = link.is_datagram();
    let hello = &peer.hello;
    let name: Arc<str> = Arc::from(hello.node_name.as_str());
    let endpoint = state.endpoint(&name);
    let path_id = state.next_path_id();
    let config = &state.shared.config;
    let path = if datagram {
        PathConfig {
            mtu: datagram_mtu(&*link, config),
            overhead: 0,
            window: Some(config.udp_window),
            urgent_only: false,
        }
    } else {
        PathConfig::with_mtu(config.stream_mtu)
    };
    let head = link.frame_head().cloned();
    let path = match &head {
        Some(head) => super::relay::path_config(head),
        None => path,
    };
    let path = PathConfig {
        urgent_only: hello.latency_path,
        ..path
    };
    let batch = if link.is_tcp() {
        config.tcp_write_batch
    } else {
        config.write_batch
    };
    let io = PathIo::new(
        datagram,
        path.mtu,
        link.aligns_writes(),
        batch,
        hello.latency_path,
        head,
    );
    endpoint.add_path(&state, path_id, path, io, hello.incarnation);
    state.shared.set_live(&name, true);
    super::relay::release_held(&state, &endpoint);
    state.shared.counters.established.fetch_add(1, Ordering::Relaxed);
    if peer.awaiting.is_some() {
        tracing::info!(node = %state.shared.name, peer = %name, path = path_id.0, "connected via {origin} (0-RTT)");
    } else {
        tracing::info!(node = %state.shared.name, peer = %name, path = path_id.0, "connected via {origin}");
    }
    let dead = Rc::new(Notify::default());
    // The writer runs in the connection's class, like its reader (see
    // `established`): a latency path's flush never waits behind bulk work.
    let class = if hello.latency_path {
        TaskClass::Latency
    } else {
        TaskClass::Throughput
    };
    {
        let (state, link, endpoint, dead) = (state.clone(), link.clone(), endpoint.clone(), dead.clone());
        runtime::spawn(class, async move {
            writer(state, link, endpoint, path_id, dead).await;
        });
    }
    // Frames that came with the handshake.
    let mut frames = Vec::new();
    reader.decode_buffered(&mut frames);
    let ctx = PathContext {
        endpoint: &endpoint,
        path_id,
        dead: &dead,
        origin: &origin,
    };
    let end = read_loop(&state, &*link, &mut reader, &ctx, &mut peer, frames).await;
    match &end {
        End::Closed(reason) => {
            // Give the writer a moment to send the close packet.
            let deadline = Instant::now() + Duration::from_millis(200);
            while endpoint
                .state
                .borrow()
                .paths
                .get(&path_id)
                .is_some_and(|p| !p.dead && p.buffered() > 0)
                && Instant::now() < deadline
            {
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
            if reason.code == AtbusCloseReason::BadFrame as i32 {
                state.shared.counters.closed_bad_frame.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(peer = %name, "closed connection {origin}: {:?} {}", reason.code(), reason.message);
        }
        End::Io(e) => tracing::info!(peer = %name, "connection {origin} ended: {e}"),
        End::PeerClosed => tracing::info!(peer = %name, "peer closed connection {origin}"),
        End::Refused(reason) => {
            tracing::warn!(peer = %name, "connection {origin} refused: {:?} {}", reason.code(), reason.message);
        }
        End::ResumptionFailed => tracing::info!(peer = %name, "0-RTT connection {origin} ended before it was accepted"),
        End::Shutdown | End::HandedOff => {}
    }
    endpoint.remove_path(path_id);
    state.shared.set_live(&name, false);
    if !endpoint.has_paths() {
        super::relay::carrier_lost(&state, &name);
    }
    endpoint.drive(&state);
    state.shared.counters.closed.fetch_add(1, Ordering::Relaxed);
    link.shutdown().await;
    end
}

/// Refuses a handshake: logged, counted, told to the peer, closed.
async fn refuse<L: Link>(state: &ShardState, link: &L, origin: &str, code: AtbusCloseReason, message: String) -> End {
    if code == AtbusCloseReason::Unauthorized {
        state.shared.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
    }
    tracing::warn!(node = %state.shared.name, "handshake on {origin} refused: {message}");
    let refusal = reason(code, message);
    let _ = write_frame(state, link, &close_frame(refusal.clone())).await;
    End::Closed(refusal)
}

/// Runs the handshake. The dialling side speaks first, with credentials;
/// the accepting side answers once it has checked them. A dialer holding a
/// resumption ticket returns right after its first flight (0-RTT: its data
/// follows at once; the reply is checked by the read loop).
async fn handshake<L: Link>(
    state: &ShardState,
    link: &L,
    reader: &mut FrameReader,
    dial: &Dial,
    origin: &str,
) -> Result<Peer, End> {
    let config = &state.shared.config;
    let deadline = Instant::now() + config.connect_timeout;
    let datagram = link.is_datagram();
    let mut ours = None;
    if let Dial::Out {
        peer,
        latency,
        zero_rtt,
    } = dial
    {
        let (auth, pending) = state.shared.auth.dial(
            &state.shared.name,
            peer,
            state.shared.incarnation,
            *latency,
            *zero_rtt && !datagram,
            auth::now_micros(),
        );
        let hello = hello_frame(state, false, *latency, Some(auth));
        write_frame(state, link, &hello)
            .await
            .map_err(|e| End::Io(e.to_string()))?;
        if pending.is_zero_rtt() {
            let incarnation = pending.acceptor_incarnation.unwrap_or_default();
            return Ok(Peer {
                hello: HandshakeData {
                    node_name: peer.to_string(),
                    incarnation,
                    latency_path: *latency,
                    ..HandshakeData::default()
                },
                anonymous: false,
                reply: None,
                awaiting: Some(pending),
                grant: None,
            });
        }
        ours = Some((hello, pending));
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(End::Io(format!("handshake on {origin} timed out")));
        }
        let wait = if datagram {
            left.min(Duration::from_millis(200))
        } else {
            left
        };
        let read = futures_lite::future::or(
            async { Some(transport::with_timeout(wait, reader.fill(link)).await) },
            async {
                state.shutdown.notified().await;
                None
            },
        )
        .await;
        match read {
            None => return Err(End::Shutdown),
            Some(Ok(0)) => return Err(End::Io(format!("{origin} closed during the handshake"))),
            Some(Ok(_)) => {}
            Some(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
                if let Some((hello, _)) = &ours
                    && datagram
                {
                    let _ = write_frame(state, link, hello).await;
                }
                continue;
            }
            Some(Err(e)) => return Err(End::Io(e.to_string())),
        }
        // One frame at a time: whatever follows the peer's handshake stays in
        // the reader for the connection (or the shard it is handed to).
        while let Some(frame) = reader.next_frame() {
            let (code, message) = match frame {
                Err(DecodeError::UnsupportedVersion { version, min, max }) => (
                    AtbusCloseReason::UnsupportedVersion,
                    format!("protocol version {version} not supported ({min}..={max})"),
                ),
                Err(e) if e.is_fatal() || !datagram => (
                    AtbusCloseReason::BadFrame,
                    format!("bad frame during the handshake: {e}"),
                ),
                // A damaged datagram: the peer resends its handshake.
                Err(_) => continue,
                Ok(frame) => {
                    if let Some(refusal) = parse_close(&frame) {
                        tracing::warn!(
                            node = %state.shared.name,
                            "peer refused the handshake on {origin}: {:?} {}",
                            refusal.code(),
                            refusal.message
                        );
                        return Err(End::Refused(refusal));
                    }
                    match parse_hello(&frame) {
                        // Stream data ahead of the handshake (a datagram
                        // race): the stream layer resends it.
                        None => continue,
                        Some(Err(message)) => (AtbusCloseReason::BadFrame, message),
                        Some(Ok(hello)) => match &ours {
                            Some((_, pending)) => match check_reply(state, hello, dial, pending) {
                                Ok(peer) => return Ok(peer),
                                Err(refusal) => refusal,
                            },
                            None => match admit(state, hello, dial) {
                                Ok((peer, reply)) => {
                                    write_frame(state, link, &reply)
                                        .await
                                        .map_err(|e| End::Io(e.to_string()))?;
                                    return Ok(Peer {
                                        reply: datagram.then_some(reply),
                                        ..peer
                                    });
                                }
                                Err(refusal) => refusal,
                            },
                        },
                    }
                }
            };
            return Err(refuse(state, link, origin, code, message).await);
        }
    }
}

type Refusal = (AtbusCloseReason, String);

/// Accepting side: checks the dialer's handshake and credentials; returns
/// the peer and our reply.
fn admit(state: &ShardState, mut hello: HandshakeData, dial: &Dial) -> Result<(Peer, FrameMessage), Refusal> {
    let anonymous_allowed = matches!(dial, Dial::Accepted { anonymous: true });
    let anonymous = hello.auth.as_ref().is_some_and(|a| a.anonymous);
    check_version(&hello)?;
    if anonymous {
        if !hello.node_name.is_empty() || !hello.record.is_empty() {
            return Err((
                AtbusCloseReason::Unauthorized,
                "an anonymous handshake carries a name".to_string(),
            ));
        }
    } else {
        check_name(state, &hello, None)?;
    }
    let me = &*state.shared.name;
    let now = auth::now_micros();
    let client = if anonymous {
        None
    } else {
        client_grant(state, &hello.node_name, now)?
    };
    if client.is_some() || anonymous {
        // Nobody untrusted hands over frames of others.
        hello.relay = false;
    }
    let grant = state
        .shared
        .auth
        .accept(
            hello.auth.as_ref(),
            &hello.node_name,
            me,
            hello.incarnation,
            hello.latency_path,
            anonymous_allowed,
            client.as_ref().map(|c| c.token.as_bytes()),
            now,
        )
        .map_err(|e| {
            let who = if anonymous {
                "anonymous peer".to_string()
            } else {
                format!("peer {:?}", hello.node_name)
            };
            (AtbusCloseReason::Unauthorized, format!("{who}: {e}"))
        })?;
    let dialer_auth = hello.auth.clone().unwrap_or_default();
    let reply_auth = state.shared.auth.reply(
        &grant,
        &dialer_auth,
        &hello.node_name,
        me,
        hello.incarnation,
        state.shared.incarnation,
        hello.latency_path,
        now,
    );
    if let auth::Grant::Anonymous { name } = &grant {
        hello.node_name = name.clone();
        // Its own latency path would be another anonymous peer.
        hello.latency_path = false;
    }
    let reply = hello_frame(state, true, hello.latency_path, Some(reply_auth));
    Ok((
        Peer {
            hello,
            anonymous,
            reply: None,
            awaiting: None,
            grant: client.map(Arc::new),
        },
        reply,
    ))
}

/// The grant a server allocated to a client named `name`, if discovery
/// registers one; an expired one is refused.
fn client_grant(state: &ShardState, name: &str, now_micros: i64) -> Result<Option<crate::grant::ClientGrant>, Refusal> {
    let Some(crate::discovery::Record::Node(record)) = state.shared.discovery.get(name) else {
        return Ok(None);
    };
    let Some(grant) = crate::grant::ClientGrant::from_record(&record) else {
        return Ok(None);
    };
    grant
        .check_time(now_micros / 1_000_000)
        .map_err(|e| (AtbusCloseReason::Unauthorized, e.to_string()))?;
    Ok(Some(grant))
}

/// Dialling side: checks the acceptor's reply to our credentials.
fn check_reply(state: &ShardState, hello: HandshakeData, dial: &Dial, pending: &Pending) -> Result<Peer, Refusal> {
    let Dial::Out { peer, latency, .. } = dial else {
        return Err((AtbusCloseReason::Unknown, "not the dialling side".to_string()));
    };
    check_version(&hello)?;
    check_name(state, &hello, Some(peer))?;
    state
        .shared
        .auth
        .finish(
            pending,
            hello.auth.as_ref(),
            peer,
            hello.incarnation,
            auth::now_micros(),
        )
        .map_err(|e| unauthorized_from(peer, e))?;
    Ok(Peer {
        hello: HandshakeData {
            // From here on `latency_path` tells what this path is: the
            // dialler's flag, i.e. our own.
            latency_path: *latency,
            ..hello
        },
        anonymous: false,
        reply: None,
        awaiting: None,
        grant: None,
    })
}

fn unauthorized_from(peer: &str, e: AuthError) -> Refusal {
    (AtbusCloseReason::Unauthorized, format!("peer {peer:?}: {e}"))
}

fn check_version(hello: &HandshakeData) -> Result<(), Refusal> {
    let minimum = crate::frame::MIN_PROTOCOL_VERSION as i32;
    if hello.version < minimum {
        return Err((
            AtbusCloseReason::UnsupportedVersion,
            format!(
                "peer speaks protocol version {}, below the minimum {minimum}",
                hello.version
            ),
        ));
    }
    Ok(())
}

/// Whether the name (and record) in `hello` are acceptable.
fn check_name(state: &ShardState, hello: &HandshakeData, expected: Option<&str>) -> Result<(), Refusal> {
    if let Err(e) = crate::discovery::validate::dns_subdomain(&hello.node_name) {
        return Err((
            AtbusCloseReason::Unauthorized,
            format!("invalid peer name {:?}: {e}", hello.node_name),
        ));
    }
    if hello.node_name == *state.shared.name {
        return Err((AtbusCloseReason::Unauthorized, "connected to itself".to_string()));
    }
    if !hello.record.is_empty() {
        let record = crate::discovery::NodeRecord::decode(hello.record.clone())
            .map_err(|e| (AtbusCloseReason::BadFrame, format!("undecodable discovery record: {e}")))?;
        if record.name != hello.node_name {
            return Err((
                AtbusCloseReason::Unauthorized,
                format!(
                    "handshake names {:?} but its discovery record names {:?}",
                    hello.node_name, record.name
                ),
            ));
        }
    }
    match expected {
        Some(name) if name != hello.node_name => Err((
            AtbusCloseReason::Unauthorized,
            format!("expected peer {name:?}, found {:?}", hello.node_name),
        )),
        _ => Ok(()),
    }
}

/// One established connection, as the read loop sees it.
struct PathContext<'a> {
    endpoint: &'a Rc<Endpoint>,
    path_id: PathId,
    dead: &'a Notify,
    origin: &'a str,
}

async fn read_loop<L: Link>(
    state: &Rc<ShardState>,
    link: &L,
    reader: &mut FrameReader,
    ctx: &PathContext<'_>,
    peer: &mut Peer,
    mut frames: Vec<Result<FrameMessage, DecodeError>>,
) -> End {
    let PathContext {
        endpoint,
        path_id,
        dead,
        origin,
    } = *ctx;
    let config = &state.shared.config;
    let epoch = Instant::now();
    let mut last_rx = Instant::now();
    let mut last_ping = Instant::now();
    let mut bad_frames = 0u32;
    loop {
        let now = Instant::now();
        let mut close = None;
        for frame in frames.drain(..) {
            match frame {
                Ok(frame) if peer.awaiting.is_some() => match resumption_reply(state, endpoint, peer, &frame) {
                    Ok(()) => {}
                    Err(None) => return End::ResumptionFailed,
                    Err(Some(refusal)) => {
                        state.shared.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                        close = Some(refusal);
                        break;
                    }
                },
                Ok(frame) => match handle_frame(state, endpoint, path_id, peer, epoch, now, frame) {
                    Ok(()) => {}
                    Err(Fault::Fatal(refusal)) => {
                        if refusal.code == AtbusCloseReason::Unauthorized as i32 {
                            state.shared.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                        }
                        close = Some(refusal);
                        break;
                    }
                    Err(Fault::Bad(e)) => {
                        bad_frames += 1;
                        state.shared.counters.bad_frames.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = %endpoint.peer, "bad frame on {origin} ({bad_frames}/{}): {e}", config.max_bad_frames);
                    }
                },
                Err(e) => {
                    bad_frames += 1;
                    state.shared.counters.bad_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %endpoint.peer, "bad frame on {origin} ({bad_frames}/{}): {e}", config.max_bad_frames);
                    if e.is_fatal() && !link.is_datagram() {
                        close = Some(reason(AtbusCloseReason::BadFrame, format!("stream framing lost: {e}")));
                    }
                }
            }
        }
        // Whatever else came in the same read is not looked at.
        if close.is_some() {
            frames.clear();
        }
        if close.is_none() && bad_frames > config.max_bad_frames {
            close = Some(reason(
                AtbusCloseReason::BadFrame,
                format!("{bad_frames} bad frames (max_bad_frames {})", config.max_bad_frames),
            ));
        }
        let path_closing = endpoint.state.borrow().paths.get(&path_id).is_some_and(|p| p.closing);
        if path_closing && close.is_none() {
            // FINISH_CONNECTION from the peer, or our own shutdown.
            endpoint.drive(state);
            return if shard::is_stopping(state) || state.shared.stopping.load(Ordering::Acquire) {
                End::Shutdown
            } else {
                End::PeerClosed
            };
        }
        if peer.awaiting.is_some() && last_rx.elapsed() > config.connect_timeout {
            return End::ResumptionFailed;
        }
        if last_rx.elapsed() > config.idle_timeout {
            close = Some(reason(
                AtbusCloseReason::IdleTimeout,
                format!("nothing received for {:?}", config.idle_timeout),
            ));
        }
        if let Some(r) = close {
            {
                let mut st = endpoint.state.borrow_mut();
                st.session.close_path(path_id, r.clone());
                if let Some(path) = st.paths.get_mut(&path_id) {
                    path.closing = true;
                }
            }
            endpoint.drive(state);
            return End::Closed(r);
        }
        if last_ping.elapsed() >= config.ping_interval {
            last_ping = Instant::now();
            endpoint.push_control(path_id, shard::ping_frame(epoch, false, None));
        }
        endpoint.drive(state);
        // A busy bulk connection always has bytes to read: let the latency
        // queue (frame-sync connections, the inbox) run when it asks to.
        if peer.hello.latency_path {
            glommio::yield_if_needed().await;
        } else {
            runtime::yield_to_latency().await;
        }

        let wait = config
            .ping_interval
            .saturating_sub(last_ping.elapsed())
            .max(Duration::from_millis(1));
        let read = futures_lite::future::or(
            async { Some(transport::with_timeout(wait, reader.read(link, &mut frames)).await) },
            async {
                futures_lite::future::or(dead.notified(), state.shutdown.notified()).await;
                None
            },
        )
        .await;
        let awaiting = peer.awaiting.is_some();
        match read {
            None if state.shutdown.is_set() => return End::Shutdown,
            None if awaiting => return End::ResumptionFailed,
            None => return End::Io("write failed".into()),
            Some(Ok(0)) if awaiting => return End::ResumptionFailed,
            Some(Ok(0)) => return End::Io("closed by peer".into()),
            Some(Ok(n)) => {
                last_rx = Instant::now();
                if let Some(path) = endpoint.state.borrow_mut().paths.get_mut(&path_id) {
                    path.counts.rx_bytes += n as u64;
                    path.counts.rx_frames += frames.len() as u64;
                }
            }
            Some(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {}
            Some(Err(_)) if awaiting => return End::ResumptionFailed,
            Some(Err(e)) => return End::Io(e.to_string()),
        }
    }
}

/// A 0-RTT dialer's first frame back: the acceptor's reply (checked, then
/// the connection goes on as usual), its refusal (`Err(None)`: redial with
/// a full handshake), or anything else (`Err(Some)`: close).
fn resumption_reply(
    state: &ShardState,
    endpoint: &Endpoint,
    peer: &mut Peer,
    frame: &FrameMessage,
) -> Result<(), Option<CloseReasonData>> {
    if let Some(refusal) = parse_close(frame) {
        tracing::warn!(
            node = %state.shared.name,
            peer = %endpoint.peer,
            "0-RTT resumption refused: {:?} {}",
            refusal.code(),
            refusal.message
        );
        return Err(None);
    }
    let unauthorized = |message: String| Some(reason(AtbusCloseReason::Unauthorized, message));
    let hello = match parse_hello(frame) {
        Some(Ok(hello)) => hello,
        Some(Err(message)) => return Err(unauthorized(message)),
        None => return Err(unauthorized("data before the handshake reply".to_string())),
    };
    let Some(pending) = peer.awaiting.take() else {
        return Ok(());
    };
    let checked = check_version(&hello)
        .and_then(|()| check_name(state, &hello, Some(&endpoint.peer)))
        .map_err(|(_, message)| message)
        .and_then(|()| {
            if hello.incarnation == peer.hello.incarnation {
                Ok(())
            } else {
                Err(format!(
                    "peer {:?} restarted since its ticket was issued",
                    endpoint.peer
                ))
            }
        })
        .and_then(|()| {
            state
                .shared
                .auth
                .finish(
                    &pending,
                    hello.auth.as_ref(),
                    &endpoint.peer,
                    hello.incarnation,
                    auth::now_micros(),
                )
                .map_err(|e| format!("peer {:?}: {e}", endpoint.peer))
        });
    checked.map_err(unauthorized)?;
    // What the ticket could not tell: whether the acceptor relays.
    peer.hello.relay = hello.relay;
    Ok(())
}

/// What is wrong with a frame.
enum Fault {
    /// Counted against `max_bad_frames`.
    Bad(String),
    /// Closes the connection at once with this reason.
    Fatal(CloseReasonData),
}

/// Handles one frame on an established connection.
fn handle_frame(
    state: &Rc<ShardState>,
    endpoint: &Rc<Endpoint>,
    path_id: PathId,
    peer: &Peer,
    epoch: Instant,
    now: Instant,
    frame: FrameMessage,
) -> Result<(), Fault> {
    if let Some(grant) = &peer.grant
        && let Err(e) = grant.permits(&frame)
    {
        return Err(Fault::Fatal(reason(AtbusCloseReason::Unauthorized, e.to_string())));
    }
    if let Some(head) = &frame.head {
        let elsewhere = !head.destination.is_empty() && head.destination != *state.shared.name;
        let other_source = !head.source.is_empty() && head.source != *endpoint.peer;
        if other_source && !peer.hello.relay {
            return Err(Fault::Bad(format!(
                "frame from {:?} handed over by {:?}, which is not a relay",
                head.source, endpoint.peer
            )));
        }
        if elsewhere && state.shared.config.relay.forward && !peer.anonymous {
            super::relay::forward(state, endpoint, path_id, frame);
            return Ok(());
        }
        if other_source && !elsewhere {
            super::relay::tunnelled(state, endpoint, frame);
            return Ok(());
        }
        if elsewhere {
            // This node does not forward (relays do).
            let message = format!(
                "frame for {:?} sent to {:?}, which does not forward",
                head.destination, state.shared.name
            );
            return Err(if peer.anonymous {
                Fault::Fatal(reason(
                    AtbusCloseReason::Unauthorized,
                    format!(
                        "anonymous peer {:?} may talk to {:?} only: {message}",
                        endpoint.peer, state.shared.name
                    ),
                ))
            } else {
                Fault::Bad(message)
            });
        }
    }
    match &frame.body {
        Some(Body::Ping(ping)) => {
            endpoint.push_control(
                path_id,
                shard::ping_frame(epoch, true, Some(ping.timepoint_microseconds)),
            );
            return Ok(());
        }
        Some(Body::Pong(pong)) => {
            let sent = epoch + Duration::from_micros(u64::try_from(pong.timepoint_microseconds).unwrap_or(0));
            let rtt = now.saturating_duration_since(sent);
            let ms = rtt.as_secs_f64() * 1000.0;
            state.shared.shard_metrics[state.index].rtt_ms.observe(ms);
            state.shared.record_rtt(rtt);
            if let Some(path) = endpoint.state.borrow_mut().paths.get_mut(&path_id) {
                path.counts.rtt.observe(ms);
            }
            tracing::trace!(peer = %endpoint.peer, ?rtt, "pong");
            return Ok(());
        }
        _ => {}
    }
    if let Some(hello) = parse_hello(&frame) {
        let hello = hello.map_err(Fault::Bad)?;
        if !hello.acknowledge
            && let Some(reply) = &peer.reply
        {
            // Our reply was lost (datagrams): answer again.
            endpoint.push_control(path_id, reply.clone());
        }
        return Ok(());
    }
    endpoint
        .state
        .borrow_mut()
        .session
        .handle_frame(now, path_id, frame)
        .map_err(|e| Fault::Bad(e.to_string()))
}

/// Writes what the session puts in this path's buffer, batched: everything
/// buffered goes out in one write (one datagram per frame on UDP).
async fn writer<L: Link>(
    state: Rc<ShardState>,
    link: Rc<L>,
    endpoint: Rc<Endpoint>,
    path_id: PathId,
    dead: Rc<Notify>,
) {
    enum Work {
        Bytes(Bytes),
        Gathered(Vec<Bytes>),
        Datagrams(Vec<Bytes>),
        Close,
        Stop,
    }
    // A bulk writer steps aside for the latency queue after each write.
    let latency = endpoint.state.borrow().paths.get(&path_id).is_some_and(|p| p.latency);
    loop {
        let work = std::future::poll_fn(|cx| {
            let mut st = endpoint.state.borrow_mut();
            let Some(path) = st.paths.get_mut(&path_id) else {
                return Poll::Ready(Work::Stop);
            };
            if path.dead {
                return Poll::Ready(Work::Stop);
            }
            if !path.gathered.is_empty() {
                let mut parts: Vec<Bytes> = path.gathered.drain(..).collect();
                if !path.out.is_empty() {
                    parts.push(path.out.split().freeze());
                }
                return Poll::Ready(Work::Gathered(parts));
            }
            if !path.out.is_empty() {
                return Poll::Ready(Work::Bytes(path.out.split().freeze()));
            }
            if !path.datagrams.is_empty() {
                return Poll::Ready(Work::Datagrams(path.datagrams.drain(..).collect()));
            }
            if path.closing {
                return Poll::Ready(Work::Close);
            }
            path.writer = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        let result = match work {
            Work::Stop => break,
            Work::Close => {
                link.shutdown().await;
                if let Some(path) = endpoint.state.borrow_mut().paths.get_mut(&path_id) {
                    path.dead = true;
                }
                dead.notify();
                break;
            }
            Work::Bytes(bytes) => {
                let written = write_all(&*link, &bytes).await;
                if !latency {
                    runtime::yield_to_latency().await;
                }
                written
            }
            Work::Gathered(parts) => {
                let written = link.send_parts(parts).await;
                if let Ok(zero_copy @ 1..) = written
                    && let Some(path) = endpoint.state.borrow_mut().paths.get_mut(&path_id)
                {
                    path.counts.tx_zero_copy_bytes += zero_copy;
                }
                if !latency {
                    runtime::yield_to_latency().await;
                }
                written.map(|_| ())
            }
            Work::Datagrams(datagrams) => {
                let mut result = Ok(());
                let mut unyielded = 0;
                for datagram in datagrams {
                    let len = datagram.len();
                    match link.send_datagram(datagram).await {
                        Ok(_) => {}
                        // The peer's port is closed for now (ICMP): a lost datagram.
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                    // Large datagrams (loopback paths) make a burst of many
                    // writes: the latency queue gets its turn between them
                    // as between a stream link's writes.
                    unyielded += len;
                    if !latency && unyielded >= DATAGRAM_BYTES_PER_YIELD {
                        unyielded = 0;
                        runtime::yield_to_latency().await;
                    }
                }
                if !latency && unyielded > 0 {
                    runtime::yield_to_latency().await;
                }
                result
            }
        };
        if let Err(e) = result {
            tracing::debug!(peer = %endpoint.peer, "write failed: {e}");
            if let Some(path) = endpoint.state.borrow_mut().paths.get_mut(&path_id) {
                path.dead = true;
            }
            dead.notify();
            break;
        }
        endpoint.state.borrow_mut().session.set_path_blocked(path_id, false);
        endpoint.drive(&state);
    }
}
