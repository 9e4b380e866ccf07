//! Codec properties: round trips over every body variant, and the streaming
//! decoder fed the same bytes cut at every position.

mod common;

use bytes::{Bytes, BytesMut};
use common::{encode, frame_message, sample_frames};
use libatbus::frame::{Config, Decoder, decode_datagram};
use libatbus::proto::{Body, FrameMessage, PacketContent};
use proptest::prelude::*;
use prost::Message;

/// Feeds `chunks` in order and collects every frame, failing on any error.
fn decode_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<FrameMessage> {
    let mut decoder = Decoder::default();
    let mut out = Vec::new();
    for chunk in chunks {
        decoder.extend(chunk);
        while let Some(frame) = decoder.decode().expect("valid stream") {
            out.push(frame);
        }
    }
    decoder.finish().expect("no frame cut short");
    out
}

fn concat(frames: &[FrameMessage]) -> Bytes {
    let mut buf = BytesMut::new();
    for frame in frames {
        buf.extend_from_slice(&encode(frame));
    }
    buf.freeze()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_every_variant(msg in frame_message(70_000)) {
        let wire = encode(&msg);
        prop_assert_eq!(&decode_datagram(&Config::default(), wire.clone()).expect("datagram"), &msg);
        let streamed = decode_chunks([&wire[..]]);
        prop_assert_eq!(streamed.as_slice(), std::slice::from_ref(&msg));
        // packet_content inside packet_data.content survives too (maps, options).
        if let Some(Body::Packet(p)) = &msg.body
            && let Ok(content) = PacketContent::decode(p.content.clone()) {
                let Some(Body::Packet(q)) = &streamed[0].body else { unreachable!() };
                prop_assert_eq!(PacketContent::decode(q.content.clone()).expect("content"), content);
            }
    }

    #[test]
    fn many_frames_in_one_read(frames in proptest::collection::vec(frame_message(20_000), 1..8)) {
        let wire = concat(&frames);
        prop_assert_eq!(decode_chunks([&wire[..]]), frames);
    }

    #[test]
    fn split_at_random_points(
        frames in proptest::collection::vec(frame_message(20_000), 1..6),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let wire = concat(&frames);
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        points.push(0);
        points.push(wire.len());
        points.sort_unstable();
        let chunks = points.windows(2).map(|w| &wire[w[0]..w[1]]);
        prop_assert_eq!(decode_chunks(chunks), frames);
    }
}

#[test]
fn split_at_every_position_and_byte_by_byte() {
    // Small frames so that cutting at every position stays quick; one large frame
    // (several hundred KiB of buffer) is covered by a strided cut below.
    let frames: Vec<FrameMessage> = sample_frames(400, 16_384)
        .into_iter()
        .filter(|f| f.encoded_len() < 600)
        .take(6)
        .collect();
    assert!(frames.len() >= 4, "sampler gave too few small frames");
    let wire = concat(&frames);
    for cut in 0..=wire.len() {
        assert_eq!(decode_chunks([&wire[..cut], &wire[cut..]]), frames, "cut at {cut}");
    }
    assert_eq!(decode_chunks(wire.chunks(1)), frames, "byte by byte");
}

#[test]
fn split_large_frames_at_strided_positions() {
    let frames = sample_frames(160, 70_000);
    let wire = concat(&frames);
    assert!(
        wire.len() > 100_000,
        "expected some large frames, got {} bytes",
        wire.len()
    );
    for cut in (0..=wire.len()).step_by(997) {
        assert_eq!(decode_chunks([&wire[..cut], &wire[cut..]]), frames, "cut at {cut}");
    }
    assert_eq!(decode_chunks(wire.chunks(1)), frames, "byte by byte");
}
