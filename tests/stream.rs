//! Stream layer over the deterministic simulated network (tests/sim): exactly
//! once, in order, under loss, duplication and reordering; multi-path with a
//! link cut; zero copy; flow control; resend timing; FIN, reset and close.

mod sim;

use std::time::Duration;

use bytes::Bytes;
use libatbus::proto::{AcknowledgeData, AtbusCloseReason, CloseReasonData};
use libatbus::proto::{AtbusPacketFlagType, StreamAcknowledge};
use libatbus::stream::{
    Config, Event, Fragment, Packet, PathConfig, PathId, ProtocolError, SendError, Session, Transmit,
};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use sim::{LinkConfig, Sim};
use xxhash_rust::xxh3::xxh3_64;

const MS: Duration = Duration::from_millis(1);
const STREAM: i64 = 1;

/// `count` messages with log-uniform sizes in 1..=max_len and random content.
fn messages(seed: u64, count: usize, max_len: usize) -> Vec<Bytes> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let ln_max = (max_len as f64).ln();
    (0..count)
        .map(|_| {
            let len = ((rng.random::<f64>() * ln_max).exp() as usize).clamp(1, max_len);
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            Bytes::from(data)
        })
        .collect()
}

/// Sends `msgs` from A to B on STREAM, driving the simulator until all arrive.
/// Checks order and content by hash; runs `at_half` once half have arrived.
fn transfer(sim: &mut Sim, msgs: &[Bytes], mut at_half: impl FnMut(&mut Sim)) {
    let expected: Vec<u64> = msgs.iter().map(|m| xxh3_64(m)).collect();
    let seed = sim.seed;
    let (mut next, mut received, mut half_done) = (0, 0, false);
    while received < msgs.len() {
        while next < msgs.len() {
            match sim.a.send(STREAM, msgs[next].clone()) {
                Ok(()) => next += 1,
                Err(SendError::WouldBlock { .. }) => break,
                Err(err) => panic!("seed {seed:#x}: send failed: {err}"),
            }
        }
        sim.flush();
        for event in sim.events(sim::Side::B) {
            if let Event::Message { stream_id, data } = event {
                assert_eq!(stream_id, STREAM);
                assert!(received < msgs.len(), "seed {seed:#x}: extra message delivered");
                assert_eq!(
                    xxh3_64(&data),
                    expected[received],
                    "seed {seed:#x}: message {received} differs (len {} vs {})",
                    data.len(),
                    msgs[received].len()
                );
                received += 1;
            }
        }
        sim.events(sim::Side::A);
        if !half_done && received >= msgs.len() / 2 {
            half_done = true;
            at_half(sim);
        }
        assert!(
            sim.elapsed() < Duration::from_secs(3600),
            "seed {seed:#x}: no completion after an hour of simulated time ({received}/{} delivered)",
            msgs.len()
        );
        if received < msgs.len() {
            assert!(
                sim.advance(),
                "seed {seed:#x}: stalled at {received}/{} delivered",
                msgs.len()
            );
        }
    }
    // Let every resend and duplicate in flight land: nothing more may arrive.
    for _ in 0..10_000 {
        sim.flush();
        for event in sim.events(sim::Side::B) {
            assert!(
                !matches!(event, Event::Message { .. }),
                "seed {seed:#x}: duplicate delivery"
            );
        }
        sim.events(sim::Side::A);
        if !sim.advance() {
            break;
        }
    }
    assert!(
        sim.a.is_drained(),
        "seed {seed:#x}: sender still holds unacknowledged data"
    );
}

fn lossy_link(loss: f64) -> LinkConfig {
    LinkConfig {
        mtu: 1200,
        delay: 5 * MS,
        jitter: 2 * MS,
        loss,
        duplicate: 0.02,
        reorder: 0.05,
    }
}

#[test]
fn ten_thousand_messages_exactly_once_at_0_1_5_20_percent_loss() {
    for (i, loss) in [0.0, 0.01, 0.05, 0.20].into_iter().enumerate() {
        let seed = 0x5717_0000 + i as u64;
        let mut sim = Sim::new(seed, Config::default());
        sim.add_link(PathId(1), lossy_link(loss));
        let msgs = messages(seed, 10_000, 64 * 1024);
        transfer(&mut sim, &msgs, |_| {});
        let sent = sim.log.iter().filter(|s| !s.is_ack).count();
        let lost = sim.log.iter().filter(|s| s.dropped).count();
        println!(
            "seed {seed:#x} loss {:>4.0}%: {} messages, {sent} data packets, {lost} frames dropped, {:?} simulated",
            loss * 100.0,
            msgs.len(),
            sim.elapsed()
        );
        assert_eq!(sim.protocol_errors, 0, "seed {seed:#x}");
    }
}

