//! Writes into a Unix stream socket without copying the payloads: the parts
//! of a write go into a pipe by reference (`vmsplice`) and from the pipe into
//! the socket (`splice`), so the kernel queues buffers that point at the
//! writer's own pages where a `sendmsg` would copy each write into pages of
//! its own (perf/README.md item 47: unix 16 KiB).
//!
//! The peer reads those pages later, so a part must not change until the
//! kernel lets go of them. Parts are `Bytes` (never changed while alive);
//! each one written is held here until the socket no longer holds its
//! bytes. The socket's queued memory (`SIOCOUTQ`: the true sizes of the
//! buffers the peer has not finished reading, each at least its bytes, the
//! spliced ones included) bounds the bytes still queued: every part that
//! ended before the last that many bytes spliced is free. A socket closed
//! with parts still held hands them to [`linger`], which keeps them until
//! the peer has read them or closed.
//!
//! Only Unix stream sockets: TCP frees a buffer when the peer acknowledges
//! it, which on loopback is before the peer's application reads it.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Pipe size asked for: a 256 KiB batch of 16 KiB frames is ~110 pieces
/// (a payload spans five pages, its header and hash one more), one pipe
/// slot each.
const PIPE_SIZE: i32 = 512 * 1024;

/// Fewer pipe slots than this (a user over `pipe-user-pages-soft` gets
/// two-slot pipes): more system calls than the copy saves.
const PIPE_SLOTS_MIN: i32 = 64;

/// Pieces per `vmsplice` (the kernel takes up to `IOV_MAX`, 1024).
const MAX_PIECES: usize = 256;

/// What a zero-copy writer found when it tried to move bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Everything given is in the socket.
    Done,
    /// The socket is full: wait until it is writable, then call again.
    Full,
}

/// The pipe, the positions and the parts held for one socket.
#[derive(Debug)]
pub(crate) struct Splicer {
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    /// Bytes put into the pipe so far.
    piped: u64,
    /// Bytes moved from the pipe into the socket so far (`piped` less what
    /// the pipe holds).
    spliced: u64,
    /// Parts the kernel may still hold, each with the position (in bytes
    /// piped) where it ends, oldest first.
    held: VecDeque<(u64, Bytes)>,
    /// Where the last part let go of ended (tests hold `release` to it).
    released_to: u64,
    /// The write in progress: parts not yet wholly piped, the first one
    /// already held if some of it is.
    pending: VecDeque<Bytes>,
    /// Bytes of `pending`'s first part already piped.
    first_piped: usize,
}

