//! Clients on untrusted networks: a server allocates each one a name, a
//! stream id and a token ([`ClientGrant`]) and registers them in discovery,
//! with an expiry, as the client's record (`type: client`, the token in
//! `tokens`, the rest in annotations). The client connects under that name
//! with that token (it proves the token with the same handshake MAC as any
//! node token: the token itself never crosses the network). The relay it
//! connects to and the server both look the grant up by the client's name
//! and check:
//!
//! - the token (a grant's client is authenticated by its own token only),
//! - the expiry,
//! - every frame: addressed to the server that issued the grant, data on the
//!   granted stream only (internal streams, below 0, for handshakes, acks and
//!   control are allowed).
//!
//! Anything else is closed UNAUTHORIZED. Pure: no sockets, no clocks of its
//! own.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};

use crate::discovery::{Metadata, NodeRecord, RelaySelector, TYPE_CLIENT};
use crate::proto::FrameMessage;
use crate::proto::frame_message::Body;
use crate::stream::StreamId;

/// Annotation with the granted stream id.
pub const STREAM_ANNOTATION: &str = "atbus.io/client-stream";
/// Annotation with the expiry (Unix seconds).
pub const EXPIRES_ANNOTATION: &str = "atbus.io/client-expires";
/// Annotation with the issuing server's name.
pub const SERVER_ANNOTATION: &str = "atbus.io/client-server";

/// What a server allocated to one client.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientGrant {
    /// The client's node name.
    pub name: String,
    /// The one stream it may send on.
    pub stream_id: StreamId,
    /// Its token (give it to the client only).
    pub token: String,
    /// Unix seconds after which the grant is refused.
    pub expires: i64,
    /// The server that issued it: the only node the client may address.
    pub server: String,
}

impl fmt::Debug for ClientGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientGrant")
            .field("name", &self.name)
            .field("stream_id", &self.stream_id)
            .field("token", &"[redacted]")
            .field("expires", &self.expires)
            .field("server", &self.server)
            .finish()
    }
}

/// Why a frame of a granted client is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The frame addresses another node than the issuing server.
    #[error("client {client:?} may address {server:?} only, not {to:?}")]
    Destination {
        /// The client.
        client: String,
        /// Its server.
        server: String,
        /// Whom it addressed.
        to: String,
    },
    /// Data on a stream it was not granted.
    #[error("client {client:?} may use stream {granted} only, not {used}")]
    Stream {
        /// The client.
        client: String,
        /// Its stream.
        granted: StreamId,
        /// The stream it used.
        used: StreamId,
    },
    /// The grant expired.
    #[error("the grant of client {client:?} expired at {expires} (Unix s)")]
    Expired {
        /// The client.
        client: String,
        /// When.
        expires: i64,
    },
}

impl ClientGrant {
    /// A new grant from `server`: `name` or a random `client-…` one, a
    /// random 256-bit token, valid `ttl_seconds` from `now` (Unix s).
    pub fn issue(server: &str, name: Option<&str>, stream_id: StreamId, now: i64, ttl_seconds: i64) -> Self {
        let rng = SystemRandom::new();
        let mut secret = [0u8; 32];
        if rng.fill(&mut secret).is_err() {
            // Not recoverable in a meaningful way; never hand out a weak
            // token silently.
            panic!("the system random source failed");
        }
        let token: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let name = name.map_or_else(|| format!("client-{}", &token[..16]), str::to_string);
        Self {
            name,
            stream_id,
            token,
            expires: now.saturating_add(ttl_seconds),
            server: server.to_string(),
        }
    }

    /// The discovery record that registers it; `relay`: the relays the
    /// client goes through (its `advertise_relay`).
    pub fn record(&self, relay: Option<RelaySelector>) -> NodeRecord {
        let mut metadata = Metadata::default();
        metadata
            .annotations
            .insert(STREAM_ANNOTATION.into(), self.stream_id.to_string());
        metadata
            .annotations
            .insert(EXPIRES_ANNOTATION.into(), self.expires.to_string());
        metadata
            .annotations
            .insert(SERVER_ANNOTATION.into(), self.server.clone());
        NodeRecord {
            name: self.name.clone(),
            r#type: TYPE_CLIENT.into(),
            tokens: vec![self.token.clone()],
            metadata: Some(metadata),
            advertise_relay: relay,
            ..NodeRecord::default()
        }
    }

