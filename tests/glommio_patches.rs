//! The glommio we build is 0.9.0 with fixes of ours
//! (.cargo/patched/glommio/PATCHES.md). These tests hold each fix to what
//! it must keep: an executor that has runnable work does not sleep, and a
//! task woken from another thread is never left asleep, and a parked
//! executor wakes for its timers and its sockets.
//!
//! They run bare glommio executors with no timers and no io but their own:
//! a wrong park then sleeps for good, and the test fails on its timeout
//! instead of a backstop timer hiding it.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};

/// io memory for these executors: 3 × this is locked (RLIMIT_MEMLOCK is
/// 8 MiB for a normal user here), as the bus's own runtime does.
const IO_MEMORY: usize = 512 * 1024;

/// A bare executor (unpinned, the bus's io memory), with `preempt` as its
/// preempt timer if given.
fn executor(preempt: Option<Duration>) -> Result<LocalExecutor, String> {
    let builder = LocalExecutorBuilder::new(Placement::Unbound).io_memory(IO_MEMORY);
    let builder = match preempt {
        Some(preempt) => builder.preempt_timer(preempt),
        None => builder,
    };
    builder.make().map_err(|e| e.to_string())
}

/// Runs `body` on a thread of its own and returns what it returns; fails
/// the test with `hung` if that takes more than a minute (an executor that
/// sleeps with work to do never returns).
fn within_a_minute<T: Send + 'static>(hung: &str, body: impl FnOnce() -> Result<T, String> + Send + 'static) -> T {
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = done_tx.send(body());
    });
    match done_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(result) => result.unwrap_or_else(|e| panic!("executor: {e}")),
        Err(_) => panic!("{hung}"),
    }
}

/// Varies how long an executor had to go to sleep before the next thing
/// for it comes: none, a spin of a few µs (around its park), or a real
/// sleep.
fn let_the_executor_park(rng: &mut fastrand::Rng) {
    match rng.u8(0..8) {
        0 => thread::sleep(Duration::from_micros(50)),
        1..=3 => {
            let until = std::time::Instant::now() + Duration::from_micros(rng.u64(1..20));
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        _ => {}
    }
}

/// Patch 2: a preempt timer that fires between the executor's io poll and
/// its first look at the task queues must not make it park with the task
/// still runnable. A 1 ns preempt timer makes that the common case: 0.9.0
/// parks with the spawned task pending and never wakes (no io, no timer).
#[test]
fn runnable_work_survives_an_early_preemption() {
    let ran = within_a_minute(
        "the executor stopped with runnable work (parked while a task was ready)",
        || {
            let executor = executor(Some(Duration::from_nanos(1)))?;
            Ok((0..1_000u32)
                .map(|round| executor.run(async move { round % 2 }))
                .sum::<u32>())
        },
    );
    assert_eq!(ran, 500, "every run's future ran to its end");
}

/// Patch 1: a parking executor fences instead of `membarrier`. A thread
/// outside the executor wakes a task on it many times, sometimes at once
/// and sometimes after the executor had time to park; every wake-up must
/// reach it (a lost one leaves the executor asleep for good: it has no
/// timer and no io).
#[test]
fn foreign_wake_ups_reach_a_parking_executor() {
    const ROUNDS: u32 = 20_000;
    let (to_executor, from_outside) = async_channel::bounded::<u32>(1);
    let (answer_tx, answer_rx) = mpsc::channel::<u32>();
    let worker = thread::spawn(move || {
        executor(None)?.run(async move {
            while let Ok(value) = from_outside.recv().await {
                if answer_tx.send(value).is_err() {
                    break;
                }
            }
        });
        Ok::<(), String>(())
    });
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    for round in 0..ROUNDS {
        let_the_executor_park(&mut rng);
        to_executor.send_blocking(round).expect("executor alive");
        match answer_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(answer) => assert_eq!(answer, round),
            Err(e) => panic!("round {round}: the executor did not wake for a message sent to it ({e})"),
        }
    }
    drop(to_executor);
    worker.join().expect("executor thread").expect("executor");
}

