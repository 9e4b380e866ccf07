//! A stream packet's fragments as the stream layer holds them.
//!
//! `packet_content.fragment_type` has seven fields, but data packets use
//! three: the bytes, the HAS_MORE flag and (for control packets) the packet
//! type. prost's generated struct keeps all seven inline (some 240 bytes, with
//! a map to drop), and a 64 KiB packet of 64 B messages holds about a thousand
//! fragments: moving, measuring and dropping them took a fifth of the sending
//! shard's time (perf/README.md item 20). [`Fragment`] holds the three inline
//! (48 bytes) and boxes the rest; its encoding is byte-for-byte prost's (the
//! tests compare).

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::frame::Gather;
use crate::proto::{self, AtbusPacketFragmentFlagType, CloseReasonData};

/// Payloads at least this long go to a byte-stream socket by reference
/// (a gathering write) instead of being copied into the frame
/// ([`PacketFrame::gathers`](super::PacketFrame::gathers)).
pub const GATHER_MIN: usize = 4096;

/// `packet_content.fragment_type`'s first field the box holds.
const FIRST_RARE_TAG: u32 = 4;
/// Its last field (options, labels, forward_for, close_reason).
const LAST_RARE_TAG: u32 = 7;
/// `fragment_type.padding`: filler the receiver skips.
const PADDING_TAG: u32 = 8;

/// The cache line: a large payload's place in the socket write that carries
/// it, modulo this, is made its source's, where the link says the kernel's
/// copy of a write starts aligned (see
/// [`PacketFrame::aligned`](super::PacketFrame::aligned)).
pub const PAYLOAD_ALIGN: usize = 64;

/// Bytes of a `padding` field that moves what follows it forward by `skew`
/// bytes modulo [`PAYLOAD_ALIGN`]: none for 0; otherwise the key and a
/// one-byte length take two, so a skew of 1 takes 65.
pub(crate) fn padding_len(skew: usize) -> usize {
    match skew % PAYLOAD_ALIGN {
        0 => 0,
        1 => PAYLOAD_ALIGN + 1,
        n => n,
    }
}

/// Appends a `padding` field [`padding_len`] made `len` bytes long in all
/// (nothing for 0).
pub(crate) fn encode_padding(len: usize, buf: &mut impl BufMut) {
    if len == 0 {
        return;
    }
    debug_assert!((2..=PAYLOAD_ALIGN + 1).contains(&len));
    encoding::encode_key(PADDING_TAG, WireType::LengthDelimited, buf);
    // A one-byte length: at most 63.
    encoding::encode_varint(len as u64 - 2, buf);
    buf.put_bytes(0, len - 2);
}

/// One fragment of a stream packet (`packet_content.fragment_type`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fragment {
    /// `packet_type`: 0 for data.
    pub packet_type: i32,
    /// The fragment's bytes.
    pub data: Bytes,
    /// `ATBUS_PACKET_FRAGMENT_FLAG_TYPE` bits.
    pub fragment_flag: i32,
    /// Fields 4 to 7, which only control packets carry; its fields 1 to 3
    /// stay at their defaults.
    rare: Option<Box<proto::Fragment>>,
}

impl Fragment {
    /// A data fragment: `data`, with HAS_MORE when more of its message
    /// follows.
    pub fn data(data: Bytes, has_more: bool) -> Self {
        let fragment_flag = if has_more {
            AtbusPacketFragmentFlagType::HasMore as i32
        } else {
            AtbusPacketFragmentFlagType::None as i32
        };
        Self {
            data,
            fragment_flag,
            ..Self::default()
        }
    }

    /// A fragment carrying only why a connection closes.
    pub fn closing(reason: CloseReasonData) -> Self {
        Self {
            rare: Some(Box::new(proto::Fragment {
                close_reason: Some(reason),
                ..proto::Fragment::default()
            })),
            ..Self::default()
        }
    }

    /// Whether more fragments of the same message follow this one.
    pub fn has_more(&self) -> bool {
        self.fragment_flag & AtbusPacketFragmentFlagType::HasMore as i32 != 0
    }

