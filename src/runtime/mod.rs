//! Thread-per-core shards: one glommio `LocalExecutor` per shard, pinned to
//! its core, with a lock-free inbox for work coming from other threads.
//!
//! ```text
//!   any thread ──submit(job)──► SegQueue ──(1 byte on a socketpair, only
//!                                            when the shard may be parked)──►
//!   shard thread: inbox task drains the queue and runs each job in place
//! ```
//!
//! A shard owns what runs on it (listeners, connections, endpoints); nothing
//! migrates between shards. Two task queues per shard: [`TaskClass::Latency`]
//! (bulk loops hand the shard to it, see [`latency`]) for frame-sync traffic and
//! [`TaskClass::Throughput`] for bulk work.
//!
//! Memory: glommio registers `3 × io_memory` of locked memory per executor
//! (default 10 MiB each). This machine's `RLIMIT_MEMLOCK` is 8 MiB, so the
//! default here is 512 KiB (1.5 MiB locked per shard): the runtime starts as
//! an ordinary user. Network IO does not use that memory; only file IO does.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_queue::SegQueue;

mod latency;
use futures_lite::AsyncReadExt;
use glommio::{Latency, LocalExecutorBuilder, Placement, Shares, TaskQueueHandle};
pub use latency::{WATCH_INTERVAL, latency_wanted, readable, yield_to_latency};

thread_local! {
    /// This shard's inbox (on shard threads).
    static SHARD_INBOX: RefCell<Option<Arc<Inbox>>> = const { RefCell::new(None) };
}

/// On a shard about to hand its core to an application thread for a
/// moment (`sched_yield`): jobs submitted until [`run_submitted_soon`] send
/// no wake-up byte (a system call for the submitter, and a few passes
/// through glommio's rings before the shard reads it), since the shard
/// looks at its jobs right after.
pub fn expect_submissions() {
    SHARD_INBOX.with(|i| {
        if let Some(inbox) = i.borrow().as_ref() {
            inbox.notified.store(true, Ordering::SeqCst);
        }
    });
}

/// On a shard, after [`expect_submissions`]: submitters send wake-up bytes
/// again, and the jobs submitted meanwhile run as soon as the current task
/// yields (the inbox task is woken directly). Nothing elsewhere.
pub fn run_submitted_soon() {
    SHARD_INBOX.with(|i| {
        let inbox = i.borrow();
        let Some(inbox) = inbox.as_ref() else {
            return;
        };
        // A read-modify-write: if a submitter saw the flag up (and skipped
        // its byte), this reads its write and so sees its job; if it comes
        // later, it finds the flag down and sends a byte. A byte still in
        // flight from before stays harmless (the inbox task reads them all).
        inbox.notified.swap(false, Ordering::SeqCst);
        if !inbox.jobs.is_empty() {
            inbox.hurry.store(true, Ordering::Release);
            latency::look_hurry();
        }
    });
}

/// A unit of work run on a shard's thread.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// Runtime settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Number of shards; 0 means one per available core.
    pub shards: usize,
    /// Pin each shard to one core (core `first_core + index`, wrapping).
    pub pin: bool,
    /// Core of shard 0 when pinning.
    pub first_core: usize,
    /// glommio io memory per shard (3 × this is locked); see the module docs.
    pub io_memory: usize,
    /// io_uring submission depth.
    pub ring_depth: usize,
    /// Busy-poll this long before parking (lower latency, burns CPU).
    pub spin_before_park: Option<Duration>,
    /// Busy-poll before parking for a window that adapts between nothing
    /// and this (unless `spin_before_park` is set; default 50 µs): it opens
    /// while wake-ups come within four times this of a park (request-reply
    /// traffic, whose replies then come within it), and closes after a few
    /// longer waits, so an idle shard burns next to no CPU (glommio patch 7,
    /// perf/README.md item 36).
    pub adaptive_spin: Option<Duration>,
    /// Every shard keeps a timer this often (see [`stall_guard`]): a
    /// backstop, the longest a shard could sleep with runnable tasks if
    /// glommio parked it wrongly again.
    pub stall_guard: Duration,
    /// Thread name prefix.
    pub name: String,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            shards: 0,
            pin: true,
            first_core: 0,
            io_memory: 512 * 1024,
            ring_depth: 128,
            spin_before_park: None,
            adaptive_spin: Some(Duration::from_micros(50)),
            stall_guard: Duration::from_millis(100),
            name: "atbus".to_string(),
        }
    }
}

