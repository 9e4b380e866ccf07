//! The application's receive queues (ordinary and urgent), with wake-ups
//! decoupled from pushes.
//!
//! A shard pushes every message a frame completes and wakes a sleeping reader
//! once, after the frame ([`AppInbox::wake`]); a channel that wakes its reader
//! on each push made the reader, pinned beside its shard, preempt the shard on
//! every message (two context switches per 64 B message). Same-process
//! senders wake after each message; the check is a load of a counter that
//! only sleeping readers write.
//!
//! Same-process senders have queues of their own whose entries name the
//! sender by an index ([`MemEntry`]): 56-byte queue slots instead of
//! [`Message`]'s 72, which is what a message costs in cache lines moved from
//! the sending core to the reading one.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;

use super::{Message, SmolStr};
use crate::stream::StreamId;

/// A same-process message as queued: the sender is an index into the
/// receiving inbox's names ([`AppInbox::mem_sender`]), so that the entry is
/// 48 bytes (a `Message`, with the name inline, is 64).
#[derive(Debug)]
pub(super) struct MemEntry {
    pub(super) data: Bytes,
    pub(super) stream_id: StreamId,
    pub(super) sender: u32,
}

const _: () = assert!(std::mem::size_of::<MemEntry>() == 48);

/// Same-process entries taken between two looks at the reader's pace
/// ([`AppInbox::let_senders_ahead`]).
const LOCKSTEP_LOOK: u32 = 64;
/// `LOCKSTEP_LOOK` entries in less than this (4 M msgs/s or more): streaming.
const LOCKSTEP_FAST: Duration = Duration::from_micros(16);
/// A queue shorter than this has the reader right behind the senders.
const LOCKSTEP_SHORT: usize = 64;
/// How long the reader lets the senders run ahead.
const LOCKSTEP_LEAD: Duration = Duration::from_micros(4);

/// Whether a reader that took `LOCKSTEP_LOOK` entries in `took` (`None`:
/// the first look) and sees `queued` more, in a queue of `capacity`, is
/// right behind a streaming sender. A queue too small for a batch never
/// waits: its sender would be refused instead.
fn in_lockstep(took: Option<Duration>, queued: usize, capacity: usize) -> bool {
    took.is_some_and(|took| took < LOCKSTEP_FAST) && queued < LOCKSTEP_SHORT && capacity >= 4 * LOCKSTEP_SHORT
}

thread_local! {
    /// Per reading thread: same-process entries taken since the last look
    /// at the pace, and when that look was.
    static LOCKSTEP: Cell<(u32, Option<Instant>)> = const { Cell::new((0, None)) };
    /// Per reading thread: whether the same-process queue goes first the
    /// next time both ordinary queues hold messages (neither starves).
    static MEM_FIRST: Cell<bool> = const { Cell::new(false) };
}

pub(super) struct AppInbox {
    /// Indexed by "urgent": messages the shards deliver.
    queues: [ArrayQueue<Message>; 2],
    /// Indexed by "urgent": same-process senders' messages; made when the
    /// first such sender registers.
    mem: OnceLock<[ArrayQueue<MemEntry>; 2]>,
    /// Same-process senders' names by index (see [`MemEntry`]). It only
    /// grows: one name per same-process node that ever sent here.
    mem_names: boxcar::Vec<SmolStr>,
    mem_index: Mutex<HashMap<SmolStr, u32>>,
    /// The last message a reader took came from a same-process sender
    /// (see [`AppInbox::expects_mem`]); written by readers when it changes.
    mem_recent: CachePadded<AtomicBool>,
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
            mem: OnceLock::new(),
            mem_names: boxcar::Vec::new(),
            mem_index: Mutex::new(HashMap::new()),
            mem_recent: CachePadded::new(AtomicBool::new(false)),
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

