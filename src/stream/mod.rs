//! Sans-IO reliable streams: offsets, fragments, acknowledgements, resends,
//! flow control, and one stream mixed over several connections.
//!
//! This layer never touches a socket or reads a clock: the caller passes the
//! current time in and gets frames to send, the next timer deadline and
//! application events out (see [`Session`] for the call order).
//!
//! ```text
//!  send(stream, Bytes) ──► SendStream: messages by offset, ranges to (re)send
//!                              │ cut per path MTU (slices, no copy)
//!                              ▼
//!                    poll_transmit ──► Transmit { path, packet | ack }
//!
//!  handle_packet ──► RecvStream: fill gaps by offset ──► Event::Message
//!  handle_ack    ──► free acknowledged data, RTT, loss ──► Event::Writable
//! ```
//!
//! Rules (design.md, "Stream rules"):
//! * Offsets, not sequence numbers: each path fragments the same data its own
//!   way, so acknowledgements and resends are by offset. A message is one or
//!   more fragments; all but its last carry HAS_MORE.
//! * Acknowledgements carry `acknowledge_offset` (all before it received),
//!   `received_max_offset`, and up to [`MAX_SACK_RANGES`] selective ranges held
//!   above the acknowledged offset (a field libatbus-rs adds: with only the two
//!   offsets, everything sent above a hole looks lost). They are merged (one
//!   per stream and path per poll) and echo the packet timepoint for RTT.
//! * A packet is lost when an acknowledgement shows data three packets beyond
//!   it, or when it is older than 9/8 RTT below acknowledged data (fast
//!   resend), or at the retransmission timeout (1.25 × smoothed RTT, doubled
//!   per consecutive expiry).
//! * The FIN of a stream occupies one offset after its last byte, like TCP's
//!   FIN, so it is acknowledged like data.
//! * Send window full → [`SendError::WouldBlock`]; [`Event::Writable`] follows.
//!   Data beyond the receive window is dropped and resent later; delivered
//!   messages the application has not polled count against that window.
//!
//! Not yet here: congestion control beyond a fixed per-path in-flight window
//! ([`Config::path_window`]), and the low-latency scheduling class.

mod fragment;
mod recv;
mod rtt;
mod send;
mod session;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message;
use prost::encoding;

pub use fragment::{Content, Fragment, GATHER_MIN, PAYLOAD_ALIGN};
pub use session::{PathStats, Session};

use crate::frame::{FrameBody, Gather};
use crate::proto::{AcknowledgeData, AtbusPacketFlagType, Body, FrameMessage, MessageHead, PacketData};

/// Stream identifier; negative ids are internal (handshake, commands).
pub type StreamId = i64;

/// Internal stream used for connection control packets.
pub const CONTROL_STREAM: StreamId = -1;

/// Bytes a packet's framing may take besides fragments: frame header and hash,
/// and every `packet_data` field at its widest (the message head is extra:
/// see [`PathConfig::overhead`]).
pub const PACKET_OVERHEAD: usize = 64;

/// Selective-ack ranges one acknowledgement carries at most.
pub const MAX_SACK_RANGES: usize = 16;

/// Bytes each fragment's encoding adds to its payload, at most.
pub const FRAGMENT_OVERHEAD: usize = 12;

/// Identifies a path (one connection) within a [`Session`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathId(pub u64);

/// Per-path settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathConfig {
    /// Largest encoded frame this path carries (548 for UDP by default).
    pub mtu: usize,
    /// Extra bytes each frame carries besides the packet: the message head
    /// (source and destination names) the connection adds.
    pub overhead: usize,
    /// Bytes in flight on this path at most; `None` takes the session's
    /// [`Config::path_window`]. Datagram paths want less than the socket's
    /// kernel buffer holds, or bursts are dropped there.
    pub window: Option<usize>,
    /// A latency path: it carries urgent streams only (see
    /// [`crate::stream::Session::set_stream_urgent`]), and those prefer it.
    /// It carries other streams only when no other path is left.
    pub urgent_only: bool,
}