/// Why the runtime did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The executor could not be created (io_uring setup, memlock limit...).
    #[error(
        "shard {shard}: cannot start the glommio executor: {source} (io_memory {io_memory} B locks 3x that; check RLIMIT_MEMLOCK)"
    )]
    Executor {
        /// The shard.
        shard: usize,
        /// Configured io memory.
        io_memory: usize,
        /// The cause.
        source: io::Error,
    },
    /// A socketpair for the wake-up channel could not be made.
    #[error("shard {shard}: cannot create the wake-up socketpair: {source}")]
    Wakeup {
        /// The shard.
        shard: usize,
        /// The cause.
        source: io::Error,
    },
}

/// Which of a shard's two task queues a task runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskClass {
    /// Frame-sync traffic: scheduled first, preempts bulk work.
    Latency,
    /// Bulk traffic and everything else.
    Throughput,
}

/// The inbox of one shard, shared with every thread that submits to it.
struct Inbox {
    jobs: SegQueue<Job>,
    /// Set when a wake-up byte is in flight or the shard is draining.
    notified: AtomicBool,
    /// Raised with frame-sync work queued (see [`ShardHandle::hurry`]).
    hurry: Arc<AtomicBool>,
    stopping: AtomicBool,
    waker: StdUnixStream,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("jobs", &self.jobs.len())
            .finish_non_exhaustive()
    }
}

impl Inbox {
    fn push(&self, job: Job) {
        self.jobs.push(job);
        // One byte per sleep: if a byte is already pending (or the shard is
        // draining and will look again), skip the syscall.
        if !self.notified.swap(true, Ordering::AcqRel) {
            // A full socket buffer means bytes are pending: the shard wakes anyway.
            let _ = (&self.waker).write(&[1]);
        }
    }
}

/// A handle to one shard, usable from any thread.
#[derive(Clone, Debug)]
pub struct ShardHandle {
    index: usize,
    inbox: Arc<Inbox>,
}

impl ShardHandle {
    /// The shard's index in its runtime.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Runs `job` on the shard's thread, soon. Jobs from one thread run in
    /// the order they were submitted.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        self.inbox.push(Box::new(job));
    }

    /// Tells the shard that latency-class work (a frame-sync send) is
    /// queued for it: if it is busy with bulk work, its bulk tasks step
    /// aside at their next yield point and the inbox task runs the jobs
    /// submitted so far. A flag; the jobs themselves still go by `submit`.
    pub fn hurry(&self) {
        self.inbox.hurry.store(true, Ordering::Release);
    }
}

thread_local! {
    static CURRENT: std::cell::RefCell<Option<ShardContext>> = const { std::cell::RefCell::new(None) };
}

/// What code running on a shard can ask about the shard it runs on.
#[derive(Clone, Debug)]
pub struct ShardContext {
    /// The shard's index.
    pub index: usize,
    /// Task queue of [`TaskClass::Latency`].
    pub latency: TaskQueueHandle,
    /// Task queue of [`TaskClass::Throughput`].
    pub throughput: TaskQueueHandle,
}

impl ShardContext {
    /// The shard the calling thread runs, if any.
    pub fn current() -> Option<ShardContext> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// The task queue for a class.
    pub fn queue(&self, class: TaskClass) -> TaskQueueHandle {
        match class {
            TaskClass::Latency => self.latency,
            TaskClass::Throughput => self.throughput,
        }
    }
}

