//! `mem://name`: nodes of one process. A message's `Bytes` goes straight into
//! the peer's bounded receive queue: no encoding, no copy, no socket. Order
//! holds per sending thread; a full queue answers `WouldBlock` and the sender
//! is told when the peer's application makes room.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use bytes::Bytes;

use super::{Message, SendError, Shared};
use crate::address::Address;
use crate::stream::StreamId;

static REGISTRY: LazyLock<Mutex<HashMap<String, Weak<Shared>>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// Publishes the node's `mem://` listen addresses.
pub(super) fn register(shared: &Arc<Shared>) {
    let Ok(mut registry) = REGISTRY.lock() else {
        return;
    };
    for address in &shared.config.listen {
        if let Address::Mem(name) = address {
            registry.insert(name.clone(), Arc::downgrade(shared));
            if let Ok(mut listening) = shared.listening.lock() {
                listening.push(address.clone());
            }
        }
    }
}

/// Withdraws them.
pub(super) fn unregister(shared: &Arc<Shared>) {
    if let Ok(mut registry) = REGISTRY.lock() {
        registry.retain(|_, node| !std::ptr::eq(node.as_ptr(), Arc::as_ptr(shared)));
    }
}

/// The node listening on `mem://name`, if it runs.
pub(super) fn lookup(name: &str) -> Option<Arc<Shared>> {
    REGISTRY.lock().ok()?.get(name)?.upgrade()
}

pub(super) fn send(
    from: &Arc<Shared>,
    target: &Weak<Shared>,
    peer: &str,
    stream_id: StreamId,
    data: Bytes,
    urgent: bool,
) -> Result<(), SendError> {
    let Some(target) = target.upgrade().filter(|t| !t.stopping.load(Ordering::Acquire)) else {
        return Err(SendError::UnknownPeer(format!("{peer} (mem peer stopped)")));
    };
    super::check_message(peer, stream_id, &data, target.config.stream.max_message_len)?;
    let message = Message {
        from: from.name.clone(),
        stream_id,
        data,
    };
    let queue = if urgent { &target.urgent_tx } else { &target.app_tx };
    match queue.try_send(message) {
        Ok(()) => {
            target.counters.received.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Err(_) => {
            if let Ok(mut waiters) = target.mem_waiters.lock()
                && !waiters.iter().any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(from)))
            {
                waiters.push(Arc::downgrade(from));
            }
            target.mem_waiting.store(true, Ordering::Release);
            // The peer may have drained between the failed send and the flag.
            if !queue.is_full() {
                from.notify_writable();
            }
            Err(SendError::WouldBlock {
                peer: peer.to_string(),
                queue: "peer recv_queue",
            })
        }
    }
}