/// Patch 4: the preempt timer is no longer armed again on every pass (a
/// pending one is kept while it still has half its slice or more). It must
/// still fire: a task that never waits, only yields when asked to, must
/// still let a task of another queue run.
#[test]
fn a_busy_queue_is_still_preempted() {
    use std::cell::Cell;
    use std::rc::Rc;

    use glommio::{Latency, Shares};

    let passes = within_a_minute(
        "a busy task queue was never preempted: the other queue's task never ran",
        || {
            let executor = executor(Some(Duration::from_millis(5)))?;
            executor.run(async {
                let busy = glommio::executor().create_task_queue(Shares::default(), Latency::NotImportant, "busy");
                let other = glommio::executor().create_task_queue(Shares::default(), Latency::NotImportant, "other");
                let stop = Rc::new(Cell::new(false));
                let started = Rc::new(Cell::new(false));
                let spinner = glommio::spawn_local_into(
                    {
                        let (stop, started) = (stop.clone(), started.clone());
                        async move {
                            started.set(true);
                            let mut passes = 0u64;
                            while !stop.get() {
                                // CPU work, then a yield only if preempted.
                                let until = std::time::Instant::now() + Duration::from_micros(100);
                                while std::time::Instant::now() < until {
                                    std::hint::spin_loop();
                                }
                                passes += 1;
                                glommio::yield_if_needed().await;
                            }
                            passes
                        }
                    },
                    busy,
                )
                .map_err(|e| e.to_string())?;
                // Stops the spinner once it runs: only a preemption gets
                // this task going again after its first yield.
                let stopper = glommio::spawn_local_into(
                    async move {
                        while !started.get() {
                            glommio::executor().yield_now().await;
                        }
                        stop.set(true);
                    },
                    other,
                )
                .map_err(|e| e.to_string())?;
                stopper.await;
                Ok::<u64, String>(spinner.await)
            })
        },
    );
    assert!(passes >= 1, "the busy task ran before it was stopped");
}

/// Patch 5: a parked executor's sleep is bounded by its next timer itself
/// (no timeout request on the latency ring), and the preempt timer (100
/// ms) stays pending through parks. Timers of assorted lengths must each
/// end the sleep, never early, and most of them on time: a sleep the
/// timer did not bound would last until the preempt timer fired. "On
/// time" is a correctness bound, not a speed target: 20 ms late at most,
/// for more than half of the timers.
#[test]
fn timers_wake_a_parked_executor() {
    const ROUNDS: usize = 200;
    let slept = within_a_minute("a parked executor did not wake for its timer", || {
        let executor = executor(None)?;
        Ok(executor.run(async {
            let mut rng = fastrand::Rng::with_seed(0x71e5);
            let mut slept = Vec::with_capacity(ROUNDS);
            for _ in 0..ROUNDS {
                let wait = Duration::from_micros(rng.u64(50..8_000));
                let started = std::time::Instant::now();
                glommio::timer::sleep(wait).await;
                slept.push((wait, started.elapsed()));
            }
            slept
        }))
    });
    let early: Vec<_> = slept.iter().filter(|(wait, slept)| slept < wait).collect();
    assert!(early.is_empty(), "timers that ended their sleep early: {early:?}");
    let late = slept
        .iter()
        .filter(|(wait, slept)| *slept > *wait + Duration::from_millis(20))
        .count();
    assert!(
        late < ROUNDS / 2,
        "{late} of {ROUNDS} timers ended their sleep more than 20 ms late: the sleep was not bounded by them"
    );
}

