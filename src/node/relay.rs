//! Relays and tunnels, as a node runs them.
//!
//! A node reaches a peer through a relay by a *tunnel*: a connection whose
//! frames carry a head {source: this node, destination: the peer, tunnel:
//! id} and travel inside this node's ordinary connection to the relay (the
//! *carrier*). The tunnel is served like any connection (handshake, auth,
//! streams, e2e) by the two ends; relays only pass frames on.
//!
//! ```text
//!  app1 ──carrier──▶ relay1 ──▶ relay2 ──▶ app2
//!   └─ tunnel {app1 → app2, id} ─────────────┘   (frames forwarded by head)
//! ```
//!
//! - Carrier side (every node): [`open`] starts a tunnel on the carrier's
//!   home shard; [`tunnelled`] hands a frame that came in on a carrier to its
//!   tunnel (or accepts a new tunnel when it is a handshake); [`carrier_lost`]
//!   ends the tunnels of a carrier that has no connection left, so the dial
//!   loop moves on to the next relay at once.
//! - Relay side (`RelayConfig::forward`): [`forward`] passes a frame whose
//!   destination is another node to the next hop: a live connection to the
//!   destination, else the connection the destination's own traffic came in
//!   on (clients), else the route discovery gives (the destination itself,
//!   or the next relay). No route, or one hop too many: the source gets a
//!   close frame (ROUTER_NOT_FOUND, HOP_LIMIT) on its tunnel.
//!
//! Relays may drop frames (a next hop still connecting past `hold` bytes, a
//! carrier buffer over its bound): the ends' stream layer resends by offset.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use prost::Message as _;

use super::shard::{self, Endpoint, ShardState};
use super::{Shared, conn};
use crate::proto::{AtbusCloseReason, CloseReasonData, FrameMessage, MessageHead};
use crate::runtime::{self, TaskClass};
use crate::stream::{PathConfig, PathId};
use crate::transport::tunnel::{self, CarrierEnd};
use crate::transport::{Connected, TunnelLink};

/// Largest frame a tunnel path sends: the datagram reader holds 64 KiB, and
/// relays add to the head on the way.
pub(super) const TUNNEL_MTU: usize = 32 * 1024;

/// Head bytes relays may add (hop count, forward_for_source and its
/// connection id).
const FORWARD_OVERHEAD: usize = 300;

/// Bytes a connection may have buffered before frames passed to it wait
/// (tunnels) or are dropped (forwarding).
const CARRIER_BACKLOG: usize = 4 << 20;

/// Reverse routes a relay keeps before it forgets those whose connection is
/// gone.
const REVERSE_ROUTES: usize = 65_536;

/// A tunnel on one of this shard's carriers: (carrier, far end, tunnel id).
pub(super) type TunnelKey = (Arc<str>, Arc<str>, u64);

/// This shard's tunnels, by key: where frames that arrive for them go.
#[derive(Default)]
pub(super) struct Tunnels {
    map: RefCell<HashMap<TunnelKey, async_channel::Sender<Bytes>>>,
}

/// Path settings of a tunnel whose frames carry `head`.
pub(super) fn path_config(head: &MessageHead) -> PathConfig {
    PathConfig {
        mtu: TUNNEL_MTU,
        overhead: head.encoded_len() + FORWARD_OVERHEAD,
        window: None,
        urgent_only: false,
    }
}

/// What became of a frame handed to a connection.
enum Pushed {
    Yes,
    /// Its buffer is over [`CARRIER_BACKLOG`].
    Full,
    /// It has no usable connection.
    NoPath,
}

