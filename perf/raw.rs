//! Raw-socket baselines: the same traffic as `atbus bench` over bare
//! sockets (blocking, two pinned threads, no bus), the "physical limit"
//! column. Shared by `atbus bench` (measured in the same run as the bus) and
//! `atbus-baseline` (perf/baseline.rs, on its own).

#![allow(dead_code)] // each includer uses its part

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;

/// The ping-pong's message size.
pub const PING: usize = 64;
/// The bulk message size of the class cases.
pub const BULK: usize = 16384;

/// A payload whose clones share no reference count: the same message sent
/// again and again (as the raw baselines write the same buffer again), so
/// the sending thread and the shard do not bounce one counter's cache line
/// between cores for every message (that was 12 % of the 64 B profile).
pub fn static_payload(byte: u8, len: usize) -> Bytes {
    Bytes::from_static(Box::leak(vec![byte; len].into_boxed_slice()))
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(100, 60_000_000_000, 3).expect("histogram bounds")
}

pub fn pin(core: usize) {
    if let Some(id) = core_affinity::get_core_ids().and_then(|ids| ids.get(core).copied()) {
        core_affinity::set_for_current(id);
    }
}

/// The bare socket a transport's baseline uses: QUIC runs on UDP, so its
/// baseline is raw datagrams (no resend, no crypto).
pub fn raw_kind(transport: &str) -> &str {
    match transport {
        "quic" => "udp",
        other => other,
    }
}

/// Messages/s of the same traffic over a bare socket, and messages lost.
pub fn baseline_throughput(transport: &str, payload: usize, messages: u64) -> (f64, u64) {
    match raw_kind(transport) {
        kind @ ("tcp" | "unix") => (framed_throughput(kind, payload, messages, false), 0),
        "udp" => udp_throughput(payload, messages),
        "mem" => {
            let (tx, rx) = crossbeam_channel::bounded::<Bytes>(65_536);
            let reader = thread::spawn(move || {
                pin(1);
                for _ in 0..messages {
                    rx.recv().expect("channel");
                }
                Instant::now()
            });
            pin(0);
            let data = static_payload(0xa5u8, payload);
            let started = Instant::now();
            for _ in 0..messages {
                tx.send(data.clone()).expect("channel");
            }
            let done = reader.join().expect("reader");
            (messages as f64 / (done - started).as_secs_f64(), 0)
        }
        other => panic!("unknown transport {other}"),
    }
}

/// The bare tcp or unix baseline (`hashed`: with the frame hash, see
/// [`hashed_baseline_throughput`]), in messages/s.
fn framed_throughput(kind: &str, payload: usize, messages: u64, hashed: bool) -> f64 {
    let (tx, rx) = stream_pair(kind);
    let reader = thread::spawn(move || {
        pin(1);
        read_framed(rx, payload, messages, hashed)
    });
    // The bare sender's writes are as large as the bus's (perf/README.md
    // item 33).
    messages as f64 / write_framed(tx, write_batch(kind), payload, messages, reader, hashed)
}

/// Messages/s of the tcp or unix baseline when each message also carries
/// the wire format's frame hash (xxh3-64 of its bytes, low 32 bits; design
/// "Wire format"), computed by the sender and checked by the receiver: the
/// one per-byte cost any implementation of the protocol pays beside the
/// sockets' own. `None` for other transports.
pub fn hashed_baseline_throughput(transport: &str, payload: usize, messages: u64) -> Option<f64> {
    match raw_kind(transport) {
        kind @ ("tcp" | "unix") => Some(framed_throughput(kind, payload, messages, true)),
        _ => None,
    }
}

fn write_framed(
    socket: impl Write,
    batch: usize,
    payload: usize,
    messages: u64,
    rx: thread::JoinHandle<Instant>,
    hashed: bool,
) -> f64 {
    pin(0);
    let data = vec![0xa5u8; payload];
    let len = (payload + if hashed { 4 } else { 0 }) as u32;
    let mut out = BufWriter::with_capacity(batch, socket);
    let started = Instant::now();
    for _ in 0..messages {
        out.write_all(&len.to_le_bytes()).expect("write");
        out.write_all(&data).expect("write");
        if hashed {
            // `black_box`: the same buffer every time, hashed every time.
            let hash = libatbus::frame::frame_hash(std::hint::black_box(&data));
            out.write_all(&hash.to_le_bytes()).expect("write");
        }
    }
    out.flush().expect("flush");
    let done = rx.join().expect("reader");
    (done - started).as_secs_f64()
}