impl PathConfig {
    /// Default MTU of datagram paths: the safe UDP payload (576 − 20 − 8).
    pub const UDP_MTU: usize = 548;
    /// Default MTU of Unix-socket paths.
    pub const UNIX_MTU: usize = 64 * 1024;
    /// Default MTU of TCP paths.
    pub const TCP_MTU: usize = 64 * 1024;

    /// A path with this MTU and no head overhead.
    pub fn with_mtu(mtu: usize) -> Self {
        Self {
            mtu,
            overhead: 0,
            window: None,
            urgent_only: false,
        }
    }
}

/// Session settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Bytes a stream retains unacknowledged before `send` answers WouldBlock.
    pub send_window: usize,
    /// Bytes past the next undelivered message a stream accepts.
    pub recv_window: usize,
    /// Largest message; must fit the receive window.
    pub max_message_len: usize,
    /// Streams a peer may open on this session.
    pub max_streams: usize,
    /// Bytes in flight per path at most.
    pub path_window: usize,
    /// RTT assumed before the first sample.
    pub initial_rtt: Duration,
    /// Lower bound of the retransmission timeout.
    pub min_rto: Duration,
    /// Upper bound of the retransmission timeout (also of its backoff).
    pub max_rto: Duration,
    /// How long an acknowledgement of a lone packet may wait for data going
    /// the other way on its path, to leave in the same write (an answer to
    /// the message it acknowledges, typically): one write and one wake-up of
    /// the peer instead of two. Two or more packets unacknowledged, a hole,
    /// or a stream's end are acknowledged at once. Zero: always at once.
    pub ack_delay: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            send_window: 4 * 1024 * 1024,
            recv_window: 8 * 1024 * 1024,
            max_message_len: 4 * 1024 * 1024,
            max_streams: 1024,
            path_window: 4 * 1024 * 1024,
            initial_rtt: Duration::from_millis(50),
            min_rto: Duration::from_millis(1),
            max_rto: Duration::from_secs(5),
            ack_delay: Duration::from_micros(200),
        }
    }
}

impl Config {
    /// Checks the settings, naming the field that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("send_window", self.send_window),
            ("recv_window", self.recv_window),
            ("max_message_len", self.max_message_len),
            ("max_streams", self.max_streams),
            ("path_window", self.path_window),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Zero { field });
        }
        if self.max_message_len > self.recv_window {
            return Err(ConfigError::MessageExceedsWindow {
                max_message_len: self.max_message_len,
                recv_window: self.recv_window,
            });
        }
        if self.min_rto.is_zero() || self.min_rto > self.max_rto {
            return Err(ConfigError::RtoBounds {
                min_rto: self.min_rto,
                max_rto: self.max_rto,
            });
        }
        Ok(())
    }
}

/// An invalid stream [`Config`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A size that must be positive is zero.
    #[error("stream.{field} must be greater than zero")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// A whole message must fit the receive window.
    #[error("stream.max_message_len ({max_message_len}) exceeds stream.recv_window ({recv_window})")]
    MessageExceedsWindow {
        /// Configured maximum message.
        max_message_len: usize,
        /// Configured receive window.
        recv_window: usize,
    },
    /// `min_rto` is zero or above `max_rto`.
    #[error("stream.min_rto ({min_rto:?}) must be positive and at most stream.max_rto ({max_rto:?})")]
    RtoBounds {
        /// Configured lower bound.
        min_rto: Duration,
        /// Configured upper bound.
        max_rto: Duration,
    },
}

/// Why a message was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The stream's send window is full; wait for [`Event::Writable`].
    #[error("stream {stream_id}: send window of {window} bytes is full")]
    WouldBlock {
        /// The stream.
        stream_id: StreamId,
        /// The window that is full (`stream.send_window`).
        window: usize,
    },
    /// Empty messages have no offset of their own and cannot be delimited.
    #[error("stream {stream_id}: empty messages cannot be sent")]
    EmptyMessage {
        /// The stream.
        stream_id: StreamId,
    },
    /// The message exceeds `stream.max_message_len`.
    #[error("stream {stream_id}: message of {len} bytes exceeds max_message_len {max}")]
    MessageTooLarge {
        /// The stream.
        stream_id: StreamId,
        /// Message length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The stream was finished; nothing more can be sent on it.
    #[error("stream {stream_id} is finished")]
    Finished {
        /// The stream.
        stream_id: StreamId,
    },
}

