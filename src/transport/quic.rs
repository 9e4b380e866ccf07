//! `quic://`: QUIC by quinn-proto, driven on the shard by its own glommio
//! UDP socket; TLS 1.3 by rustls (ring) with the node's certificate.
//!
//! One QUIC connection carries one bus connection, on the bidirectional
//! stream the dialler opens first: to the connection layer it is a byte
//! stream like TCP ([`QuicLink`]). Each shard has a client endpoint (made on
//! the first dial) and the listening shard a server endpoint; one driver
//! task per endpoint feeds datagrams, timers and transmits to quinn-proto.
//! A connection lives on the shard whose socket it uses; when its peer is
//! homed elsewhere, its bytes cross to the home shard over a pair of
//! channels ([`BridgeLink`]).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use glommio::net::UdpSocket;
use quinn_proto::{
    ConnectionHandle, DatagramEvent, Dir, EndpointConfig, Event, ReadError, ReadableError, StreamEvent, StreamId,
    WriteError,
};

use super::{ChannelEnd, Handoff, Link};
use crate::runtime::Notify;

/// Client connections that sent their first bytes as 0-RTT data (TLS
/// session resumption), and how many of those the server accepted; for
/// tests and benchmarks.
pub static ZERO_RTT_SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// See [`ZERO_RTT_SENT`].
pub static ZERO_RTT_ACCEPTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Largest UDP payload read at once.
const DATAGRAM: usize = 65_536;
/// Chunks in flight between a connection's shard and its peer's home shard,
/// each way.
const BRIDGE_DEPTH: usize = 64;

/// A quinn-proto endpoint on one UDP socket of this shard.
pub struct QuicEndpoint {
    socket: UdpSocket,
    endpoint: RefCell<quinn_proto::Endpoint>,
    conns: RefCell<HashMap<ConnectionHandle, Rc<QuicConn>>>,
    /// Server side: connections whose dialler opened its stream.
    accepted: RefCell<VecDeque<Rc<QuicConn>>>,
    accept_ready: Notify,
    /// Something changed that the driver must act on.
    wake: Notify,
    local: SocketAddr,
    server: Option<Arc<quinn_proto::ServerConfig>>,
}

/// One QUIC connection.
pub struct QuicConn {
    handle: ConnectionHandle,
    conn: RefCell<quinn_proto::Connection>,
    endpoint: Weak<QuicEndpoint>,
    stream: Cell<Option<StreamId>>,
    connected: Cell<bool>,
    /// A client connection writing 0-RTT data before the handshake is done.
    zero_rtt: Cell<bool>,
    /// The peer acknowledged everything we sent on the stream after FIN.
    send_done: Cell<bool>,
    /// Why it ended, once it did.
    lost: RefCell<Option<String>>,
    /// Readable, writable, connected, lost: any change.
    changed: Notify,
    remote: SocketAddr,
}

impl QuicConn {
    fn wake_driver(&self) {
        if let Some(endpoint) = self.endpoint.upgrade() {
            endpoint.wake.notify();
        }
    }
}

