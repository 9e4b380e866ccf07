//! How bytes move: TCP, Unix and UDP sockets on the shard's glommio reactor,
//! behind one small trait, [`Link`]. (`mem://` needs no socket: the node hands
//! payloads to the peer's shard directly.)
//!
//! A [`Link`] is either a byte stream (tcp, unix: frames are cut by the
//! streaming decoder) or datagrams (udp: one frame per datagram). A link is
//! shared by its connection's reader and writer tasks, so its methods take
//! `&self`; it lives on one shard and never moves.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::{TcpListener, TcpStream, UdpSocket};

use crate::address::Address;

pub mod quic;
mod splice;
pub mod tunnel;
pub use quic::{BridgeLink, QuicEndpoint, QuicLink};
pub use tunnel::TunnelLink;

/// One connected link, as the connection layer drives it.
#[allow(async_fn_in_trait)] // shards are single-threaded: no Send bound wanted
pub trait Link: 'static {
    /// Whether each `recv` / `send` is one whole datagram.
    fn is_datagram(&self) -> bool;
    /// Reads bytes (stream) or one datagram into `buf`; `Ok(0)` on a stream
    /// means the peer closed it.
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes some of `buf` (stream) or all of it as one datagram.
    async fn send(&self, buf: &[u8]) -> io::Result<usize>;
    /// Writes some of `bufs`, in order (streams; a gathering write where the
    /// link has one, else the first non-empty buffer alone).
    async fn send_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        send_first(self, bufs).await
    }
    /// Writes all of `parts`, in order (streams), in as few gathering writes
    /// as the socket takes; returns how many of their bytes went without a
    /// copy (see [`Link::allow_zero_copy`]).
    async fn send_parts(&self, parts: Vec<Bytes>) -> io::Result<u64> {
        send_all_gathered(self, parts).await.map(|()| 0)
    }
    /// Lets [`Link::send_parts`] write without copying where the link can
    /// (Unix sockets to a peer of the same user: see `splice.rs`); returns
    /// whether it will.
    fn allow_zero_copy(&self) -> bool {
        false
    }
    /// Half-closes the sending side (streams); nothing for datagrams.
    async fn shutdown(&self);
    /// The remote address, for logs.
    fn peer(&self) -> String;
    /// What another shard needs to take this connection over (see
    /// [`Handoff`]); the link must be dropped here without shutting it down.
    fn handoff(&self) -> io::Result<Handoff>;
    /// The message head every frame on this link carries (tunnels through
    /// relays name both ends); `None`: frames go without one.
    fn frame_head(&self) -> Option<&crate::proto::MessageHead> {
        None
    }
    /// This link is a pair's latency path (frame-sync traffic): from now on
    /// `recv` should wait in a way that preempts bulk work on the shard.
    /// Links without such a way keep waiting as before.
    fn set_latency(&self) -> io::Result<()> {
        Ok(())
    }
    /// Sizes the kernel's send buffer for writes of up to `batch` bytes.
    /// Links whose kernel sizes it well itself (TCP autotunes), or that have
    /// none, keep theirs.
    fn size_send_buffer(&self, _batch: usize) -> io::Result<()> {
        Ok(())
    }
    /// Whether the kernel copies every write into buffers of its own whose
    /// data areas start 64-byte aligned, a write stopped short stopping at a
    /// multiple of 64 bytes (Unix stream sockets: each write fills skbs of
    /// its own, 3 776 bytes of head and 32 KiB of pages). A large payload
    /// whose destination sits in its cache line as its source does is
    /// copied faster (perf/README.md item 27), so frames for these links
    /// are laid out that way (`stream::PacketFrame::aligned`). TCP's copy
    /// (into the writing thread's page fragment, one run across writes and
    /// sockets) measured the same aligned or not.
    fn aligns_writes(&self) -> bool {
        false
    }
    /// Whether writes go through the kernel's TCP stack (TCP connections;
    /// not Unix sockets, UDP, QUIC or tunnels): such a link's writes are
    /// batched by `NodeConfig::tcp_write_batch` instead of `write_batch`.
    fn is_tcp(&self) -> bool {
        false
    }
    /// Waits until bytes are probably there for [`Link::try_recv_uninit`]
    /// (the readiness wait `recv` makes, without its read); `Ok(false)` at
    /// once from links that wait their own way: read those with `recv`.
    async fn readable(&self) -> io::Result<bool> {
        Ok(false)
    }
    /// Whether [`Link::try_recv_uninit`] can read at all.
    fn recvs_uninit(&self) -> bool {
        false
    }
    /// Bytes already waiting, read without waiting into memory that need not
    /// be initialised (`None`: none waiting, or the link cannot read that
    /// way; the caller then reads as usual). `Ok(0)`: the peer closed.
    fn try_recv_uninit(&self, _buf: &mut [MaybeUninit<u8>]) -> Option<io::Result<usize>> {
        None
    }
    /// One whole datagram, owned (links that pass buffers on, like tunnels,
    /// take it without a copy).
    async fn send_datagram(&self, datagram: Bytes) -> io::Result<usize> {
        self.send(&datagram).await
    }
    /// One whole datagram as an owned buffer (`buf`: scratch space for links
    /// that read into memory of their own).
    async fn recv_datagram(&self, buf: &mut [u8]) -> io::Result<Bytes> {
        let n = self.recv(buf).await?;
        Ok(Bytes::copy_from_slice(&buf[..n]))
    }
    /// One more datagram if one is already waiting, without waiting (`None`:
    /// none there, or the link cannot look without waiting). A reader takes
    /// what arrived together in one go: one pass of its connection's work,
    /// and one wake-up of the application, per burst instead of per
    /// datagram (perf/README.md item 29).
    async fn recv_datagram_now(&self, _buf: &mut [u8]) -> Option<io::Result<Bytes>> {
        None
    }
    /// The largest datagram payload every hop to the peer carries, where the
    /// kernel knows it for certain: a loopback peer's route (the loopback
    /// interface's MTU, less the IP and UDP headers). `None` elsewhere: a
    /// route's first hop says nothing of narrower hops behind it.
    fn loopback_mtu(&self) -> Option<usize> {
        None
    }
    /// Whether the link reads from a socket other links share (an accepted
    /// UDP peer, fed by its listener's demultiplexer): it is better off on
    /// a socket of its own ([`Link::handoff`] makes one), on any shard.
    fn shares_socket(&self) -> bool {
        false
    }
}

