//! Tunnels: a connection to a far node carried inside this node's
//! connection to a relay (`relay://name`).
//!
//! ```text
//!  app1                                 relay                      app2
//!  TunnelLink ══ frames, head {app1 → app2} ══▶ forwards by head ══▶ …
//!     ▲ async channels (any shard)
//!  CarrierEnd: pumps frames into / out of the relay connection's path
//! ```
//!
//! A tunnel is a datagram-like [`Link`]: each `send` is one whole encoded
//! frame, each `recv` one frame. Its frames carry a message head naming both
//! ends ([`Link::frame_head`]), which is what relays route by. The channel
//! pair crosses threads, so the tunnel serves on the far node's home shard
//! while the carrier connection stays on its own.
//!
//! Relays may drop frames (a next hop still connecting, a full queue), and
//! a carrier may die: the stream layer above resends by offset, on this
//! tunnel or another path.

use std::io;

use bytes::Bytes;

use super::{ChannelEnd, Handoff, Link};
use crate::proto::MessageHead;

/// Frames a tunnel queues each way before the sender waits (tunnel side) or
/// drops (carrier side).
pub const TUNNEL_DEPTH: usize = 4096;

/// The tunnel's channels, and the head its frames carry.
#[derive(Debug)]
pub struct TunnelEnd {
    channels: ChannelEnd,
    head: MessageHead,
}

/// The carrier's side of a tunnel: frames from the far node go into `to_link`,
/// frames for it come out of `from_link`.
#[derive(Debug)]
pub struct CarrierEnd {
    /// Frames that arrived for the tunnel.
    pub to_link: async_channel::Sender<Bytes>,
    /// Frames the tunnel sends.
    pub from_link: async_channel::Receiver<Bytes>,
}

/// Tunnel `id` between `source` (this node) and `destination` through the
/// carrier named in `label` (for logs).
pub fn pair(source: &str, destination: &str, id: u64, label: String) -> (TunnelEnd, CarrierEnd) {
    let (to_link, rx) = async_channel::bounded(TUNNEL_DEPTH);
    let (tx, from_link) = async_channel::bounded(TUNNEL_DEPTH);
    let head = MessageHead {
        source: source.to_string(),
        destination: destination.to_string(),
        tunnel: id,
        ..MessageHead::default()
    };
    (
        TunnelEnd {
            channels: ChannelEnd::new(rx, tx, label),
            head,
        },
        CarrierEnd { to_link, from_link },
    )
}

/// A connection through a relay, seen from the end that runs it.
pub struct TunnelLink {
    end: TunnelEnd,
}

impl TunnelLink {
    /// The link over `end`.
    pub fn new(end: TunnelEnd) -> Self {
        Self { end }
    }
}

impl Link for TunnelLink {
    fn is_datagram(&self) -> bool {
        true
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self.recv_datagram(buf).await?;
        buf[..frame.len()].copy_from_slice(&frame);
        Ok(frame.len())
    }

    async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.end.channels.send_copy(buf, "the relay connection ended").await
    }

    async fn shutdown(&self) {
        self.end.channels.close();
    }

    fn peer(&self) -> String {
        self.end.channels.peer()
    }

    /// Channels cross threads: the tunnel moves as it is.
    fn handoff(&self) -> io::Result<Handoff> {
        Ok(Handoff::Tunnel(TunnelEnd {
            channels: self.end.channels.share(),
            head: self.end.head.clone(),
        }))
    }

    async fn send_datagram(&self, datagram: Bytes) -> io::Result<usize> {
        self.end
            .channels
            .send_owned(datagram, "the relay connection ended")
            .await
    }

    async fn recv_datagram(&self, buf: &mut [u8]) -> io::Result<Bytes> {
        let frame = self
            .end
            .channels
            .recv()
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::ConnectionReset, "the relay connection ended"))?;
        if frame.len() > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "tunnelled frame of {} bytes over the {}-byte limit",
                    frame.len(),
                    buf.len()
                ),
            ));
        }
        Ok(frame)
    }

    fn frame_head(&self) -> Option<&MessageHead> {
        Some(&self.end.head)
    }
}