impl QuicEndpoint {
    /// Binds `local`; with `server`, it accepts connections too.
    pub fn bind(local: SocketAddr, server: Option<Arc<quinn_proto::ServerConfig>>) -> io::Result<Rc<Self>> {
        let socket = super::udp_socket(local)?;
        let local = socket.local_addr().map_err(io::Error::from)?;
        let endpoint = quinn_proto::Endpoint::new(Arc::new(EndpointConfig::default()), server.clone(), true, None);
        let this = Rc::new(Self {
            socket,
            endpoint: RefCell::new(endpoint),
            conns: RefCell::new(HashMap::new()),
            accepted: RefCell::new(VecDeque::new()),
            accept_ready: Notify::default(),
            wake: Notify::default(),
            local,
            server,
        });
        let driver = Rc::downgrade(&this);
        glommio::spawn_local(drive(driver)).detach();
        Ok(this)
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next connection whose dialler opened its stream.
    pub async fn accept(&self) -> io::Result<QuicLink> {
        loop {
            if let Some(conn) = self.accepted.borrow_mut().pop_front() {
                return Ok(QuicLink::new(conn));
            }
            self.accept_ready.notified().await;
        }
    }

    /// Dials `remote` (certificate must name `server_name`) and opens the
    /// stream; completes when the QUIC handshake has, or at once when TLS
    /// resumes an earlier session: the first bytes then go as 0-RTT data (if
    /// the server refuses them the connection ends and is dialled again; the
    /// bus's own handshake refuses replays of such a flight).
    pub async fn connect(
        self: &Rc<Self>,
        remote: SocketAddr,
        server_name: &str,
        config: quinn_proto::ClientConfig,
        timeout: Duration,
    ) -> io::Result<QuicLink> {
        let (handle, conn) = self
            .endpoint
            .borrow_mut()
            .connect(Instant::now(), config, remote, server_name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("quic://{remote}: {e}")))?;
        let conn = self.insert(handle, conn, remote);
        let stream = conn.conn.borrow_mut().streams().open(Dir::Bi);
        conn.stream.set(stream);
        self.wake.notify();
        if conn.conn.borrow().has_0rtt() {
            conn.zero_rtt.set(true);
            ZERO_RTT_SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(QuicLink::new(conn));
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(reason) = conn.lost.borrow().clone() {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("quic://{remote}: {reason}"),
                ));
            }
            if conn.connected.get() {
                return Ok(QuicLink::new(conn));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                conn.conn.borrow_mut().close(
                    Instant::now(),
                    quinn_proto::VarInt::from_u32(0),
                    Bytes::from_static(b"timeout"),
                );
                self.wake.notify();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("quic://{remote}: handshake timed out"),
                ));
            }
            futures_lite::future::or(conn.changed.notified(), glommio::timer::sleep(left)).await;
        }
    }

    fn insert(
        self: &Rc<Self>,
        handle: ConnectionHandle,
        conn: quinn_proto::Connection,
        remote: SocketAddr,
    ) -> Rc<QuicConn> {
        let conn = Rc::new(QuicConn {
            handle,
            conn: RefCell::new(conn),
            endpoint: Rc::downgrade(self),
            stream: Cell::new(None),
            connected: Cell::new(false),
            zero_rtt: Cell::new(false),
            send_done: Cell::new(false),
            lost: RefCell::new(None),
            changed: Notify::default(),
            remote,
        });
        self.conns.borrow_mut().insert(handle, conn.clone());
        conn
    }

    /// Hands one received datagram to quinn-proto.
    async fn handle_datagram(self: &Rc<Self>, remote: SocketAddr, data: BytesMut, out: &mut Vec<u8>) {
        let now = Instant::now();
        out.clear();
        let event = self.endpoint.borrow_mut().handle(now, remote, None, None, data, out);
        match event {
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                if let Some(conn) = self.conns.borrow().get(&handle) {
                    conn.conn.borrow_mut().handle_event(event);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                out.clear();
                let accepted = self
                    .endpoint
                    .borrow_mut()
                    .accept(incoming, now, out, self.server.clone());
                match accepted {
                    Ok((handle, conn)) => {
                        self.insert(handle, conn, remote);
                    }
                    Err(e) => {
                        tracing::debug!("quic: refused a connection from {remote}: {}", e.cause);
                        if let Some(transmit) = e.response {
                            let _ = send_to(&self.socket, &out[..transmit.size], transmit.destination).await;
                        }
                    }
                }
            }
            Some(DatagramEvent::Response(transmit)) => {
                let _ = send_to(&self.socket, &out[..transmit.size], transmit.destination).await;
            }
            None => {}
        }
    }

    /// Runs every connection: timers, events, transmits. Returns the
    /// earliest timer.
    async fn run_connections(self: &Rc<Self>, buf: &mut Vec<u8>) -> Option<Instant> {
        let now = Instant::now();
        let conns: Vec<Rc<QuicConn>> = self.conns.borrow().values().cloned().collect();
        let mut next: Option<Instant> = None;
        let mut drained = Vec::new();
        for conn in conns {
            let mut changed = false;
            {
                let mut c = conn.conn.borrow_mut();
                if c.poll_timeout().is_some_and(|t| t <= now) {
                    c.handle_timeout(now);
                }
                while let Some(event) = c.poll_endpoint_events() {
                    if let Some(back) = self.endpoint.borrow_mut().handle_event(conn.handle, event) {
                        c.handle_event(back);
                    }
                }
                while let Some(event) = c.poll() {
                    changed = true;
                    match event {
                        Event::Connected => {
                            conn.connected.set(true);
                            if conn.zero_rtt.replace(false) {
                                if c.accepted_0rtt() {
                                    ZERO_RTT_ACCEPTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                } else {
                                    // What went as 0-RTT is lost: end the
                                    // connection, the bus dials again and
                                    // resends.
                                    *conn.lost.borrow_mut() = Some("0-RTT data refused by the server".into());
                                    c.close(
                                        now,
                                        quinn_proto::VarInt::from_u32(0),
                                        Bytes::from_static(b"0-RTT refused"),
                                    );
                                }
                            }
                        }
                        Event::ConnectionLost { reason } => {
                            *conn.lost.borrow_mut() = Some(reason.to_string());
                        }
                        Event::Stream(StreamEvent::Finished { id }) if Some(id) == conn.stream.get() => {
                            conn.send_done.set(true);
                        }
                        Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                            if conn.stream.get().is_none()
                                && let Some(id) = c.streams().accept(Dir::Bi)
                            {
                                conn.stream.set(Some(id));
                                self.accepted.borrow_mut().push_back(conn.clone());
                                self.accept_ready.notify();
                            }
                        }
                        _ => {}
                    }
                }
            }
            // Transmits, one datagram at a time (no GSO on this socket).
            loop {
                buf.clear();
                let transmit = conn.conn.borrow_mut().poll_transmit(now, 1, buf);
                let Some(transmit) = transmit else { break };
                if let Err(e) = send_to(&self.socket, &buf[..transmit.size], transmit.destination).await {
                    tracing::debug!("quic: send to {} failed: {e}", transmit.destination);
                }
            }
            let mut c = conn.conn.borrow_mut();
            if c.is_drained() {
                drained.push(conn.handle);
                if conn.lost.borrow().is_none() {
                    *conn.lost.borrow_mut() = Some("closed".into());
                }
                changed = true;
            } else if let Some(t) = c.poll_timeout() {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
            drop(c);
            if changed {
                conn.changed.notify();
            }
        }
        for handle in drained {
            self.conns.borrow_mut().remove(&handle);
        }
        next
    }
}