/// [`Link::send_vectored`] without a gathering write: the first non-empty
/// buffer alone.
async fn send_first<L: Link + ?Sized>(link: &L, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    match bufs.iter().find(|b| !b.is_empty()) {
        Some(first) => link.send(first).await,
        None => Ok(0),
    }
}

/// Writes all of `parts` in order on a stream link, as few gathering writes
/// as the socket takes ([`Link::send_parts`] where the link has no way of
/// its own).
pub async fn send_all_gathered<L: Link + ?Sized>(link: &L, mut parts: Vec<Bytes>) -> io::Result<()> {
    use bytes::Buf;
    /// Slices per write (the kernel takes up to `IOV_MAX`, 1024).
    const MAX_SLICES: usize = 256;
    let mut first = 0;
    while first < parts.len() {
        let n = {
            let slices: Vec<io::IoSlice<'_>> = parts[first..]
                .iter()
                .take(MAX_SLICES)
                .map(|part| io::IoSlice::new(part))
                .collect();
            link.send_vectored(&slices).await?
        };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes"));
        }
        let mut left = n;
        while left > 0 && first < parts.len() {
            let part = &mut parts[first];
            if left >= part.len() {
                left -= part.len();
                first += 1;
            } else {
                part.advance(left);
                left = 0;
            }
        }
        // Empty parts (none are made, but cheap to pass over).
        while first < parts.len() && parts[first].is_empty() {
            first += 1;
        }
    }
    Ok(())
}

/// A connection on its way to another shard: the socket itself (stream
/// links, a duplicated descriptor) or how to make a connected socket that
/// takes over the peer's datagrams (UDP, through SO_REUSEPORT).
#[derive(Debug)]
pub enum Handoff {
    /// A TCP socket.
    Tcp(OwnedFd, String),
    /// A Unix stream socket.
    Unix(OwnedFd, String),
    /// A UDP peer of a listening socket.
    Udp {
        /// The listener's address.
        local: SocketAddr,
        /// The peer.
        peer: SocketAddr,
    },
    /// A connection that stays on its shard (QUIC: the socket is shared by
    /// many connections); its bytes cross over.
    Bridged(ChannelEnd),
    /// A tunnel through a relay: its channels move as they are.
    Tunnel(tunnel::TunnelEnd),
}

impl Handoff {
    /// Rebuilds the link on the current shard.
    pub async fn adopt(self) -> io::Result<Connected> {
        match self {
            // SAFETY: the descriptor is owned and moved in.
            Handoff::Tcp(fd, peer) => Ok(Connected::Tcp(StreamLink::new(
                unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) },
                peer,
            ))),
            // SAFETY: as above.
            Handoff::Unix(fd, peer) => Ok(Connected::Unix(StreamLink::new(
                unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) },
                peer,
            ))),
            Handoff::Udp { local, peer } => {
                let socket = udp_socket(local)?;
                socket.connect(peer).await.map_err(io::Error::from)?;
                Ok(Connected::Udp(UdpLink {
                    socket: Rc::new(socket),
                    peer,
                    inbox: None,
                    latency: std::cell::Cell::new(false),
                }))
            }
            Handoff::Bridged(end) => Ok(Connected::Bridged(BridgeLink::new(end))),
            Handoff::Tunnel(end) => Ok(Connected::Tunnel(TunnelLink::new(end))),
        }
    }
}

/// The end of a link whose bytes other tasks carry (a bridged QUIC
/// connection, a tunnel through a relay): a bounded channel each way, which
/// crosses threads.
#[derive(Debug)]
pub struct ChannelEnd {
    rx: async_channel::Receiver<Bytes>,
    tx: async_channel::Sender<Bytes>,
    peer: String,
}

impl ChannelEnd {
    /// An end receiving from `rx`, sending into `tx`; `peer` for logs.
    pub fn new(rx: async_channel::Receiver<Bytes>, tx: async_channel::Sender<Bytes>, peer: String) -> Self {
        Self { rx, tx, peer }
    }

    /// The next chunk; `None` once the other side is gone.
    pub async fn recv(&self) -> Option<Bytes> {
        self.rx.recv().await.ok()
    }

    /// Sends `chunk` as it is; `ended` names what broke.
    pub async fn send_owned(&self, chunk: Bytes, ended: &'static str) -> io::Result<usize> {
        let n = chunk.len();
        self.tx
            .send(chunk)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, ended))?;
        Ok(n)
    }

    /// Sends a copy of `buf` as one chunk; `ended` names what broke.
    pub async fn send_copy(&self, buf: &[u8], ended: &'static str) -> io::Result<usize> {
        self.tx
            .send(Bytes::copy_from_slice(buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, ended))?;
        Ok(buf.len())
    }

    /// Closes both directions.
    pub fn close(&self) {
        self.tx.close();
        self.rx.close();
    }

    /// The peer, for logs.
    pub fn peer(&self) -> String {
        self.peer.clone()
    }

    /// Another handle on the same channels.
    pub fn share(&self) -> Self {
        Self {
            rx: self.rx.clone(),
            tx: self.tx.clone(),
            peer: self.peer.clone(),
        }
    }
}