    /// The grant a record registers, if it is one (a client record with
    /// every annotation and exactly one token).
    pub fn from_record(record: &NodeRecord) -> Option<Self> {
        if !record.is_client() || record.tokens.len() != 1 {
            return None;
        }
        let annotations = &record.metadata.as_ref()?.annotations;
        Some(Self {
            name: record.name.clone(),
            stream_id: annotations.get(STREAM_ANNOTATION)?.parse().ok()?,
            token: record.tokens[0].clone(),
            expires: annotations.get(EXPIRES_ANNOTATION)?.parse().ok()?,
            server: annotations.get(SERVER_ANNOTATION)?.clone(),
        })
    }

    /// Refuses an expired grant.
    pub fn check_time(&self, now: i64) -> Result<(), GrantError> {
        if now > self.expires {
            return Err(GrantError::Expired {
                client: self.name.clone(),
                expires: self.expires,
            });
        }
        Ok(())
    }

    /// Whether the client may send `frame` (see the module docs).
    pub fn permits(&self, frame: &FrameMessage) -> Result<(), GrantError> {
        if let Some(head) = &frame.head
            && !head.destination.is_empty()
            && head.destination != self.server
        {
            return Err(GrantError::Destination {
                client: self.name.clone(),
                server: self.server.clone(),
                to: head.destination.clone(),
            });
        }
        let used = match &frame.body {
            Some(Body::Packet(packet)) => packet.stream_id,
            Some(Body::Acknowledge(ack)) => ack.acknowledge.as_ref().map_or(-1, |a| a.stream_id),
            Some(Body::Ping(_)) | Some(Body::Pong(_)) | None => -1,
        };
        if used >= 0 && used != self.stream_id {
            return Err(GrantError::Stream {
                client: self.name.clone(),
                granted: self.stream_id,
                used,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{AcknowledgeData, MessageHead, PacketData, StreamAcknowledge};
    use proptest::prelude::*;

    fn frame(to: &str, body: Body) -> FrameMessage {
        FrameMessage {
            head: Some(MessageHead {
                source: "c".into(),
                destination: to.into(),
                ..MessageHead::default()
            }),
            body: Some(body),
        }
    }

    fn packet(stream_id: i64) -> Body {
        Body::Packet(PacketData {
            stream_id,
            ..PacketData::default()
        })
    }

    #[test]
    fn a_grant_survives_its_record_and_redacts_its_token() {
        let grant = ClientGrant::issue("server-1", None, 7, 1_000, 60);
        assert!(grant.name.starts_with("client-"));
        assert_eq!(grant.token.len(), 64);
        assert_eq!(grant.expires, 1_060);
        let record = grant.record(None);
        assert!(crate::discovery::validate_node(&record).is_ok(), "{record:?}");
        assert_eq!(ClientGrant::from_record(&record).as_ref(), Some(&grant));
        assert!(!format!("{grant:?}").contains(&grant.token));
        // A plain client record (no grant) is not one.
        let mut plain = record.clone();
        plain.metadata = None;
        assert_eq!(ClientGrant::from_record(&plain), None);
        let mut node = record;
        node.r#type = "node".into();
        assert_eq!(ClientGrant::from_record(&node), None);
    }

    #[test]
    fn only_the_server_and_the_granted_stream() {
        let grant = ClientGrant::issue("server-1", Some("c"), 7, 0, 60);
        assert_eq!(grant.permits(&frame("server-1", packet(7))), Ok(()));
        assert_eq!(grant.permits(&frame("server-1", packet(-2))), Ok(()), "handshake");
        assert!(matches!(
            grant.permits(&frame("server-1", packet(8))),
            Err(GrantError::Stream { used: 8, .. })
        ));
        assert!(matches!(
            grant.permits(&frame("other", packet(7))),
            Err(GrantError::Destination { .. })
        ));
        let ack = |stream_id| {
            Body::Acknowledge(AcknowledgeData {
                acknowledge: Some(StreamAcknowledge {
                    stream_id,
                    ..StreamAcknowledge::default()
                }),
                ..AcknowledgeData::default()
            })
        };
        assert_eq!(grant.permits(&frame("server-1", ack(7))), Ok(()));
        assert!(grant.permits(&frame("server-1", ack(3))).is_err());
        assert!(grant.check_time(60).is_ok());
        assert!(matches!(grant.check_time(61), Err(GrantError::Expired { .. })));
    }

    proptest! {
        /// Whatever the frame, it passes only if it stays on the granted
        /// stream (or an internal one) and addresses the server.
        #[test]
        fn permits_exactly_the_grant(stream in -3i64..20, to_server in any::<bool>()) {
            let grant = ClientGrant::issue("srv", Some("c"), 5, 0, 60);
            let to = if to_server { "srv" } else { "elsewhere" };
            let ok = grant.permits(&frame(to, packet(stream))).is_ok();
            prop_assert_eq!(ok, to_server && (stream < 0 || stream == 5));
        }
    }
}