/// A datagram already queued on the socket, without waiting.
fn try_recv_from(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the descriptor belongs to `socket`, alive meanwhile.
    let fd = unsafe { BorrowedFd::borrow_raw(socket.as_raw_fd()) };
    let sock = socket2::SockRef::from(&fd);
    // SAFETY: `recv_from` only writes initialised bytes into the slice, and
    // u8 and MaybeUninit<u8> have the same layout.
    let uninit = unsafe { &mut *(std::ptr::from_mut::<[u8]>(buf) as *mut [std::mem::MaybeUninit<u8>]) };
    let (n, from) = sock.recv_from(uninit)?;
    let from = from
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP sender"))?;
    Ok((n, from))
}

/// Sends one datagram: the plain non-blocking syscall first, the ring only
/// when the socket buffer is full (see `UdpLink::send`).
async fn send_to(socket: &UdpSocket, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    {
        // SAFETY: as in `try_recv_from`.
        let fd = unsafe { BorrowedFd::borrow_raw(socket.as_raw_fd()) };
        match socket2::SockRef::from(&fd).send_to(buf, &to.into()) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            done => return done,
        }
    }
    socket.send_to(buf, to).await.map_err(io::Error::from)
}

/// The endpoint's driver: until the endpoint is dropped.
async fn drive(endpoint: Weak<QuicEndpoint>) {
    let mut buf = vec![0u8; DATAGRAM];
    let mut out = Vec::with_capacity(DATAGRAM);
    loop {
        let Some(this) = endpoint.upgrade() else { break };
        let next = this.run_connections(&mut out).await;
        let wait = next
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_micros(100));
        enum Step {
            Datagram(io::Result<(usize, SocketAddr)>),
            Woken,
        }
        let step = {
            let recv = async { Step::Datagram(this.socket.recv_from(&mut buf).await.map_err(io::Error::from)) };
            let woken = async {
                futures_lite::future::or(this.wake.notified(), glommio::timer::sleep(wait)).await;
                Step::Woken
            };
            futures_lite::future::or(recv, woken).await
        };
        match step {
            Step::Datagram(Ok((n, remote))) => {
                this.handle_datagram(remote, BytesMut::from(&buf[..n]), &mut out).await;
                // More may be queued: take them before running connections.
                for _ in 0..64 {
                    match try_recv_from(&this.socket, &mut buf) {
                        Ok((n, remote)) => this.handle_datagram(remote, BytesMut::from(&buf[..n]), &mut out).await,
                        Err(_) => break,
                    }
                }
            }
            Step::Datagram(Err(e)) => tracing::debug!("quic: receive on {}: {e}", this.local),
            Step::Woken => {}
        }
        drop(this);
    }
}

