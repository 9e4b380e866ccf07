//! The application's receive queues (ordinary and urgent), with wake-ups
//! decoupled from pushes.
//!
//! A shard pushes every message a frame completes and wakes a sleeping reader
//! once, after the frame ([`AppInbox::wake`]); a channel that wakes its reader
//! on each push made the reader, pinned beside its shard, preempt the shard on
//! every message (two context switches per 64 B message). Same-process
//! senders wake after each message; the check is a load of a counter that
//! only sleeping readers write.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;

use super::Message;

pub(super) struct AppInbox {
    /// Indexed by "urgent".
    queues: [ArrayQueue<Message>; 2],
    /// Readers asleep (or about to be) in [`AppInbox::wait`].
    sleepers: CachePadded<AtomicUsize>,
    /// A wake-up is on its way to the sleepers: pushes until they look again
    /// need not send another (a condvar notify is a system call, and a woken
    /// reader takes microseconds to run).
    notified: CachePadded<AtomicBool>,
    /// Bumped by each wake-up that found sleepers.
    generation: Mutex<u64>,
    cvar: Condvar,
}

impl AppInbox {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            queues: [ArrayQueue::new(capacity), ArrayQueue::new(capacity)],
            sleepers: CachePadded::new(AtomicUsize::new(0)),
            notified: CachePadded::new(AtomicBool::new(false)),
            generation: Mutex::new(0),
            cvar: Condvar::new(),
        }
    }

    /// Queues a message without waking anyone (see [`AppInbox::wake`]);
    /// `Err` gives it back when that queue is full.
    pub(super) fn push(&self, message: Message, urgent: bool) -> Result<(), Message> {
        self.queues[usize::from(urgent)].push(message)
    }

    /// Whether a reader is asleep (or about to be) in [`AppInbox::wait`].
    pub(super) fn has_sleepers(&self) -> bool {
        self.sleepers.load(Ordering::SeqCst) > 0
    }

    /// Wakes the readers asleep in [`AppInbox::wait`], if any. Call it after
    /// pushing.
    ///
    /// No fence: `ArrayQueue::push` ends in a SeqCst compare-exchange of the
    /// queue's tail and `is_empty` loads head and tail SeqCst (crossbeam-queue
    /// 0.3), so with the SeqCst count here and in `wait` either this load sees
    /// the sleeper or the sleeper's look at the queues sees the push (the
    /// pairing crossbeam-channel itself relies on). A fence, or an idempotent
    /// read-modify-write, which LLVM turns into one, cost ~40 % of mem 64 B.
    ///
    /// Whether it woke sleepers.
    pub(super) fn wake(&self) -> bool {
        if self.sleepers.load(Ordering::SeqCst) > 0
            && !self.notified.load(Ordering::SeqCst)
            && !self.notified.swap(true, Ordering::SeqCst)
            && let Ok(mut generation) = self.generation.lock()
        {
            *generation += 1;
            // Notified after the lock is released: a reader woken while it
            // is held would block on it at once (two more context switches
            // per wake-up, with the reader pinned beside this shard). Taking
            // the lock is what orders this wake-up after a sleeper's look.
            drop(generation);
            self.cvar.notify_all();
            return true;
        }
        false
    }

    /// The next message, urgent ones first, and whether it is urgent.
    pub(super) fn take(&self) -> Option<(Message, bool)> {
        // The urgent queue is usually empty: `is_empty` (SeqCst loads of its
        // head and tail, see `wake`) is cheaper than popping, which fences
        // when empty. The ordinary one is usually not: popping reads the slot
        // first, and the tail (the line the writer is writing) only when
        // empty, after a SeqCst fence.
        if !self.queues[1].is_empty()
            && let Some(message) = self.queues[1].pop()
        {
            return Some((message, true));
        }
        self.queues[0].pop().map(|message| (message, false))
    }

    /// Sleeps until a message comes or `timeout` passes.
    pub(super) fn wait(&self, timeout: Duration) -> Option<(Message, bool)> {
        let deadline = Instant::now() + timeout;
        let Ok(mut generation) = self.generation.lock() else {
            return self.take();
        };
        // Pairs with the load in `wake`.
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let taken = loop {
            // Before each look: a wake-up sent before it is not needed (the
            // look sees its push), one sent after it must come.
            self.notified.store(false, Ordering::SeqCst);
            if let Some(taken) = self.take() {
                break Some(taken);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break None;
            }
            // Under the lock since the look above: a wake-up after it bumps
            // the generation after this sleep began, and ends it.
            match self.cvar.wait_timeout(generation, left) {
                Ok((held, _)) => generation = held,
                Err(_) => {
                    self.sleepers.fetch_sub(1, Ordering::SeqCst);
                    return self.take();
                }
            }
        };
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        taken
    }

    /// Messages queued in one class.
    pub(super) fn len(&self, urgent: bool) -> usize {
        self.queues[usize::from(urgent)].len()
    }

    /// Messages queued in both.
    pub(super) fn total(&self) -> usize {
        self.len(false) + self.len(true)
    }

    /// Room of one class's queue.
    pub(super) fn capacity(&self) -> usize {
        self.queues[0].capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn message(n: u8) -> Message {
        Message {
            from: "peer".into(),
            stream_id: 1,
            data: bytes::Bytes::from(vec![n]),
        }
    }

    #[test]
    fn urgent_first_then_order_and_bounds() {
        let inbox = AppInbox::new(2);
        inbox.push(message(1), false).unwrap();
        inbox.push(message(2), false).unwrap();
        assert!(inbox.push(message(3), false).is_err(), "full");
        inbox.push(message(9), true).unwrap();
        assert_eq!(inbox.total(), 3);
        let order: Vec<(u8, bool)> = std::iter::from_fn(|| inbox.take())
            .map(|(m, urgent)| (m.data[0], urgent))
            .collect();
        assert_eq!(order, [(9, true), (1, false), (2, false)]);
        assert!(inbox.wait(Duration::from_millis(5)).is_none(), "times out empty");
    }

    /// Pushes with one wake per batch from one thread, several sleeping
    /// readers: every message is read once, nobody sleeps through a batch.
    #[test]
    fn batched_wakes_reach_every_sleeper() {
        let inbox = Arc::new(AppInbox::new(64));
        const TOTAL: usize = 200_000;
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let inbox = inbox.clone();
                std::thread::spawn(move || {
                    let mut got = 0usize;
                    while let Some((m, _)) = inbox.wait(Duration::from_secs(2)) {
                        if m.data.is_empty() {
                            break;
                        }
                        got += 1;
                    }
                    got
                })
            })
            .collect();
        let mut sent = 0;
        while sent < TOTAL {
            let batch = (sent % 7) + 1;
            for _ in 0..batch.min(TOTAL - sent) {
                let mut m = message(1);
                while let Err(back) = inbox.push(m, false) {
                    m = back;
                    inbox.wake();
                    std::thread::yield_now();
                }
                sent += 1;
            }
            inbox.wake();
        }
        for _ in 0..3 {
            let mut stop = Message {
                data: bytes::Bytes::new(),
                ..message(0)
            };
            while let Err(back) = inbox.push(stop, false) {
                stop = back;
                inbox.wake();
                std::thread::yield_now();
            }
            inbox.wake();
        }
        let got: usize = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert_eq!(got, TOTAL);
    }
}
