//! Any single-bit flip anywhere in an encoded frame is reported as an error by
//! both decoders: never a wrong frame, never a panic.

mod common;

use bytes::Bytes;
use common::{encode, sample_frames};
use libatbus::frame::{Config, Decoder, decode_datagram};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Returns true if the streaming decoder, given `wire` and then end of stream,
/// reported an error and produced no frame.
fn streaming_rejects(wire: &[u8]) -> bool {
    let mut decoder = Decoder::default();
    decoder.extend(wire);
    match decoder.decode() {
        Ok(Some(frame)) => panic!("corrupted bytes decoded to a frame: {frame:?}"),
        Ok(None) => decoder.finish().is_err(),
        Err(_) => true,
    }
}

fn flip(wire: &Bytes, bit: usize) -> Vec<u8> {
    let mut corrupted = wire.to_vec();
    corrupted[bit / 8] ^= 1 << (bit % 8);
    corrupted
}

fn assert_rejected(corrupted: Vec<u8>, what: &str) {
    assert!(streaming_rejects(&corrupted), "streaming decoder accepted {what}");
    let datagram = decode_datagram(&Config::default(), Bytes::from(corrupted));
    assert!(datagram.is_err(), "datagram decoder accepted {what}: {datagram:?}");
}

#[test]
fn random_single_bit_flips() {
    const CORRUPTIONS: usize = 100_000;
    let seed = 0x5eed_c0de_u64;
    let frames: Vec<Bytes> = sample_frames(256, 20_000).iter().map(encode).collect();
    let mut rng = SmallRng::seed_from_u64(seed);
    for i in 0..CORRUPTIONS {
        let wire = &frames[rng.random_range(0..frames.len())];
        let bit = rng.random_range(0..wire.len() * 8);
        assert_rejected(flip(wire, bit), &format!("corruption #{i} (seed {seed:#x}, bit {bit})"));
    }
}

#[test]
fn every_bit_of_small_frames() {
    for (n, frame) in sample_frames(64, 16_384).iter().enumerate() {
        let wire = encode(frame);
        if wire.len() > 256 {
            continue;
        }
        for bit in 0..wire.len() * 8 {
            assert_rejected(flip(&wire, bit), &format!("frame {n} with bit {bit} flipped"));
        }
    }
}