/// Writes `rounds` bytes to an executor that echoes them over `outside`,
/// letting it park before every `park_every`-th; each echo must come back,
/// the same byte (`stuck`: what it means when one never does).
/// `socket` as a glommio stream of the running executor.
fn glommio_unix(socket: std::os::unix::net::UnixStream) -> glommio::net::UnixStream {
    use std::os::fd::{FromRawFd, IntoRawFd};

    // SAFETY: the descriptor came out of a `UnixStream` it was the only
    // owner of.
    unsafe { glommio::net::UnixStream::from_raw_fd(socket.into_raw_fd()) }
}

/// Sends back every byte `socket` receives, until its peer closes it.
async fn echo_each_byte(socket: std::os::unix::net::UnixStream) -> Result<(), String> {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};

    let mut stream = glommio_unix(socket);
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte).await {
            Ok(1) => stream.write_all(&byte).await.map_err(|e| e.to_string())?,
            Ok(_) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn echo_rounds(mut outside: std::os::unix::net::UnixStream, rounds: u32, seed: u64, park_every: u32, stuck: &str) {
    use std::io::{Read, Write};

    outside
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let mut rng = fastrand::Rng::with_seed(seed);
    for round in 0..rounds {
        if round % park_every == 0 {
            let_the_executor_park(&mut rng);
        }
        let sent = round as u8;
        outside.write_all(&[sent]).expect("executor's socket open");
        let mut echo = [0u8; 1];
        match outside.read_exact(&mut echo) {
            Ok(()) => assert_eq!(echo[0], sent, "round {round}"),
            Err(e) => panic!("round {round}: {stuck} ({e})"),
        }
    }
}

/// Patch 5: when the executor parks, the main ring's pending submissions
/// (a socket's readiness poll) go to the kernel with the sleep itself.
/// A thread writes to the executor's socket at once, after a spin or
/// after a sleep; every byte must wake it (a submission left behind would
/// leave it asleep for good: it has no timer and no other io).
#[test]
fn socket_bytes_wake_a_parked_executor() {
    const ROUNDS: u32 = 5_000;
    let (outside, inside) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    let worker = thread::spawn(move || executor(None)?.run(echo_each_byte(inside)));
    echo_rounds(
        outside,
        ROUNDS,
        0x50c4,
        1,
        "the parked executor did not wake for its socket's byte",
    );
    worker.join().expect("executor thread").expect("executor");
}

/// Patch 7: an executor whose spin before parking adapts (pinned: glommio
/// spins only on bound executors) wakes for every byte too, whether it
/// comes during a spin, as the window grows or shrinks, or in a sleep.
#[test]
fn socket_bytes_wake_an_adaptively_spinning_executor() {
    const ROUNDS: u32 = 5_000;
    let (outside, inside) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    let worker = thread::spawn(move || {
        LocalExecutorBuilder::new(Placement::Fixed(0))
            .io_memory(IO_MEMORY)
            .adaptive_spin(Duration::from_micros(50))
            .make()
            .map_err(|e| e.to_string())?
            .run(echo_each_byte(inside))
    });
    echo_rounds(
        outside,
        ROUNDS,
        0xada7,
        1,
        "the adaptively spinning executor did not wake for its socket's byte",
    );
    worker.join().expect("executor thread").expect("executor");
}

/// Patch 8: the throughput preemption timer (it fires after `ring_depth`
/// completions on the main ring) still tells a running task to yield, and
/// does so without an io-wq worker thread: it used to write the latency
/// ring's eventfd, a write io_uring always hands to a worker (an eventfd has
/// no `write_iter`), which then woke on the executor's core. Sixteen socket
/// reads complete while a task spins (the time-based preempt timer is set
/// to a minute, so only the throughput timer can raise `need_preempt`), and
/// no thread named after the executor's io-wq (`iou-wrk-<its tid>`) may
/// exist afterwards.
#[test]
fn throughput_preemption_needs_no_io_worker() {
    use std::time::Instant;

    use futures_lite::AsyncReadExt;

    const SOCKETS: usize = 16;
    let (outside, inside): (Vec<_>, Vec<_>) = (0..SOCKETS)
        .map(|_| std::os::unix::net::UnixStream::pair().expect("socket pair"))
        .unzip();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let writer = thread::spawn(move || {
        use std::io::Write;
        go_rx.recv().expect("the spinning task's go");
        for mut socket in outside {
            socket.write_all(&[1]).expect("executor's socket open");
            // Kept open until the test ends: the reads see a byte, not EOF.
            std::mem::forget(socket);
        }
    });
    let (told, executor_tid) = within_a_minute("the executor hung", move || {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(IO_MEMORY)
            .ring_depth(8)
            .preempt_timer(Duration::from_secs(60))
            .make()
            .map_err(|e| e.to_string())?
            .run(async move {
                let tid = std::fs::read_link("/proc/thread-self")
                    .map_err(|e| e.to_string())?
                    .file_name()
                    .and_then(|name| name.to_str())
                    .map(str::to_string)
                    .ok_or("no thread id")?;
                let readers: Vec<_> = inside
                    .into_iter()
                    .map(|socket| {
                        glommio::spawn_local(async move {
                            let mut stream = glommio_unix(socket);
                            let mut byte = [0u8; 1];
                            stream.read(&mut byte).await.map_err(|e| e.to_string())
                        })
                    })
                    .collect();
                // Lets the executor submit the readers' reads (a pass of
                // its loop), then spins without yielding until told to.
                glommio::timer::sleep(Duration::from_millis(20)).await;
                go_tx.send(()).map_err(|e| e.to_string())?;
                let until = Instant::now() + Duration::from_secs(20);
                let mut told = false;
                while Instant::now() < until {
                    if glommio::executor().need_preempt() {
                        told = true;
                        break;
                    }
                    std::hint::spin_loop();
                }
                for reader in readers {
                    assert_eq!(reader.await?, 1, "each reader got its byte");
                }
                Ok::<(bool, String), String>((told, tid))
            })
    });
    writer.join().expect("writer thread");
    assert!(
        told,
        "sixteen completions on a ring 8 deep did not raise need_preempt within 20 s"
    );
    let worker = format!("iou-wrk-{executor_tid}");
    let workers: Vec<String> = std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == worker)
        .collect();
    assert!(workers.is_empty(), "an io-wq worker ran for the executor: {workers:?}");
}