#[test]
fn two_paths_different_mtus_one_cut_mid_transfer() {
    for notify in [true, false] {
        let seed = 0x2a7b_0000 + notify as u64;
        let mut sim = Sim::new(seed, Config::default());
        sim.add_link(PathId(1), LinkConfig::clean(PathConfig::UDP_MTU, 3 * MS));
        sim.add_link(PathId(2), LinkConfig::clean(16 * 1024, 8 * MS));
        let msgs = messages(seed, 3_000, 64 * 1024);
        transfer(&mut sim, &msgs, |sim| sim.kill_link(PathId(2), notify));
        let used = |path| sim.log.iter().filter(|s| !s.is_ack && s.path == PathId(path)).count();
        assert!(used(1) > 0 && used(2) > 0, "both paths carried the stream");
        println!(
            "notify={notify}: path 1 sent {} packets, path 2 sent {}, {:?} simulated",
            used(1),
            used(2),
            sim.elapsed()
        );
    }
}

#[test]
fn fragments_are_slices_of_the_original_message() {
    let now = std::time::Instant::now();
    let mut session = Session::new(Config::default(), now);
    session.add_path(PathId(1), PathConfig::with_mtu(PathConfig::UDP_MTU));
    let message = Bytes::from(vec![0x42u8; 100_000]);
    let memory = message.as_ptr_range();
    session.send(STREAM, message.clone()).unwrap();
    let mut covered = 0;
    while let Some(Transmit::Packet { packet, .. }) = session.poll_transmit(now) {
        for fragment in &packet.fragments {
            let range = fragment.data.as_ptr_range();
            assert!(
                memory.start <= range.start && range.end <= memory.end,
                "fragment was copied out of the message"
            );
            covered += fragment.data.len();
        }
    }
    assert_eq!(covered, message.len());
}

#[test]
fn would_block_then_writable_after_ack() {
    let config = Config {
        send_window: 10_000,
        ..Config::default()
    };
    let mut sim = Sim::new(7, config);
    sim.add_link(PathId(1), LinkConfig::clean(1200, 10 * MS));
    let msg = Bytes::from(vec![1u8; 4000]);
    sim.a.send(STREAM, msg.clone()).unwrap();
    sim.a.send(STREAM, msg.clone()).unwrap();
    assert_eq!(
        sim.a.send(STREAM, msg.clone()),
        Err(SendError::WouldBlock {
            stream_id: STREAM,
            window: 10_000
        })
    );
    let mut writable_at = None;
    while writable_at.is_none() {
        sim.flush();
        if sim
            .events(sim::Side::A)
            .contains(&Event::Writable { stream_id: STREAM })
        {
            writable_at = Some(sim.elapsed());
        }
        sim.events(sim::Side::B);
        if writable_at.is_none() {
            assert!(sim.advance(), "network idle without a writable event");
        }
    }
    assert!(writable_at >= Some(20 * MS), "writable only after a round trip");
    sim.a.send(STREAM, msg).expect("space after the ack");
}

/// Warms RTT up on a clean link with a fixed 40 ms round trip.
fn warmed_up(mtu: usize) -> Sim {
    let mut sim = Sim::new(11, Config::default());
    sim.add_link(PathId(1), LinkConfig::clean(mtu, 20 * MS));
    let warmup = messages(11, 30, 100);
    for msg in &warmup {
        transfer(&mut sim, std::slice::from_ref(msg), |_| {});
    }
    let rtt = sim.a.path_rtt(PathId(1)).expect("rtt sampled");
    assert!((39 * MS..=41 * MS).contains(&rtt), "smoothed rtt {rtt:?}");
    sim
}

/// Time between the dropped transmission of `offset` and its first resend.
fn resend_delay(sim: &Sim, offset: u64) -> Duration {
    let mut sends = sim
        .log
        .iter()
        .filter(|s| s.from == sim::Side::A && !s.is_ack && s.offset == offset);
    let first = sends.next().expect("sent once");
    assert!(first.dropped, "the first transmission was dropped");
    sends.next().expect("resent").at - first.at
}