/// The bus connection's stream of one QUIC connection.
pub struct QuicLink {
    inner: Rc<LinkInner>,
}

struct LinkInner {
    conn: Rc<QuicConn>,
    /// Part of a received chunk not yet read.
    leftover: RefCell<Bytes>,
}

impl Drop for LinkInner {
    fn drop(&mut self) {
        // The last holder is gone: close once the peer has what we sent.
        let conn = self.conn.clone();
        glommio::spawn_local(async move {
            if let Some(id) = conn.stream.get() {
                // Already finished by `shutdown`: an error here is fine.
                let _ = conn.conn.borrow_mut().send_stream(id).finish();
                conn.wake_driver();
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline && conn.lost.borrow().is_none() && !conn.send_done.get() {
                futures_lite::future::or(
                    conn.changed.notified(),
                    glommio::timer::sleep(Duration::from_millis(20)),
                )
                .await;
            }
            conn.conn.borrow_mut().close(
                Instant::now(),
                quinn_proto::VarInt::from_u32(0),
                Bytes::from_static(b"closed"),
            );
            conn.wake_driver();
        })
        .detach();
    }
}

impl QuicLink {
    fn new(conn: Rc<QuicConn>) -> Self {
        Self {
            inner: Rc::new(LinkInner {
                conn,
                leftover: RefCell::new(Bytes::new()),
            }),
        }
    }
}

impl LinkInner {
    fn stream(&self) -> io::Result<StreamId> {
        self.conn
            .stream
            .get()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "quic stream not open"))
    }

    fn lost(&self) -> Option<io::Error> {
        self.conn
            .lost
            .borrow()
            .as_ref()
            .map(|r| io::Error::new(io::ErrorKind::ConnectionReset, format!("quic: {r}")))
    }

    /// The next received bytes (`None`: the peer finished the stream).
    async fn recv_chunk(&self, max: usize) -> io::Result<Option<Bytes>> {
        let id = self.stream()?;
        loop {
            {
                let mut left = self.leftover.borrow_mut();
                if !left.is_empty() {
                    let n = left.len().min(max);
                    return Ok(Some(left.split_to(n)));
                }
            }
            let mut got = None;
            let mut finished = false;
            let mut wake = false;
            {
                let mut c = self.conn.conn.borrow_mut();
                let mut stream = c.recv_stream(id);
                match stream.read(true) {
                    Ok(mut chunks) => {
                        match chunks.next(usize::MAX) {
                            Ok(Some(chunk)) => got = Some(chunk.bytes),
                            Ok(None) => finished = true,
                            Err(ReadError::Blocked) => {}
                            Err(ReadError::Reset(_)) => finished = true,
                        }
                        wake = chunks.finalize().should_transmit();
                    }
                    Err(ReadableError::ClosedStream) => finished = true,
                    Err(ReadableError::IllegalOrderedRead) => finished = true,
                }
            }
            if wake {
                self.conn.wake_driver();
            }
            if let Some(mut bytes) = got {
                let n = bytes.len().min(max);
                let head = bytes.split_to(n);
                *self.leftover.borrow_mut() = bytes;
                return Ok(Some(head));
            }
            if finished {
                return Ok(None);
            }
            if let Some(e) = self.lost() {
                return Err(e);
            }
            self.conn.changed.notified().await;
        }
    }

    async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        let id = self.stream()?;
        loop {
            if let Some(e) = self.lost() {
                return Err(e);
            }
            let written = self.conn.conn.borrow_mut().send_stream(id).write(buf);
            match written {
                Ok(n) => {
                    self.conn.wake_driver();
                    return Ok(n);
                }
                Err(WriteError::Blocked) => self.conn.changed.notified().await,
                Err(e) => return Err(io::Error::new(io::ErrorKind::BrokenPipe, format!("quic: {e}"))),
            }
        }
    }
}

