//! A million random byte strings through both decoders: no panic, and no
//! allocation beyond the configured maximum frame length.
//!
//! The global allocator is capped: any attempt to hold more than the budget
//! below aborts the test process. This file has a single test so that nothing
//! else allocates under the cap.

use bytes::{BufMut, Bytes, BytesMut};
use cap::Cap;
use libatbus::frame::{Config, Decoder, decode_datagram, frame_hash};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

#[global_allocator]
static ALLOCATOR: Cap<std::alloc::System> = Cap::new(std::alloc::System, usize::MAX);

const MAX_FRAME_LEN: usize = 64 * 1024;

/// One adversarial input. Shapes, in turn: pure noise; the right version byte
/// then noise; a header announcing a random or huge length; a small body of
/// noise with a *correct* hash, so the protobuf decoder itself sees garbage.
fn garbage(rng: &mut SmallRng, out: &mut BytesMut) {
    out.clear();
    let body_len = if rng.random_ratio(1, 50) {
        rng.random_range(0..8192)
    } else {
        rng.random_range(0..96)
    };
    match rng.random_range(0..5) {
        0 => {}
        1 => out.put_u8(3),
        2 | 3 => {
            out.put_u8(3);
            let length: u64 = match rng.random_range(0..4) {
                0 => rng.next_u64(),
                1 => (MAX_FRAME_LEN as u64) + rng.random_range(1..u32::MAX as u64),
                _ => rng.random_range(0..=MAX_FRAME_LEN as u64),
            };
            prost::encoding::encode_varint(length, out);
        }
        _ => {
            out.put_u8(3);
            prost::encoding::encode_varint(body_len as u64, out);
            let start = out.len();
            out.resize(start + body_len, 0);
            rng.fill_bytes(&mut out[start..]);
            let hash = frame_hash(out);
            out.put_u32_le(hash);
            return;
        }
    }
    let start = out.len();
    out.resize(start + body_len, 0);
    rng.fill_bytes(&mut out[start..]);
}

#[test]
fn million_random_inputs_to_both_decoders() {
    const INPUTS: usize = 1_000_000;
    let seed = 0x0a7b_5eed_u64;
    let config = Config {
        max_frame_len: MAX_FRAME_LEN,
    };
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut input = BytesMut::with_capacity(16 * 1024);
    let mut decoder = Decoder::new(config.clone());
    let mut frames = 0usize;
    let mut errors = 0usize;

    // Budget: what is live now, plus the largest frame one decoder may buffer
    // (twice, for a datagram copy and the streaming buffer), plus slack for the
    // decoded messages' small fields.
    let baseline = ALLOCATOR.allocated();
    let budget = 2 * config.max_wire_len() + 256 * 1024;
    ALLOCATOR.set_limit(baseline + budget).expect("limit above current use");

    for _ in 0..INPUTS {
        garbage(&mut rng, &mut input);
        match decode_datagram(&config, Bytes::copy_from_slice(&input)) {
            Ok(_) => frames += 1,
            Err(_) => errors += 1,
        }
        // The streaming decoder keeps its state across inputs, as a connection
        // would, until an error loses the framing; then a new one is made.
        decoder.extend(&input);
        loop {
            match decoder.decode() {
                Ok(Some(_)) => frames += 1,
                Ok(None) => break,
                Err(err) => {
                    errors += 1;
                    if err.is_fatal() {
                        decoder = Decoder::new(config.clone());
                    }
                    break;
                }
            }
        }
        assert!(
            decoder.buffered() <= config.max_wire_len() + input.len(),
            "streaming decoder buffered {} bytes",
            decoder.buffered()
        );
    }
    ALLOCATOR.set_limit(usize::MAX).expect("raise limit");
    drop(decoder);
    println!("seed {seed:#x}: {INPUTS} inputs, {errors} errors, {frames} frames decoded from garbage");
    assert!(errors > INPUTS / 2, "expected most garbage to be rejected");
}