/// Kernel buffer asked for each UDP socket (both directions). Loopback bursts
/// of 548-byte datagrams overflow the 208 KiB default at once; the kernel caps
/// the request at `net.core.rmem_max` / `wmem_max`.
pub const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// A UDP socket bound to `local`, with SO_REUSEADDR and SO_REUSEPORT (a
/// connected socket of another shard takes over one peer's datagrams from the
/// listening socket) and [`UDP_SOCKET_BUFFER`] buffers.
fn udp_socket(local: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Best effort: a smaller buffer only means more resends.
    let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER);
    socket.bind(&local.into())?;
    // SAFETY: the descriptor is a fresh, owned, non-blocking UDP socket whose
    // ownership moves into glommio's socket.
    Ok(unsafe { UdpSocket::from_raw_fd(socket.into_raw_fd()) })
}

fn dup_fd(fd: &impl AsFd) -> io::Result<OwnedFd> {
    fd.as_fd().try_clone_to_owned()
}

/// A byte-stream socket (TCP or Unix) shared by two tasks. Borrows last one
/// poll each, so the reader and writer never hold it at the same time.
///
/// A latency path ([`Link::set_latency`]) waits for bytes differently:
/// glommio waits for a readable stream with a poll on its main io_uring,
/// which a shard busy with bulk work only looks at between task-queue runs;
/// a receive (here a one-byte peek on a duplicate descriptor, `probe`) goes
/// to its latency ring, whose completions make `need_preempt` true, so the
/// bulk tasks yield at their next `yield_if_needed` and the latency queue
/// runs. The bytes themselves are then read with a non-blocking `recv`.
pub struct StreamLink<S: AsRawFd> {
    socket: RefCell<S>,
    probe: RefCell<Option<Rc<TcpStream>>>,
    peer: String,
    zero_copy: RefCell<ZeroCopy>,
}

/// Whether a stream link writes large parts without copying (`splice.rs`).
#[derive(Debug)]
enum ZeroCopy {
    Off,
    /// Allowed; the pipe is made at the first write that uses it.
    Allowed,
    On(splice::Splicer),
}

impl<S: AsRawFd> StreamLink<S> {
    /// Wraps a connected socket.
    pub fn new(socket: S, peer: String) -> Self {
        Self {
            socket: RefCell::new(socket),
            probe: RefCell::new(None),
            peer,
            zero_copy: RefCell::new(ZeroCopy::Off),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor lives as long as the link (the socket is
        // never replaced).
        unsafe { BorrowedFd::borrow_raw(self.socket.borrow().as_raw_fd()) }
    }

    /// Lets go of zero-copy parts the socket no longer holds (when no write
    /// is looking after them right now).
    fn release_written(&self) {
        if let Ok(mut zero_copy) = self.zero_copy.try_borrow_mut()
            && let ZeroCopy::On(splicer) = &mut *zero_copy
        {
            splicer.release(self.fd());
        }
    }
}

impl<S: StreamKind> StreamLink<S> {
    /// [`Link::send_parts`] through the link's pipe (the bytes written);
    /// `Err(parts)` when the link has none (the caller copies them).
    async fn splice_parts(&self, parts: Vec<Bytes>) -> Result<io::Result<u64>, Vec<Bytes>> {
        let bytes: u64 = parts.iter().map(|p| p.len() as u64).sum();
        {
            let mut zero_copy = self.zero_copy.borrow_mut();
            match &mut *zero_copy {
                ZeroCopy::Allowed => match splice::Splicer::new() {
                    Ok(splicer) => *zero_copy = ZeroCopy::On(splicer),
                    Err(e) => {
                        tracing::debug!(peer = %self.peer, "zero-copy writes off: {e}");
                        *zero_copy = ZeroCopy::Off;
                        return Err(parts);
                    }
                },
                ZeroCopy::On(_) => {}
                ZeroCopy::Off => return Err(parts),
            }
            if let ZeroCopy::On(splicer) = &mut *zero_copy {
                splicer.queue(parts);
            }
        }
        loop {
            let progress = match &mut *self.zero_copy.borrow_mut() {
                ZeroCopy::On(splicer) => splicer.advance(self.fd()),
                // Only a handoff turns it off, and it refuses with parts in
                // flight.
                ZeroCopy::Off | ZeroCopy::Allowed => {
                    Err(io::Error::other("zero-copy writes stopped in the middle of a write"))
                }
            };
            match progress {
                Ok(splice::Progress::Done) => {
                    self.release_written();
                    return Ok(Ok(bytes));
                }
                Ok(splice::Progress::Full) => {
                    // Parts the peer has read meanwhile can go.
                    self.release_written();
                    if let Err(e) = std::future::poll_fn(|cx| self.socket.borrow_mut().poll_writable(cx)).await {
                        return Ok(Err(e));
                    }
                }
                Err(e) => return Ok(Err(e)),
            }
        }
    }
}

impl<S: AsRawFd> Drop for StreamLink<S> {
    fn drop(&mut self) {
        let zero_copy = std::mem::replace(self.zero_copy.get_mut(), ZeroCopy::Off);
        let splicer = match zero_copy {
            ZeroCopy::On(mut splicer) => {
                splicer.release(self.fd());
                if splicer.is_idle() {
                    return;
                }
                splicer
            }
            _ => return,
        };
        // The peer may still read pages of parts held: they must outlive
        // the socket.
        match dup_fd(&self.fd()) {
            Ok(socket) => splice::linger(socket, splicer),
            Err(e) => {
                tracing::warn!(peer = %self.peer, held = splicer.held_bytes(), "cannot keep a closing socket to free its zero-copy buffers ({e}): they are leaked");
                std::mem::forget(splicer);
            }
        }
    }
}

/// Whether a non-blocking call's error only means "not now".
fn not_now(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted
}

/// `buf` as memory for a `recv` to fill.
///
/// # Safety
/// Only a `recv` may write through the result: it writes initialised bytes
/// (a `u8` slice has the layout of a `MaybeUninit<u8>` slice).
unsafe fn for_recv(buf: &mut [u8]) -> &mut [MaybeUninit<u8>] {
    // SAFETY: same layout; the caller lets only `recv` write.
    unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) }
}

