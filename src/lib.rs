//! # libatbus-rs
//!
//! A communication bus for latency-critical Linux servers: nodes with unique
//! names send messages to each other over multiplexed streams, directly or
//! through relays, and label-based service discovery decides who connects to
//! whom.
//!
//! ```text
//!   API (Node)          send(to, stream, Bytes) / receive
//!     │
//!   routing             memory → unix → direct gateway → relay
//!     │
//!   stream (sans-IO)    offsets, fragments, acks, resend, windows
//!     │
//!   connection          tcp · unix · udp · quic · mem
//!     │
//!   frame codec         bytes ⇄ frame_message
//! ```
//!
//! What is here: the protocol types ([`proto`]), the wire codec
//! ([`frame`]), the sans-IO stream layer ([`stream`]), discovery records and
//! backends ([`discovery`]), authentication ([`auth`], [`grant`] for clients
//! on untrusted networks), end-to-end TLS ([`tls`]), and the data plane:
//! pinned glommio shards ([`runtime`]), transports ([`transport`], tunnels
//! through relays included) and the [`node`] (which is also the relay).
//!
//! ```
//! use bytes::{Bytes, BytesMut};
//! use libatbus::frame::{Decoder, Encoder};
//! use libatbus::proto::{Body, FrameMessage, PacketData};
//!
//! let msg = FrameMessage {
//!     head: None,
//!     body: Some(Body::Packet(PacketData {
//!         stream_id: 1,
//!         content: Bytes::from_static(b"hello"),
//!         ..Default::default()
//!     })),
//! };
//! let mut wire = BytesMut::new();
//! Encoder::default().encode(&msg, &mut wire).unwrap();
//!
//! let mut decoder = Decoder::default();
//! decoder.extend(&wire);
//! assert_eq!(decoder.decode().unwrap(), Some(msg));
//! ```

#![warn(missing_docs)]

pub mod address;
pub mod auth;
pub mod discovery;
pub mod frame;
pub mod grant;
pub mod node;
#[allow(missing_docs)]
pub mod proto;
pub mod runtime;
pub mod stream;
pub mod tls;
pub mod transport;