/// A peer broke the stream protocol. The offending packet is ignored; the
/// connection layer counts these and closes connections that persist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A stream offset was negative.
    #[error("negative stream offset")]
    NegativeOffset,
    /// `packet_data.content` is not a `packet_content`.
    #[error("undecodable packet content: {0}")]
    Content(prost::DecodeError),
    /// An acknowledgement covers data that was never sent.
    #[error("stream {stream_id}: acknowledgement {acknowledged} beyond sent data")]
    AckBeyondSent {
        /// The stream.
        stream_id: StreamId,
        /// Offset the peer acknowledged.
        acknowledged: u64,
    },
    /// The peer opened more streams than `stream.max_streams`.
    #[error("peer exceeded max_streams {max}")]
    TooManyStreams {
        /// Configured maximum.
        max: usize,
    },
    /// Input for a path this session does not have.
    #[error("unknown path {path:?}")]
    UnknownPath {
        /// The path.
        path: PathId,
    },
}

/// Something for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A whole message, in order, exactly once.
    Message {
        /// Its stream.
        stream_id: StreamId,
        /// Its bytes (a slice of the receive buffer when it arrived in one
        /// fragment).
        data: Bytes,
    },
    /// The stream's send window has room again after a `WouldBlock`.
    Writable {
        /// The stream.
        stream_id: StreamId,
    },
    /// The peer finished the stream and every message was delivered.
    Finished {
        /// The stream.
        stream_id: StreamId,
    },
    /// This side finished the stream and the peer acknowledged everything.
    SendFinished {
        /// The stream.
        stream_id: StreamId,
    },
    /// The peer closed a path with FINISH_CONNECTION.
    PathClosed {
        /// The path.
        path: PathId,
        /// The reason the peer gave.
        reason: Option<crate::proto::CloseReasonData>,
    },
}

/// One stream packet, before encoding: its fragments are slices of the
/// sender's messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    /// The stream.
    pub stream_id: StreamId,
    /// Offset of the first fragment's first byte.
    pub offset: u64,
    /// `ATBUS_PACKET_FLAG_TYPE` bits.
    pub flags: i32,
    /// Sender's timepoint (µs), echoed in the acknowledgement.
    pub timepoint: i64,
    /// The fragments, in offset order.
    pub fragments: Vec<Fragment>,
}

impl Packet {
    /// Whether `flag` is set.
    pub fn has_flag(&self, flag: AtbusPacketFlagType) -> bool {
        self.flags & flag as i32 != 0
    }

    /// Encodes into `packet_data` (the fragments are serialised into
    /// `content`, a copy of every payload; the node's paths skip it and frame
    /// packets with [`PacketFrame`]).
    pub fn into_data(self) -> PacketData {
        let content = Content {
            fragments: self.fragments,
        };
        PacketData {
            stream_id: self.stream_id,
            stream_offset: self.offset as i64,
            content: Bytes::from(content.encode_to_vec()),
            flags: self.flags,
            padding_size: 0,
            timepoint_microseconds: self.timepoint,
        }
    }
}

/// A stream packet as a whole frame body, `frame_message { head, packet }`,
/// written without first serialising the fragments into a `content` buffer of
/// their own: each payload is copied once, from the sender's message into the
/// frame, or, with [`Encoder::encode_gathered`](crate::frame::Encoder::encode_gathered),
/// not at all when it is [`GATHER_MIN`] bytes or more. The bytes are exactly
/// those of [`Transmit::into_frame`] with the same head (the tests compare
/// them).
#[derive(Clone, Copy, Debug)]
pub struct PacketFrame<'a> {
    head: Option<&'a MessageHead>,
    packet: &'a Packet,
    /// Length of `packet_content { fragment... }`, computed once (a packet
    /// may hold hundreds of small fragments).
    content: usize,
    /// Whether a fragment holds [`GATHER_MIN`] bytes or more (found in the
    /// same pass).
    gathers: bool,
    /// Bytes of the `padding` field before each of the first large
    /// fragments' payloads ([`PacketFrame::aligned`]; 0: none).
    pads: [u8; MAX_ALIGNED],
}