/// One non-blocking `recv` into `buf`; `None` when no bytes are there yet.
fn recv_now(fd: BorrowedFd<'_>, buf: &mut [MaybeUninit<u8>]) -> Option<io::Result<usize>> {
    match socket2::SockRef::from(&fd).recv_with_flags(buf, libc::MSG_DONTWAIT) {
        Err(e) if not_now(&e) => None,
        done => Some(done),
    }
}

/// The kernel's MTU of the route to `peer` less the IP and UDP headers: the
/// largest datagram payload it sends unfragmented (`IP_MTU` of a socket
/// connected to it; connecting a UDP socket sends nothing).
fn route_mtu(peer: SocketAddr) -> io::Result<usize> {
    let (local, level, name, headers): (SocketAddr, _, _, usize) = if peer.is_ipv6() {
        (
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU,
            40 + 8,
        )
    } else {
        (
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            20 + 8,
        )
    };
    let socket = std::net::UdpSocket::bind(local)?;
    socket.connect(peer)?;
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the descriptor is open while `socket` lives; `mtu` and `len`
    // describe a writable `c_int`.
    let rc = unsafe { libc::getsockopt(socket.as_raw_fd(), level, name, (&raw mut mtu).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(mtu).unwrap_or(0).saturating_sub(headers))
}

/// Which [`Handoff`] a stream socket makes.
pub trait StreamKind: AsRawFd {
    /// Completes once the socket is probably readable, reading nothing.
    fn poll_readable(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>>;
    /// Completes once the socket is probably writable, writing nothing.
    fn poll_writable(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>>;
}

impl StreamKind for TcpStream {
    fn poll_readable(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        TcpStream::poll_readable(self, cx)
    }

    fn poll_writable(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        TcpStream::poll_writable(self, cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + StreamKind + 'static> Link for StreamLink<S> {
    fn is_datagram(&self) -> bool {
        false
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let probe = self.probe.borrow().clone();
        let Some(probe) = probe else {
            let n = std::future::poll_fn(|cx| Pin::new(&mut *self.socket.borrow_mut()).poll_read(cx, buf)).await?;
            if n > 0 {
                self.release_written();
            }
            return Ok(n);
        };
        loop {
            // SAFETY: only `recv` writes into it.
            if let Some(done) = self.try_recv_uninit(unsafe { for_recv(buf) }) {
                return done;
            }
            // Completes once a byte is there (or the peer closed: then the
            // next `recv` says so).
            let fd = self.socket.borrow().as_raw_fd();
            if let Some(Err(e)) = crate::runtime::readable(fd, probe.peek(&mut [0u8; 1])).await {
                return Err(e.into());
            }
        }
    }

    fn recvs_uninit(&self) -> bool {
        true
    }

    async fn readable(&self) -> io::Result<bool> {
        // A latency path waits on the latency ring (`recv`).
        if self.probe.borrow().is_some() {
            return Ok(false);
        }
        std::future::poll_fn(|cx| self.socket.borrow_mut().poll_readable(cx)).await?;
        Ok(true)
    }

    fn try_recv_uninit(&self, buf: &mut [MaybeUninit<u8>]) -> Option<io::Result<usize>> {
        let read = recv_now(self.fd(), buf);
        if let Some(Ok(1..)) = read {
            // The peer's acknowledgements come in here: what it has read
            // of the parts written without a copy can go.
            self.release_written();
        }
        read
    }

    async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| Pin::new(&mut *self.socket.borrow_mut()).poll_write(cx, buf)).await
    }

    /// A non-blocking `sendmsg` of all of `bufs`; when the socket is full,
    /// glommio's write of the first buffer, which waits for room.
    async fn send_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let now =
            socket2::SockRef::from(&self.fd()).send_vectored_with_flags(bufs, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
        match now {
            Err(e) if not_now(&e) => {}
            done => return done,
        }
        send_first(self, bufs).await
    }

    fn set_latency(&self) -> io::Result<()> {
        let fd = dup_fd(&self.fd())?;
        // SAFETY: a fresh duplicate, owned by the probe from here on.
        let probe = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
        *self.probe.borrow_mut() = Some(Rc::new(probe));
        Ok(())
    }

    fn aligns_writes(&self) -> bool {
        self.peer.starts_with("unix:")
    }

    fn is_tcp(&self) -> bool {
        !self.peer.starts_with("unix:")
    }

    /// Unix sockets: `batch` as `SO_SNDBUF`, which the kernel doubles: one
    /// batch waits in the socket while the writer makes the next. The
    /// default (`net.core.wmem_default`, 208 KiB here) took less than one
    /// 256 KiB batch: a third of the writes stopped short, and the writer
    /// waited for a readiness poll each time (unix 16 KiB, alternating
    /// runs: 0.23 → 0.35 M msgs/s; 1 KiB +18 %, 64 B +3 %; a 1 MiB buffer
    /// gained less at 16 KiB and cost 64 B 14 %).
    fn size_send_buffer(&self, batch: usize) -> io::Result<()> {
        if !self.peer.starts_with("unix:") {
            return Ok(());
        }
        socket2::SockRef::from(&self.fd()).set_send_buffer_size(batch)
    }

    async fn send_parts(&self, parts: Vec<Bytes>) -> io::Result<u64> {
        match self.splice_parts(parts).await {
            Ok(written) => written,
            Err(parts) => send_all_gathered(self, parts).await.map(|()| 0),
        }
    }

    fn allow_zero_copy(&self) -> bool {
        let mut zero_copy = self.zero_copy.borrow_mut();
        if matches!(*zero_copy, ZeroCopy::Off) && self.peer.starts_with("unix:") && splice::peer_is_same_user(self.fd())
        {
            *zero_copy = ZeroCopy::Allowed;
        }
        !matches!(*zero_copy, ZeroCopy::Off)
    }

    async fn shutdown(&self) {
        let _ = std::future::poll_fn(|cx| Pin::new(&mut *self.socket.borrow_mut()).poll_close(cx)).await;
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }

    fn handoff(&self) -> io::Result<Handoff> {
        if let ZeroCopy::On(splicer) = &*self.zero_copy.borrow()
            && !splicer.is_idle()
        {
            // Connections move before they carry data; parts written
            // without a copy cannot move with them.
            return Err(io::Error::other(
                "a connection with zero-copy writes in flight cannot move",
            ));
        }
        *self.zero_copy.borrow_mut() = ZeroCopy::Off;
        let fd = dup_fd(&self.fd())?;
        Ok(if self.peer.starts_with("unix:") {
            Handoff::Unix(fd, self.peer.clone())
        } else {
            Handoff::Tcp(fd, self.peer.clone())
        })
    }
}

/// A UDP link: either a socket connected to one peer (the dialling side), or
/// one peer of a listening socket, fed by the listener's demultiplexer.
pub struct UdpLink {
    socket: Rc<UdpSocket>,
    peer: SocketAddr,
    /// Datagrams for this peer when the socket is shared (listening side).
    inbox: Option<LocalReceiver<Vec<u8>>>,
    /// A pair's latency path (see [`Link::set_latency`]; a socket of its
    /// own only: shared ones are read by the listener's demultiplexer).
    latency: std::cell::Cell<bool>,
}

impl Link for UdpLink {
    fn is_datagram(&self) -> bool {
        true
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.inbox {
            // A datagram already waiting is read at once (no io_uring round
            // trip while a burst lasts); otherwise a one-byte peek waits for
            // the next, left queued for the read: on a latency path as a
            // stream link's latency path waits (see `StreamLink`).
            None => loop {
                if let Some(done) = self.recv_waiting(buf) {
                    return done;
                }
                let mut byte = [0u8; 1];
                let peek = self.socket.peek(&mut byte);
                if self.latency.get() {
                    if let Some(Err(e)) = crate::runtime::readable(self.socket.as_raw_fd(), peek).await {
                        return Err(e.into());
                    }
                } else {
                    peek.await.map_err(io::Error::from)?;
                }
            },
            Some(inbox) => {
                let datagram = inbox
                    .recv()
                    .await
                    .ok_or_else(|| io::Error::new(io::ErrorKind::ConnectionAborted, "udp listener closed"))?;
                let n = datagram.len().min(buf.len());
                buf[..n].copy_from_slice(&datagram[..n]);
                Ok(n)
            }
        }
    }

    async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        // A datagram send rarely blocks: try the plain non-blocking syscall
        // first (one per datagram instead of an io_uring submission and
        // completion round trip each), and queue on the ring only when the
        // socket buffer is full.
        // SAFETY: the descriptor belongs to `self.socket`, alive meanwhile.
        let fd = unsafe { BorrowedFd::borrow_raw(self.socket.as_raw_fd()) };
        let socket = socket2::SockRef::from(&fd);
        let now = match self.inbox {
            None => socket.send(buf),
            Some(_) => socket.send_to(buf, &self.peer.into()),
        };
        match now {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            done => return done,
        }
        let sent = match self.inbox {
            None => self.socket.send(buf).await,
            Some(_) => self.socket.send_to(buf, self.peer).await,
        };
        sent.map_err(io::Error::from)
    }

    async fn recv_datagram(&self, buf: &mut [u8]) -> io::Result<Bytes> {
        match &self.inbox {
            // The demultiplexer's datagram as it is: no second copy.
            Some(inbox) => inbox
                .recv()
                .await
                .map(Bytes::from)
                .ok_or_else(|| io::Error::new(io::ErrorKind::ConnectionAborted, "udp listener closed")),
            None => {
                let n = self.recv(buf).await?;
                Ok(Bytes::copy_from_slice(&buf[..n]))
            }
        }
    }

    async fn recv_datagram_now(&self, buf: &mut [u8]) -> Option<io::Result<Bytes>> {
        match &self.inbox {
            Some(inbox) => match futures_lite::future::poll_once(inbox.recv()).await? {
                Some(datagram) => Some(Ok(Bytes::from(datagram))),
                None => Some(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "udp listener closed",
                ))),
            },
            None => Some(self.recv_waiting(buf)?.map(|n| Bytes::copy_from_slice(&buf[..n]))),
        }
    }

    fn shares_socket(&self) -> bool {
        self.inbox.is_some()
    }

    fn loopback_mtu(&self) -> Option<usize> {
        if !self.peer.ip().is_loopback() {
            return None;
        }
        match route_mtu(self.peer) {
            Ok(mtu) => Some(mtu),
            Err(e) => {
                tracing::debug!("no route MTU to {}: {e}", self.peer);
                None
            }
        }
    }

    async fn shutdown(&self) {}

    fn peer(&self) -> String {
        format!("udp://{}", self.peer)
    }

    fn set_latency(&self) -> io::Result<()> {
        self.latency.set(self.inbox.is_none());
        Ok(())
    }

    fn handoff(&self) -> io::Result<Handoff> {
        Ok(Handoff::Udp {
            local: self.socket.local_addr().map_err(io::Error::from)?,
            peer: self.peer,
        })
    }
}