/// Appends an encoded frame to one of `endpoint`'s connections (a bulk one
/// if there is any), as is.
fn push_raw(endpoint: &Endpoint, frame: &Bytes) -> Pushed {
    let mut st = endpoint.state.borrow_mut();
    let mut best = None;
    for (id, path) in st.paths.iter() {
        // A datagram path takes frames up to its own MTU (a loopback UDP
        // path's is the route's, `udp_mtu` elsewhere).
        if path.dead || path.closing || (path.datagram && frame.len() > path.max_frame) {
            continue;
        }
        if best.is_none() || !path.latency {
            best = Some(*id);
            if !path.latency {
                break;
            }
        }
    }
    let Some(id) = best else {
        return Pushed::NoPath;
    };
    let Some(path) = st.paths.get_mut(&id) else {
        return Pushed::NoPath;
    };
    if path.buffered() > CARRIER_BACKLOG {
        return Pushed::Full;
    }
    path.push_encoded(frame);
    Pushed::Yes
}

/// Opens a tunnel to `far` through the relay `relay` (dialled when not yet
/// connected); the link is served where this is called.
pub(super) async fn open(state: &Rc<ShardState>, relay: &str, far: &Arc<str>) -> io::Result<TunnelLink> {
    let shared = &state.shared;
    if relay == &*shared.name || relay == &**far {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("relay://{relay}: a node cannot be its own relay"),
        ));
    }
    shared
        .ensure_route(relay)
        .map_err(|e| io::Error::new(io::ErrorKind::NotFound, format!("relay://{relay}: {e}")))?;
    let carrier: Arc<str> = Arc::from(relay);
    let id = fastrand::u64(1..);
    let (end, carrier_end) = tunnel::pair(&shared.name, far, id, format!("relay://{relay}"));
    let deadline = Instant::now() + shared.config.connect_timeout;
    let (tx, rx) = async_channel::bounded(1);
    let key: TunnelKey = (carrier, far.clone(), id);
    let job = move || {
        let Some(state) = shard::local() else { return };
        runtime::spawn(TaskClass::Throughput, async move {
            let attached = attach(&state, key, carrier_end, deadline).await;
            let _ = tx.try_send(attached);
        });
    };
    let home = shared.home_shard(relay);
    if home == state.index {
        job();
    } else {
        shared.shards[home].submit(job);
    }
    match rx.recv().await {
        Ok(Ok(())) => Ok(TunnelLink::new(end)),
        Ok(Err(e)) => Err(io::Error::new(io::ErrorKind::NotConnected, e)),
        Err(_) => Err(io::Error::other("the relay's shard stopped")),
    }
}

/// On the carrier's home shard: waits until `deadline` for a connection to
/// the carrier, then registers the tunnel and pumps its frames out.
async fn attach(state: &Rc<ShardState>, key: TunnelKey, end: CarrierEnd, deadline: Instant) -> Result<(), String> {
    let endpoint = state.endpoint(&key.0);
    while !endpoint.has_paths() {
        if Instant::now() >= deadline || state.stopping.get() {
            let last = endpoint
                .last_error
                .borrow()
                .as_ref()
                .map(|e| format!(" (last: {e})"))
                .unwrap_or_default();
            return Err(format!(
                "no connection to relay {:?} within {:?}{last}",
                key.0, state.shared.config.connect_timeout
            ));
        }
        futures_lite::future::or(
            glommio::timer::sleep(Duration::from_millis(5)),
            state.shutdown.notified(),
        )
        .await;
    }
    register(state, endpoint, key, end);
    Ok(())
}

fn register(state: &Rc<ShardState>, carrier: Rc<Endpoint>, key: TunnelKey, end: CarrierEnd) {
    state.tunnels.map.borrow_mut().insert(key.clone(), end.to_link.clone());
    runtime::spawn(TaskClass::Throughput, pump(state.clone(), carrier, key, end));
}

/// Frames the tunnel sends go out on the carrier; ends with the tunnel or
/// when the carrier has no connection left.
async fn pump(state: Rc<ShardState>, carrier: Rc<Endpoint>, key: TunnelKey, end: CarrierEnd) {
    'frames: while let Ok(frame) = end.from_link.recv().await {
        loop {
            match push_raw(&carrier, &frame) {
                Pushed::Yes => break,
                Pushed::Full => glommio::timer::sleep(Duration::from_micros(200)).await,
                Pushed::NoPath => break 'frames,
            }
        }
    }
    let mut map = state.tunnels.map.borrow_mut();
    if map.get(&key).is_some_and(|tx| tx.same_channel(&end.to_link)) {
        map.remove(&key);
    }
    drop(map);
    end.to_link.close();
    end.from_link.close();
}

