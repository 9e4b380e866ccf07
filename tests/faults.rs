//! Hostile peers over real sockets. A node on one shard serves a healthy peer
//! that keeps streaming while raw sockets send it garbage or frames with a
//! wrong hash: each bad connection is closed with a clear reason, the healthy
//! one never notices, and nothing it sent is lost.

mod peer;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libatbus::node::{HANDSHAKE_STREAM, Node, NodeConfig};
use libatbus::proto::{AtbusCloseReason, Body, FrameMessage, PacketData};
use peer::{close_reason, encode, handshake, ping, socket_addr};

fn node(name: &str, core: usize) -> Node {
    let mut config = NodeConfig::new(name, &["tcp://127.0.0.1:0"]).expect("config");
    config.runtime.first_core = core;
    Node::start(config).expect("node starts")
}

#[test]
fn bad_peers_are_closed_while_a_healthy_one_flows() {
    const MESSAGES: u64 = 30_000;
    let server = Arc::new(node("server", 0));
    let healthy = Arc::new(node("healthy", 1));
    let address = server.listen_addresses()[0].clone();
    healthy.add_route("server", address.clone()).expect("route");

    // The healthy peer streams for the whole test.
    let sending = Arc::new(AtomicBool::new(true));
    let sender = {
        let healthy = healthy.clone();
        let sending = sending.clone();
        thread::spawn(move || {
            let mut seq = 0u64;
            while seq < MESSAGES || sending.load(Ordering::Acquire) {
                let data = Bytes::from([seq.to_le_bytes().as_slice(), &[0x5a; 120]].concat());
                healthy
                    .send_blocking("server", 1, data, Duration::from_secs(30))
                    .unwrap_or_else(|e| panic!("healthy send {seq}: {e}"));
                seq += 1;
                if seq >= MESSAGES {
                    thread::sleep(Duration::from_millis(1));
                }
            }
            seq
        })
    };
    let receiver = {
        let server = server.clone();
        thread::spawn(move || {
            let mut next = 0u64;
            while let Some(message) = server.recv_timeout(Duration::from_secs(2)) {
                assert_eq!(&*message.from, "healthy");
                let seq = u64::from_le_bytes(message.data[..8].try_into().expect("8 bytes"));
                assert_eq!(seq, next, "healthy stream out of order");
                next += 1;
            }
            next
        })
    };
    let started = Instant::now();
    while server.stats().messages_received < 1_000 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "healthy traffic never started"
        );
        thread::sleep(Duration::from_millis(5));
    }
    let target = socket_addr(&address);

    // 1. Not our protocol at all: refused at the handshake.
    let mut http = TcpStream::connect(target).expect("connect");
    http.write_all(b"GET / HTTP/1.1\r\nHost: bus\r\n\r\n").expect("write");
    let reason = close_reason(http);
    assert_eq!(reason.code(), AtbusCloseReason::UnsupportedVersion, "{reason:?}");
    assert!(
        reason.message.contains("version 71"),
        "clear reason: {}",
        reason.message
    );

    // 1b. A handshake that does not decode, and one with an invalid name:
    //     both refused with a reason.
    let mut broken = TcpStream::connect(target).expect("connect");
    let bad_hello = FrameMessage {
        head: None,
        body: Some(Body::Packet(PacketData {
            stream_id: HANDSHAKE_STREAM,
            content: Bytes::from_static(&[0xff, 0xff, 0xff]),
            ..Default::default()
        })),
    };
    broken.write_all(&encode(&bad_hello)).expect("write");
    let reason = close_reason(broken);
    assert_eq!(reason.code(), AtbusCloseReason::BadFrame, "{reason:?}");
    assert!(
        reason.message.contains("undecodable handshake"),
        "clear reason: {}",
        reason.message
    );
    let mut misnamed = TcpStream::connect(target).expect("connect");
    misnamed.write_all(&encode(&handshake("Not A Name!"))).expect("write");
    let reason = close_reason(misnamed);
    assert_eq!(reason.code(), AtbusCloseReason::Unauthorized, "{reason:?}");
    assert!(
        reason.message.contains("invalid peer name"),
        "clear reason: {}",
        reason.message
    );

    // 2. A correct handshake, then frames whose hash is wrong: tolerated up to
    //    max_bad_frames, then BAD_FRAME.
    let mut liar = TcpStream::connect(target).expect("connect");
    liar.write_all(&encode(&handshake("liar"))).expect("handshake");
    for _ in 0..20 {
        let mut frame = encode(&ping());
        let last = frame.len() - 1;
        frame[last] ^= 0xff;
        if liar.write_all(&frame).is_err() {
            break; // already closed
        }
    }
    let reason = close_reason(liar);
    assert_eq!(reason.code(), AtbusCloseReason::BadFrame, "{reason:?}");
    assert!(
        reason.message.contains("bad frames"),
        "clear reason: {}",
        reason.message
    );

    // 3. A correct handshake, then noise: the framing is lost, closed at once.
    let mut noisy = TcpStream::connect(target).expect("connect");
    noisy.write_all(&encode(&handshake("noisy"))).expect("handshake");
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80)
        .collect();
    let _ = noisy.write_all(&noise);
    let reason = close_reason(noisy);
    assert_eq!(reason.code(), AtbusCloseReason::BadFrame, "{reason:?}");
    assert!(
        reason.message.contains("framing lost"),
        "clear reason: {}",
        reason.message
    );

    // The healthy connection went on through all of it.
    sending.store(false, Ordering::Release);
    let sent = sender.join().expect("healthy sender");
    let received = receiver.join().expect("server receiver");
    assert_eq!(received, sent, "every healthy message arrived, in order");
    let stats = server.stats();
    assert_eq!(stats.closed_bad_frame, 2, "{stats:?}");
    assert_eq!(stats.handshake_failures, 3, "{stats:?}");
    assert!(stats.bad_frames >= 9, "{stats:?}");
    assert_eq!(
        healthy.stats().connections_closed,
        0,
        "the healthy connection never dropped"
    );
    assert_eq!(healthy.stats().bad_frames, 0);
    assert_eq!(server.connected_peers(), vec!["healthy".to_string()]);
    server.stop(Duration::from_millis(200));
    healthy.stop(Duration::from_millis(200));
}