/// Spawns a detached task on the current shard in the given class.
///
/// # Panics
/// Outside a shard thread.
pub fn spawn(class: TaskClass, future: impl std::future::Future<Output = ()> + 'static) {
    let queue = ShardContext::current().map(|c| c.queue(class));
    let task = match queue {
        Some(queue) => glommio::spawn_local_into(future, queue),
        None => Ok(glommio::spawn_local(future)),
    };
    match task {
        Ok(task) => {
            task.detach();
        }
        // Only fails for a queue of another executor; ours are local.
        Err(e) => tracing::error!("spawn failed: {e}"),
    }
}

/// Runs `future` as a task of the given class on the current shard and
/// waits for its result (inline outside a shard).
pub async fn run_in<T: 'static>(class: TaskClass, future: impl std::future::Future<Output = T> + 'static) -> T {
    let Some(queue) = ShardContext::current().map(|c| c.queue(class)) else {
        return future.await;
    };
    match glommio::spawn_local_into(future, queue) {
        Ok(task) => task.await,
        // Only fails for a queue of another executor; ours are local.
        Err(e) => panic!("spawn into this shard's own queue failed: {e}"),
    }
}

/// N pinned shards.
#[derive(Debug)]
pub struct Runtime {
    shards: Vec<ShardHandle>,
    threads: Vec<JoinHandle<()>>,
}