fn read_framed(socket: impl Read, payload: usize, messages: u64, hashed: bool) -> Instant {
    let mut input = BufReader::with_capacity(256 * 1024, socket);
    let mut buf = vec![0u8; payload + 4];
    let mut len = [0u8; 4];
    for _ in 0..messages {
        input.read_exact(&mut len).expect("read");
        let n = u32::from_le_bytes(len) as usize;
        input.read_exact(&mut buf[..n]).expect("read");
        if hashed {
            let (body, carried) = buf[..n].split_at(n - 4);
            assert_eq!(
                libatbus::frame::frame_hash(body).to_le_bytes(),
                carried,
                "frame hash mismatch in the baseline"
            );
        }
    }
    Instant::now()
}

fn udp_throughput(payload: usize, messages: u64) -> (f64, u64) {
    let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = rx.local_addr().expect("addr");
    rx.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let reader = thread::spawn(move || {
        pin(1);
        let mut buf = vec![0u8; 65_536];
        let mut got = 0u64;
        let mut last = Instant::now();
        while got < messages {
            match rx.recv(&mut buf) {
                Ok(_) => {
                    got += 1;
                    last = Instant::now();
                }
                Err(_) => break, // the rest was dropped
            }
        }
        (got, last)
    });
    pin(0);
    let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
    tx.connect(addr).expect("connect");
    let data = vec![0xa5u8; payload];
    let started = Instant::now();
    for _ in 0..messages {
        let _ = tx.send(&data);
    }
    let (got, last) = reader.join().expect("reader");
    (got as f64 / (last - started).as_secs_f64(), messages - got)
}

/// 64 B ping-pong over a bare socket between two pinned threads.
pub fn baseline_rtt(transport: &str, trips: usize) -> Histogram<u64> {
    let total = trips + (trips / 10).max(10);
    match raw_kind(transport) {
        kind @ ("tcp" | "unix") => {
            let (a, b) = stream_pair(kind);
            let server = thread::spawn(move || {
                pin(1);
                echo_stream(b, total);
            });
            let hist = ping_stream(a, trips, total);
            server.join().expect("server");
            hist
        }
        "udp" => {
            let (a, b) = udp_pair();
            let server = udp_echo(b, total);
            let mut buf = [0u8; PING];
            let hist = timed_round_trips(trips, total, || {
                a.send(&buf).expect("send");
                a.recv(&mut buf).expect("recv");
            });
            server.join().expect("server");
            hist
        }
        "mem" => {
            let (to_b, from_a) = crossbeam_channel::bounded::<Bytes>(1);
            let (to_a, from_b) = crossbeam_channel::bounded::<Bytes>(1);
            let server = thread::spawn(move || {
                pin(1);
                for _ in 0..total {
                    let m = from_a.recv().expect("recv");
                    to_a.send(m).expect("send");
                }
            });
            let data = static_payload(0u8, PING);
            let hist = timed_round_trips(trips, total, || {
                to_b.send(data.clone()).expect("send");
                from_b.recv().expect("recv");
            });
            server.join().expect("server");
            hist
        }
        other => panic!("unknown transport {other}"),
    }
}

fn echo_stream(mut socket: impl Read + Write, total: usize) {
    let mut buf = [0u8; PING];
    for _ in 0..total {
        socket.read_exact(&mut buf).expect("read");
        socket.write_all(&buf).expect("write");
    }
}

fn ping_stream(mut socket: impl Read + Write, trips: usize, total: usize) -> Histogram<u64> {
    let mut buf = [0u8; PING];
    timed_round_trips(trips, total, || {
        socket.write_all(&buf).expect("write");
        socket.read_exact(&mut buf).expect("read");
    })
}

/// Runs `total` round trips on core 0; the last `trips` (after warm-up) go
/// into the histogram.
fn timed_round_trips(trips: usize, total: usize, mut round_trip: impl FnMut()) -> Histogram<u64> {
    pin(0);
    let mut hist = histogram();
    for i in 0..total {
        let started = Instant::now();
        round_trip();
        if i >= total - trips {
            let _ = hist.record(started.elapsed().as_nanos() as u64);
        }
    }
    hist
}

/// A connected byte-stream socket of either kind.
trait Duplex: Read + Write + std::os::fd::AsRawFd + Send {}
impl<T: Read + Write + std::os::fd::AsRawFd + Send> Duplex for T {}

/// The bus's default write batch for `kind`: `NodeConfig::tcp_write_batch`
/// on tcp, `write_batch` otherwise (which its Unix links also take as their
/// send buffer).
fn write_batch(kind: &str) -> usize {
    let defaults = libatbus::node::NodeConfig::default();
    if kind == "tcp" {
        defaults.tcp_write_batch
    } else {
        defaults.write_batch
    }
}

