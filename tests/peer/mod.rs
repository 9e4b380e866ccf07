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
    let hello = HandshakeData {
        version,
        minimal_version: version.min(2),
        node_name: name.into(),
        incarnation: 7,
        acknowledge: false,
        record: Bytes::new(),
        latency_path: false,
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