fn drop_first_packet_at(sim: &mut Sim, offset: u64) {
    let mut dropped = false;
    sim.drop_filter = Some(Box::new(move |_, transmit| {
        if let Transmit::Packet { packet, .. } = transmit
            && packet.offset == offset
            && !dropped
        {
            dropped = true;
            return true;
        }
        false
    }));
}

#[test]
fn tail_loss_is_resent_at_the_rto() {
    let mut sim = warmed_up(1200);
    let rtt = 40 * MS;
    let offset = warmup_bytes();
    drop_first_packet_at(&mut sim, offset);
    transfer(&mut sim, &messages(12, 1, 500), |_| {});
    let delay = resend_delay(&sim, offset);
    assert!(
        delay >= rtt && delay <= rtt * 3 / 2,
        "first resend after {delay:?}, expected within 1.0x..1.5x of {rtt:?}"
    );
}

#[test]
fn sack_gap_is_resent_without_waiting_for_the_rto() {
    let mut sim = warmed_up(1200);
    let rtt = 40 * MS;
    let offset = warmup_bytes();
    drop_first_packet_at(&mut sim, offset);
    // Six packets' worth of messages: the later ones reveal the gap.
    let burst: Vec<Bytes> = (0..6).map(|i| Bytes::from(vec![i as u8; 1000])).collect();
    transfer(&mut sim, &burst, |_| {});
    let delay = resend_delay(&sim, offset);
    let rto = rtt * 5 / 4;
    assert!(
        delay >= rtt && delay < rto,
        "resend after {delay:?}: expected at the gap's acknowledgement (~{rtt:?}), before the RTO ({rto:?})"
    );
}

fn warmup_bytes() -> u64 {
    messages(11, 30, 100).iter().map(|m| m.len() as u64).sum()
}

#[test]
fn finish_reaches_both_sides() {
    let mut sim = Sim::new(3, Config::default());
    sim.add_link(PathId(1), lossy_link(0.1));
    let msgs = messages(3, 50, 5000);
    for m in &msgs {
        sim.a.send(STREAM, m.clone()).unwrap();
    }
    sim.a.finish(STREAM).unwrap();
    let (mut got, mut finished, mut send_finished) = (0, false, false);
    while !(finished && send_finished) {
        sim.flush();
        for event in sim.events(sim::Side::B) {
            match event {
                Event::Message { .. } => {
                    assert!(!finished, "message after Finished");
                    got += 1
                }
                Event::Finished { stream_id } => {
                    assert_eq!(stream_id, STREAM);
                    finished = true
                }
                _ => {}
            }
        }
        send_finished |= sim
            .events(sim::Side::A)
            .contains(&Event::SendFinished { stream_id: STREAM });
        assert!(sim.advance(), "stalled");
    }
    assert_eq!(got, msgs.len());
}

#[test]
fn restarted_peer_gets_only_unacknowledged_messages_via_reset_offset() {
    let mut sim = Sim::new(5, Config::default());
    sim.add_link(PathId(1), LinkConfig::clean(1200, 5 * MS));
    transfer(&mut sim, &messages(5, 20, 3000), |_| {});
    // B restarts: a fresh session that never saw offsets before.
    sim.b = Session::new(Config::default(), sim.now);
    sim.b.add_path(PathId(1), PathConfig::with_mtu(1200));
    sim.a.peer_restarted();
    let later = messages(6, 10, 3000);
    transfer(&mut sim, &later, |_| {});
}

#[test]
fn close_path_carries_reason() {
    let mut sim = Sim::new(9, Config::default());
    sim.add_link(PathId(1), LinkConfig::clean(1200, MS));
    sim.add_link(PathId(2), LinkConfig::clean(1200, MS));
    let reason = CloseReasonData {
        code: AtbusCloseReason::Shutdown as i32,
        message: "draining".into(),
    };
    sim.a.close_path(PathId(2), reason.clone());
    sim.flush();
    sim.advance();
    assert_eq!(
        sim.events(sim::Side::B),
        vec![Event::PathClosed {
            path: PathId(2),
            reason: Some(reason)
        }]
    );
    assert_eq!(sim.b.paths().collect::<Vec<_>>(), vec![PathId(1)]);
    transfer(&mut sim, &messages(9, 100, 2000), |_| {});
}