/// Two ends of a fresh tcp or unix connection.
fn stream_pair(transport: &str) -> (Box<dyn Duplex>, Box<dyn Duplex>) {
    if transport == "unix" {
        let (a, b) = UnixStream::pair().expect("pair");
        // The send buffer the bus gives its Unix links (one 256 KiB write
        // batch, doubled by the kernel; `Link::size_send_buffer`): the
        // bare sockets get the same kernel knob.
        for end in [&a, &b] {
            let _ = socket2::SockRef::from(end).set_send_buffer_size(write_batch("unix"));
        }
        return (Box::new(a), Box::new(b));
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (b, _) = listener.accept().expect("accept");
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    (Box::new(a), Box::new(b))
}

/// The raw-socket counterpart of `Pair::under_bulk`: 16 KiB writes flood one
/// socket (writer on core 0, reader on core 1) while a 64 B ping-pong runs on
/// another. Returns the ping histogram and the bulk MB/s.
pub fn baseline_under_bulk(transport: &str, trips: usize, rate_mb: f64) -> (Histogram<u64>, f64) {
    let total = trips + (trips / 10).max(10);
    let stop = Arc::new(AtomicBool::new(false));
    let pace = move |started: Instant, sent: f64| {
        if rate_mb > 0.0
            && let Some(ahead) = Duration::from_secs_f64(sent / (rate_mb * 1e6)).checked_sub(started.elapsed())
        {
            thread::sleep(ahead);
        }
    };
    let (bulk_writer, bulk_reader, echo) = if raw_kind(transport) == "udp" {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        tx.connect(rx.local_addr().expect("addr")).expect("connect");
        rx.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        let writer = {
            let stop = stop.clone();
            thread::spawn(move || {
                pin(0);
                let (data, started, mut sent) = (vec![0x5au8; BULK], Instant::now(), 0f64);
                while !stop.load(Ordering::Acquire) {
                    let _ = tx.send(&data);
                    sent += BULK as f64;
                    pace(started, sent);
                }
            })
        };
        let reader = {
            let stop = stop.clone();
            thread::spawn(move || {
                pin(1);
                let (mut buf, started, mut bytes) = (vec![0u8; 65_536], Instant::now(), 0u64);
                while !stop.load(Ordering::Acquire) {
                    if let Ok(n) = rx.recv(&mut buf) {
                        bytes += n as u64;
                    }
                }
                bytes as f64 / started.elapsed().as_secs_f64() / 1e6
            })
        };
        let (a, b) = udp_pair();
        let echo = udp_echo(b, total);
        thread::sleep(Duration::from_millis(200));
        let mut buf = [0u8; PING];
        let hist = timed_round_trips(trips, total, || {
            a.send(&buf).expect("send");
            a.recv(&mut buf).expect("recv");
        });
        (writer, reader, (echo, hist))
    } else {
        let (mut tx, mut rx) = stream_pair(transport);
        let writer = {
            let stop = stop.clone();
            thread::spawn(move || {
                pin(0);
                let (data, started, mut sent) = (vec![0x5au8; BULK], Instant::now(), 0f64);
                while !stop.load(Ordering::Acquire) {
                    if tx.write_all(&data).is_err() {
                        break;
                    }
                    sent += BULK as f64;
                    pace(started, sent);
                }
            })
        };
        let reader = thread::spawn(move || {
            pin(1);
            let (mut buf, started, mut bytes) = (vec![0u8; 256 * 1024], Instant::now(), 0u64);
            while let Ok(n) = rx.read(&mut buf) {
                if n == 0 {
                    break;
                }
                bytes += n as u64;
            }
            bytes as f64 / started.elapsed().as_secs_f64() / 1e6
        });
        let (a, b) = stream_pair(transport);
        let echo = thread::spawn(move || {
            pin(1);
            echo_stream(b, total);
        });
        thread::sleep(Duration::from_millis(200));
        let hist = ping_stream(a, trips, total);
        (writer, reader, (echo, hist))
    };
    let (echo, hist) = echo;
    echo.join().expect("echo");
    stop.store(true, Ordering::Release);
    bulk_writer.join().expect("bulk writer");
    let bulk = bulk_reader.join().expect("bulk reader");
    (hist, bulk)
}

/// Two loopback UDP sockets connected to each other.
fn udp_pair() -> (UdpSocket, UdpSocket) {
    let a = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let b = UdpSocket::bind("127.0.0.1:0").expect("bind");
    a.connect(b.local_addr().expect("b")).expect("connect");
    b.connect(a.local_addr().expect("a")).expect("connect");
    (a, b)
}

/// Echoes `total` 64 B datagrams on `b`, on a thread pinned to core 1.
fn udp_echo(b: UdpSocket, total: usize) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        pin(1);
        let mut buf = [0u8; PING];
        for _ in 0..total {
            let n = b.recv(&mut buf).expect("recv");
            b.send(&buf[..n]).expect("send");
        }
    })
}

