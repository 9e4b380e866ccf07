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

impl Content {
    /// Decodes a stream packet's `content`: what [`Message::decode`] gives
    /// (the tests compare, on valid and on mangled input), faster for data
    /// packets. prost's generic merge took ~22 ns per 64-byte fragment on
    /// tcp 64 B's receiving shard, the core that sets that case's pace
    /// (perf/README.md item 44): a fragment holding only the three data
    /// fields and padding, each under its one-byte key, is read here in one
    /// pass over the slice; anything else (a control packet's rare fields,
    /// unknown or oddly encoded keys, malformed input) is decoded by prost
    /// from the start, so its result and its errors are prost's.
    pub fn decode_packet(content: Bytes) -> Result<Self, DecodeError> {
        match Self::decode_data(&content) {
            Some(fragments) => Ok(Self { fragments }),
            None => Self::decode(content),
        }
    }

    /// The fast path of [`Content::decode_packet`]; `None` where prost must
    /// decide.
    fn decode_data(content: &Bytes) -> Option<Vec<Fragment>> {
        // `packet_content.fragment` (1, length-delimited) and the fields of
        // `fragment_type` read here, as one-byte keys.
        const FRAGMENT: u8 = 1 << 3 | 2;
        const PACKET_TYPE: u8 = 1 << 3;
        const DATA: u8 = 2 << 3 | 2;
        const FLAG: u8 = 3 << 3;
        const PADDING: u8 = (PADDING_TAG as u8) << 3 | 2;
        let bytes: &[u8] = content;
        let mut at = 0;
        let mut fragments = Vec::new();
        while at < bytes.len() {
            if bytes[at] != FRAGMENT {
                return None;
            }
            let (len, n) = varint(&bytes[at + 1..])?;
            at += 1 + n;
            let end = at
                .checked_add(usize::try_from(len).ok()?)
                .filter(|&end| end <= bytes.len())?;
            let mut fragment = Fragment::default();
            while at < end {
                let key = bytes[at];
                let (value, n) = varint(&bytes[at + 1..end])?;
                at += 1 + n;
                match key {
                    // int32 fields: prost truncates the varint the same way.
                    PACKET_TYPE => fragment.packet_type = value as i32,
                    FLAG => fragment.fragment_flag = value as i32,
                    DATA | PADDING => {
                        let stop = at
                            .checked_add(usize::try_from(value).ok()?)
                            .filter(|&stop| stop <= end)?;
                        if key == DATA {
                            fragment.data = content.slice(at..stop);
                        }
                        at = stop;
                    }
                    _ => return None,
                }
            }
            fragments.push(fragment);
        }
        Some(fragments)
    }
}

/// A varint at the start of `bytes` and its length, as prost reads it;
/// `None` where prost would fail. Inlined: called out of line, returning
/// the pair through memory took 22 instructions a call (callgrind).
#[inline(always)]
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut rest = bytes;
    let value = encoding::decode_varint(&mut rest).ok()?;
    Some((value, bytes.len() - rest.len()))
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

    /// [`Content::decode_packet`] against prost's decoding of the same bytes.
    fn same_as_prost(bytes: &[u8]) -> Result<(), TestCaseError> {
        let fast = Content::decode_packet(Bytes::copy_from_slice(bytes));
        let prost = Content::decode(Bytes::copy_from_slice(bytes));
        match (fast, prost) {
            (Ok(fast), Ok(prost)) => prop_assert_eq!(fast, prost),
            (Err(fast), Err(prost)) => prop_assert_eq!(fast.to_string(), prost.to_string()),
            (fast, prost) => prop_assert!(false, "decode_packet {fast:?}, prost {prost:?}"),
        }
        Ok(())
    }

    /// Encoded data fragments as a data packet carries them: some with
    /// padding before the payload, some with a packet type.
    fn data_content() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            (
                proptest::collection::vec(any::<u8>(), 0..200),
                any::<bool>(),
                0usize..PAYLOAD_ALIGN,
                prop_oneof![Just(0i32), any::<i32>()],
            ),
            0..6,
        )
        .prop_map(|fragments| {
            let mut out = Vec::new();
            for (data, has_more, skew, packet_type) in fragments {
                let fragment = Fragment {
                    packet_type,
                    ..Fragment::data(Bytes::from(data), has_more)
                };
                let mut inner = Vec::new();
                encode_padding(padding_len(skew), &mut inner);
                fragment.encode_raw(&mut inner);
                encoding::encode_key(1, WireType::LengthDelimited, &mut out);
                encoding::encode_varint(inner.len() as u64, &mut out);
                out.extend_from_slice(&inner);
            }
            out
        })
    }

    proptest! {
        #[test]
        fn the_data_path_decodes_as_prost(bytes in data_content()) {
            prop_assert!(Content::decode_data(&Bytes::from(bytes.clone())).is_some());
            same_as_prost(&bytes)?;
        }

        #[test]
        fn control_fragments_decode_as_prost(fragments in proptest::collection::vec(full_fragment(), 0..4)) {
            same_as_prost(&PacketContent { fragment: fragments }.encode_to_vec())?;
        }

        #[test]
        fn mangled_content_decodes_as_prost(
            bytes in data_content(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = bytes;
            for (at, value) in edits {
                if !bytes.is_empty() {
                    let at = at.index(bytes.len());
                    bytes[at] = value;
                }
            }
            same_as_prost(&bytes)?;
            let cut = cut.index(bytes.len() + 1);
            same_as_prost(&bytes[..cut])?;
        }

        #[test]
        fn arbitrary_bytes_decode_as_prost(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            same_as_prost(&bytes)?;
        }
    }

    #[test]
    fn the_data_path_takes_data_fragments_and_leaves_the_rest_to_prost() {
        let data = Content {
            fragments: vec![
                Fragment::data(Bytes::from_static(b"hello"), true),
                Fragment::data(Bytes::from_static(b"!"), false),
            ],
        };
        let bytes = Bytes::from(data.encode_to_vec());
        assert_eq!(Content::decode_data(&bytes), Some(data.fragments.clone()));
        assert_eq!(Content::decode_packet(bytes).expect("decodes"), data);
        let closing = Content {
            fragments: vec![Fragment::closing(CloseReasonData {
                code: 1,
                message: "bye".into(),
            })],
        };
        let bytes = Bytes::from(closing.encode_to_vec());
        assert_eq!(Content::decode_data(&bytes), None);
        assert_eq!(Content::decode_packet(bytes).expect("decodes"), closing);
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