#[test]
fn peer_violations_are_errors_not_panics() {
    let now = std::time::Instant::now();
    let config = Config {
        max_streams: 2,
        ..Config::default()
    };
    let mut s = Session::new(config, now);
    s.add_path(PathId(1), PathConfig::with_mtu(1200));
    s.send(STREAM, Bytes::from_static(b"abc")).unwrap();
    let ack = |offset| AcknowledgeData {
        acknowledge: Some(StreamAcknowledge {
            stream_id: STREAM,
            acknowledge_offset: offset,
            received_max_offset: offset,
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        s.handle_ack(now, PathId(1), ack(-5)),
        Err(ProtocolError::NegativeOffset)
    );
    assert!(matches!(
        s.handle_ack(now, PathId(1), ack(1000)),
        Err(ProtocolError::AckBeyondSent { .. })
    ));
    let packet = |stream_id| Packet {
        stream_id,
        offset: 0,
        flags: 0,
        timepoint: 0,
        fragments: vec![Fragment::data(Bytes::from_static(b"x"), false)],
    };
    s.handle_packet(now, PathId(1), packet(10)).unwrap();
    s.handle_packet(now, PathId(1), packet(11)).unwrap();
    assert_eq!(
        s.handle_packet(now, PathId(1), packet(12)),
        Err(ProtocolError::TooManyStreams { max: 2 })
    );
    assert!(matches!(
        s.handle_packet(now, PathId(9), packet(10)),
        Err(ProtocolError::UnknownPath { .. })
    ));
    assert_eq!(
        s.send(STREAM, Bytes::new()),
        Err(SendError::EmptyMessage { stream_id: STREAM })
    );
    let fin = Packet {
        flags: AtbusPacketFlagType::FinishStream as i32,
        ..packet(10)
    };
    s.handle_packet(now, PathId(1), fin).unwrap();
}

/// Cuts the concatenation of `msgs` into packets at `cuts`, marking message
/// ends as the protocol does.
fn cut_into_packets(msgs: &[Vec<u8>], cuts: &[usize]) -> Vec<Packet> {
    let mut ends = Vec::new();
    let mut all = Vec::new();
    for m in msgs {
        all.extend_from_slice(m);
        ends.push(all.len());
    }
    let all = Bytes::from(all);
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| c % (all.len() + 1))
        .chain(ends.iter().copied())
        .collect();
    points.push(0);
    points.sort_unstable();
    points.dedup();
    let mut packets = Vec::new();
    // Each packet holds 1..=3 consecutive fragments.
    let mut i = 0;
    while i + 1 < points.len() {
        let take = 1 + (points[i] % 3).min(points.len() - i - 2);
        let fragments = (i..i + take)
            .map(|j| Fragment::data(all.slice(points[j]..points[j + 1]), !ends.contains(&points[j + 1])))
            .collect();
        packets.push(Packet {
            stream_id: STREAM,
            offset: points[i] as u64,
            flags: 0,
            timepoint: 0,
            fragments,
        });
        i += take;
    }
    packets
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Two connections fragment the same messages differently; their packets
    /// arrive shuffled and duplicated. Every message comes out once, in order.
    #[test]
    fn reassembly_of_differently_cut_duplicated_shuffled_packets(
        msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 1..20),
        cuts_a in proptest::collection::vec(any::<usize>(), 0..30),
        cuts_b in proptest::collection::vec(any::<usize>(), 0..30),
        order in any::<u64>(),
    ) {
        let now = std::time::Instant::now();
        let mut s = Session::new(Config::default(), now);
        s.add_path(PathId(1), PathConfig::with_mtu(1200));
        let mut packets = cut_into_packets(&msgs, &cuts_a);
        packets.extend(cut_into_packets(&msgs, &cuts_b));
        let dup: Vec<Packet> = packets.iter().step_by(3).cloned().collect();
        packets.extend(dup);
        let mut rng = SmallRng::seed_from_u64(order);
        for i in (1..packets.len()).rev() {
            packets.swap(i, rng.random_range(0..=i));
        }
        for packet in packets {
            s.handle_packet(now, PathId(1), packet).unwrap();
        }
        let got: Vec<Vec<u8>> = std::iter::from_fn(|| s.poll_event())
            .map(|e| match e {
                Event::Message { data, .. } => data.to_vec(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        prop_assert_eq!(got, msgs);
    }
}

/// Urgent streams keep to the latency path, others to the ordinary one; their
/// packets carry URGENT, which the receiver records; the latency path takes
/// bulk only once it is the last path.
#[test]
fn urgent_streams_use_the_latency_path() {
    const BULK: i64 = 1;
    const SYNC: i64 = 7;
    let now = std::time::Instant::now();
    let mut a = Session::new(Config::default(), now);
    let mut b = Session::new(Config::default(), now);
    let ordinary = PathId(1);
    let latency = PathId(2);
    for session in [&mut a, &mut b] {
        session.add_path(ordinary, PathConfig::with_mtu(PathConfig::TCP_MTU));
        session.add_path(
            latency,
            PathConfig {
                urgent_only: true,
                ..PathConfig::with_mtu(PathConfig::TCP_MTU)
            },
        );
    }
    a.set_stream_urgent(SYNC, true);
    for i in 0..50u8 {
        a.send(BULK, Bytes::from(vec![i; 16_384]))
            .expect("bulk fits the window");
        a.send(SYNC, Bytes::from(vec![i; 64])).expect("sync fits the window");
    }
    let (mut bulk_packets, mut sync_packets) = (0, 0);
    while let Some(transmit) = a.poll_transmit(now) {
        let Transmit::Packet { path, packet } = transmit else {
            continue;
        };
        let urgent = packet.flags & AtbusPacketFlagType::Urgent as i32 != 0;
        match packet.stream_id {
            BULK => {
                assert_eq!(path, ordinary, "bulk stays off the latency path");
                assert!(!urgent);
                bulk_packets += 1;
            }
            SYNC => {
                assert_eq!(path, latency, "urgent data takes the latency path");
                assert!(urgent, "urgent packets are flagged");
                sync_packets += 1;
                b.handle_packet(now, path, packet).expect("b takes it");
            }
            other => panic!("unexpected stream {other}"),
        }
    }
    assert!(bulk_packets > 0 && sync_packets > 0);
    assert!(b.is_peer_urgent(SYNC) && !b.is_peer_urgent(BULK));
    // Their messages come out of b's urgent event queue.
    assert!(matches!(
        b.poll_urgent_event(),
        Some(Event::Message { stream_id: SYNC, .. })
    ));

    // The ordinary path dies: its unacknowledged bulk goes to the latency path.
    a.remove_path(ordinary);
    let mut moved = 0;
    while let Some(transmit) = a.poll_transmit(now) {
        if let Transmit::Packet { path, packet } = transmit {
            assert_eq!(path, latency);
            if packet.stream_id == BULK {
                moved += 1;
            }
        }
    }
    assert!(moved > 0, "bulk uses the last path left");
}

/// Two sessions with one TCP path each.
fn session_pair(config: Config, now: std::time::Instant) -> (Session, Session) {
    let mut a = Session::new(config.clone(), now);
    let mut b = Session::new(config, now);
    for session in [&mut a, &mut b] {
        session.add_path(PathId(1), PathConfig::with_mtu(PathConfig::TCP_MTU));
    }
    (a, b)
}

/// Everything `from` transmits now, delivered to `to`; the kinds in order
/// (`true`: an acknowledgement).
fn pump(from: &mut Session, to: &mut Session, now: std::time::Instant) -> Vec<bool> {
    let mut kinds = Vec::new();
    while let Some(transmit) = from.poll_transmit(now) {
        match transmit {
            Transmit::Packet { path, packet } => {
                kinds.push(false);
                to.handle_packet(now, path, packet).expect("valid packet");
            }
            Transmit::Ack { path, ack } => {
                kinds.push(true);
                to.handle_ack(now, path, ack).expect("valid ack");
            }
        }
    }
    kinds
}

#[test]
fn a_lone_packet_is_acknowledged_with_the_answer_or_after_the_delay() {
    let delay = Config::default().ack_delay;
    assert!(delay > Duration::ZERO);
    let now = std::time::Instant::now();
    let (mut a, mut b) = session_pair(Config::default(), now);

    // A ping: b owes an acknowledgement, but not yet.
    a.send(STREAM, Bytes::from_static(b"ping")).expect("send");
    assert_eq!(pump(&mut a, &mut b, now), [false]);
    assert!(pump(&mut b, &mut a, now).is_empty(), "no acknowledgement alone at once");
    assert_eq!(b.poll_timeout(), Some(now + delay), "the acknowledgement's deadline");
    // The answer comes first: the acknowledgement leaves with it.
    b.send(STREAM, Bytes::from_static(b"pong")).expect("send");
    assert_eq!(
        pump(&mut b, &mut a, now),
        [false, true],
        "answer, then its acknowledgement"
    );
    assert_eq!(a.unacknowledged(STREAM), 0, "the ping is acknowledged");

    // No answer: the acknowledgement goes when its delay has passed.
    let later = now + delay / 4;
    a.send(STREAM, Bytes::from_static(b"ping 2")).expect("send");
    assert_eq!(
        pump(&mut a, &mut b, later),
        [false, true],
        "the second ping carries the acknowledgement of the pong"
    );
    assert!(pump(&mut b, &mut a, later + delay / 2).is_empty());
    let due = b.poll_timeout().expect("a deadline");
    assert_eq!(due, later + delay);
    b.handle_timeout(due);
    assert_eq!(pump(&mut b, &mut a, due), [true]);
    assert_eq!(a.unacknowledged(STREAM), 0);
    assert_eq!(b.poll_timeout(), None, "nothing owed, no timer");
}

#[test]
fn a_closing_path_sends_the_acknowledgements_it_owes_first() {
    let now = std::time::Instant::now();
    let (mut a, mut b) = session_pair(Config::default(), now);
    a.send(STREAM, Bytes::from_static(b"last")).expect("send");
    assert_eq!(pump(&mut a, &mut b, now), [false]);
    assert!(
        b.poll_timeout().is_some_and(|t| t > now),
        "a delayed acknowledgement is owed"
    );
    // The receiving node stops at once (it has what it wanted).
    b.close_path(
        PathId(1),
        CloseReasonData {
            code: AtbusCloseReason::Shutdown as i32,
            message: "node stopping".into(),
        },
    );
    assert_eq!(
        pump(&mut b, &mut a, now),
        [true, false],
        "the acknowledgement, then FINISH_CONNECTION"
    );
    assert_eq!(a.unacknowledged(STREAM), 0, "the sender knows it was delivered");
}

#[test]
fn bursts_holes_and_resends_are_acknowledged_at_once() {
    let now = std::time::Instant::now();
    // A burst: two packets or more.
    let (mut a, mut b) = session_pair(Config::default(), now);
    a.send(STREAM, Bytes::from(vec![1u8; 3 * PathConfig::TCP_MTU]))
        .expect("send");
    assert!(pump(&mut a, &mut b, now).len() >= 2);
    assert_eq!(pump(&mut b, &mut a, now), [true]);

    // A hole: the second packet arrives first.
    let (mut a, mut b) = session_pair(Config::default(), now);
    a.send(STREAM, Bytes::from(vec![2u8; PathConfig::TCP_MTU]))
        .expect("send");
    a.send(STREAM, Bytes::from_static(b"after the hole")).expect("send");
    let mut packets = Vec::new();
    while let Some(Transmit::Packet { path, packet }) = a.poll_transmit(now) {
        packets.push((path, packet));
    }
    assert!(packets.len() >= 2);
    let (path, last) = packets.pop().expect("two packets");
    b.handle_packet(now, path, last).expect("valid");
    assert_eq!(pump(&mut b, &mut a, now), [true], "a hole is reported at once");

    // A resend of what was delivered: the sender waits for it.
    let (mut a, mut b) = session_pair(Config::default(), now);
    a.send(STREAM, Bytes::from_static(b"once")).expect("send");
    let Some(Transmit::Packet { path, packet }) = a.poll_transmit(now) else {
        panic!("a packet");
    };
    b.handle_packet(now, path, packet.clone()).expect("valid");
    b.handle_timeout(now + MS);
    assert_eq!(pump(&mut b, &mut a, now + MS), [true]);
    b.handle_packet(now + MS, path, packet).expect("a duplicate is fine");
    assert_eq!(
        pump(&mut b, &mut a, now + MS),
        [true],
        "a resend is acknowledged at once"
    );

    // A zero delay: always at once.
    let config = Config {
        ack_delay: Duration::ZERO,
        ..Config::default()
    };
    let (mut a, mut b) = session_pair(config, now);
    a.send(STREAM, Bytes::from_static(b"ping")).expect("send");
    assert_eq!(pump(&mut a, &mut b, now), [false]);
    assert_eq!(pump(&mut b, &mut a, now), [true]);
}