/// The carrier `peer` has no connection left: its tunnels end (their dial
/// loops move on to the next relay).
pub(super) fn carrier_lost(state: &ShardState, peer: &Arc<str>) {
    let mut map = state.tunnels.map.borrow_mut();
    map.retain(|(carrier, far, _), tx| {
        if carrier == peer {
            tracing::info!(node = %state.shared.name, peer = %far, "relay {carrier} lost: its tunnel ends");
            tx.close();
            false
        } else {
            true
        }
    });
}

/// Ends every tunnel of this shard (shutdown).
pub(super) fn close_all(state: &ShardState) {
    for (_, tx) in state.tunnels.map.borrow_mut().drain() {
        tx.close();
    }
}

/// A frame that came in on a connection with `carrier` from another node
/// (`head.source`), addressed to this node: to its tunnel, or a new tunnel
/// when it opens one.
pub(super) fn tunnelled(state: &Rc<ShardState>, carrier: &Rc<Endpoint>, frame: FrameMessage) {
    let Some(head) = frame.head.as_ref() else { return };
    let key: TunnelKey = (carrier.peer.clone(), Arc::from(head.source.as_str()), head.tunnel);
    let tx = state.tunnels.map.borrow().get(&key).cloned();
    if let Some(tx) = tx {
        let bytes = encode(state, &frame);
        if tx.try_send(bytes).is_err() {
            // Full: the stream layer resends. Closed: the pump cleans up.
            state.shared.shard_metrics[state.index].relay_dropped.add(1);
        }
        return;
    }
    if conn::opens_connection(&frame) {
        let (end, carrier_end) = tunnel::pair(
            &state.shared.name,
            &key.1,
            key.2,
            format!("relay://{} (from {})", key.0, key.1),
        );
        let _ = carrier_end.to_link.try_send(encode(state, &frame));
        let origin = format!("relay://{} (tunnel from {})", key.0, key.1);
        register(state, carrier.clone(), key, carrier_end);
        runtime::spawn(
            TaskClass::Throughput,
            conn::accept_tunnel(state.clone(), Connected::Tunnel(TunnelLink::new(end)), origin),
        );
        return;
    }
    if !conn::is_close(&frame) {
        // A tunnel this node no longer has (it restarted, or closed it): say
        // so, and the far end redials instead of waiting for its timeout.
        let why = format!(
            "no tunnel {:x} from {:?} at {:?} (closed or restarted)",
            key.2, key.1, state.shared.name
        );
        bounce(state, carrier, head, AtbusCloseReason::PeerReset, why);
    }
}

/// Sends the source of `head` a close frame on its tunnel, back through
/// `via` (the connection the frame came in on), as if from its destination.
fn bounce(state: &ShardState, via: &Endpoint, head: &MessageHead, code: AtbusCloseReason, message: String) {
    tracing::debug!(node = %state.shared.name, from = %head.source, to = %head.destination, "bounced: {message}");
    let mut frame = conn::close_frame(CloseReasonData {
        code: code as i32,
        message,
    });
    frame.head = Some(MessageHead {
        source: head.destination.clone(),
        destination: head.source.clone(),
        forward_for_source: state.shared.name.to_string(),
        tunnel: head.tunnel,
        ..MessageHead::default()
    });
    let _ = push_raw(via, &encode(state, &frame));
}

fn encode(state: &ShardState, frame: &FrameMessage) -> Bytes {
    let mut buf = BytesMut::with_capacity(state.encoder.encoded_len(frame));
    if let Err(e) = state.encoder.encode(frame, &mut buf) {
        tracing::error!("cannot encode a forwarded frame: {e}");
    }
    buf.freeze()
}