/// A connected link of any transport.
pub enum Connected {
    /// TCP.
    Tcp(StreamLink<TcpStream>),
    /// Unix stream socket (see [`unix_stream`] for why it is a `TcpStream`).
    Unix(StreamLink<TcpStream>),
    /// UDP.
    Udp(UdpLink),
    /// QUIC (one stream of one QUIC connection).
    Quic(QuicLink),
    /// A connection served on another shard (see [`Handoff::Bridged`]).
    Bridged(BridgeLink),
    /// A connection through a relay.
    Tunnel(TunnelLink),
}

/// Resolves `host:port` to one socket address (the first the resolver gives).
pub fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host}:{port} resolves to nothing")))
}

/// Dials `address`, giving up after `timeout`.
pub async fn connect(address: &Address, timeout: Duration) -> io::Result<Connected> {
    match address {
        Address::Tcp { host, port } => {
            let addr = resolve(host, *port)?;
            // A blocking connect on glommio's blocking thread, not glommio's
            // io_uring connect: after that one failed (ECONNREFUSED) on this
            // machine (Linux 6.18, glommio 0.9), the executor no longer woke
            // up for later events, cross-thread wake-ups included.
            let std_stream = glommio::executor()
                .spawn_blocking(move || std::net::TcpStream::connect_timeout(&addr, timeout))
                .await
                .map_err(|e| annotate(e, address))?;
            std_stream.set_nodelay(true)?;
            std_stream.set_nonblocking(true)?;
            // SAFETY: the descriptor is owned and moved in.
            let stream = unsafe { TcpStream::from_raw_fd(std_stream.into_raw_fd()) };
            Ok(Connected::Tcp(StreamLink::new(stream, address.to_string())))
        }
        Address::Unix(path) => {
            // Local and immediate: a blocking connect cannot stall the shard.
            let std_stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| annotate(e, address))?;
            Ok(Connected::Unix(StreamLink::new(
                unix_stream(std_stream)?,
                address.to_string(),
            )))
        }
        Address::UnixAbstract(name) => {
            let std_stream = std::os::unix::net::UnixStream::connect_addr(&abstract_addr(name)?)
                .map_err(|e| annotate(e, address))?;
            Ok(Connected::Unix(StreamLink::new(
                unix_stream(std_stream)?,
                address.to_string(),
            )))
        }
        Address::Udp { host, port } => {
            let addr = resolve(host, *port)?;
            let local: SocketAddr = if addr.is_ipv6() {
                "[::]:0".parse().map_err(io::Error::other)?
            } else {
                "0.0.0.0:0".parse().map_err(io::Error::other)?
            };
            let socket = udp_socket(local).map_err(|e| annotate(e, address))?;
            socket.connect(addr).await.map_err(|e| map_glommio(e, address))?;
            Ok(Connected::Udp(UdpLink {
                socket: Rc::new(socket),
                peer: addr,
                inbox: None,
                latency: std::cell::Cell::new(false),
            }))
        }
        Address::Quic { .. } | Address::Mem(_) | Address::Relay(_) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{address}: not a socket transport of this build"),
        )),
    }
}