    /// The index same-process sender `name` puts in its [`MemEntry`]s (the
    /// same for every route of that name: its messages keep their order).
    pub(super) fn mem_sender(&self, name: &SmolStr) -> u32 {
        self.mem_queues();
        let mut index = self.mem_index.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *index.entry(name.clone()).or_insert_with(|| {
            // Pushed under the lock: indices are handed out in order.
            let at = self.mem_names.push(name.clone());
            u32::try_from(at).unwrap_or(u32::MAX)
        })
    }

    fn mem_queues(&self) -> &[ArrayQueue<MemEntry>; 2] {
        let capacity = self.capacity();
        self.mem
            .get_or_init(|| [ArrayQueue::new(capacity), ArrayQueue::new(capacity)])
    }

    /// Queues a same-process sender's message without waking anyone; `Err`
    /// gives it back when that queue is full. Inlined into the sender's path
    /// (`mem::send`): left out of line by an unrelated change, mem 64 B lost
    /// 8-15 % (perf/README.md item 21).
    #[inline]
    pub(super) fn push_mem(&self, entry: MemEntry, urgent: bool) -> Result<(), MemEntry> {
        self.mem_queues()[usize::from(urgent)].push(entry)
    }

    /// Whether the last message taken came from a same-process sender:
    /// the next one is then likely a moment away (a same-process peer
    /// answers in well under a microsecond), while a sleeping reader's
    /// wake-up costs its sender tens.
    pub(super) fn expects_mem(&self) -> bool {
        self.mem_recent.load(Ordering::Relaxed)
    }

    /// A reader looked for a same-process message in vain: stop expecting
    /// one until the next comes.
    pub(super) fn stop_expecting_mem(&self) {
        self.note_source(false);
    }

    fn note_source(&self, mem: bool) {
        if self.mem_recent.load(Ordering::Relaxed) != mem {
            self.mem_recent.store(mem, Ordering::Relaxed);
        }
    }

    fn mem_message(&self, entry: MemEntry) -> Message {
        self.note_source(true);
        Message {
            from: self.mem_names.get(entry.sender as usize).cloned().unwrap_or_default(),
            stream_id: entry.stream_id,
            data: entry.data,
        }
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
        // The urgent queues are usually empty: `is_empty` (SeqCst loads of
        // head and tail, see `wake`) is cheaper than popping, which fences
        // when empty. The ordinary one in use is usually not: popping reads
        // the slot first, and the tail (the line the writer is writing) only
        // when empty, after a SeqCst fence.
        if !self.queues[1].is_empty()
            && let Some(message) = self.queues[1].pop()
        {
            self.note_source(false);
            return Some((message, true));
        }
        let Some(mem) = self.mem.get() else {
            return self.queues[0].pop().map(|message| (message, false));
        };
        if !mem[1].is_empty()
            && let Some(entry) = mem[1].pop()
        {
            return Some((self.mem_message(entry), true));
        }
        // A node usually hears from one kind of sender at a time: the
        // shards' queue is looked at without popping, the other popped.
        if !self.queues[0].is_empty() {
            let mem_first = MEM_FIRST.with(|first| first.replace(!first.get()));
            if mem_first && let Some(entry) = mem[0].pop() {
                return Some((self.mem_message(entry), false));
            }
            if let Some(message) = self.queues[0].pop() {
                self.note_source(false);
                return Some((message, false));
            }
        }
        let entry = mem[0].pop()?;
        self.let_senders_ahead(&mem[0]);
        Some((self.mem_message(entry), false))
    }