/// Relay: passes on a frame whose destination is another node. `from`: the
/// connection's peer; `path`: the connection (for `forward_for`).
pub(super) fn forward(state: &Rc<ShardState>, from: &Endpoint, path: PathId, mut frame: FrameMessage) {
    let config = &state.shared.config.relay;
    let metrics = &state.shared.shard_metrics[state.index];
    let closing = conn::is_close(&frame);
    let Some(head) = frame.head.as_mut() else { return };
    if head.source.is_empty() {
        head.source = from.peer.to_string();
    }
    if u32::try_from(head.hops).unwrap_or(u32::MAX) >= config.max_hops {
        metrics.relay_dropped.add(1);
        if !closing {
            let why = format!(
                "HOP_LIMIT: frame from {:?} to {:?} passed {} relays (max_hops {})",
                head.source, head.destination, head.hops, config.max_hops
            );
            bounce(state, from, head, AtbusCloseReason::HopLimit, why);
        }
        return;
    }
    head.hops += 1;
    if head.forward_for_source.is_empty() {
        head.forward_for_source = state.shared.name.to_string();
        head.forward_for_connection_id = i64::try_from(path.0).unwrap_or(i64::MAX);
    }
    if head.source != *from.peer {
        state.shared.learn_reverse(&head.source, &from.peer);
    }
    let next = match state.shared.next_hop(&head.destination) {
        Ok(next) if next == from.peer => Err(format!(
            "the route to {:?} leads back to {:?}, where the frame came from",
            head.destination, from.peer
        )),
        other => other,
    };
    let next = match next {
        Ok(next) => next,
        Err(e) => {
            metrics.relay_dropped.add(1);
            if !closing {
                let why = format!("ROUTER_NOT_FOUND at relay {:?}: {e}", state.shared.name);
                bounce(state, from, head, AtbusCloseReason::RouterNotFound, why);
            }
            return;
        }
    };
    let bytes = encode(state, &frame);
    let home = state.shared.home_shard(&next);
    if home == state.index {
        pass_on(state, next, bytes);
    } else {
        state.shared.shards[home].submit(move || {
            if let Some(state) = shard::local() {
                pass_on(&state, next, bytes);
            }
        });
    }
}

/// On the next hop's home shard: onto its connection, or held while it
/// connects.
fn pass_on(state: &Rc<ShardState>, next: Arc<str>, frame: Bytes) {
    let metrics = &state.shared.shard_metrics[state.index];
    let endpoint = state.endpoint(&next);
    let len = frame.len();
    match push_raw(&endpoint, &frame) {
        Pushed::Yes => metrics.relayed(len),
        Pushed::Full => metrics.relay_dropped.add(1),
        Pushed::NoPath => {
            let held_bytes = endpoint.held_bytes.get();
            if held_bytes + len <= state.shared.config.relay.hold {
                endpoint.held.borrow_mut().push_back(frame);
                endpoint.held_bytes.set(held_bytes + len);
            } else {
                metrics.relay_dropped.add(1);
            }
        }
    }
}

/// A connection to `endpoint` came up: frames held for it go out.
pub(super) fn release_held(state: &ShardState, endpoint: &Endpoint) {
    let held: VecDeque<Bytes> = std::mem::take(&mut *endpoint.held.borrow_mut());
    endpoint.held_bytes.set(0);
    let metrics = &state.shared.shard_metrics[state.index];
    for frame in held {
        let len = frame.len();
        match push_raw(endpoint, &frame) {
            Pushed::Yes => metrics.relayed(len),
            Pushed::Full | Pushed::NoPath => metrics.relay_dropped.add(1),
        }
    }
}