fn abstract_addr(name: &str) -> io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

/// A connected Unix stream socket on the shard's reactor.
///
/// glommio's `TcpStream` is a thin io_uring wrapper over any connected
/// stream socket (recv, send, shutdown): we use it for `AF_UNIX` as well,
/// because glommio's `UnixStream` does not expose its descriptor, which a
/// connection needs to move to its peer's home shard.
fn unix_stream(std_stream: std::os::unix::net::UnixStream) -> io::Result<TcpStream> {
    std_stream.set_nonblocking(true)?;
    // SAFETY: the descriptor is owned and moved in.
    Ok(unsafe { TcpStream::from_raw_fd(std_stream.into_raw_fd()) })
}

/// A listening Unix socket on the shard's reactor (accepts with io_uring;
/// see [`unix_stream`]).
fn unix_listener(std_listener: std::os::unix::net::UnixListener) -> io::Result<TcpListener> {
    std_listener.set_nonblocking(true)?;
    // SAFETY: the descriptor is owned and moved in.
    Ok(unsafe { TcpListener::from_raw_fd(std_listener.into_raw_fd()) })
}

fn annotate(e: io::Error, address: &Address) -> io::Error {
    io::Error::new(e.kind(), format!("{address}: {e}"))
}

fn map_glommio(e: glommio::GlommioError<()>, address: &Address) -> io::Error {
    let e = io::Error::from(e);
    io::Error::new(e.kind(), format!("{address}: {e}"))
}

/// A bound listener.
pub enum Listener {
    /// TCP (SO_REUSEPORT: every shard may bind the same port).
    Tcp(TcpListener),
    /// Unix stream socket (see [`unix_stream`]).
    Unix(TcpListener),
    /// UDP: one socket, peers told apart by source address.
    Udp(Rc<UdpSocket>),
    /// QUIC: a server endpoint.
    Quic(Rc<QuicEndpoint>),
}

impl Listener {
    /// Binds `address` on the current shard. `quic`: the server side of
    /// QUIC (certificate and CA); a `quic://` address needs it.
    pub fn bind(address: &Address, quic: Option<Arc<quinn_proto::ServerConfig>>) -> io::Result<Listener> {
        match address {
            Address::Tcp { host, port } => {
                let addr = resolve(host, *port)?;
                TcpListener::bind(addr)
                    .map(Listener::Tcp)
                    .map_err(|e| map_glommio(e, address))
            }
            Address::Unix(path) => {
                remove_stale_socket(path);
                let listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| annotate(e, address))?;
                unix_listener(listener).map(Listener::Unix)
            }
            Address::UnixAbstract(name) => {
                let listener = std::os::unix::net::UnixListener::bind_addr(&abstract_addr(name)?)
                    .map_err(|e| annotate(e, address))?;
                unix_listener(listener).map(Listener::Unix)
            }
            Address::Udp { host, port } => {
                let addr = resolve(host, *port)?;
                udp_socket(addr)
                    .map(|s| Listener::Udp(Rc::new(s)))
                    .map_err(|e| annotate(e, address))
            }
            Address::Quic { host, port } => {
                let config = quic.ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{address}: QUIC needs the node's certificate (NodeConfig::tls)"),
                    )
                })?;
                let addr = resolve(host, *port)?;
                QuicEndpoint::bind(addr, Some(config))
                    .map(Listener::Quic)
                    .map_err(|e| annotate(e, address))
            }
            Address::Mem(_) | Address::Relay(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{address}: not a socket transport (nothing listens on it)"),
            )),
        }
    }

    /// The bound address (with the port the kernel chose for port 0).
    pub fn local_address(&self, requested: &Address) -> Address {
        let port_of = |addr: io::Result<SocketAddr>| addr.map(|a| a.port()).ok();
        match (self, requested) {
            (Listener::Tcp(l), Address::Tcp { host, .. }) => match port_of(l.local_addr().map_err(io::Error::from)) {
                Some(port) => Address::Tcp {
                    host: host.clone(),
                    port,
                },
                None => requested.clone(),
            },
            (Listener::Udp(s), Address::Udp { host, .. }) => match port_of(s.local_addr().map_err(io::Error::from)) {
                Some(port) => Address::Udp {
                    host: host.clone(),
                    port,
                },
                None => requested.clone(),
            },
            (Listener::Quic(e), Address::Quic { host, .. }) => Address::Quic {
                host: host.clone(),
                port: e.local_addr().port(),
            },
            _ => requested.clone(),
        }
    }

    /// Accepts the next stream connection (TCP / Unix listeners).
    pub async fn accept(&self) -> io::Result<Connected> {
        match self {
            Listener::Tcp(l) => {
                let stream = l.accept().await.map_err(io::Error::from)?;
                stream.set_nodelay(true)?;
                let peer = stream
                    .peer_addr()
                    .map(|a| format!("tcp://{a}"))
                    .unwrap_or_else(|_| "tcp://?".into());
                Ok(Connected::Tcp(StreamLink::new(stream, peer)))
            }
            Listener::Unix(l) => {
                let stream = l.accept().await.map_err(io::Error::from)?;
                Ok(Connected::Unix(StreamLink::new(stream, "unix:(accepted)".into())))
            }
            Listener::Udp(_) => Err(io::Error::new(io::ErrorKind::Unsupported, "udp has no accept")),
            Listener::Quic(endpoint) => endpoint.accept().await.map(Connected::Quic),
        }
    }
}

