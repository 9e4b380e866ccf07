//! Frame codec throughput: encode, streaming decode and datagram decode of one
//! packet frame carrying 64 B, 548 B (the frame-sync class) and 16 KiB; and
//! the decoding of a stream packet's content holding a thousand 64 B
//! fragments, by prost and by the stream layer's data path.
//!
//! Run: `cargo bench --bench codec`. Figures are recorded in `perf/codec.md`.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use libatbus::frame::{Config, Decoder, Encoder, decode_datagram};
use libatbus::proto::{Body, FrameMessage, MessageHead, PacketData};
use libatbus::stream::{Content, Fragment};
use prost::Message;

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

/// What a 64 KiB tcp packet of 64 B messages carries: 1 000 fragments.
fn content(c: &mut Criterion) {
    let content = Content {
        fragments: (0..1000)
            .map(|i| Fragment::data(Bytes::from(vec![i as u8; 64]), false))
            .collect(),
    };
    let bytes = Bytes::from(content.encode_to_vec());
    let mut group = c.benchmark_group("content");
    group.throughput(Throughput::Elements(content.fragments.len() as u64));
    group.bench_with_input(BenchmarkId::new("prost", 64), &bytes, |b, bytes| {
        b.iter(|| Content::decode(black_box(bytes.clone())).expect("decode"))
    });
    group.bench_with_input(BenchmarkId::new("decode_packet", 64), &bytes, |b, bytes| {
        b.iter(|| Content::decode_packet(black_box(bytes.clone())).expect("decode"))
    });
    group.finish();
}

criterion_group!(benches, codec, content);
criterion_main!(benches);