    /// Breaks the lockstep of a reader right behind a streaming
    /// same-process sender: popping each entry as soon as it lands takes
    /// the line the sender writes next, so every message costs a line
    /// transfer each way (mem 64 B 10-14 M msgs/s on the Intel machine,
    /// 14-17 M when profiler interrupts happened to break the lockstep).
    /// Every `LOCKSTEP_LOOK` entries: if they came faster than
    /// `LOCKSTEP_FAST` and the queue is still short, the reader yields its
    /// core for `LOCKSTEP_LEAD` while the senders get a batch ahead (23-25
    /// M; a sender on the same core runs meanwhile). A request-reply pair
    /// never comes that fast, and never waits.
    fn let_senders_ahead(&self, queue: &ArrayQueue<MemEntry>) {
        LOCKSTEP.with(|cell| {
            let (taken, since) = cell.get();
            let taken = taken + 1;
            if taken < LOCKSTEP_LOOK {
                cell.set((taken, since));
                return;
            }
            let now = Instant::now();
            let took = since.map(|since| now.duration_since(since));
            let now = if in_lockstep(took, queue.len(), queue.capacity()) {
                // Yielding: a sender on the same core gets it meanwhile.
                while now.elapsed() < LOCKSTEP_LEAD {
                    std::thread::yield_now();
                }
                Instant::now()
            } else {
                now
            };
            cell.set((0, Some(now)));
        });
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

    /// Messages the shards queued in one class.
    pub(super) fn len(&self, urgent: bool) -> usize {
        self.queues[usize::from(urgent)].len()
    }

    /// Messages same-process senders queued in one class.
    pub(super) fn mem_len(&self, urgent: bool) -> usize {
        self.mem.get().map_or(0, |mem| mem[usize::from(urgent)].len())
    }

    /// Messages queued in all.
    pub(super) fn total(&self) -> usize {
        [false, true]
            .map(|urgent| self.len(urgent) + self.mem_len(urgent))
            .iter()
            .sum()
    }

    /// Room of each queue.
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

    #[test]
    fn the_reader_waits_only_right_behind_a_fast_sender() {
        let fast = Some(LOCKSTEP_FAST / 2);
        assert!(in_lockstep(fast, 0, 8192));
        assert!(in_lockstep(fast, LOCKSTEP_SHORT - 1, 8192));
        // The first look has no pace yet.
        assert!(!in_lockstep(None, 0, 8192));
        // A request-reply pair, or a slow sender: never.
        assert!(!in_lockstep(Some(LOCKSTEP_FAST), 0, 8192));
        assert!(!in_lockstep(Some(Duration::from_millis(1)), 0, 8192));
        // Behind already: the senders are ahead.
        assert!(!in_lockstep(fast, LOCKSTEP_SHORT, 8192));
        // No room for a batch: the senders would be refused.
        assert!(!in_lockstep(fast, 0, 4));
        assert!(!in_lockstep(fast, 0, 4 * LOCKSTEP_SHORT - 1));
    }

    /// A sender streaming through the same-process queue while the reader
    /// takes (and, right behind it, waits for it to get ahead): every entry
    /// once, in order.
    #[test]
    fn a_streaming_same_process_sender_keeps_its_order() {
        const N: u32 = 200_000;
        let inbox = Arc::new(AppInbox::new(8192));
        let sender = inbox.mem_sender(&SmolStr::new("streamer"));
        let writer = {
            let inbox = inbox.clone();
            std::thread::spawn(move || {
                for n in 0..N {
                    let mut entry = MemEntry {
                        data: bytes::Bytes::copy_from_slice(&n.to_le_bytes()),
                        stream_id: 3,
                        sender,
                    };
                    while let Err(back) = inbox.push_mem(entry, false) {
                        entry = back;
                        std::hint::spin_loop();
                    }
                }
            })
        };
        let mut next = 0u32;
        while next < N {
            if let Some((m, urgent)) = inbox.take() {
                assert!(!urgent);
                assert_eq!(&*m.from, "streamer");
                assert_eq!(u32::from_le_bytes([m.data[0], m.data[1], m.data[2], m.data[3]]), next);
                next += 1;
            }
        }
        writer.join().expect("writer");
        assert!(inbox.take().is_none(), "nothing more");
    }

    fn entry(inbox: &AppInbox, from: &str, n: u8) -> MemEntry {
        MemEntry {
            data: bytes::Bytes::from(vec![n]),
            stream_id: 2,
            sender: inbox.mem_sender(&SmolStr::new(from)),
        }
    }

    /// Same-process senders' entries come out as messages with their
    /// sender's name; urgent ones of either kind first; with both ordinary
    /// queues holding messages the reader alternates between them, each in
    /// its own order.
    #[test]
    fn same_process_entries_name_their_sender_and_share_the_reader() {
        let inbox = AppInbox::new(8);
        assert_eq!(inbox.mem_len(false), 0, "no same-process queue before a sender");
        let long = "a-same-process-node-name-longer-than-23-bytes";
        assert_eq!(inbox.mem_sender(&SmolStr::new("x")), 0);
        assert_eq!(inbox.mem_sender(&SmolStr::new(long)), 1);
        assert_eq!(inbox.mem_sender(&SmolStr::new("x")), 0, "one index per name");
        for n in 1..=3 {
            inbox.push(message(n), false).unwrap();
            inbox
                .push_mem(entry(&inbox, if n == 2 { long } else { "x" }, 10 + n), false)
                .unwrap();
        }
        inbox.push_mem(entry(&inbox, "x", 99), true).unwrap();
        inbox.push(message(98), true).unwrap();
        assert_eq!(inbox.total(), 8);
        let mut taken: Vec<(String, u8, bool)> = std::iter::from_fn(|| inbox.take())
            .map(|(m, urgent)| (m.from.to_string(), m.data[0], urgent))
            .collect();
        assert_eq!(taken[..2], [("peer".into(), 98, true), ("x".into(), 99, true)]);
        let ordinary = taken.split_off(2);
        assert!(ordinary.iter().all(|(_, _, urgent)| !urgent));
        let shards: Vec<u8> = ordinary.iter().filter(|m| m.0 == "peer").map(|m| m.1).collect();
        let mem: Vec<(&str, u8)> = ordinary
            .iter()
            .filter(|m| m.0 != "peer")
            .map(|m| (m.0.as_str(), m.1))
            .collect();
        assert_eq!(shards, [1, 2, 3]);
        assert_eq!(mem, [("x", 11), (long, 12), ("x", 13)]);
        // Alternating: the first four taken hold two of each kind.
        let kinds: Vec<bool> = ordinary[..4].iter().map(|m| m.0 == "peer").collect();
        assert_eq!(kinds.iter().filter(|&&shard| shard).count(), 2, "{ordinary:?}");
        assert_eq!(inbox.total(), 0);
    }

    /// `expects_mem` follows where the last message taken came from.
    #[test]
    fn the_reader_remembers_where_its_last_message_came_from() {
        let inbox = AppInbox::new(4);
        assert!(!inbox.expects_mem());
        inbox.push_mem(entry(&inbox, "x", 1), false).unwrap();
        inbox.push(message(2), true).unwrap();
        assert_eq!(inbox.take().map(|(m, _)| m.data[0]), Some(2));
        assert!(!inbox.expects_mem(), "a shard's message");
        assert_eq!(inbox.take().map(|(m, _)| m.data[0]), Some(1));
        assert!(inbox.expects_mem(), "a same-process sender's");
        assert!(inbox.take().is_none());
        assert!(inbox.expects_mem(), "unchanged by an empty look");
        inbox.stop_expecting_mem();
        assert!(!inbox.expects_mem(), "a long look ran dry");
        inbox.push_mem(entry(&inbox, "x", 4), false).unwrap();
        assert_eq!(inbox.take().map(|(m, _)| m.data[0]), Some(4));
        assert!(inbox.expects_mem(), "expected again");
        inbox.push(message(3), false).unwrap();
        assert_eq!(inbox.take().map(|(m, _)| m.data[0]), Some(3));
        assert!(!inbox.expects_mem());
    }

    /// The same-process queue is bounded by the same capacity, per class.
    #[test]
    fn same_process_queue_is_bounded() {
        let inbox = AppInbox::new(2);
        inbox.push_mem(entry(&inbox, "x", 1), false).unwrap();
        inbox.push_mem(entry(&inbox, "x", 2), false).unwrap();
        assert!(inbox.push_mem(entry(&inbox, "x", 3), false).is_err(), "full");
        inbox.push_mem(entry(&inbox, "x", 4), true).unwrap();
        assert_eq!((inbox.mem_len(false), inbox.mem_len(true), inbox.len(false)), (2, 1, 0));
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
