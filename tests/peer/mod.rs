//! A raw-socket peer for tests: hand-made frames and handshakes, and the
//! close reason a node answers with.

#![allow(dead_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use libatbus::address::Address;
use libatbus::frame::{Decoder, Encoder};
use libatbus::node::HANDSHAKE_STREAM;
use libatbus::proto::{
    AtbusPacketFlagType, AtbusPacketType, Body, CloseReasonData, Fragment, FrameMessage, HandshakeData, PacketContent,
    PacketData, PingData,
};
use prost::Message as _;

/// The socket address of a `tcp://` address.
pub fn socket_addr(address: &Address) -> SocketAddr {
    match address {
        Address::Tcp { host, port } => format!("{host}:{port}").parse().expect("ip address"),
        other => panic!("not tcp: {other}"),
    }
}

/// One frame, encoded.
pub fn encode(frame: &FrameMessage) -> BytesMut {
    let mut wire = BytesMut::new();
    Encoder::default().encode(frame, &mut wire).expect("encodes");
    wire
}

/// A peer's handshake claiming `name`, speaking protocol `version`.
pub fn handshake_version(name: &str, version: i32) -> FrameMessage {
    handshake_frame(&HandshakeData {
        version,
        minimal_version: version.min(2),
        node_name: name.into(),
        incarnation: 7,
        acknowledge: false,
        record: Bytes::new(),
        latency_path: false,
        auth: None,
        relay: false,
    })
}

/// The handshake packet carrying `hello`.
#[allow(dead_code)]
pub fn handshake_frame(hello: &HandshakeData) -> FrameMessage {
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

/// A ping frame.
pub fn ping() -> FrameMessage {
    FrameMessage {
        head: None,
        body: Some(Body::Ping(PingData {
            timepoint_microseconds: 1,
        })),
    }
}

/// Reads until the node closes the socket; returns the close reason it sent.
pub fn close_reason(mut socket: TcpStream) -> CloseReasonData {
    socket.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut decoder = Decoder::default();
    let mut buf = [0u8; 4096];
    let mut reason = None;
    loop {
        match socket.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => decoder.extend(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the node neither closed nor answered: {e}"),
        }
        while let Ok(Some(frame)) = decoder.decode() {
            let Some(Body::Packet(packet)) = frame.body else {
                continue;
            };
            if packet.flags & AtbusPacketFlagType::FinishConnection as i32 == 0 {
                continue;
            }
            let content = PacketContent::decode(packet.content).expect("close packet decodes");
            reason = content.fragment.into_iter().find_map(|f| f.close_reason);
        }
    }
    reason.expect("a FINISH_CONNECTION with a close reason before EOF")
}

/// A handshake of the current protocol version claiming `name`.
pub fn handshake(name: &str) -> FrameMessage {
    handshake_version(name, 3)
}

/// A TCP proxy in front of one listener: it delays every chunk by a fixed
/// time in each direction (order kept), records when it accepted each
/// connection and every byte the dialling side sent (a tap), and can cut
/// all connections at once.
pub struct Proxy {
    pub addr: SocketAddr,
    pub accepted: std::sync::Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
    pub captured: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    /// What the listening side sent back, per connection.
    pub captured_back: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    live: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(target: SocketAddr, delay: Duration) -> Proxy {
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let captured = Arc::new(Mutex::new(Vec::new()));
        let captured_back = Arc::new(Mutex::new(Vec::new()));
        let live = Arc::new(Mutex::new(Vec::new()));
        let (acc, cap, back, lv) = (accepted.clone(), captured.clone(), captured_back.clone(), live.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                acc.lock().expect("lock").push(std::time::Instant::now());
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let index = {
                    let mut c = cap.lock().expect("lock");
                    c.push(Vec::new());
                    back.lock().expect("lock").push(Vec::new());
                    c.len() - 1
                };
                {
                    let mut l = lv.lock().expect("lock");
                    l.push(client.try_clone().expect("clone"));
                    l.push(server.try_clone().expect("clone"));
                }
                pump(
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                    delay,
                    Some((cap.clone(), index)),
                );
                pump(server, client, delay, Some((back.clone(), index)));
            }
        });
        Proxy {
            addr,
            accepted,
            captured,
            captured_back,
            live,
        }
    }

    /// Cuts every connection made so far.
    pub fn cut(&self) {
        for socket in self.live.lock().expect("lock").drain(..) {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn address(&self) -> Address {
        format!("tcp://{}", self.addr).parse().expect("address")
    }
}

type Tap = (std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>, usize);

/// Copies `from` to `to`, each chunk `delay` after it was read.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration, tap: Option<Tap>) {
    use std::io::Write;
    let (tx, rx) = std::sync::mpsc::channel::<Option<(std::time::Instant, Vec<u8>)>>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    break;
                }
                Ok(n) => {
                    if let Some((captured, index)) = &tap {
                        captured.lock().expect("lock")[*index].extend_from_slice(&buf[..n]);
                    }
                    let _ = tx.send(Some((std::time::Instant::now() + delay, buf[..n].to_vec())));
                }
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok(Some((due, chunk))) = rx.recv() {
            let now = std::time::Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}
