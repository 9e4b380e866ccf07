//! Stream layer throughput in process: send → fragment → (encode → decode) →
//! reassemble → deliver, with acknowledgements flowing back, for 64 B and
//! 16 KiB messages.
//!
//! * `handover`: packets passed as values between the sessions, as the
//!   same-process `mem://` transport will;
//! * `codec`: every packet and ack encoded to a frame and decoded again by the
//!   streaming decoder, as a byte-stream transport does.
//!
//! Run: `cargo bench --bench stream`. Figures are recorded in `perf/stream.md`.

use std::hint::black_box;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use libatbus::frame::{Decoder, Encoder};
use libatbus::stream::{Config, Event, PathConfig, PathId, Session, Transmit};

const PATH: PathId = PathId(1);
const BATCH_BYTES: usize = 1024 * 1024;

struct Pair {
    a: Session,
    b: Session,
    encoder: Encoder,
    decoder: Decoder,
    wire: BytesMut,
}

impl Pair {
    fn new() -> Self {
        let now = Instant::now();
        let mut a = Session::new(Config::default(), now);
        let mut b = Session::new(Config::default(), now);
        a.add_path(PATH, PathConfig::with_mtu(PathConfig::TCP_MTU));
        b.add_path(PATH, PathConfig::with_mtu(PathConfig::TCP_MTU));
        Self {
            a,
            b,
            encoder: Encoder::default(),
            decoder: Decoder::default(),
            wire: BytesMut::new(),
        }
    }

    /// Moves every pending transmit of `from` into `to`.
    fn pump(
        from: &mut Session,
        to: &mut Session,
        now: Instant,
        codec: Option<(&Encoder, &mut Decoder, &mut BytesMut)>,
    ) {
        match codec {
            None => {
                while let Some(transmit) = from.poll_transmit(now) {
                    let result = match transmit {
                        Transmit::Packet { path, packet } => to.handle_packet(now, path, packet),
                        Transmit::Ack { path, ack } => to.handle_ack(now, path, ack),
                    };
                    result.expect("valid input");
                }
            }
            Some((encoder, decoder, wire)) => {
                while let Some(transmit) = from.poll_transmit(now) {
                    wire.clear();
                    encoder.encode(&transmit.into_frame(), wire).expect("encode");
                    decoder.extend(wire);
                    while let Some(frame) = decoder.decode().expect("decode") {
                        to.handle_frame(now, PATH, frame).expect("valid input");
                    }
                }
            }
        }
    }

    /// Sends `messages` from A and runs both sides until B delivered them all.
    fn transfer(&mut self, messages: &[Bytes], codec: bool) -> usize {
        let now = Instant::now();
        for message in messages {
            self.a.send(1, message.clone()).expect("window fits the batch");
        }
        let mut delivered = 0;
        while delivered < messages.len() {
            let c = codec.then_some((&self.encoder, &mut self.decoder, &mut self.wire));
            Self::pump(&mut self.a, &mut self.b, now, c);
            while let Some(event) = self.b.poll_event() {
                if let Event::Message { data, .. } = event {
                    delivered += black_box(data).len().min(1);
                }
            }
            let c = codec.then_some((&self.encoder, &mut self.decoder, &mut self.wire));
            Self::pump(&mut self.b, &mut self.a, now, c);
            while self.a.poll_event().is_some() {}
        }
        delivered
    }
}

fn stream(c: &mut Criterion) {
    let mut group = c.benchmark_group("stream");
    for size in [64usize, 16 * 1024] {
        let count = BATCH_BYTES / size;
        let messages: Vec<Bytes> = (0..count).map(|i| Bytes::from(vec![i as u8; size])).collect();
        for codec in [false, true] {
            let name = if codec { "codec" } else { "handover" };
            group.throughput(Throughput::Elements(count as u64));
            let mut pair = Pair::new();
            group.bench_with_input(BenchmarkId::new(name, size), &messages, |b, messages| {
                b.iter(|| pair.transfer(messages, codec))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, stream);
criterion_main!(benches);
