//! Wire codec: bytes ⇄ [`FrameMessage`]. No IO, no clocks.
//!
//! Every frame on the wire is
//!
//! ```text
//! +----------------+---------------+-------------------------------+---------------+
//! | varint version | varint length | frame_message (length bytes)  | hash (4 B LE) |
//! +----------------+---------------+-------------------------------+---------------+
//! ```
//!
//! The hash is xxh3-64 seeded with [`HASH_SEED`] over every preceding byte of the
//! frame, truncated to its low 32 bits, little-endian.
//!
//! * [`Encoder`] writes a frame into a caller's `BytesMut`, sizing it exactly up
//!   front.
//! * [`Decoder`] is the streaming decoder for byte-stream transports (TCP, Unix):
//!   feed it whatever a read returned, take frames out as they complete.
//! * [`decode_datagram`] is the decoder for datagram transports (UDP): exactly one
//!   frame per datagram.
//!
//! The maximum body length ([`Config::max_frame_len`]) is checked as soon as the
//! length varint is read, before any body byte is buffered.
//!
//! Errors after which the frame boundaries are still known (a hash mismatch, a
//! body that is not a valid `frame_message`) consume the frame and leave the
//! decoder usable; the connection decides how many it tolerates. Errors that lose
//! the framing (bad version, oversized or malformed length) are fatal: see
//! [`DecodeError::is_fatal`].

use std::collections::VecDeque;
use std::hash::Hasher;
use std::mem::MaybeUninit;
use std::sync::LazyLock;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use twox_hash::XxHash3_64;
use twox_hash::xxhash3_64::{DEFAULT_SECRET_LENGTH, RawHasher, SecretBuffer};

use crate::proto::FrameMessage;

/// Protocol version this build speaks.
pub const PROTOCOL_VERSION: u64 = 3;
/// Oldest protocol version this build accepts.
pub const MIN_PROTOCOL_VERSION: u64 = 3;
/// Newest protocol version this build accepts.
pub const MAX_PROTOCOL_VERSION: u64 = PROTOCOL_VERSION;
/// Seed of the frame hash (`ATBUS_PROTOCOL_CONST_MAGIC_NUMBER`).
pub const HASH_SEED: u64 = 0x0100_0193;
/// Size of the trailing hash.
pub const HASH_LEN: usize = 4;
/// Default maximum `frame_message` length: 2 MiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 2 * 1024 * 1024;
/// Largest accepted `max_frame_len`: lengths are signed 32-bit in other bindings.
pub const MAX_FRAME_LEN_LIMIT: usize = i32::MAX as usize;
/// Longest varint (a u64).
const MAX_VARINT_LEN: usize = 10;

/// Codec limits, shared by encoder and decoders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Largest `frame_message` body accepted or produced, in bytes.
    pub max_frame_len: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
        }
    }
}

impl Config {
    /// Checks the limits, naming the field that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_frame_len == 0 || self.max_frame_len > MAX_FRAME_LEN_LIMIT {
            return Err(ConfigError::MaxFrameLen {
                value: self.max_frame_len,
                limit: MAX_FRAME_LEN_LIMIT,
            });
        }
        Ok(())
    }

    /// Largest number of bytes one whole frame can occupy on the wire.
    pub fn max_wire_len(&self) -> usize {
        varint_len(PROTOCOL_VERSION) + varint_len(self.max_frame_len as u64) + self.max_frame_len + HASH_LEN
    }
}

/// An invalid codec [`Config`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `max_frame_len` is zero or above the limit.
    #[error("frame.max_frame_len = {value} is out of range (1..={limit})")]
    MaxFrameLen {
        /// The configured value.
        value: usize,
        /// The largest accepted value.
        limit: usize,
    },
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The message is longer than the configured maximum; the peer would refuse it.
    #[error("frame_message of {length} bytes exceeds max_frame_len {max}")]
    FrameTooLarge {
        /// Encoded body length.
        length: usize,
        /// Configured maximum.
        max: usize,
    },
}

