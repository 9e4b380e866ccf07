//! Shared generators for the codec tests: proptest strategies for every
//! `frame_message` body variant, including encoded `packet_content` with maps.

#![allow(dead_code)]

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use libatbus::frame::Encoder;
use libatbus::proto::{
    AcknowledgeData, Body, CloseReasonData, ForwardData, Fragment, FrameMessage, MessageHead, OffsetRange,
    PacketContent, PacketData, PacketOptions, PingData, StreamAcknowledge,
};
use proptest::collection::{hash_map, vec};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use prost::Message;

/// Payload bytes: mostly small, sometimes empty, sometimes large (up to 70 KB).
pub fn payload(max_large: usize) -> impl Strategy<Value = Bytes> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..64),
        2 => vec(any::<u8>(), 0..2048),
        1 => Just(Vec::new()),
        1 => (16_384usize..=max_large.max(16_384)).prop_map(|n| (0..n).map(|i| (i * 31 % 251) as u8).collect()),
    ]
    .prop_map(Bytes::from)
}

fn small_bytes() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

pub fn forward_data() -> impl Strategy<Value = ForwardData> {
    (
        any::<i32>(),
        ".{0,16}",
        ".{0,8}",
        small_bytes(),
        any::<i32>(),
        any::<i64>(),
    )
        .prop_map(|(version, source, scheme, address, port, connection_id)| ForwardData {
            version,
            source,
            scheme,
            address,
            port,
            connection_id,
        })
}

pub fn close_reason() -> impl Strategy<Value = CloseReasonData> {
    (any::<i32>(), ".{0,32}").prop_map(|(code, message)| CloseReasonData { code, message })
}

pub fn fragment(max_large: usize) -> impl Strategy<Value = Fragment> {
    (
        any::<i32>(),
        payload(max_large),
        0..4i32,
        proptest::option::of(proptest::option::of(small_bytes()).prop_map(|token| PacketOptions { token })),
        hash_map("[a-z.]{1,12}", ".{0,12}", 0..4),
        proptest::option::of(forward_data()),
        proptest::option::of(close_reason()),
        prop_oneof![Just(Bytes::new()), small_bytes()],
    )
        .prop_map(
            |(packet_type, data, fragment_flag, options, labels, forward_for, close_reason, padding)| Fragment {
                packet_type,
                data,
                fragment_flag,
                options,
                labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                forward_for,
                close_reason,
                padding,
            },
        )
}

pub fn packet_content(max_large: usize) -> impl Strategy<Value = PacketContent> {
    vec(fragment(max_large), 0..4).prop_map(|fragment| PacketContent { fragment })
}

pub fn packet_data(max_large: usize) -> impl Strategy<Value = PacketData> {
    let content = prop_oneof![
        // Opaque content (compressed / encrypted in real use).
        payload(max_large),
        // A real packet_content, as the stream layer writes it.
        packet_content(max_large).prop_map(|c| Bytes::from(c.encode_to_vec())),
    ];
    (
        any::<i64>(),
        any::<i64>(),
        content,
        any::<i32>(),
        any::<i32>(),
        any::<i64>(),
    )
        .prop_map(
            |(stream_id, stream_offset, content, flags, padding_size, timepoint_microseconds)| PacketData {
                stream_id,
                stream_offset,
                content,
                flags,
                padding_size,
                timepoint_microseconds,
            },
        )
}

pub fn head() -> impl Strategy<Value = MessageHead> {
    (".{0,24}", ".{0,24}", ".{0,24}", any::<i64>(), 0i32..16, any::<u64>()).prop_map(
        |(source, destination, forward_for_source, forward_for_connection_id, hops, tunnel)| MessageHead {
            source,
            destination,
            forward_for_source,
            forward_for_connection_id,
            hops,
            tunnel,
        },
    )
}

pub fn acknowledge() -> impl Strategy<Value = AcknowledgeData> {
    (
        proptest::option::of(
            (
                any::<i64>(),
                any::<i64>(),
                any::<i64>(),
                vec(
                    (any::<i64>(), any::<i64>()).prop_map(|(start, end)| OffsetRange { start, end }),
                    0..4,
                ),
            )
                .prop_map(|(s, a, r, received_ranges)| StreamAcknowledge {
                    stream_id: s,
                    acknowledge_offset: a,
                    received_max_offset: r,
                    received_ranges,
                }),
        ),
        any::<i64>(),
        proptest::option::of(forward_data()),
    )
        .prop_map(|(acknowledge, timepoint_microseconds, forward_for)| AcknowledgeData {
            acknowledge,
            timepoint_microseconds,
            forward_for,
        })
}

/// Any frame_message: every body variant (and none), with and without head.
pub fn frame_message(max_large: usize) -> impl Strategy<Value = FrameMessage> {
    let body = prop_oneof![
        1 => Just(None),
        2 => any::<i64>().prop_map(|t| Some(Body::Ping(PingData { timepoint_microseconds: t }))),
        2 => any::<i64>().prop_map(|t| Some(Body::Pong(PingData { timepoint_microseconds: t }))),
        6 => packet_data(max_large).prop_map(|p| Some(Body::Packet(p))),
        3 => acknowledge().prop_map(|a| Some(Body::Acknowledge(a))),
    ];
    (proptest::option::of(head()), body).prop_map(|(head, body)| FrameMessage { head, body })
}

/// Encodes one frame with the default encoder.
pub fn encode(msg: &FrameMessage) -> Bytes {
    let mut buf = BytesMut::new();
    Encoder::default()
        .encode(msg, &mut buf)
        .expect("frame fits the default maximum");
    buf.freeze()
}

/// `count` deterministic frames drawn from [`frame_message`].
pub fn sample_frames(count: usize, max_large: usize) -> Vec<FrameMessage> {
    let mut runner = TestRunner::deterministic();
    let strategy = frame_message(max_large);
    (0..count)
        .map(|_| {
            strategy
                .new_tree(&mut runner)
                .expect("strategy never rejects")
                .current()
        })
        .collect()
}
