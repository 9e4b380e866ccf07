//! How a shard busy with bulk work notices frame-sync traffic in time.
//!
//! glommio runs a task queue until it is empty or `need_preempt` says so
//! (a completion on its latency ring, or the preempt timer: 100 ms while no
//! latency task is runnable), and only between those runs does it submit
//! and reap io. A shard that always has bulk bytes to read or write would so
//! notice a latency connection's bytes late, and even then glommio gives the
//! woken latency queue a virtual runtime just above the bulk queue's, so the
//! bulk queue runs first once more. What closes that gap:
//!
//! - Latency-class tasks wait for io with [`readable`]: the io wait itself
//!   (a receive on the latency ring, which preempts once it is with the
//!   kernel), and a watch: the descriptor is listed for the shard's bulk
//!   loops, which at their yield points ([`yield_to_latency`]) look at every
//!   listed descriptor with one non-blocking `poll(2)` and wake the readers
//!   whose bytes are there.
//! - A latency task woken by io or by a bulk task (a handler sending an
//!   urgent reply) marks latency work as wanted ([`latency_wanted`]).
//! - [`yield_to_latency`] then yields the bulk task's queue at once, so the
//!   latency queue runs next.
//! - Frame-sync sends from application threads reach the shard through its
//!   inbox, whose wake-up byte a busy shard would also read late: they raise
//!   the shard's hurry flag ([`super::ShardHandle::hurry`]), which the same
//!   yield points check (one atomic load) to wake the inbox task.
//!
//! The watch costs one `poll(2)` per yield point at most every
//! [`WATCH_INTERVAL`], and nothing on a shard without waiting latency tasks.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// How often bulk yield points look at the watched descriptors at most.
pub const WATCH_INTERVAL: Duration = Duration::from_micros(10);

/// One latency-class task waiting for bytes on a descriptor.
struct Watched {
    fd: RawFd,
    waker: RefCell<Option<Waker>>,
    /// Set by a yield point that found the descriptor readable.
    ready: Cell<bool>,
}