/// Large fragments per packet that [`PacketFrame::aligned`] aligns (a 64 KiB
/// packet holds at most 16 of [`GATHER_MIN`] bytes); later ones go as they
/// fall.
const MAX_ALIGNED: usize = 16;

/// `frame_message.packet`'s field number.
const FRAME_PACKET_TAG: u32 = 7;
/// `frame_message.head`'s field number.
const FRAME_HEAD_TAG: u32 = 1;

impl<'a> PacketFrame<'a> {
    /// `packet` in a frame with `head` (the path's tunnel head, if any).
    pub fn new(head: Option<&'a MessageHead>, packet: &'a Packet) -> Self {
        let (mut content, mut gathers) = (0, false);
        for fragment in &packet.fragments {
            content += encoding::message::encoded_len(1, fragment);
            gathers |= fragment.data.len() >= GATHER_MIN;
        }
        Self {
            head,
            packet,
            content,
            gathers,
            pads: [0; MAX_ALIGNED],
        }
    }

    /// This frame, starting `at` bytes after an aligned point of
    /// the socket write (the link's: see `Link::aligns_writes`), each large
    /// payload moved by a `padding` field before it (at most 65 bytes;
    /// receivers skip it) to where its destination sits in a
    /// [`PAYLOAD_ALIGN`]-byte line as its source does. The kernel copied an
    /// aligned 16 KiB payload into a Unix socket ~12 % slower (a bare
    /// program) to a quarter slower (the bus's sending shard) when the
    /// destination was not aligned too (perf/README.md item 27).
    pub fn aligned(self, at: usize) -> Self {
        let mut frame = self;
        let packet = frame.packet;
        if !frame.gathers {
            return frame;
        }
        // A padding field lengthens its fragment, the content and the frame,
        // whose length prefixes may then take a byte more, which moves the
        // payloads: a second pass settles it (a third, rarely). Alignment is
        // best effort; the encoding is right whatever the pads.
        for _ in 0..3 {
            let mut at = at + frame.before_fragments_len();
            let (mut content, mut changed, mut large) = (0, false, 0);
            for fragment in &packet.fragments {
                let bare = fragment.encoded_len();
                let mut pad = 0;
                if fragment.data.len() >= GATHER_MIN && large < MAX_ALIGNED {
                    pad = usize::from(frame.pads[large]);
                    for _ in 0..2 {
                        let payload = at
                            + encoding::key_len(1)
                            + encoding::encoded_len_varint((bare + pad) as u64)
                            + pad
                            + fragment.before_payload_len();
                        // To where the payload's own bytes sit in their
                        // cache line: the copy is slow only when it must
                        // shift an aligned source (item 27).
                        let source = fragment.data.as_ptr() as usize % PAYLOAD_ALIGN;
                        pad = fragment::padding_len(pad + source + PAYLOAD_ALIGN - payload % PAYLOAD_ALIGN);
                    }
                    changed |= usize::from(frame.pads[large]) != pad;
                    frame.pads[large] = pad as u8;
                    large += 1;
                }
                let len = encoding::key_len(1) + encoding::encoded_len_varint((bare + pad) as u64) + bare + pad;
                content += len;
                at += len;
            }
            frame.content = content;
            if !changed {
                break;
            }
        }
        frame
    }