/// Demultiplexes a listening UDP socket: datagrams from a new source address
/// make a new [`UdpLink`]; later ones are queued to that link (bounded: a
/// peer that does not keep up loses datagrams, which the stream layer resends).
pub struct UdpDemux {
    socket: Rc<UdpSocket>,
    peers: RefCell<std::collections::HashMap<SocketAddr, DemuxPeer>>,
    queue: usize,
}

/// A source [`UdpDemux`] knows.
enum DemuxPeer {
    /// Its link's queue.
    Link(LocalSender<Vec<u8>>),
    /// Its link moved to a connected socket of its own at this instant:
    /// datagrams that were on their way to the listening socket meanwhile
    /// are dropped (a new link made of them would take a tunnelled or
    /// stream frame for a handshake) until [`MOVED_GRACE`] has passed.
    Moved(Instant),
}

/// How long datagrams from a source whose link moved to a socket of its
/// own are dropped: what was queued in the listening socket or on its
/// way when it moved.
const MOVED_GRACE: Duration = Duration::from_secs(2);

impl UdpDemux {
    /// Over a bound socket; `queue` datagrams are buffered per peer at most.
    pub fn new(socket: Rc<UdpSocket>, queue: usize) -> Self {
        Self {
            socket,
            peers: RefCell::new(std::collections::HashMap::new()),
            queue,
        }
    }

    /// Receives the next datagram; returns a new link when it came from a
    /// source never seen (or forgotten) before.
    ///
    /// The socket carries latency paths too: it waits as their readers do
    /// (see [`crate::runtime::readable`]) and reads with non-blocking calls.
    pub async fn next(&self, buf: &mut [u8]) -> io::Result<Option<UdpLink>> {
        let fd = self.socket.as_raw_fd();
        let (n, from) = loop {
            // SAFETY: only `recv` writes into it.
            let uninit = unsafe { for_recv(buf) };
            // SAFETY: the descriptor belongs to `self.socket`, alive meanwhile.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            match socket2::SockRef::from(&borrowed).recv_from_with_flags(uninit, libc::MSG_DONTWAIT) {
                Ok((n, from)) => match from.as_socket() {
                    Some(from) => break (n, from),
                    None => continue,
                },
                Err(e) if not_now(&e) => {}
                Err(e) => return Err(e),
            }
            if let Some(Err(e)) = crate::runtime::readable(fd, self.socket.peek_from(&mut [0u8; 1])).await {
                return Err(e.into());
            }
        };
        let mut peers = self.peers.borrow_mut();
        match peers.get(&from) {
            Some(DemuxPeer::Link(sender)) => {
                match sender.try_send(buf[..n].to_vec()) {
                    Ok(()) => return Ok(None),
                    Err(glommio::GlommioError::Closed(_)) => {
                        peers.remove(&from);
                    }
                    // Full: drop it, the stream layer resends.
                    Err(_) => return Ok(None),
                }
                return Ok(None);
            }
            Some(DemuxPeer::Moved(at)) if at.elapsed() < MOVED_GRACE => return Ok(None),
            Some(DemuxPeer::Moved(_)) => {
                peers.remove(&from);
            }
            None => {}
        }
        let (sender, receiver) = local_channel::new_bounded(self.queue);
        let _ = sender.try_send(buf[..n].to_vec());
        peers.insert(from, DemuxPeer::Link(sender));
        Ok(Some(UdpLink {
            socket: self.socket.clone(),
            peer: from,
            inbox: Some(receiver),
            latency: std::cell::Cell::new(false),
        }))
    }

    /// Forgets a peer whose connection ended.
    pub fn forget(&self, peer: SocketAddr) {
        self.peers.borrow_mut().remove(&peer);
    }

    /// A peer's link moved to a connected socket of its own
    /// ([`Link::handoff`]): its datagrams still on their way here are
    /// dropped for a while ([`MOVED_GRACE`]), then it is forgotten.
    pub fn moved(&self, peer: SocketAddr) {
        self.peers.borrow_mut().insert(peer, DemuxPeer::Moved(Instant::now()));
    }
}