impl Shared {
    /// Where a relay sends a frame for `destination`: a live connection to
    /// it, else the connection its own traffic came in on, else what
    /// discovery says (the destination, or the next relay, dialled if need
    /// be).
    pub(super) fn next_hop(&self, destination: &str) -> Result<Arc<str>, String> {
        if let Some(name) = self.live_name(destination) {
            return Ok(name);
        }
        let via = self.reverse.read().ok().and_then(|r| r.get(destination).cloned());
        if let Some(via) = via
            && self.live_name(&via).is_some()
        {
            return Ok(via);
        }
        let cached = self.forward_plans.read().ok().and_then(|p| p.get(destination).cloned());
        let hops = match cached {
            Some(hops) => hops,
            None => {
                let hops = self.plan_hops(destination)?;
                if let Ok(mut plans) = self.forward_plans.write() {
                    plans.insert(Arc::from(destination), hops.clone());
                }
                hops
            }
        };
        let next = hops
            .iter()
            .find(|h| self.live_name(h).is_some())
            .or_else(|| hops.first())
            .cloned()
            .ok_or_else(|| format!("no route to {destination:?}"))?;
        self.ensure_route(&next).map_err(|e| e.to_string())?;
        Ok(next)
    }

    /// The hops discovery offers towards `destination`: itself (dialled
    /// directly) or the relays to try, best first.
    fn plan_hops(&self, destination: &str) -> Result<Arc<[Arc<str>]>, String> {
        let record = match self.discovery.get(destination) {
            Some(crate::discovery::Record::Node(node)) => node,
            Some(crate::discovery::Record::Group(_)) => {
                return Err(format!("{destination:?} is a group; relays forward to nodes"));
            }
            None => {
                return Err(format!(
                    "{destination:?} is not connected here and unknown to discovery"
                ));
            }
        };
        let plan = self
            .plan(&record)
            .ok_or_else(|| "the relay is not started".to_string())?;
        match plan.map_err(|e| e.to_string())? {
            super::Plan::Mem => Err(format!(
                "{destination:?} runs in the relay's own process (give it another host in its record)"
            )),
            super::Plan::Dial(addresses) => {
                let relays: Vec<Arc<str>> = addresses
                    .iter()
                    .filter_map(|a| match a {
                        crate::address::Address::Relay(name) => Some(Arc::from(name.as_str())),
                        _ => None,
                    })
                    .collect();
                if relays.len() == addresses.len() {
                    Ok(relays.into())
                } else {
                    Ok(vec![Arc::from(destination)].into())
                }
            }
        }
    }

    /// The name as the live map holds it, if `name` has a connection now.
    fn live_name(&self, name: &str) -> Option<Arc<str>> {
        let live = self.live.read().ok()?;
        live.get_key_value(name)
            .filter(|(_, n)| **n > 0)
            .map(|(k, _)| k.clone())
    }

    /// Counts a connection to `peer` coming (`up`) or going.
    pub(super) fn set_live(&self, peer: &Arc<str>, up: bool) {
        if let Ok(mut live) = self.live.write() {
            let count = live.entry(peer.clone()).or_default();
            if up {
                *count += 1;
            } else {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    live.remove(peer);
                }
            }
        }
    }

    /// `source`'s traffic came in from `via`: replies to it may go back there.
    fn learn_reverse(&self, source: &str, via: &Arc<str>) {
        let known = self
            .reverse
            .read()
            .ok()
            .is_some_and(|r| r.get(source).is_some_and(|v| v == via));
        if !known && let Ok(mut reverse) = self.reverse.write() {
            if reverse.len() >= REVERSE_ROUTES {
                // Forget the routes whose connection is gone.
                let live = self.live.read().map(|l| l.clone()).unwrap_or_default();
                reverse.retain(|_, via| live.get(via).is_some_and(|n| *n > 0));
            }
            reverse.insert(Arc::from(source), via.clone());
        }
    }

    /// A route to `peer` exists (looked up in discovery and dialled if it
    /// did not).
    pub(super) fn ensure_route(&self, peer: &str) -> Result<(), super::SendError> {
        if self.peers.read().is_ok_and(|p| p.contains_key(peer)) {
            return Ok(());
        }
        self.resolve(peer)
    }
}