    /// Bytes of the frame before its first fragment: the frame's header,
    /// the head, and `packet_data`'s fields before `content`'s bytes.
    fn before_fragments_len(&self) -> usize {
        let p = self.packet;
        let data = self.data_len();
        let mut len = crate::frame::header_len(self.body_len())
            + self
                .head
                .map_or(0, |h| encoding::message::encoded_len(FRAME_HEAD_TAG, h))
            + encoding::key_len(FRAME_PACKET_TAG)
            + encoding::encoded_len_varint(data as u64);
        if p.stream_id != 0 {
            len += encoding::int64::encoded_len(1, &p.stream_id);
        }
        if p.offset != 0 {
            len += encoding::int64::encoded_len(2, &(p.offset as i64));
        }
        if self.content != 0 {
            len += encoding::key_len(3) + encoding::encoded_len_varint(self.content as u64);
        }
        len
    }

    /// Length of `packet_data`. Fields at their default are left out, as
    /// prost does.
    fn data_len(&self) -> usize {
        let (p, content) = (self.packet, self.content);
        let offset = p.offset as i64;
        let mut len = 0;
        if p.stream_id != 0 {
            len += encoding::int64::encoded_len(1, &p.stream_id);
        }
        if offset != 0 {
            len += encoding::int64::encoded_len(2, &offset);
        }
        if content != 0 {
            len += encoding::key_len(3) + encoding::encoded_len_varint(content as u64) + content;
        }
        if p.flags != 0 {
            len += encoding::int32::encoded_len(4, &p.flags);
        }
        if p.timepoint != 0 {
            len += encoding::int64::encoded_len(6, &p.timepoint);
        }
        len
    }
}

impl FrameBody for PacketFrame<'_> {
    fn body_len(&self) -> usize {
        let data = self.data_len();
        let head = self
            .head
            .map_or(0, |h| encoding::message::encoded_len(FRAME_HEAD_TAG, h));
        head + encoding::key_len(FRAME_PACKET_TAG) + encoding::encoded_len_varint(data as u64) + data
    }

    fn encode_body(&self, dst: &mut BytesMut) {
        self.encode_before_fragments(dst);
        if self.content != 0 {
            let mut large = 0;
            for fragment in &self.packet.fragments {
                let pad = self.pad(fragment, &mut large);
                if pad == 0 {
                    encoding::message::encode(1, fragment, dst);
                    continue;
                }
                encoding::encode_key(1, encoding::WireType::LengthDelimited, dst);
                encoding::encode_varint((fragment.encoded_len() + pad) as u64, dst);
                fragment::encode_padding(pad, dst);
                fragment.encode_raw(dst);
            }
        }
        self.encode_after_fragments(dst);
    }

    fn encode_body_gathered(&self, dst: &mut Gather<'_>) {
        self.encode_before_fragments(dst.out());
        if self.content != 0 {
            let mut large = 0;
            for fragment in &self.packet.fragments {
                let pad = self.pad(fragment, &mut large);
                encoding::encode_key(1, encoding::WireType::LengthDelimited, dst.out());
                encoding::encode_varint((fragment.encoded_len() + pad) as u64, dst.out());
                fragment::encode_padding(pad, dst.out());
                fragment.encode_gathered(dst);
            }
        }
        self.encode_after_fragments(dst.out());
    }
}

impl PacketFrame<'_> {
    /// Whether a fragment is large enough to go to the socket by reference
    /// ([`Encoder::encode_gathered`](crate::frame::Encoder::encode_gathered)).
    pub fn gathers(&self) -> bool {
        self.gathers
    }

    /// The padding before `fragment`'s payload; `large` counts the large
    /// fragments passed so far.
    fn pad(&self, fragment: &Fragment, large: &mut usize) -> usize {
        if fragment.data.len() < GATHER_MIN {
            return 0;
        }
        *large += 1;
        self.pads.get(*large - 1).map_or(0, |&p| usize::from(p))
    }

    /// The frame body up to the first fragment.
    fn encode_before_fragments(&self, dst: &mut BytesMut) {
        use encoding::WireType::LengthDelimited;
        let p = self.packet;
        if let Some(head) = self.head {
            encoding::message::encode(FRAME_HEAD_TAG, head, dst);
        }
        encoding::encode_key(FRAME_PACKET_TAG, LengthDelimited, dst);
        encoding::encode_varint(self.data_len() as u64, dst);
        let offset = p.offset as i64;
        if p.stream_id != 0 {
            encoding::int64::encode(1, &p.stream_id, dst);
        }
        if offset != 0 {
            encoding::int64::encode(2, &offset, dst);
        }
        if self.content != 0 {
            encoding::encode_key(3, LengthDelimited, dst);
            encoding::encode_varint(self.content as u64, dst);
        }
    }

    /// The frame body after the last fragment.
    fn encode_after_fragments(&self, dst: &mut BytesMut) {
        let p = self.packet;
        if p.flags != 0 {
            encoding::int32::encode(4, &p.flags, dst);
        }
        if p.timepoint != 0 {
            encoding::int64::encode(6, &p.timepoint, dst);
        }
    }
}