    /// Appends the encoding of [`Message::encode_raw`], a payload of
    /// [`GATHER_MIN`] bytes or more by reference.
    pub(crate) fn encode_gathered(&self, dst: &mut Gather<'_>) {
        if self.data.len() < GATHER_MIN {
            self.encode_raw(dst.out());
            return;
        }
        self.encode_before_payload(dst.out());
        dst.payload(&self.data);
        self.encode_after_payload(dst.out());
    }

    /// Length of what [`Fragment::encode_before_payload`] writes.
    pub(crate) fn before_payload_len(&self) -> usize {
        let mut len = 0;
        if self.packet_type != 0 {
            len += encoding::int32::encoded_len(1, &self.packet_type);
        }
        if !self.data.is_empty() {
            len += encoding::key_len(2) + encoding::encoded_len_varint(self.data.len() as u64);
        }
        len
    }

    /// Fields 1 and 2 up to the payload's bytes (the key and length of a
    /// non-empty payload).
    fn encode_before_payload(&self, buf: &mut impl BufMut) {
        if self.packet_type != 0 {
            encoding::int32::encode(1, &self.packet_type, buf);
        }
        if !self.data.is_empty() {
            encoding::encode_key(2, WireType::LengthDelimited, buf);
            encoding::encode_varint(self.data.len() as u64, buf);
        }
    }

    /// The fields after the payload.
    fn encode_after_payload(&self, buf: &mut impl BufMut) {
        if self.fragment_flag != 0 {
            encoding::int32::encode(3, &self.fragment_flag, buf);
        }
        if let Some(rare) = &self.rare {
            rare.encode_raw(buf);
        }
    }

    /// The close reason it carries, if any.
    pub fn into_close_reason(self) -> Option<CloseReasonData> {
        self.rare.and_then(|rare| rare.close_reason)
    }
}

impl From<proto::Fragment> for Fragment {
    fn from(mut full: proto::Fragment) -> Self {
        let packet_type = std::mem::take(&mut full.packet_type);
        let data = std::mem::take(&mut full.data);
        let fragment_flag = std::mem::take(&mut full.fragment_flag);
        // Filler with no meaning.
        full.padding = Bytes::new();
        let rare = (full != proto::Fragment::default()).then(|| Box::new(full));
        Self {
            packet_type,
            data,
            fragment_flag,
            rare,
        }
    }
}

impl From<Fragment> for proto::Fragment {
    fn from(slim: Fragment) -> Self {
        let mut full = slim.rare.map(|rare| *rare).unwrap_or_default();
        full.packet_type = slim.packet_type;
        full.data = slim.data;
        full.fragment_flag = slim.fragment_flag;
        full
    }
}