impl UdpLink {
    /// The remote socket address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// A datagram already waiting in the link's own socket, read without
    /// waiting; `None` when none is there.
    fn recv_waiting(&self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        // SAFETY: the descriptor belongs to `self.socket`, alive meanwhile;
        // only `recv` writes into the buffer.
        recv_now(unsafe { BorrowedFd::borrow_raw(self.socket.as_raw_fd()) }, unsafe {
            for_recv(buf)
        })
    }
}

/// Removes a leftover socket file from a previous run (only a socket).
fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Runs `future` with a deadline.
pub async fn with_timeout<T>(timeout: Duration, future: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    glommio::timer::timeout(timeout, async { future.await.map_err(glommio::GlommioError::from) })
        .await
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Unix stream link takes the batch as its send buffer (the kernel
    /// doubles it); a link that is not Unix keeps its own.
    #[test]
    fn unix_links_size_their_send_buffer_for_a_batch() {
        let executor = glommio::LocalExecutorBuilder::default()
            .io_memory(512 * 1024)
            .make()
            .expect("executor under the memlock limit");
        executor.run(async {
            let batch = 256 * 1024;
            let send_buffer = |link: &StreamLink<TcpStream>| {
                let socket = link.socket.borrow();
                // SAFETY: the descriptor is valid while `socket` is borrowed.
                let fd = unsafe { BorrowedFd::borrow_raw(socket.as_raw_fd()) };
                socket2::SockRef::from(&fd).send_buffer_size().expect("SO_SNDBUF")
            };
            let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
            let unix = StreamLink::new(unix_stream(a).expect("link"), "unix:/tmp/x".into());
            let before = send_buffer(&unix);
            unix.size_send_buffer(batch).expect("sized");
            // The kernel caps the request at net.core.wmem_max.
            let cap = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(batch);
            let want = 2 * batch.min(cap);
            assert!(
                send_buffer(&unix) >= want,
                "{before} -> {}, want {want}",
                send_buffer(&unix)
            );
            let other = StreamLink::new(unix_stream(b).expect("link"), "tcp://127.0.0.1:1".into());
            let kept = send_buffer(&other);
            other.size_send_buffer(batch).expect("nothing to do");
            assert_eq!(send_buffer(&other), kept);
        });
    }

    /// A connected UDP link: one datagram waited for, those behind it taken
    /// without waiting, in order, whole, and `None` once none are left.
    #[test]
    fn udp_links_take_a_burst_without_waiting() {
        let executor = glommio::LocalExecutorBuilder::default()
            .io_memory(512 * 1024)
            .make()
            .expect("executor under the memlock limit");
        executor.run(async {
            let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("peer socket");
            let address = Address::Udp {
                host: "127.0.0.1".into(),
                port: peer.local_addr().expect("bound").port(),
            };
            let Connected::Udp(link) = connect(&address, Duration::from_secs(1)).await.expect("connected") else {
                panic!("a UDP link");
            };
            let ours = link.socket.local_addr().expect("bound");
            let mut buf = vec![0u8; 65_536];
            assert!(link.recv_datagram_now(&mut buf).await.is_none(), "nothing sent yet");
            let sizes = [1usize, 548, 9_000, 65_000];
            for (i, &len) in sizes.iter().enumerate() {
                peer.send_to(&vec![i as u8 + 1; len], ours).expect("sent");
            }
            let first = link.recv_datagram(&mut buf).await.expect("the first");
            assert_eq!(first.as_ref(), vec![1u8; 1].as_slice());
            for (i, &len) in sizes.iter().enumerate().skip(1) {
                let next = link
                    .recv_datagram_now(&mut buf)
                    .await
                    .expect("waiting already")
                    .expect("read");
                assert_eq!(next.len(), len);
                assert!(next.iter().all(|&b| b == i as u8 + 1), "datagram {i} whole");
            }
            assert!(link.recv_datagram_now(&mut buf).await.is_none(), "all taken");
        });
    }

    /// The listener's demultiplexer: a new source makes a link; once that
    /// link moved to a socket of its own, the source's stragglers make no
    /// second one; a forgotten source makes a new one again.
    #[test]
    fn a_moved_peer_makes_no_second_link() {
        let executor = glommio::LocalExecutorBuilder::default()
            .io_memory(512 * 1024)
            .make()
            .expect("executor under the memlock limit");
        executor.run(async {
            let listening = udp_socket("127.0.0.1:0".parse().expect("address")).expect("bound");
            let at = listening.local_addr().expect("bound");
            let demux = UdpDemux::new(Rc::new(listening), 16);
            let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("peer socket");
            let from = peer.local_addr().expect("bound");
            let mut buf = vec![0u8; 65_536];
            peer.send_to(b"hello", at).expect("sent");
            let link = demux.next(&mut buf).await.expect("read").expect("a new link");
            assert_eq!(link.peer_addr(), from);
            peer.send_to(b"more", at).expect("sent");
            assert!(
                demux.next(&mut buf).await.expect("read").is_none(),
                "queued to the link"
            );
            demux.moved(from);
            drop(link);
            peer.send_to(b"straggler", at).expect("sent");
            assert!(
                demux.next(&mut buf).await.expect("read").is_none(),
                "dropped, no new link"
            );
            demux.forget(from);
            peer.send_to(b"hello again", at).expect("sent");
            let again = demux.next(&mut buf).await.expect("read").expect("a new link");
            assert_eq!(again.peer_addr(), from);
        });
    }

    /// The loopback route's MTU, less the headers: what `lo` carries, at
    /// least the safe 548 bytes and never more than a datagram holds.
    #[test]
    fn loopback_routes_report_their_mtu() {
        let mtu = route_mtu("127.0.0.1:9".parse().expect("address")).expect("IP_MTU");
        let lo = std::fs::read_to_string("/sys/class/net/lo/mtu")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok());
        if let Some(lo) = lo {
            assert_eq!(mtu, lo.min(65_535) - 28, "lo's MTU less IPv4 and UDP headers");
        }
        assert!((548..=65_507).contains(&mtu), "{mtu}");
    }
}