/// Which varint of the header was malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarintField {
    /// The leading protocol version.
    Version,
    /// The body length.
    Length,
}

impl std::fmt::Display for VarintField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Version => "version",
            Self::Length => "length",
        })
    }
}

/// Why bytes could not be decoded into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame's protocol version is outside the supported range.
    #[error("unsupported protocol version {version} (supported {min}..={max})")]
    UnsupportedVersion {
        /// Version the peer sent.
        version: u64,
        /// Oldest supported version.
        min: u64,
        /// Newest supported version.
        max: u64,
    },
    /// The length field exceeds the configured maximum.
    #[error("frame length {length} exceeds max_frame_len {max}")]
    FrameTooLarge {
        /// Length the peer announced.
        length: u64,
        /// Configured maximum.
        max: usize,
    },
    /// A header varint is longer than 10 bytes or overflows 64 bits.
    #[error("malformed {field} varint")]
    MalformedVarint {
        /// Which header field.
        field: VarintField,
    },
    /// The trailing hash does not match the frame's bytes.
    #[error("frame hash mismatch (carried {carried:#010x}, computed {computed:#010x})")]
    HashMismatch {
        /// Hash found in the frame.
        carried: u32,
        /// Hash computed over the received bytes.
        computed: u32,
    },
    /// The body passed the hash but is not a valid `frame_message`.
    #[error("undecodable frame_message: {0}")]
    Undecodable(#[from] prost::DecodeError),
    /// A datagram holds bytes after its one frame.
    #[error("{count} trailing bytes after the frame")]
    TrailingBytes {
        /// How many bytes follow the frame.
        count: usize,
    },
    /// The input ended inside a frame.
    #[error("input ended inside a frame ({available} of {needed} bytes)")]
    Truncated {
        /// Bytes the frame needs (or, inside the header, at least needs).
        needed: usize,
        /// Bytes that were there.
        available: usize,
    },
    /// A previous fatal error lost the framing of this byte stream.
    #[error("decoder lost framing after an earlier fatal error")]
    Desynchronized,
}

impl DecodeError {
    /// Whether the byte stream's framing is lost: nothing after this error can be
    /// decoded and the connection must be closed. Non-fatal errors consumed
    /// exactly one bad frame.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Self::HashMismatch { .. } | Self::Undecodable(_))
    }
}

/// Number of bytes `value` takes as a varint.
pub fn varint_len(value: u64) -> usize {
    prost::encoding::encoded_len_varint(value)
}

/// Frame hash of `bytes`: xxh3-64 seeded with [`HASH_SEED`], low 32 bits.
pub fn frame_hash(bytes: &[u8]) -> u32 {
    // With the secret derived once: `oneshot_with_seed` derives it per call
    // for inputs over 240 bytes (~10 ns: a third of a 1 KiB frame's hash).
    match XxHash3_64::oneshot_with_seed_and_secret(HASH_SEED, &*FRAME_SECRET, bytes) {
        Ok(hash) => hash as u32,
        Err(_) => unreachable!("xxh3's default secret is long enough"),
    }
}

/// The secret xxh3 derives from [`HASH_SEED`] for inputs over 240 bytes,
/// derived once (`XxHash3_64::with_seed` derives it into a fresh heap
/// buffer per hasher: an allocation per gathered frame).
static FRAME_SECRET: LazyLock<[u8; DEFAULT_SECRET_LENGTH]> = LazyLock::new(|| {
    match SecretBuffer::with_seed(HASH_SEED, [0; DEFAULT_SECRET_LENGTH]) {
        Ok(buffer) => buffer.into_secret(),
        // The array is exactly the default secret's length.
        Err(_) => unreachable!("xxh3's default secret is {DEFAULT_SECRET_LENGTH} bytes"),
    }
});