/// Patch 6: `TcpStream::poll_readable` (the bus's stream links wrap Unix
/// sockets in glommio's `TcpStream` too) completes once bytes wait, reading
/// none of them, also for an executor that parked meanwhile: a `recv` of the
/// bus's own after it gets every byte.
#[test]
fn readiness_waits_read_nothing() {
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};

    use futures_lite::AsyncWriteExt;

    const ROUNDS: u32 = 2_000;
    let (outside, inside) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    let worker = thread::spawn(move || {
        executor(None)?.run(async move {
            // SAFETY: the descriptor came out of a `UnixStream` it was the
            // only owner of.
            let mut stream = unsafe { glommio::net::TcpStream::from_raw_fd(inside.into_raw_fd()) };
            let mut spurious = 0u32;
            loop {
                std::future::poll_fn(|cx| stream.poll_readable(cx))
                    .await
                    .map_err(|e| e.to_string())?;
                let fd = stream.as_raw_fd();
                let mut byte = [0u8; 1];
                // SAFETY: a valid buffer of one byte, a descriptor the stream owns.
                let n = unsafe { libc::recv(fd, byte.as_mut_ptr().cast(), 1, libc::MSG_DONTWAIT) };
                match n {
                    1 => stream.write_all(&byte).await.map_err(|e| e.to_string())?,
                    0 => return Ok::<u32, String>(spurious),
                    _ => spurious += 1,
                }
            }
        })
    });
    echo_rounds(outside, ROUNDS, 0x7ead, 4, "the readiness wait never completed");
    let spurious = worker.join().expect("executor thread").expect("executor");
    assert!(
        spurious < ROUNDS / 10,
        "{spurious} readiness waits found nothing to read"
    );
}
