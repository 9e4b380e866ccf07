//! Frame codec throughput: encode, streaming decode and datagram decode of one
//! packet frame carrying 64 B, 548 B (the frame-sync class) and 16 KiB.
//!
//! Run: `cargo bench --bench codec`. Figures are recorded in `perf/codec.md`.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use libatbus::frame::{Config, Decoder, Encoder, decode_datagram};
use libatbus::proto::{Body, FrameMessage, MessageHead, PacketData};

const SIZES: [usize; 3] = [64, 548, 16 * 1024];

fn frame(size: usize) -> FrameMessage {
    FrameMessage {
        head: Some(MessageHead {
            source: "game-logic-1".into(),
            destination: "gateway-7".into(),
            ..Default::default()
        }),
        body: Some(Body::Packet(PacketData {
            stream_id: 1,
            stream_offset: 1 << 20,
            content: Bytes::from(vec![0x5a; size]),
            timepoint_microseconds: 1_700_000_000_000_000,
            ..Default::default()
        })),
    }
}

fn codec(c: &mut Criterion) {
    let encoder = Encoder::default();
    let mut group = c.benchmark_group("codec");
    for size in SIZES {
        let msg = frame(size);
        let mut wire = BytesMut::new();
        encoder.encode(&msg, &mut wire).expect("encode");
        let wire = wire.freeze();
        group.throughput(Throughput::Bytes(wire.len() as u64));

        let mut out = BytesMut::with_capacity(wire.len() * 2);
        group.bench_with_input(BenchmarkId::new("encode", size), &msg, |b, msg| {
            b.iter(|| {
                out.clear();
                encoder.encode(black_box(msg), &mut out).expect("encode")
            })
        });

        let mut decoder = Decoder::new(Config::default());
        group.bench_with_input(BenchmarkId::new("decode_stream", size), &wire, |b, wire| {
            b.iter(|| {
                decoder.extend(black_box(wire));
                decoder.decode().expect("decode").expect("one frame")
            })
        });

        let config = Config::default();
        group.bench_with_input(BenchmarkId::new("decode_datagram", size), &wire, |b, wire| {
            b.iter(|| decode_datagram(&config, black_box(wire.clone())).expect("decode"))
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
