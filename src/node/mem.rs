//! `mem://name`: nodes of one process. A message's `Bytes` goes straight into
//! the peer's bounded receive queue: no encoding, no copy, no socket. Order
//! holds per sending thread; a full queue answers `WouldBlock` and the sender
//! is told when the peer's application makes room.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use bytes::Bytes;

use super::inbox::MemEntry;
use super::{Message, SendError, Shared};
use crate::address::Address;
use crate::stream::StreamId;

static REGISTRY: LazyLock<Mutex<HashMap<String, Weak<Shared>>>> = LazyLock::new(|| Mutex::new(HashMap::new()));
/// Running nodes of this process by node name (routing's "same process").
static NODES: LazyLock<Mutex<HashMap<Arc<str>, Weak<Shared>>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// Publishes the node by name and its `mem://` listen addresses; a second
/// running node with the same name is refused.
pub(super) fn register(shared: &Arc<Shared>) -> Result<(), super::NodeError> {
    {
        let mut nodes = NODES
            .lock()
            .map_err(|_| super::NodeError::Duplicate(shared.name.to_string()))?;
        if nodes.get(&shared.name).is_some_and(|n| n.strong_count() > 0) {
            return Err(super::NodeError::Duplicate(shared.name.to_string()));
        }
        nodes.insert(shared.name.clone(), Arc::downgrade(shared));
    }
    let Ok(mut registry) = REGISTRY.lock() else {
        return Ok(());
    };
    for address in &shared.config.listen {
        if let Address::Mem(name) = address {
            registry.insert(name.clone(), Arc::downgrade(shared));
            if let Ok(mut listening) = shared.listening.lock() {
                listening.push(address.clone());
            }
        }
    }
    Ok(())
}

/// Withdraws them.
pub(super) fn unregister(shared: &Arc<Shared>) {
    if let Ok(mut registry) = REGISTRY.lock() {
        registry.retain(|_, node| !std::ptr::eq(node.as_ptr(), Arc::as_ptr(shared)));
    }
    if let Ok(mut nodes) = NODES.lock() {
        nodes.retain(|_, node| !std::ptr::eq(node.as_ptr(), Arc::as_ptr(shared)));
    }
}

/// The running node of this process named `name`.
pub(super) fn lookup_node(name: &str) -> Option<Arc<Shared>> {
    NODES
        .lock()
        .ok()?
        .get(name)?
        .upgrade()
        .filter(|n| !n.stopping.load(Ordering::Acquire))
}

/// The node listening on `mem://name`, if it runs.
pub(super) fn lookup(name: &str) -> Option<Arc<Shared>> {
    REGISTRY.lock().ok()?.get(name)?.upgrade()
}

/// A route to a same-process node: its queues and flags held directly, so a
/// send writes no reference count or line the receiving thread reads.
pub(super) struct MemTarget {
    shared: Weak<Shared>,
    inbox: Arc<super::inbox::AppInbox>,
    /// The sender's index in the target's inbox (see [`MemEntry`]).
    sender: u32,
    handler: Arc<std::sync::OnceLock<super::Handler>>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    max_message_len: usize,
}

impl std::fmt::Debug for MemTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.shared.upgrade().map(|s| s.name.clone());
        f.debug_struct("MemTarget").field("node", &name).finish_non_exhaustive()
    }
}

impl MemTarget {
    /// `from`'s route to `target`.
    pub(super) fn new(from: &Shared, target: &Arc<Shared>) -> Self {
        Self {
            shared: Arc::downgrade(target),
            inbox: target.inbox.clone(),
            sender: target.inbox.mem_sender(&from.small_name),
            handler: target.handler.clone(),
            stopping: target.stopping.clone(),
            max_message_len: target.config.stream.max_message_len,
        }
    }
}

/// Inlined into the route lookup: as a call of its own (which the compiler
/// chose after an unrelated change) mem 64 B lost a fifth of its messages/s
/// (perf/README.md item 17).
#[inline]
pub(super) fn send(
    from: &Arc<Shared>,
    target: &MemTarget,
    peer: &str,
    stream_id: StreamId,
    data: Bytes,
    urgent: bool,
) -> Result<(), SendError> {
    let stopped = || SendError::UnknownPeer(format!("{peer} (mem peer stopped)"));
    if target.stopping.load(Ordering::Acquire) {
        return Err(stopped());
    }
    super::check_message(peer, stream_id, &data, target.max_message_len)?;
    if target.handler.get().is_some() {
        let message = Message {
            from: from.small_name.clone(),
            stream_id,
            data,
        };
        // The handler runs on one of the target's shards: the one this
        // sender's name hashes to, so one sender's messages stay in order.
        let Some(shared) = target.shared.upgrade() else {
            return Err(stopped());
        };
        let home = shared.home_shard(&from.name);
        shared.shards[home].submit(move || super::shard::handle_mem(message));
        return Ok(());
    }
    let entry = MemEntry {
        data,
        stream_id,
        sender: target.sender,
    };
    match target.inbox.push_mem(entry, urgent) {
        Ok(()) => {
            target.inbox.wake();
            Ok(())
        }
        Err(_) => {
            let Some(target) = target.shared.upgrade() else {
                return Err(stopped());
            };
            if let Ok(mut waiters) = target.mem_waiters.lock()
                && !waiters.iter().any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(from)))
            {
                waiters.push(Arc::downgrade(from));
            }
            target.mem_waiting[usize::from(urgent)].store(true, Ordering::SeqCst);
            std::sync::atomic::fence(Ordering::SeqCst);
            // The peer may have read its queue down before the flag was up.
            if target.mem_has_room(urgent) {
                from.notify_writable();
            }
            Err(SendError::WouldBlock {
                peer: peer.to_string(),
                queue: "peer recv_queue",
            })
        }
    }
}