thread_local! {
    /// A latency-class task was woken since bulk work last stepped aside.
    static WANTED: Cell<bool> = const { Cell::new(false) };
    /// The latency-class tasks of this shard waiting for bytes.
    static WATCH: RefCell<Vec<Rc<Watched>>> = const { RefCell::new(Vec::new()) };
    /// When a yield point last looked at the watched descriptors.
    static LAST_LOOK: Cell<Option<Instant>> = const { Cell::new(None) };
    /// This shard's hurry flag ([`super::ShardHandle::hurry`]) and the
    /// inbox task waiting for it.
    static HURRY: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
    static HURRY_WAKER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// Makes `flag` this shard's hurry flag (`None`: the inbox task ended).
pub(super) fn set_hurry(flag: Option<Arc<AtomicBool>>) {
    HURRY.with(|h| *h.borrow_mut() = flag);
}

/// Completes once another thread raised this shard's hurry flag (and
/// lowers it); pending forever on a shard without one.
pub(super) async fn hurried() {
    std::future::poll_fn(|cx| {
        let raised = HURRY.with(|h| h.borrow().as_ref().is_some_and(|f| f.swap(false, Ordering::AcqRel)));
        if raised {
            return Poll::Ready(());
        }
        HURRY_WAKER.with(|w| *w.borrow_mut() = Some(cx.waker().clone()));
        Poll::Pending
    })
    .await
}

/// Wakes the inbox task if the hurry flag is up. Whether it was.
pub(super) fn look_hurry() -> bool {
    let raised = HURRY.with(|h| h.borrow().as_ref().is_some_and(|f| f.load(Ordering::Acquire)));
    if raised && let Some(waker) = HURRY_WAKER.with(|w| w.borrow_mut().take()) {
        waker.wake();
    }
    raised
}

/// Tells this shard's bulk tasks that a latency-class task was woken: they
/// step aside at their next [`yield_to_latency`].
pub fn latency_wanted() {
    WANTED.with(|w| w.set(true));
}

/// A yield point for bulk (throughput-class) loops: gives the shard to the
/// latency queue when one of its tasks was woken or has bytes waiting, to
/// the reactor when glommio wants to preempt, and otherwise goes on at once.
pub async fn yield_to_latency() {
    let found = look_hurry() | look();
    if WANTED.with(|w| w.replace(false)) || found {
        glommio::executor().yield_task_queue_now().await;
    } else {
        glommio::yield_if_needed().await;
    }
}

/// Looks at the watched descriptors (at most every [`WATCH_INTERVAL`]) and
/// wakes the tasks whose bytes are there. Whether it woke any.
fn look() -> bool {
    WATCH.with(|watch| {
        let watch = watch.borrow();
        if watch.is_empty() {
            return false;
        }
        let now = Instant::now();
        let due = LAST_LOOK.with(|l| match l.get() {
            Some(last) if now.duration_since(last) < WATCH_INTERVAL => false,
            _ => {
                l.set(Some(now));
                true
            }
        });
        if !due {
            return false;
        }
        let mut fds: Vec<libc::pollfd> = watch
            .iter()
            .map(|w| libc::pollfd {
                fd: w.fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries; a
        // zero timeout never blocks. Every watched descriptor is open: its
        // reader holds the socket while it waits (see `readable`).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        if n <= 0 {
            return false;
        }
        let mut woke = false;
        for (w, p) in watch.iter().zip(&fds) {
            if p.revents != 0 && !w.ready.replace(true) {
                if let Some(waker) = w.waker.borrow_mut().take() {
                    waker.wake();
                }
                woke = true;
            }
        }
        woke
    })
}

/// Removes a wait from the watch when it ends (completed or dropped).
struct Unwatch(Rc<Watched>);

impl Drop for Unwatch {
    fn drop(&mut self) {
        WATCH.with(|watch| watch.borrow_mut().retain(|w| !Rc::ptr_eq(w, &self.0)));
    }
}

/// Waits until `fd` (open for as long as this runs) is probably readable:
/// `Some` with the output of `io_wait` (a receive on glommio's latency
/// ring, such as a one-byte peek) when it completes, `None` when a bulk
/// yield point saw the descriptor readable first. Marks latency work as
/// wanted when the task wakes.
pub async fn readable<F: Future>(fd: RawFd, io_wait: F) -> Option<F::Output> {
    struct Marking(Waker);
    impl std::task::Wake for Marking {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            // glommio wakes its io waiters on the shard's own thread.
            latency_wanted();
            self.0.wake_by_ref();
        }
    }
    let watched = Rc::new(Watched {
        fd,
        waker: RefCell::new(None),
        ready: Cell::new(false),
    });
    let mut io_wait = std::pin::pin!(io_wait);
    // The task's waker and the marking one made from it.
    let mut marking: Option<(Waker, Waker)> = None;
    let mut unwatch: Option<Unwatch> = None;
    std::future::poll_fn(move |cx| {
        if watched.ready.get() {
            return Poll::Ready(None);
        }
        let waker = match &marking {
            Some((task, w)) if task.will_wake(cx.waker()) => w.clone(),
            _ => {
                let w = Waker::from(Arc::new(Marking(cx.waker().clone())));
                marking = Some((cx.waker().clone(), w.clone()));
                w
            }
        };
        if let Poll::Ready(out) = io_wait.as_mut().poll(&mut std::task::Context::from_waker(&waker)) {
            return Poll::Ready(Some(out));
        }
        *watched.waker.borrow_mut() = Some(cx.waker().clone());
        if unwatch.is_none() {
            WATCH.with(|watch| watch.borrow_mut().push(watched.clone()));
            unwatch = Some(Unwatch(watched.clone()));
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
    use std::os::unix::net::UnixStream;

    use glommio::{Latency, LocalExecutorBuilder, Placement, Shares};

    use super::*;

    /// Bulk iterations at most: far more than the bytes need to be noticed
    /// through the watch, far fewer than glommio's preempt timer (set to a
    /// minute here) lets a task queue run.
    const LIMIT: u64 = 2_000_000;

    /// Runs `bulk` in a throughput queue beside `latency` in a latency queue
    /// on one executor whose preempt timer never fires during the test:
    /// only the mechanisms of this module can let the latency task run
    /// before the bulk task ends.
    fn race(latency: impl Future<Output = ()> + 'static, bulk: impl Future<Output = ()> + 'static) {
        let ex = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(512 * 1024)
            .preempt_timer(Duration::from_secs(60))
            .make()
            .expect("executor");
        ex.run(async move {
            let executor = glommio::executor();
            let lq = executor.create_task_queue(Shares::Static(1000), Latency::NotImportant, "l");
            let bq = executor.create_task_queue(Shares::Static(1000), Latency::NotImportant, "b");
            let l = glommio::spawn_local_into(latency, lq).expect("spawn");
            let b = glommio::spawn_local_into(bulk, bq).expect("spawn");
            b.await;
            // Not awaited: without this module's help it would still wait.
            drop(l);
        });
    }

    #[test]
    fn bytes_on_a_watched_socket_interrupt_a_busy_bulk_task() {
        let (tx, rx) = UnixStream::pair().expect("socketpair");
        rx.set_nonblocking(true).expect("nonblocking");
        let fd = rx.as_raw_fd();
        let ran = Rc::new(Cell::new(false));
        let seen_at = Rc::new(Cell::new(None::<u64>));
        let (l_ran, b_ran, b_seen) = (ran.clone(), ran.clone(), seen_at.clone());
        let dup = rx.try_clone().expect("dup");
        let latency = async move {
            // SAFETY: a duplicate owned by the probe.
            let probe = unsafe { glommio::net::UnixStream::from_raw_fd(dup.into_raw_fd()) };
            let woke = readable(fd, probe.peek(&mut [0u8; 1])).await;
            assert!(woke.is_none_or(|r| r.is_ok()));
            l_ran.set(true);
        };
        let mut tx = Some(tx);
        let bulk = async move {
            for i in 0..LIMIT {
                if b_ran.get() {
                    b_seen.set(Some(i));
                    break;
                }
                if i == 1000
                    && let Some(mut tx) = tx.take()
                {
                    tx.write_all(&[7]).expect("write");
                }
                yield_to_latency().await;
            }
        };
        race(latency, bulk);
        assert!(ran.get());
        let at = seen_at
            .get()
            .expect("the latency task ran while the bulk task was still busy");
        assert!(at > 1000, "it ran only after the byte was written (at {at})");
        assert!(
            WATCH.with(|w| w.borrow().is_empty()),
            "a finished wait leaves the watch"
        );
    }

    #[test]
    fn a_raised_hurry_flag_interrupts_a_busy_bulk_task() {
        let flag = Arc::new(AtomicBool::new(false));
        let ran = Rc::new(Cell::new(false));
        let seen_at = Rc::new(Cell::new(None::<u64>));
        let (l_ran, b_ran, b_seen) = (ran.clone(), ran.clone(), seen_at.clone());
        let (l_flag, b_flag) = (flag.clone(), flag.clone());
        let latency = async move {
            set_hurry(Some(l_flag));
            hurried().await;
            l_ran.set(true);
            set_hurry(None);
        };
        let bulk = async move {
            for i in 0..LIMIT {
                if b_ran.get() {
                    b_seen.set(Some(i));
                    break;
                }
                if i == 1000 {
                    // As another thread's `ShardHandle::hurry` does.
                    let raiser = b_flag.clone();
                    std::thread::spawn(move || raiser.store(true, Ordering::Release))
                        .join()
                        .expect("raiser");
                }
                yield_to_latency().await;
            }
        };
        race(latency, bulk);
        assert!(ran.get());
        let at = seen_at
            .get()
            .expect("the inbox task ran while the bulk task was still busy");
        assert!(at > 1000, "it ran only after the flag went up (at {at})");
        assert!(!flag.load(Ordering::Acquire), "the woken task lowered the flag");
    }

    #[test]
    fn a_wait_that_completes_by_io_leaves_the_watch_and_marks_latency_work() {
        let (mut tx, rx) = UnixStream::pair().expect("socketpair");
        let fd = rx.as_raw_fd();
        let ex = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(512 * 1024)
            .make()
            .expect("executor");
        ex.run(async move {
            // SAFETY: a duplicate owned by the probe.
            let probe = unsafe { glommio::net::UnixStream::from_raw_fd(rx.try_clone().expect("dup").into_raw_fd()) };
            let mut buf = [0u8; 1];
            let mut wait = std::pin::pin!(readable(fd, probe.peek(&mut buf)));
            assert!(
                futures_lite::future::poll_once(&mut wait).await.is_none(),
                "nothing to read yet"
            );
            assert_eq!(WATCH.with(|w| w.borrow().len()), 1, "a pending wait is watched");
            WANTED.with(|w| w.set(false));
            tx.write_all(&[1]).expect("write");
            let woke = wait.await;
            assert!(matches!(woke, Some(Ok(1))), "the peek completes: {woke:?}");
            assert!(WANTED.with(|w| w.get()), "its wake-up asked bulk work to step aside");
            assert!(WATCH.with(|w| w.borrow().is_empty()));
        });
    }
}