/// A frame to send on a path.
#[derive(Debug, Clone, PartialEq)]
pub enum Transmit {
    /// Stream data (or a FIN / connection close).
    Packet {
        /// Where to send it.
        path: PathId,
        /// What to send.
        packet: Packet,
    },
    /// An acknowledgement.
    Ack {
        /// Where to send it.
        path: PathId,
        /// What to send.
        ack: AcknowledgeData,
    },
}

impl Transmit {
    /// The path to send on.
    pub fn path(&self) -> PathId {
        match self {
            Self::Packet { path, .. } | Self::Ack { path, .. } => *path,
        }
    }

    /// The frame body to encode (the connection fills in the head).
    pub fn into_frame(self) -> FrameMessage {
        let body = match self {
            Self::Packet { packet, .. } => Body::Packet(packet.into_data()),
            Self::Ack { ack, .. } => Body::Acknowledge(ack),
        };
        FrameMessage {
            head: None,
            body: Some(body),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::frame::Encoder;
    use crate::proto::CloseReasonData;

    /// The frame `Transmit::into_frame` makes, with `head`, encoded by prost.
    fn via_frame_message(head: Option<&MessageHead>, packet: &Packet) -> BytesMut {
        let mut frame = Transmit::Packet {
            path: PathId(0),
            packet: packet.clone(),
        }
        .into_frame();
        frame.head = head.cloned();
        let mut out = BytesMut::new();
        Encoder::default().encode(&frame, &mut out).expect("encodes");
        out
    }

    fn via_packet_frame(head: Option<&MessageHead>, packet: &Packet) -> BytesMut {
        let body = PacketFrame::new(head, packet);
        let mut out = BytesMut::new();
        let n = Encoder::default().encode(&body, &mut out).expect("encodes");
        assert_eq!(n, out.len());
        assert_eq!(Encoder::default().encoded_len(&body), n);
        out
    }

    /// `before` (bytes of earlier frames) and the frame `encode_gathered`
    /// makes after them, as the socket would get them; and how many
    /// payloads went by reference.
    fn via_gathered(head: Option<&MessageHead>, packet: &Packet, before: &[u8]) -> (Vec<u8>, usize) {
        let body = PacketFrame::new(head, packet);
        let mut out = BytesMut::from(before);
        let mut segments = std::collections::VecDeque::new();
        let n = Encoder::default()
            .encode_gathered(&body, &mut out, &mut segments)
            .expect("encodes");
        let mut wire: Vec<u8> = segments.iter().flat_map(|s| s.iter().copied()).collect();
        wire.extend_from_slice(&out);
        assert_eq!(wire.len(), before.len() + n);
        let by_reference = packet.fragments.iter().filter(|f| f.data.len() >= GATHER_MIN).count();
        (wire, by_reference)
    }

    fn fragment() -> impl Strategy<Value = Fragment> {
        (
            0..3i32,
            prop_oneof![
                4 => proptest::collection::vec(any::<u8>(), 0..300),
                1 => proptest::collection::vec(any::<u8>(), GATHER_MIN - 1..GATHER_MIN + 300),
            ],
            any::<i32>(),
            proptest::option::of(("[a-z]{0,8}", "[a-z]{0,8}")),
            proptest::option::of((any::<i32>(), "[a-z ]{0,12}")),
        )
            .prop_map(|(packet_type, data, fragment_flag, label, close)| {
                Fragment::from(crate::proto::Fragment {
                    packet_type,
                    data: Bytes::from(data),
                    fragment_flag,
                    labels: label.into_iter().collect::<BTreeMap<_, _>>(),
                    close_reason: close.map(|(code, message)| CloseReasonData { code, message }),
                    ..crate::proto::Fragment::default()
                })
            })
    }

    fn head() -> impl Strategy<Value = MessageHead> {
        ("[a-z.]{0,12}", "[a-z.]{0,12}", any::<i32>(), any::<u64>()).prop_map(|(source, destination, hops, tunnel)| {
            MessageHead {
                source,
                destination,
                hops,
                tunnel,
                ..MessageHead::default()
            }
        })
    }

    fn packet() -> impl Strategy<Value = Packet> {
        (
            prop_oneof![Just(0i64), any::<i64>()],
            prop_oneof![Just(0u64), any::<u64>()],
            prop_oneof![Just(0i32), any::<i32>()],
            prop_oneof![Just(0i64), any::<i64>()],
            proptest::collection::vec(fragment(), 0..4),
        )
            .prop_map(|(stream_id, offset, flags, timepoint, fragments)| Packet {
                stream_id,
                offset,
                flags,
                timepoint,
                fragments,
            })
    }

    proptest! {
        #[test]
        fn packet_frame_matches_the_frame_message_encoding(
            head in proptest::option::of(head()),
            packet in packet(),
        ) {
            prop_assert_eq!(via_packet_frame(head.as_ref(), &packet), via_frame_message(head.as_ref(), &packet));
        }

        #[test]
        fn a_gathered_frame_is_the_same_bytes(
            head in proptest::option::of(head()),
            packet in packet(),
            before in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut expected = before.clone();
            expected.extend_from_slice(&via_frame_message(head.as_ref(), &packet));
            let (wire, _) = via_gathered(head.as_ref(), &packet, &before);
            prop_assert_eq!(wire, expected);
        }
    }

    /// Frames a packet as [`PacketFrame::aligned`] lays it out `at` bytes
    /// into a write, gathered, and checks it: the same bytes as the copied
    /// encoding, a frame that decodes to `packet`, and every large payload
    /// placed where its source sits in a cache line.
    fn check_aligned(head: Option<&MessageHead>, packet: &Packet, at: usize) -> Result<(), TestCaseError> {
        let body = PacketFrame::new(head, packet).aligned(at);
        let mut out = BytesMut::from(&vec![0u8; at][..]);
        let mut segments = std::collections::VecDeque::new();
        let n = Encoder::default()
            .encode_gathered(&body, &mut out, &mut segments)
            .expect("encodes");
        let mut wire: Vec<u8> = Vec::new();
        let mut placed = Vec::new();
        for segment in &segments {
            placed.push((segment.as_ptr() as usize, wire.len()));
            wire.extend_from_slice(segment);
        }
        wire.extend_from_slice(&out);
        prop_assert_eq!(wire.len(), at + n);
        prop_assert_eq!(Encoder::default().encoded_len(&body), n);
        let mut copied = BytesMut::new();
        Encoder::default().encode(&body, &mut copied).expect("encodes");
        prop_assert_eq!(&copied[..], &wire[at..]);
        for fragment in packet.fragments.iter().filter(|f| f.data.len() >= GATHER_MIN) {
            let source = fragment.data.as_ptr() as usize;
            let (_, position) = placed
                .iter()
                .find(|(ptr, _)| *ptr == source)
                .expect("passed by reference");
            prop_assert_eq!(
                position % PAYLOAD_ALIGN,
                source % PAYLOAD_ALIGN,
                "payload at {}",
                position
            );
        }
        let mut decoder = crate::frame::Decoder::new(crate::frame::Config::default());
        decoder.extend(&wire[at..]);
        let frame = decoder.decode().expect("valid frame").expect("complete");
        let Some(Body::Packet(data)) = frame.body else {
            panic!("not a packet: {frame:?}");
        };
        prop_assert_eq!(
            (
                data.stream_id,
                data.stream_offset,
                data.flags,
                data.timepoint_microseconds
            ),
            (packet.stream_id, packet.offset as i64, packet.flags, packet.timepoint)
        );
        let content = Content::decode(data.content).expect("decodes");
        prop_assert_eq!(&content.fragments, &packet.fragments);
        prop_assert_eq!(frame.head.as_ref(), head);
        Ok(())
    }

    proptest! {
        #[test]
        fn aligned_frames_place_large_payloads_like_their_sources(
            head in proptest::option::of(head()),
            packet in packet(),
            at in 0usize..300,
        ) {
            check_aligned(head.as_ref(), &packet, at)?;
        }
    }

    #[test]
    fn aligned_frames_settle_where_length_prefixes_grow() {
        // Payloads around the two- to three-byte varint boundary (16 384) and
        // packets whose content crosses it, at every start in a line, with
        // sources at every 16-byte offset.
        let backing = Bytes::from(vec![3u8; 3 * 16_500 + 64]);
        let line = backing.as_ptr() as usize % PAYLOAD_ALIGN;
        for len in [GATHER_MIN, 16_250, 16_300, 16_383, 16_384] {
            for skew in [0usize, 16, 32, 48] {
                let start = (PAYLOAD_ALIGN - line + skew) % PAYLOAD_ALIGN;
                let data = backing.slice(start..start + len);
                let packet = Packet {
                    stream_id: 1,
                    offset: 1 << 20,
                    flags: 0,
                    timepoint: 77,
                    fragments: vec![
                        Fragment::data(data.clone(), true),
                        Fragment::data(Bytes::from_static(b"between"), false),
                        Fragment::data(data.clone(), false),
                        Fragment::data(backing.slice(1..1 + len), false),
                    ],
                };
                for at in 0..PAYLOAD_ALIGN + 2 {
                    check_aligned(None, &packet, at).expect("aligned");
                }
            }
        }
    }

    #[test]
    fn large_payloads_go_by_reference_and_decode() {
        let big = Bytes::from(vec![5u8; 3 * GATHER_MIN]);
        let packet = Packet {
            stream_id: 7,
            offset: 99,
            flags: 0,
            timepoint: 1,
            fragments: vec![
                Fragment::data(Bytes::from_static(b"small"), false),
                Fragment::data(big.clone(), true),
                Fragment::data(big.clone(), false),
            ],
        };
        let body = PacketFrame::new(None, &packet);
        assert!(body.gathers());
        let mut out = BytesMut::new();
        let mut segments = std::collections::VecDeque::new();
        Encoder::default()
            .encode_gathered(&body, &mut out, &mut segments)
            .expect("encodes");
        let referenced = segments.iter().filter(|s| s.as_ptr() == big.as_ptr()).count();
        assert_eq!(referenced, 2, "both large payloads by reference, not copied");
        let mut decoder = crate::frame::Decoder::new(crate::frame::Config::default());
        for segment in &segments {
            decoder.extend(segment);
        }
        decoder.extend(&out);
        let frame = decoder.decode().expect("valid frame").expect("complete");
        let Some(Body::Packet(data)) = frame.body else {
            panic!("not a packet: {frame:?}");
        };
        let got = Packet::from_data(data).expect("decodes");
        assert_eq!(got, packet);
    }

    #[test]
    fn a_large_fragment_is_framed_like_prost_frames_it() {
        // Lengths past one- and two-byte varints at every level.
        let packet = Packet {
            stream_id: 3,
            offset: 1 << 40,
            flags: 0,
            timepoint: 123_456_789,
            fragments: vec![
                Fragment::data(Bytes::from(vec![7u8; 16_384]), true),
                Fragment::data(Bytes::from(vec![9u8; 200]), false),
            ],
        };
        let head = MessageHead {
            source: "a.b".into(),
            tunnel: 9,
            ..MessageHead::default()
        };
        assert_eq!(via_packet_frame(None, &packet), via_frame_message(None, &packet));
        assert_eq!(
            via_packet_frame(Some(&head), &packet),
            via_frame_message(Some(&head), &packet)
        );
    }
}