/// A streaming frame hasher (the same hash as [`frame_hash`]) that
/// allocates nothing.
type FrameHasher = RawHasher<&'static [u8; DEFAULT_SECRET_LENGTH]>;

fn frame_hasher() -> FrameHasher {
    match SecretBuffer::new(HASH_SEED, &*FRAME_SECRET) {
        Ok(buffer) => RawHasher::new(buffer),
        Err(_) => unreachable!("xxh3's default secret is long enough"),
    }
}

/// What a frame carries, as the encoder needs it: its protobuf length and
/// bytes. [`FrameMessage`] is one; the stream layer has another that writes a
/// packet's fragments straight into the frame (`stream::PacketFrame`).
pub trait FrameBody {
    /// Length of the protobuf encoding.
    fn body_len(&self) -> usize;
    /// Appends the protobuf encoding (exactly [`FrameBody::body_len`] bytes).
    fn encode_body(&self, dst: &mut BytesMut);
    /// The same bytes, large payloads passed by reference (see
    /// [`Gather::payload`]); by default all copied.
    fn encode_body_gathered(&self, dst: &mut Gather<'_>) {
        self.encode_body(dst.out());
    }
}

/// A frame's bytes on their way to a byte-stream socket, written by
/// [`Encoder::encode_gathered`]: what is in `segments` goes first, then
/// `out`. A large payload joins `segments` as the caller's `Bytes` instead
/// of being copied: the socket's gathering write takes it from there.
pub struct Gather<'a> {
    out: &'a mut BytesMut,
    segments: &'a mut VecDeque<Bytes>,
    hasher: FrameHasher,
    /// Where the bytes of `out` not hashed yet start.
    unhashed: usize,
}

impl Gather<'_> {
    /// Where the frame's small parts are written.
    pub fn out(&mut self) -> &mut BytesMut {
        self.out
    }

    /// Appends `data` by reference (what `out` holds goes to the segments
    /// first).
    pub fn payload(&mut self, data: &Bytes) {
        self.hasher.write(&self.out[self.unhashed..]);
        self.hasher.write(data);
        if !self.out.is_empty() {
            self.segments.push_back(self.out.split().freeze());
        }
        self.segments.push_back(data.clone());
        self.unhashed = 0;
    }
}

impl FrameBody for FrameMessage {
    fn body_len(&self) -> usize {
        self.encoded_len()
    }

    fn encode_body(&self, dst: &mut BytesMut) {
        self.encode_raw(dst);
    }
}

/// Room [`Encoder::encode_gathered`] gives `out` when less than
/// [`GATHER_ROOM_MIN`] is left: the small parts of a hundred or so frames.
const GATHER_ROOM: usize = 8 * 1024;
const GATHER_ROOM_MIN: usize = 512;

/// Writes frames.
#[derive(Clone, Debug, Default)]
pub struct Encoder {
    config: Config,
}

impl Encoder {
    /// An encoder with the given limits.
    pub fn new(config: Config) -> Self {
        Self { config }
    }

    /// Bytes `msg` will occupy on the wire.
    pub fn encoded_len(&self, msg: &impl FrameBody) -> usize {
        let body = msg.body_len();
        header_len(body) + body + HASH_LEN
    }

    /// Appends one frame holding `msg` to `dst`, reserving exactly the space it
    /// needs, and returns the number of bytes written.
    pub fn encode(&self, msg: &impl FrameBody, dst: &mut BytesMut) -> Result<usize, EncodeError> {
        let (body, total) = self.sizes(msg)?;
        dst.reserve(total);
        let start = dst.len();
        write_header(body, dst);
        msg.encode_body(dst);
        let hash = frame_hash(&dst[start..]);
        dst.put_u32_le(hash);
        debug_assert_eq!(dst.len() - start, total);
        Ok(total)
    }