/// The queue API's thread layout over bare sockets: at each end an
/// application thread and an I/O thread pinned on one core (a on core 0,
/// b on core 1, as `atbus bench` places applications beside their shards).
/// The application hands a ping to its I/O thread (a channel, and an
/// eventfd the I/O thread polls beside the socket), the I/O thread writes
/// it; the far I/O thread reads it and hands it to its application (a
/// channel; the application sleeps in a blocking receive). Two hand-offs per
/// hop more than [`baseline_rtt`]: the cost of the layout itself, without
/// anything of the bus. tcp and unix only.
pub fn handoff_rtt(transport: &str, trips: usize) -> Option<Histogram<u64>> {
    let kind = raw_kind(transport);
    if kind != "tcp" && kind != "unix" {
        return None;
    }
    let (a, b) = stream_pair(kind);
    let total = trips + (trips / 10).max(10);
    let echo = thread::spawn(move || {
        pin(1);
        let b = HandoffEnd::start(b, 1, total);
        for _ in 0..total {
            let ping = b.recv();
            b.send(ping);
        }
        b.join();
    });
    let a = HandoffEnd::start(a, 0, total);
    let ping = [0x11u8; PING];
    let hist = timed_round_trips(trips, total, || {
        a.send(ping);
        a.recv();
    });
    a.join();
    echo.join().expect("echo");
    Some(hist)
}

/// An application thread's side of [`handoff_rtt`]: its I/O thread and the
/// channels to and from it.
struct HandoffEnd {
    to_io: crossbeam_channel::Sender<[u8; PING]>,
    from_io: crossbeam_channel::Receiver<[u8; PING]>,
    wake: std::os::fd::OwnedFd,
    io: thread::JoinHandle<()>,
}

impl HandoffEnd {
    /// Starts the I/O thread on `core`; it ends after `total` messages each
    /// way.
    fn start(mut socket: Box<dyn Duplex>, core: usize, total: usize) -> Self {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: eventfd returns a new descriptor (or -1, checked).
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(raw >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(raw) };
        let wake_fd = wake.as_raw_fd();
        let (to_io, io_rx) = crossbeam_channel::unbounded::<[u8; PING]>();
        let (io_tx, from_io) = crossbeam_channel::unbounded::<[u8; PING]>();
        let io = thread::spawn(move || {
            pin(core);
            let mut polled = [
                libc::pollfd {
                    fd: socket.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: wake_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let (mut written, mut read) = (0, 0);
            let mut buf = vec![0u8; 64 * 1024];
            let mut pending = Vec::new();
            while written < total || read < total {
                // SAFETY: two valid pollfds.
                let n = unsafe { libc::poll(polled.as_mut_ptr(), 2, -1) };
                assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
                if polled[1].revents != 0 {
                    let mut count = [0u8; 8];
                    // SAFETY: reads 8 bytes into `count`.
                    unsafe { libc::read(wake_fd, count.as_mut_ptr().cast(), 8) };
                    while let Ok(message) = io_rx.try_recv() {
                        socket.write_all(&message).expect("write");
                        written += 1;
                    }
                }
                if polled[0].revents != 0 {
                    let n = socket.read(&mut buf).expect("read");
                    assert!(n > 0, "the peer closed early");
                    pending.extend_from_slice(&buf[..n]);
                    let whole = pending.len() / PING * PING;
                    for chunk in pending[..whole].chunks_exact(PING) {
                        io_tx.send(chunk.try_into().expect("64 bytes")).expect("application");
                        read += 1;
                    }
                    pending.drain(..whole);
                }
            }
        });
        Self {
            to_io,
            from_io,
            wake,
            io,
        }
    }

    fn send(&self, message: [u8; PING]) {
        use std::os::fd::AsRawFd;
        self.to_io.send(message).expect("I/O thread");
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from `one` to the eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    fn recv(&self) -> [u8; PING] {
        self.from_io.recv().expect("I/O thread")
    }

    fn join(self) {
        self.io.join().expect("I/O thread");
    }
}