impl Splicer {
    /// A pipe for zero-copy writes, or why there is none (the caller then
    /// writes by copying).
    pub(crate) fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both were just made and are owned here.
        let (pipe_r, pipe_w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: a plain fcntl on a descriptor owned here.
        let size = unsafe { libc::fcntl(pipe_w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        if size / 4096 < PIPE_SLOTS_MIN {
            return Err(io::Error::other(format!("the pipe got {size} bytes, too few slots")));
        }
        // A peer that closed makes `splice` raise SIGPIPE (it has no
        // MSG_NOSIGNAL); blocked on this thread, it stays pending there and
        // the call fails with EPIPE as a `sendmsg` would.
        block_sigpipe();
        Ok(Self {
            pipe_r,
            pipe_w,
            piped: 0,
            spliced: 0,
            held: VecDeque::new(),
            pending: VecDeque::new(),
            first_piped: 0,
            released_to: 0,
        })
    }

    /// Queues `parts` to be written, after anything queued before.
    pub(crate) fn queue(&mut self, parts: impl IntoIterator<Item = Bytes>) {
        self.pending.extend(parts.into_iter().filter(|p| !p.is_empty()));
    }

    /// Moves what is queued into `socket` as far as it takes without
    /// waiting.
    pub(crate) fn advance(&mut self, socket: BorrowedFd<'_>) -> io::Result<Progress> {
        loop {
            if !self.pending.is_empty() {
                match self.fill() {
                    Ok(()) => {}
                    // The pipe is full: it drains into the socket below.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            let in_pipe = (self.piped - self.spliced) as usize;
            if in_pipe == 0 {
                return Ok(Progress::Done);
            }
            // SAFETY: both descriptors are valid; no offsets (a pipe and a
            // socket have none).
            let n = unsafe {
                libc::splice(
                    self.pipe_r.as_raw_fd(),
                    std::ptr::null_mut(),
                    socket.as_raw_fd(),
                    std::ptr::null_mut(),
                    in_pipe,
                    libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(Progress::Full),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes"));
            }
            self.spliced += n as u64;
        }
    }

    /// Pipes as much of `pending` as the pipe takes.
    fn fill(&mut self) -> io::Result<()> {
        let mut pieces: Vec<libc::iovec> = Vec::with_capacity(self.pending.len().min(MAX_PIECES));
        for (i, part) in self.pending.iter().take(MAX_PIECES).enumerate() {
            let skip = if i == 0 { self.first_piped } else { 0 };
            pieces.push(libc::iovec {
                iov_base: part[skip..].as_ptr() as *mut libc::c_void,
                iov_len: part.len() - skip,
            });
        }
        // SAFETY: the pieces point into parts kept alive (`pending`, then
        // `held`) until the kernel no longer holds their pages; vmsplice
        // only reads them.
        let n = unsafe {
            libc::vmsplice(
                self.pipe_w.as_raw_fd(),
                pieces.as_ptr(),
                pieces.len(),
                libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut left = n as usize;
        while left > 0 {
            let Some(first) = self.pending.front() else {
                break;
            };
            if self.first_piped == 0 {
                // Its first bytes go into the pipe now: held from here on.
                self.held.push_back((self.piped + first.len() as u64, first.clone()));
            }
            let rest = first.len() - self.first_piped;
            if left >= rest {
                left -= rest;
                self.piped += rest as u64;
                self.first_piped = 0;
                self.pending.pop_front();
            } else {
                self.first_piped += left;
                self.piped += left as u64;
                left = 0;
            }
        }
        Ok(())
    }

    /// Lets go of the parts whose bytes `socket` no longer holds.
    pub(crate) fn release(&mut self, socket: BorrowedFd<'_>) {
        if self.held.is_empty() {
            return;
        }
        let Ok(queued) = queued_bytes(socket) else {
            return;
        };
        let free_to = self.spliced.saturating_sub(queued);
        while let Some((end, _)) = self.held.front()
            && *end <= free_to
        {
            self.released_to = *end;
            self.held.pop_front();
        }
    }

    /// Bytes of parts held.
    pub(crate) fn held_bytes(&self) -> usize {
        self.held.iter().map(|(_, p)| p.len()).sum()
    }

    /// Whether nothing is queued and nothing held.
    pub(crate) fn is_idle(&self) -> bool {
        self.held.is_empty() && self.pending.is_empty()
    }

    /// The parts the kernel may still hold, to outlive the socket
    /// ([`linger`]; bytes still in the pipe go with it).
    fn into_parts(self) -> Vec<Bytes> {
        self.held.into_iter().map(|(_, p)| p).collect()
    }
}

/// Bytes' worth of buffers the peer of `socket` has not finished reading
/// (Unix sockets: `SIOCOUTQ`, their true sizes).
fn queued_bytes(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(queued).unwrap_or(0))
}

/// Whether `socket` is a Unix socket whose peer runs as this process's
/// effective user: zero-copy writes are for those only. A peer holds the
/// pages it was sent until it reads them, and one that reads with `splice`
/// keeps them past that: it could see what this process later puts there.
/// A process of the same user can read this one's memory anyway.
pub(crate) fn peer_is_same_user(socket: BorrowedFd<'_>) -> bool {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one `ucred` of `len` bytes.
    let got = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: no arguments, always succeeds.
    got == 0 && len as usize == std::mem::size_of::<libc::ucred>() && cred.uid == unsafe { libc::geteuid() }
}

fn block_sigpipe() {
    // SAFETY: a signal set built and passed by reference; only this
    // thread's mask changes.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// How often closed sockets' held parts are looked at, and for how long.
const LINGER_POLL: Duration = Duration::from_millis(20);
const LINGER_MAX: Duration = Duration::from_secs(600);

/// Closed sockets whose peers may still read parts of theirs.
struct Lingering {
    sockets: Mutex<Vec<(OwnedFd, Vec<Bytes>, Instant)>>,
    wake: Condvar,
}

/// Keeps a closing socket's held parts until its peer has read them or
/// closed (the socket's queued bytes gone). One thread of the process looks
/// at such sockets every [`LINGER_POLL`] while there are any (a rare case:
/// a connection that ends while its peer is behind); parts still held after
/// [`LINGER_MAX`] (a peer that neither reads nor closes) are leaked, never
/// freed under it. The socket is shut down both ways first, so the peer
/// reads to the end and then sees it closed.
pub(crate) fn linger(socket: OwnedFd, splicer: Splicer) {
    // SAFETY: a plain shutdown of an owned descriptor.
    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
    if drained(socket.as_fd()) {
        return;
    }
    static LINGERING: OnceLock<Arc<Lingering>> = OnceLock::new();
    let lingering = LINGERING.get_or_init(|| {
        let lingering = Arc::new(Lingering {
            sockets: Mutex::new(Vec::new()),
            wake: Condvar::new(),
        });
        let watched = lingering.clone();
        let spawned = std::thread::Builder::new()
            .name("atbus-linger".into())
            .spawn(move || watch_lingering(&watched));
        if let Err(e) = spawned {
            tracing::error!("cannot start the thread that frees closed unix sockets' buffers: {e}");
        }
        lingering
    });
    let mut sockets = lingering.sockets.lock().unwrap_or_else(|e| e.into_inner());
    sockets.push((socket, splicer.into_parts(), Instant::now()));
    lingering.wake.notify_one();
}

fn drained(socket: BorrowedFd<'_>) -> bool {
    queued_bytes(socket).is_ok_and(|q| q == 0)
}

fn watch_lingering(lingering: &Lingering) {
    let mut sockets = lingering.sockets.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        while sockets.is_empty() {
            sockets = lingering.wake.wait(sockets).unwrap_or_else(|e| e.into_inner());
        }
        sockets.retain_mut(|(socket, parts, since)| {
            if drained(socket.as_fd()) {
                return false;
            }
            if since.elapsed() > LINGER_MAX {
                tracing::warn!(
                    bytes = parts.iter().map(Bytes::len).sum::<usize>(),
                    "a closed unix connection's peer neither read nor closed for {LINGER_MAX:?}: \
                     its zero-copy buffers are leaked"
                );
                std::mem::forget(std::mem::take(parts));
                return false;
            }
            true
        });
        sockets = lingering
            .wake
            .wait_timeout(sockets, LINGER_POLL)
            .map(|(s, _)| s)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        (a, b)
    }

    /// Parts of 1 to 40 000 bytes, each byte naming its part and place.
    fn parts(count: usize, seed: u64) -> Vec<Bytes> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..count)
            .map(|i| {
                let len = rng.usize(1..40_000);
                Bytes::from((0..len).map(|j| (i * 31 + j * 7) as u8).collect::<Vec<u8>>())
            })
            .collect()
    }

    #[test]
    fn parts_arrive_in_order_and_go_only_once_read() {
        let (a, mut b) = pair();
        let mut splicer = Splicer::new().expect("a pipe");
        let sent = parts(300, 7);
        let expected: Vec<u8> = sent.iter().flat_map(|p| p.iter().copied()).collect();
        splicer.queue(sent);
        let mut got = Vec::new();
        let mut rng = fastrand::Rng::with_seed(9);
        let mut buf = vec![0u8; 100_000];
        loop {
            let progress = splicer.advance(a.as_fd()).expect("splice");
            // Read a random amount, then let go of what the peer has read:
            // never a part with a byte it has not.
            let n = b.read(&mut buf[..rng.usize(1..100_000)]).expect("read");
            got.extend_from_slice(&buf[..n]);
            splicer.release(a.as_fd());
            assert!(
                splicer.released_to <= got.len() as u64,
                "a part let go before the peer read it"
            );
            if progress == Progress::Done && got.len() == expected.len() {
                break;
            }
        }
        assert_eq!(got, expected);
        splicer.release(a.as_fd());
        assert!(
            splicer.is_idle(),
            "all read: nothing held ({} bytes)",
            splicer.held_bytes()
        );
    }

    #[test]
    fn a_full_socket_says_so_and_holds_what_it_queued() {
        let (a, _b) = pair();
        let mut splicer = Splicer::new().expect("a pipe");
        splicer.queue(parts(200, 3));
        // Nobody reads: the socket fills.
        assert_eq!(splicer.advance(a.as_fd()).expect("splice"), Progress::Full);
        splicer.release(a.as_fd());
        assert!(splicer.held_bytes() > 0);
        assert_eq!(splicer.released_to, 0);
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = pair();
        drop(b);
        let mut splicer = Splicer::new().expect("a pipe");
        splicer.queue(parts(4, 5));
        let e = splicer.advance(a.as_fd()).expect_err("the peer is gone");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    /// A part whose drop is seen.
    struct Watched(Vec<u8>, std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl AsRef<[u8]> for Watched {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    impl Drop for Watched {
        fn drop(&mut self) {
            self.1.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_closed_socket_keeps_its_parts_until_the_peer_has_read_them() {
        use std::sync::atomic::Ordering;
        let (a, mut b) = pair();
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut splicer = Splicer::new().expect("a pipe");
        splicer.queue([Bytes::from_owner(Watched(vec![5u8; 50_000], dropped.clone()))]);
        assert_eq!(splicer.advance(a.as_fd()).expect("splice"), Progress::Done);
        linger(OwnedFd::from(a), splicer);
        std::thread::sleep(LINGER_POLL * 5);
        assert!(
            !dropped.load(Ordering::SeqCst),
            "freed while the peer may still read it"
        );
        let mut got = Vec::new();
        b.read_to_end(&mut got).expect("read to the end");
        assert_eq!(got, vec![5u8; 50_000]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dropped.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "never freed after the peer read it");
            std::thread::sleep(LINGER_POLL);
        }
    }
}