impl Link for QuicLink {
    fn is_datagram(&self) -> bool {
        false
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.recv_chunk(buf.len()).await? {
            Some(bytes) => {
                buf[..bytes.len()].copy_from_slice(&bytes);
                Ok(bytes.len())
            }
            None => Ok(0),
        }
    }

    async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.inner.send(buf).await
    }

    async fn shutdown(&self) {
        if let Ok(id) = self.inner.stream() {
            let _ = self.inner.conn.conn.borrow_mut().send_stream(id).finish();
            self.inner.conn.wake_driver();
        }
    }

    fn peer(&self) -> String {
        format!("quic://{}", self.inner.conn.remote)
    }

    /// The connection stays on this shard (its socket is here); its bytes
    /// go to and from the peer's home shard through a [`BridgeLink`].
    fn handoff(&self) -> io::Result<Handoff> {
        let (to_home, from_quic) = async_channel::bounded::<Bytes>(BRIDGE_DEPTH);
        let (to_quic, from_home) = async_channel::bounded::<Bytes>(BRIDGE_DEPTH);
        let reader = self.inner.clone();
        glommio::spawn_local(async move {
            while let Ok(Some(chunk)) = reader.recv_chunk(64 * 1024).await {
                if to_home.send(chunk).await.is_err() {
                    break;
                }
            }
            to_home.close();
        })
        .detach();
        let writer = self.inner.clone();
        glommio::spawn_local(async move {
            while let Ok(chunk) = from_home.recv().await {
                let mut rest = &chunk[..];
                while !rest.is_empty() {
                    match writer.send(rest).await {
                        Ok(n) => rest = &rest[n..],
                        Err(_) => return,
                    }
                }
            }
            if let Ok(id) = writer.stream() {
                let _ = writer.conn.conn.borrow_mut().send_stream(id).finish();
                writer.conn.wake_driver();
            }
        })
        .detach();
        Ok(Handoff::Bridged(ChannelEnd::new(from_quic, to_quic, self.peer())))
    }
}

/// A connection served on another shard, seen from the peer's home shard:
/// bytes cross through bounded channels.
pub struct BridgeLink {
    end: ChannelEnd,
    leftover: RefCell<Bytes>,
}

impl BridgeLink {
    /// The link over `end`.
    pub fn new(end: ChannelEnd) -> Self {
        Self {
            end,
            leftover: RefCell::new(Bytes::new()),
        }
    }
}

impl Link for BridgeLink {
    fn is_datagram(&self) -> bool {
        false
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.leftover.borrow().is_empty() {
            match self.end.recv().await {
                Some(chunk) => *self.leftover.borrow_mut() = chunk,
                None => return Ok(0),
            }
        }
        let mut left = self.leftover.borrow_mut();
        let n = left.len().min(buf.len());
        buf[..n].copy_from_slice(&left.split_to(n));
        Ok(n)
    }

    async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.end.send_copy(buf, "bridged connection ended").await
    }

    async fn shutdown(&self) {
        self.end.close();
    }

    fn peer(&self) -> String {
        self.end.peer()
    }

    fn handoff(&self) -> io::Result<Handoff> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a bridged connection does not move again",
        ))
    }
}

thread_local! {
    /// This shard's client endpoints, one per address family.
    static CLIENTS: RefCell<[Option<Rc<QuicEndpoint>>; 2]> = const { RefCell::new([None, None]) };
}

/// Dials `quic://` from this shard's client endpoint (made on first use).
pub async fn connect(
    remote: SocketAddr,
    server_name: &str,
    config: quinn_proto::ClientConfig,
    timeout: Duration,
) -> io::Result<QuicLink> {
    let slot = usize::from(remote.is_ipv6());
    let existing = CLIENTS.with(|c| c.borrow()[slot].clone());
    let endpoint = match existing {
        Some(endpoint) => endpoint,
        None => {
            let any: SocketAddr = if remote.is_ipv6() {
                "[::]:0".parse().map_err(|_| io::Error::other("address"))?
            } else {
                "0.0.0.0:0".parse().map_err(|_| io::Error::other("address"))?
            };
            let endpoint = QuicEndpoint::bind(any, None)?;
            CLIENTS.with(|c| c.borrow_mut()[slot] = Some(endpoint.clone()));
            endpoint
        }
    };
    endpoint.connect(remote, server_name, config, timeout).await
}