    /// Appends one frame holding `msg` as [`Encoder::encode`] would, except
    /// that the payloads `msg` passes by reference ([`Gather::payload`]) go
    /// to `segments`, each after what `out` held before it; the bytes on the
    /// wire are `segments` then `out`, the same as `encode`'s. Returns the
    /// frame's length.
    pub fn encode_gathered(
        &self,
        msg: &impl FrameBody,
        out: &mut BytesMut,
        segments: &mut VecDeque<Bytes>,
    ) -> Result<usize, EncodeError> {
        let (body, total) = self.sizes(msg)?;
        // Each payload passed by reference splits `out` (the small bytes
        // before it go to `segments`); with room left the split shares
        // `out`'s buffer. Without, `out` would grow to just the next
        // frame's small bytes: a new buffer and its shared header, two
        // allocations per frame (perf/README.md item 31).
        if out.capacity() - out.len() < GATHER_ROOM_MIN {
            out.reserve(GATHER_ROOM);
        }
        let start = out.len();
        write_header(body, out);
        let mut gather = Gather {
            out,
            segments,
            hasher: frame_hasher(),
            unhashed: start,
        };
        msg.encode_body_gathered(&mut gather);
        let Gather {
            out,
            mut hasher,
            unhashed,
            ..
        } = gather;
        hasher.write(&out[unhashed..]);
        out.put_u32_le(hasher.finish() as u32);
        Ok(total)
    }

    /// `msg`'s body length and whole frame length, checked against the limit.
    fn sizes(&self, msg: &impl FrameBody) -> Result<(usize, usize), EncodeError> {
        let body = msg.body_len();
        if body > self.config.max_frame_len {
            return Err(EncodeError::FrameTooLarge {
                length: body,
                max: self.config.max_frame_len,
            });
        }
        Ok((body, header_len(body) + body + HASH_LEN))
    }
}

/// Length of the header of a frame whose body is `body` bytes long.
pub fn header_len(body: usize) -> usize {
    varint_len(PROTOCOL_VERSION) + varint_len(body as u64)
}

/// The frame header: protocol version and body length.
fn write_header(body: usize, dst: &mut BytesMut) {
    prost::encoding::encode_varint(PROTOCOL_VERSION, dst);
    prost::encoding::encode_varint(body as u64, dst);
}

/// Outcome of reading a varint from a possibly incomplete buffer.
enum Varint {
    Value(u64, usize),
    Incomplete,
}

fn read_varint(buf: &[u8], field: VarintField) -> Result<Varint, DecodeError> {
    let mut value = 0u64;
    for (i, &byte) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        let bits = u64::from(byte & 0x7f);
        // The tenth byte may only contribute the top bit of a u64.
        if i == MAX_VARINT_LEN - 1 && byte > 1 {
            return Err(DecodeError::MalformedVarint { field });
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Varint::Value(value, i + 1));
        }
    }
    if buf.len() >= MAX_VARINT_LEN {
        Err(DecodeError::MalformedVarint { field })
    } else {
        Ok(Varint::Incomplete)
    }
}

/// Position of a frame found at the start of a buffer.
#[derive(Clone, Copy, Debug)]
struct FrameBounds {
    header_len: usize,
    body_len: usize,
}

impl FrameBounds {
    fn total(&self) -> usize {
        self.header_len + self.body_len + HASH_LEN
    }
}

/// Parses the header at the start of `buf`. `Ok(None)`: more bytes needed.
fn parse_header(buf: &[u8], config: &Config) -> Result<Option<FrameBounds>, DecodeError> {
    let (version, version_len) = match read_varint(buf, VarintField::Version)? {
        Varint::Value(v, n) => (v, n),
        Varint::Incomplete => return Ok(None),
    };
    if !(MIN_PROTOCOL_VERSION..=MAX_PROTOCOL_VERSION).contains(&version) {
        return Err(DecodeError::UnsupportedVersion {
            version,
            min: MIN_PROTOCOL_VERSION,
            max: MAX_PROTOCOL_VERSION,
        });
    }
    let (length, length_len) = match read_varint(&buf[version_len..], VarintField::Length)? {
        Varint::Value(v, n) => (v, n),
        Varint::Incomplete => return Ok(None),
    };
    if length > config.max_frame_len as u64 {
        return Err(DecodeError::FrameTooLarge {
            length,
            max: config.max_frame_len,
        });
    }
    Ok(Some(FrameBounds {
        header_len: version_len + length_len,
        // Bounded by max_frame_len, which validate() keeps within usize.
        body_len: length as usize,
    }))
}