impl Runtime {
    /// Starts the shards; returns once every executor runs.
    pub fn start(config: &RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let count = match config.shards {
            0 => cores.len().max(1),
            n => n,
        };
        let mut runtime = Runtime {
            shards: Vec::with_capacity(count),
            threads: Vec::with_capacity(count),
        };
        for index in 0..count {
            let (waker, wake_rx) =
                StdUnixStream::pair().map_err(|source| RuntimeError::Wakeup { shard: index, source })?;
            waker
                .set_nonblocking(true)
                .and_then(|()| wake_rx.set_nonblocking(true))
                .map_err(|source| RuntimeError::Wakeup { shard: index, source })?;
            let inbox = Arc::new(Inbox {
                jobs: SegQueue::new(),
                notified: AtomicBool::new(false),
                hurry: Arc::default(),
                stopping: AtomicBool::new(false),
                waker,
            });
            let placement = match (config.pin, cores.is_empty()) {
                (true, false) => Placement::Fixed(cores[(config.first_core + index) % cores.len()].id),
                _ => Placement::Unbound,
            };
            let mut builder = LocalExecutorBuilder::new(placement)
                .name(&format!("{}-{index}", config.name))
                .io_memory(config.io_memory)
                .ring_depth(config.ring_depth);
            if let Some(spin) = config.spin_before_park {
                builder = builder.spin_before_park(spin);
            } else if let Some(max) = config.adaptive_spin {
                builder = builder.adaptive_spin(max);
            }
            let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), io::Error>>(1);
            let shard_inbox = inbox.clone();
            let stall_guard = config.stall_guard;
            let spawned = builder.spawn(move || async move {
                shard_main(index, shard_inbox, wake_rx, stall_guard, ready_tx).await;
            });
            let handle = match spawned {
                Ok(handle) => handle,
                Err(e) => {
                    runtime.stop();
                    return Err(RuntimeError::Executor {
                        shard: index,
                        io_memory: config.io_memory,
                        source: io::Error::other(e.to_string()),
                    });
                }
            };
            let started = ready_rx
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("executor thread exited during start")));
            let thread = std::thread::spawn(move || {
                if let Err(e) = handle.join() {
                    tracing::error!("shard {index} ended with an error: {e}");
                }
            });
            runtime.shards.push(ShardHandle { index, inbox });
            runtime.threads.push(thread);
            if let Err(source) = started {
                runtime.stop();
                return Err(RuntimeError::Executor {
                    shard: index,
                    io_memory: config.io_memory,
                    source,
                });
            }
        }
        Ok(runtime)
    }

    /// The shards.
    pub fn shards(&self) -> &[ShardHandle] {
        &self.shards
    }

    /// Shard `index` (modulo the shard count).
    pub fn shard(&self, index: usize) -> &ShardHandle {
        &self.shards[index % self.shards.len()]
    }

    /// Stops every shard after the jobs already submitted, and joins them.
    /// Tasks still running on a shard are dropped.
    pub fn stop(&mut self) {
        for shard in &self.shards {
            shard.inbox.stopping.store(true, Ordering::Release);
            shard.inbox.push(Box::new(|| {}));
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn shard_main(
    index: usize,
    inbox: Arc<Inbox>,
    wake_rx: StdUnixStream,
    stall_guard_every: Duration,
    ready: crossbeam_channel::Sender<Result<(), io::Error>>,
) {
    let executor = glommio::executor();
    // Not `Latency::Matters`: bulk tasks hand the shard to this queue
    // themselves (`latency::yield_to_latency`), and glommio's short
    // preempt timer for such a queue is what most often trips its
    // park-while-runnable race (see `stall_guard`): a timer that fires
    // between an io poll and the first `need_preempt` check.
    let latency = executor.create_task_queue(Shares::Static(1000), Latency::NotImportant, "latency");
    let throughput = executor.create_task_queue(Shares::Static(1000), Latency::NotImportant, "throughput");
    CURRENT.with(|c| {
        *c.borrow_mut() = Some(ShardContext {
            index,
            latency,
            throughput,
        })
    });
    let _ = ready.send(Ok(()));
    match glommio::spawn_local_into(stall_guard(stall_guard_every), throughput) {
        Ok(task) => {
            task.detach();
        }
        Err(e) => tracing::error!("shard {index}: cannot start the stall guard: {e}"),
    }
    // The inbox carries sends from application threads, frame-sync ones
    // included: it runs in the latency queue, so its wake-up preempts bulk
    // work instead of waiting for the throughput queue's slice to end.
    let drained = glommio::spawn_local_into(drain_inbox(index, inbox.clone(), wake_rx), latency);
    match drained {
        Ok(task) => task.await,
        Err(e) => tracing::error!("shard {index}: cannot start the inbox task: {e}"),
    }
    CURRENT.with(|c| *c.borrow_mut() = None);
}

/// Keeps a timer pending on the shard, so that it never sleeps longer than
/// `every`: a backstop.
///
/// glommio 0.9.0 can park an executor whose task queues are still runnable:
/// `run_task_queues` answers "nothing ran" both when there was nothing to
/// run and when `need_preempt` was already true before its first queue (a
/// latency-ring completion that woke no task, such as a fired preempt
/// timer or a cancelled receive, landing between its io poll and that
/// check), and the executor parks on either. Parked, it sleeps in
/// `io_uring_enter` until some io or timer completes: here a node start
/// waited for a shard's job until a debugger's attach interrupted the
/// sleep, and connections stalled until their next ping timer. The glommio
/// we build (.cargo/patched/glommio, patch 2; tests/glommio_patches.rs)
/// no longer parks then; this timer bounds any such sleep we do not know
/// of. It used to fire every 2 ms, and each wake-up of an idle shard cost
/// ~60 µs of its core and disturbed the threads beside it (bare sockets in
/// the same process ran 30 % slower; perf/README.md item 22).
async fn stall_guard(every: Duration) {
    loop {
        glommio::timer::sleep(every).await;
    }
}

/// Runs the jobs other threads submit, until the runtime stops: woken by a
/// byte on its socket (a readiness poll on glommio's main ring: a busy
/// shard gets to it between task-queue runs), or sooner, by a bulk yield
/// point that saw the hurry flag ([`ShardHandle::hurry`]).
async fn drain_inbox(index: usize, inbox: Arc<Inbox>, wake_rx: StdUnixStream) {
    // SAFETY: the fd comes from a socketpair we own and hand over here.
    let mut wake = unsafe { glommio::net::UnixStream::from_raw_fd(wake_rx.into_raw_fd()) };
    latency::set_hurry(Some(inbox.hurry.clone()));
    SHARD_INBOX.with(|i| *i.borrow_mut() = Some(inbox.clone()));
    let mut buf = [0u8; 256];
    loop {
        // Clear before draining: a push after this point sends a new byte.
        inbox.notified.store(false, Ordering::Release);
        inbox.hurry.store(false, Ordering::Release);
        while let Some(job) = inbox.jobs.pop() {
            job();
        }
        if inbox.stopping.load(Ordering::Acquire) {
            break;
        }
        let woke = futures_lite::future::or(async { Some(wake.read(&mut buf).await) }, async {
            latency::hurried().await;
            None
        })
        .await;
        match woke {
            None | Some(Ok(1..)) => {}
            Some(Ok(0)) => break,
            Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Some(Err(e)) => {
                tracing::error!("shard {index}: wake-up socket failed: {e}");
                break;
            }
        }
    }
    latency::set_hurry(None);
    SHARD_INBOX.with(|i| *i.borrow_mut() = None);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpinned(shards: usize) -> RuntimeConfig {
        RuntimeConfig {
            shards,
            pin: false,
            ..RuntimeConfig::default()
        }
    }

    #[test]
    fn jobs_run_on_their_shard_in_order() {
        let runtime = Runtime::start(&unpinned(2)).expect("runtime starts under the default memlock limit");
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..1000 {
            let tx = tx.clone();
            runtime.shard(i % 2).submit(move || {
                let shard = ShardContext::current().map(|c| c.index);
                let _ = tx.send((i, shard));
            });
        }
        let mut last = [None::<usize>; 2];
        for _ in 0..1000 {
            let (i, shard) = rx.recv_timeout(Duration::from_secs(5)).expect("job ran");
            assert_eq!(shard, Some(i % 2));
            assert!(
                last[i % 2].is_none_or(|prev| prev < i),
                "jobs of one submitter run in order"
            );
            last[i % 2] = Some(i);
        }
    }

    /// Jobs submitted while the shard expects them (no wake-up byte), just
    /// before its look, or just after it (a byte again) all run.
    #[test]
    fn jobs_submitted_around_an_expected_window_run() {
        let runtime = Runtime::start(&unpinned(1)).expect("runtime starts");
        let shard = runtime.shard(0).clone();
        for round in 0..300u32 {
            let (ran_tx, ran_rx) = crossbeam_channel::bounded(1);
            let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);
            let submitter = {
                let shard = shard.clone();
                std::thread::spawn(move || {
                    go_rx.recv().expect("the shard says go");
                    if round % 3 == 2 {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    shard.submit(move || {
                        let _ = ran_tx.send(());
                    });
                })
            };
            // From a task of its own, as a reader task does: the inbox
            // task is waiting by then, not draining.
            shard.submit(move || {
                spawn(TaskClass::Throughput, async move {
                    glommio::timer::sleep(Duration::from_micros(200)).await;
                    expect_submissions();
                    let _ = go_tx.send(());
                    if round % 3 == 1 {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    run_submitted_soon();
                });
            });
            ran_rx
                .recv_timeout(Duration::from_secs(2))
                .unwrap_or_else(|_| panic!("round {round}: the job submitted around the window never ran"));
            submitter.join().expect("submitter");
        }
    }
}

/// A single-threaded notification: every waiter created before a
/// `notify()` completes.
#[derive(Default)]
pub struct Notify {
    generation: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
}

impl Notify {
    /// Wakes every waiter.
    pub fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Whether `notify` was ever called.
    pub fn is_set(&self) -> bool {
        self.generation.get() > 0
    }

    /// Completes at the next `notify()` after this call.
    pub fn notified(&self) -> impl Future<Output = ()> + '_ {
        let start = self.generation.get();
        std::future::poll_fn(move |cx| {
            if self.generation.get() != start {
                return Poll::Ready(());
            }
            let mut waiters = self.waiters.borrow_mut();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
    }
}
