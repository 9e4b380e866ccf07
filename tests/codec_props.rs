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

/// `wire` cut at the given points (in any order, repeats allowed).
fn cut<'a>(wire: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
    points.push(0);
    points.push(wire.len());
    points.sort_unstable();
    points.windows(2).map(|w| &wire[w[0]..w[1]]).collect()
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
        prop_assert_eq!(decode_chunks(cut(&wire, &cuts)), frames);
    }
}

/// Feeds `chunks` in order, each either copied in (`extend`) or written into
/// the decoder's own buffer (`read_room` / `filled`, as a transport reading
/// straight into it does), with the frame presizing on or off per chunk, and
/// collects every frame; `keep` frames are held while later chunks arrive,
/// so the buffer is sometimes shared and sometimes taken back.
fn decode_chunks_in_place<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
    modes: &[(bool, bool)],
    keep: usize,
) -> Vec<FrameMessage> {
    let mut decoder = Decoder::default();
    let mut out = Vec::new();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let (in_place, presize) = modes.get(i).copied().unwrap_or((true, false));
        decoder.set_presize(presize);
        if in_place {
            let mut rest = chunk;
            while !rest.is_empty() {
                let room = decoder.read_room(rest.len());
                assert!(!room.is_empty(), "room for a read");
                let n = room.len().min(rest.len());
                for (slot, byte) in room.iter_mut().zip(&rest[..n]) {
                    slot.write(*byte);
                }
                // SAFETY: the first `n` bytes of the room were just written.
                unsafe { decoder.filled(n) };
                rest = &rest[n..];
            }
        } else {
            decoder.extend(chunk);
        }
        while let Some(frame) = decoder.decode().expect("valid stream") {
            out.push(frame);
        }
        // Frames beyond the last `keep` are handed on (here: cloned out and
        // their buffer references dropped), the rest stay held.
        if out.len() > keep {
            let held = out.len() - keep;
            for frame in &mut out[..held] {
                *frame = FrameMessage::decode(frame.encode_to_vec().as_slice()).expect("copy out");
            }
        }
    }
    decoder.finish().expect("no frame cut short");
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn reading_into_the_decoders_buffer_gives_the_same_frames(
        frames in proptest::collection::vec(frame_message(70_000), 1..6),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        modes in proptest::collection::vec(any::<(bool, bool)>(), 13),
        keep in 0usize..3,
    ) {
        let wire = concat(&frames);
        prop_assert_eq!(decode_chunks_in_place(cut(&wire, &cuts), &modes, keep), frames);
    }
}

#[test]
fn a_desynchronised_decoder_offers_no_room() {
    let mut decoder = Decoder::default();
    // A version the decoder does not speak: the stream cannot be followed.
    decoder.extend(&[0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f]);
    assert!(decoder.decode().is_err());
    assert!(decoder.read_room(1024).is_empty());
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