/// Checks the hash of a complete frame at the start of `frame` and decodes its
/// body. `frame` holds exactly `bounds.total()` bytes.
fn check_and_decode(frame: Bytes, bounds: FrameBounds) -> Result<FrameMessage, DecodeError> {
    let hashed = bounds.header_len + bounds.body_len;
    let carried = u32::from_le_bytes([frame[hashed], frame[hashed + 1], frame[hashed + 2], frame[hashed + 3]]);
    let computed = frame_hash(&frame[..hashed]);
    if carried != computed {
        return Err(DecodeError::HashMismatch { carried, computed });
    }
    // Slicing a `Bytes` is zero-copy, and prost decodes `bytes` fields from a
    // `Bytes` source as slices of it: payloads are never copied.
    Ok(FrameMessage::decode(frame.slice(bounds.header_len..hashed))?)
}

/// Decodes the single frame a datagram holds.
pub fn decode_datagram(config: &Config, datagram: Bytes) -> Result<FrameMessage, DecodeError> {
    let bounds = match parse_header(&datagram, config)? {
        Some(bounds) => bounds,
        None => {
            return Err(DecodeError::Truncated {
                needed: datagram.len() + 1,
                available: datagram.len(),
            });
        }
    };
    let total = bounds.total();
    if datagram.len() < total {
        return Err(DecodeError::Truncated {
            needed: total,
            available: datagram.len(),
        });
    }
    if datagram.len() > total {
        return Err(DecodeError::TrailingBytes {
            count: datagram.len() - total,
        });
    }
    check_and_decode(datagram, bounds)
}

/// Streaming decoder for byte-stream transports.
///
/// Call order: append what the transport read ([`Decoder::extend`] or
/// [`Decoder::buffer_mut`]), then call [`Decoder::decode`] until it returns
/// `Ok(None)`. At end of stream, [`Decoder::finish`] reports a frame cut short.
#[derive(Debug, Default)]
pub struct Decoder {
    config: Config,
    buf: BytesMut,
    /// Header of the frame at the front of `buf`, once parsed.
    pending: Option<FrameBounds>,
    desynchronized: bool,
    presize: bool,
}