impl Message for Fragment {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.encode_before_payload(buf);
        // prost's `bytes::encode` clones the `Bytes` to put it: an atomic
        // increment and decrement per fragment for shared payloads.
        buf.put_slice(&self.data);
        self.encode_after_payload(buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => encoding::int32::merge(wire_type, &mut self.packet_type, buf, ctx),
            2 => encoding::bytes::merge(wire_type, &mut self.data, buf, ctx),
            3 => encoding::int32::merge(wire_type, &mut self.fragment_flag, buf, ctx),
            FIRST_RARE_TAG..=LAST_RARE_TAG => self.rare.get_or_insert_default().merge_field(tag, wire_type, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let mut len = 0;
        if self.packet_type != 0 {
            len += encoding::int32::encoded_len(1, &self.packet_type);
        }
        if !self.data.is_empty() {
            len += encoding::key_len(2) + encoding::encoded_len_varint(self.data.len() as u64) + self.data.len();
        }
        if self.fragment_flag != 0 {
            len += encoding::int32::encoded_len(3, &self.fragment_flag);
        }
        len + self.rare.as_ref().map_or(0, |rare| rare.encoded_len())
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// `packet_content` with [`Fragment`]s: what a stream packet's `content`
/// holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Content {
    /// The fragments, in offset order.
    pub fragments: Vec<Fragment>,
}

impl Message for Content {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encoding::message::encode_repeated(1, &self.fragments, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => encoding::message::merge_repeated(wire_type, &mut self.fragments, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        encoding::message::encoded_len_repeated(1, &self.fragments)
    }

    fn clear(&mut self) {
        self.fragments.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::proto::{ForwardData, PacketContent, PacketOptions};

    fn full_fragment() -> impl Strategy<Value = proto::Fragment> {
        (
            prop_oneof![Just(0i32), any::<i32>()],
            proptest::collection::vec(any::<u8>(), 0..300),
            prop_oneof![Just(0i32), Just(1i32), any::<i32>()],
            proptest::option::of(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8))),
            proptest::collection::btree_map("[a-z]{0,8}", "[a-z]{0,8}", 0..3),
            proptest::option::of(("[a-z]{0,8}", any::<i64>())),
            proptest::option::of((any::<i32>(), "[a-z ]{0,12}")),
        )
            .prop_map(
                |(packet_type, data, fragment_flag, options, labels, forward, close)| proto::Fragment {
                    packet_type,
                    data: Bytes::from(data),
                    fragment_flag,
                    options: options.map(|token| PacketOptions {
                        token: token.map(Bytes::from),
                    }),
                    labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                    forward_for: forward.map(|(source, connection_id)| ForwardData {
                        source,
                        connection_id,
                        ..ForwardData::default()
                    }),
                    close_reason: close.map(|(code, message)| CloseReasonData { code, message }),
                    padding: Bytes::new(),
                },
            )
    }

    proptest! {
        #[test]
        fn encodes_and_decodes_as_the_generated_type(
            fragments in proptest::collection::vec(full_fragment(), 0..5),
        ) {
            let full = PacketContent { fragment: fragments.clone() };
            let slim = Content { fragments: fragments.iter().cloned().map(Fragment::from).collect() };
            let bytes = full.encode_to_vec();
            prop_assert_eq!(slim.encoded_len(), full.encoded_len());
            prop_assert_eq!(&slim.encode_to_vec(), &bytes);
            let decoded = Content::decode(Bytes::from(bytes)).expect("decodes");
            prop_assert_eq!(&decoded, &slim);
            let back: Vec<proto::Fragment> = decoded.fragments.into_iter().map(proto::Fragment::from).collect();
            prop_assert_eq!(back, fragments);
        }
    }

    #[test]
    fn unknown_fields_are_skipped_and_data_fragments_stay_unboxed() {
        let mut bytes = Vec::new();
        // fragment { data: "ab", fragment_flag: 1, 99: 5 }
        let inner = [0x12, 2, b'a', b'b', 0x18, 1, 0x98, 0x06, 5];
        bytes.extend_from_slice(&[0x0a, inner.len() as u8]);
        bytes.extend_from_slice(&inner);
        // packet_content's own unknown field 2: 7
        bytes.extend_from_slice(&[0x10, 7]);
        let content = Content::decode(Bytes::from(bytes)).expect("decodes");
        assert_eq!(content.fragments, vec![Fragment::data(Bytes::from_static(b"ab"), true)]);
        assert!(content.fragments[0].rare.is_none());
        assert!(std::mem::size_of::<Fragment>() <= 48);
    }

    #[test]
    fn a_close_reason_round_trips() {
        let reason = CloseReasonData {
            code: 3,
            message: "bye".into(),
        };
        let content = Content {
            fragments: vec![Fragment::closing(reason.clone())],
        };
        let decoded = Content::decode(Bytes::from(content.encode_to_vec())).expect("decodes");
        let got = decoded.fragments.into_iter().find_map(Fragment::into_close_reason);
        assert_eq!(got, Some(reason));
    }

    #[test]
    fn a_malformed_fragment_is_an_error() {
        // fragment whose data length runs past the end.
        let bytes = Bytes::from_static(&[0x0a, 4, 0x12, 9, b'a', b'b']);
        assert!(Content::decode(bytes).is_err());
    }
}