impl Decoder {
    /// A decoder with the given limits.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            buf: BytesMut::new(),
            pending: None,
            desynchronized: false,
            presize: true,
        }
    }

    /// The codec limits in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Appends received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        if !self.desynchronized {
            self.buf.extend_from_slice(data);
        }
    }

    /// The receive buffer, for transports that read straight into it.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Room for a read of up to `len` bytes straight into the receive buffer
    /// (transports that read into it instead of copying in with
    /// [`Decoder::extend`]); empty once the stream is desynchronised. The
    /// buffer's memory is taken back when every frame cut from it was
    /// dropped, else what is buffered moves to a fresh one. Count what was
    /// read with [`Decoder::filled`].
    pub fn read_room(&mut self, len: usize) -> &mut [MaybeUninit<u8>] {
        if self.desynchronized {
            return &mut [];
        }
        if !self.buf.try_reclaim(len) {
            let mut fresh = BytesMut::with_capacity(self.buf.len() + len);
            fresh.extend_from_slice(&self.buf);
            self.buf = fresh;
        }
        let spare = self.buf.spare_capacity_mut();
        let room = spare.len().min(len);
        &mut spare[..room]
    }

    /// Whether [`Decoder::read_room`] can give `len` bytes of room in the
    /// buffer's own memory (taking it back if every frame cut from it was
    /// dropped), without moving to a fresh allocation.
    pub fn room_in_place(&mut self, len: usize) -> bool {
        !self.desynchronized && self.buf.try_reclaim(len)
    }

    /// Counts `n` bytes read into the last [`Decoder::read_room`] as received.
    ///
    /// # Safety
    /// The first `n` bytes of that room were initialised, and `n` is at most
    /// its length.
    pub unsafe fn filled(&mut self, n: usize) {
        debug_assert!(n <= self.buf.capacity() - self.buf.len());
        // SAFETY: the caller initialised these bytes, within the capacity.
        unsafe { self.buf.set_len(self.buf.len() + n) };
    }

    /// Whether a frame whose header arrived gets its whole length reserved at
    /// once (right for [`Decoder::extend`]'s copies; a reader that reads into
    /// [`Decoder::read_room`] sizes the buffer itself, and a reservation would
    /// move the frame's start to fresh memory once more).
    pub fn set_presize(&mut self, presize: bool) {
        self.presize = presize;
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes still missing before the frame at the front can complete (at least 1
    /// while the header itself is incomplete; 0 if a frame is ready).
    pub fn needed(&self) -> usize {
        match self.pending {
            Some(bounds) => bounds.total().saturating_sub(self.buf.len()),
            None => 1,
        }
    }

    /// Takes the next complete frame out of the buffer, `Ok(None)` if the buffer
    /// holds no complete frame yet.
    pub fn decode(&mut self) -> Result<Option<FrameMessage>, DecodeError> {
        if self.desynchronized {
            return Err(DecodeError::Desynchronized);
        }
        let bounds = match self.pending {
            Some(bounds) => bounds,
            None => match parse_header(&self.buf, &self.config) {
                Ok(Some(bounds)) => {
                    // The length is within max_frame_len: now it is safe to size
                    // the buffer for the whole frame in one go.
                    if self.presize {
                        self.buf.reserve(bounds.total().saturating_sub(self.buf.len()));
                    }
                    self.pending = Some(bounds);
                    bounds
                }
                Ok(None) => return Ok(None),
                Err(err) => {
                    self.desynchronize();
                    return Err(err);
                }
            },
        };
        if self.buf.len() < bounds.total() {
            return Ok(None);
        }
        self.pending = None;
        let frame = self.buf.split_to(bounds.total()).freeze();
        check_and_decode(frame, bounds).map(Some)
    }

    /// Declares the end of the stream: an error if a frame was cut short.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.desynchronized || self.buf.is_empty() {
            return Ok(());
        }
        let needed = self.pending.map_or(self.buf.len() + 1, |bounds| bounds.total());
        Err(DecodeError::Truncated {
            needed,
            available: self.buf.len(),
        })
    }

    fn desynchronize(&mut self) {
        self.desynchronized = true;
        self.pending = None;
        // Nothing more will be read from this stream: release the memory.
        self.buf = BytesMut::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Body, MessageHead, PacketData, PingData};

    fn packet(stream_id: i64, content: &'static [u8]) -> FrameMessage {
        FrameMessage {
            head: Some(MessageHead {
                source: "a".into(),
                destination: "b".into(),
                ..Default::default()
            }),
            body: Some(Body::Packet(PacketData {
                stream_id,
                stream_offset: 42,
                content: Bytes::from_static(content),
                ..Default::default()
            })),
        }
    }

    fn encode(msg: &FrameMessage) -> BytesMut {
        let mut buf = BytesMut::new();
        Encoder::default().encode(msg, &mut buf).expect("encode");
        buf
    }

    #[test]
    fn encoded_len_is_exact() {
        let msg = packet(-1, b"hello");
        let encoder = Encoder::default();
        let buf = encode(&msg);
        assert_eq!(buf.len(), encoder.encoded_len(&msg));
        assert_eq!(buf[0], 3, "version byte");
    }

    #[test]
    fn hash_is_xxh3_seeded_low_32_le() {
        let buf = encode(&packet(1, b"x"));
        let n = buf.len();
        let expected = xxhash_rust::xxh3::xxh3_64_with_seed(&buf[..n - 4], 0x0100_0193) as u32;
        assert_eq!(&buf[n - 4..], &expected.to_le_bytes());
    }

    /// The frame hash (twox-hash, SIMD picked at run time) is the reference
    /// xxh3 (xxhash-rust) at every length class: short, mid, long, with
    /// and without a partial stripe and block.
    #[test]
    fn frame_hash_matches_the_reference_xxh3() {
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let lengths = (0..=1100).chain([1023, 1024, 1025, 4095, 4096, 16_383, 16_384, 16_385, 65_536, 70_000]);
        for len in lengths {
            for start in [0, 3] {
                let bytes = &data[start..start + len.min(data.len() - start)];
                let reference = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, HASH_SEED) as u32;
                assert_eq!(frame_hash(bytes), reference, "length {}", bytes.len());
            }
        }
    }

    /// The encoder's streaming hasher (a secret derived once, the bytes in
    /// pieces as a gathered frame feeds them) against the reference XXH3
    /// over the same bytes in one piece.
    #[test]
    fn streamed_frame_hash_matches_the_reference_xxh3() {
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
            .collect();
        for len in [0usize, 1, 64, 240, 241, 255, 256, 257, 1024, 1100, 16_412, 70_000] {
            let bytes = &data[..len];
            let reference = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, HASH_SEED) as u32;
            for head in [0usize, 1, 23, 63, 64, 200, 256, 300] {
                let head = head.min(len);
                for tail in [0usize, 5, 64, 130] {
                    let tail = tail.min(len - head);
                    let mut hasher = frame_hasher();
                    hasher.write(&bytes[..head]);
                    hasher.write(&bytes[head..len - tail]);
                    hasher.write(&bytes[len - tail..]);
                    assert_eq!(
                        hasher.finish() as u32,
                        reference,
                        "length {len}, pieces {head} / {tail}"
                    );
                }
            }
        }
    }

    proptest::proptest! {
        /// The encoder's streamed hash over any split of the bytes into
        /// pieces (the frame's header, payloads passed by reference, the
        /// bytes between them) is xxh3's one-shot hash of the whole.
        #[test]
        fn streamed_frame_hash_of_any_pieces_matches_the_reference(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..5_000),
            mut cuts in proptest::collection::vec(0usize..5_000, 0..8),
        ) {
            let reference = xxhash_rust::xxh3::xxh3_64_with_seed(&data, HASH_SEED) as u32;
            cuts.iter_mut().for_each(|c| *c = (*c).min(data.len()));
            cuts.sort_unstable();
            let mut hasher = frame_hasher();
            let mut from = 0;
            for &cut in cuts.iter().chain(std::iter::once(&data.len())) {
                hasher.write(&data[from..cut]);
                from = cut;
            }
            proptest::prop_assert_eq!(hasher.finish() as u32, reference);
        }
    }

    #[test]
    fn datagram_round_trip_and_trailing() {
        let msg = packet(7, b"payload");
        let buf = encode(&msg).freeze();
        assert_eq!(decode_datagram(&Config::default(), buf.clone()), Ok(msg));
        let mut long = BytesMut::from(&buf[..]);
        long.extend_from_slice(b"zz");
        assert_eq!(
            decode_datagram(&Config::default(), long.freeze()),
            Err(DecodeError::TrailingBytes { count: 2 })
        );
        assert!(matches!(
            decode_datagram(&Config::default(), buf.slice(..buf.len() - 1)),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn unsupported_version_names_range() {
        let mut buf = encode(&packet(1, b"x"));
        buf[0] = 2;
        assert_eq!(
            decode_datagram(&Config::default(), buf.freeze()),
            Err(DecodeError::UnsupportedVersion {
                version: 2,
                min: 3,
                max: 3
            })
        );
    }

    #[test]
    fn too_large_is_rejected_before_body_arrives() {
        let config = Config { max_frame_len: 16 };
        let mut decoder = Decoder::new(config.clone());
        // Header only: version 3, length 17.
        decoder.extend(&[3, 17]);
        assert_eq!(
            decoder.decode(),
            Err(DecodeError::FrameTooLarge { length: 17, max: 16 })
        );
        assert!(decoder.decode().unwrap_err().is_fatal());
        let big = packet(1, b"0123456789abcdef0123456789");
        assert!(matches!(
            Encoder::new(config).encode(&big, &mut BytesMut::new()),
            Err(EncodeError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn malformed_varint() {
        let mut decoder = Decoder::default();
        decoder.extend(&[3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert_eq!(
            decoder.decode(),
            Err(DecodeError::MalformedVarint {
                field: VarintField::Length
            })
        );
        let mut decoder = Decoder::default();
        decoder.extend(&[0x80; 10]);
        assert_eq!(
            decoder.decode(),
            Err(DecodeError::MalformedVarint {
                field: VarintField::Version
            })
        );
    }

    #[test]
    fn hash_mismatch_skips_one_frame_and_goes_on() {
        let first = packet(1, b"first");
        let second = FrameMessage {
            head: None,
            body: Some(Body::Ping(PingData {
                timepoint_microseconds: 9,
            })),
        };
        let mut bad = encode(&first);
        let n = bad.len();
        bad[n - 1] ^= 0x10;
        let mut decoder = Decoder::default();
        decoder.extend(&bad);
        decoder.extend(&encode(&second));
        let err = decoder.decode().unwrap_err();
        assert!(matches!(err, DecodeError::HashMismatch { .. }));
        assert!(!err.is_fatal());
        assert_eq!(decoder.decode(), Ok(Some(second)));
        assert_eq!(decoder.decode(), Ok(None));
        assert_eq!(decoder.finish(), Ok(()));
    }

    #[test]
    fn undecodable_body_with_valid_hash() {
        // Body 0xff is an invalid protobuf key; give it a correct hash.
        let mut buf = BytesMut::from(&[3u8, 1, 0xff][..]);
        let hash = frame_hash(&buf);
        buf.put_u32_le(hash);
        let err = decode_datagram(&Config::default(), buf.freeze()).unwrap_err();
        assert!(matches!(err, DecodeError::Undecodable(_)));
        assert!(!err.is_fatal());
    }

    #[test]
    fn finish_reports_cut_frame() {
        let buf = encode(&packet(1, b"abc"));
        let mut decoder = Decoder::default();
        decoder.extend(&buf[..buf.len() - 2]);
        assert_eq!(decoder.decode(), Ok(None));
        assert_eq!(decoder.needed(), 2);
        assert_eq!(
            decoder.finish(),
            Err(DecodeError::Truncated {
                needed: buf.len(),
                available: buf.len() - 2
            })
        );
    }

    #[test]
    fn decoded_payload_points_into_receive_buffer() {
        let payload = vec![0xabu8; 4096];
        let msg = FrameMessage {
            head: None,
            body: Some(Body::Packet(PacketData {
                content: Bytes::from(payload),
                ..Default::default()
            })),
        };
        let wire = encode(&msg).freeze();
        let range = wire.as_ptr_range();
        let decoded = decode_datagram(&Config::default(), wire.clone()).expect("decode");
        let Some(Body::Packet(p)) = decoded.body else {
            panic!("not a packet")
        };
        assert!(range.contains(&p.content.as_ptr()), "content was copied");
    }

    #[test]
    fn config_validation_names_field() {
        let err = Config { max_frame_len: 0 }.validate().unwrap_err();
        assert!(err.to_string().contains("max_frame_len"));
        assert!(Config::default().validate().is_ok());
    }
}
