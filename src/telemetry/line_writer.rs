//! Log lines written by a thread of their own, in batches.
//!
//! Every request writes an access line, so how a line reaches stderr is on
//! the request path. A writer thread that blocks on a channel between
//! lines must be woken for each one: a `futex` wake from the request's
//! thread, and on the writer's side a spin, four `sched_yield`s and a
//! `futex` wait before it sleeps again (tracing-appender's worker, which
//! this replaces, measured with `strace -c` at one request at a time: 7 of
//! pinproxy's 15 system calls per request, where the peer without a log
//! makes 6 in all).
//!
//! This writer's thread polls instead while lines keep coming: it sleeps
//! [`BATCH_INTERVAL`], then takes everything that arrived meanwhile and
//! writes it with one `write`. Lines arrive in one shared buffer: a line
//! costs its sender a lock that is almost never contended (held for one
//! copy, and by the thread only to swap the buffer for its emptied one),
//! the copy, and no system call and no allocation once the two buffers
//! have grown to a batch's size. After [`QUIET_POLLS`] polls that found
//! nothing the thread parks, so an idle daemon does not wake; the first
//! line after the quiet unparks it once (whether it is parked is kept
//! under the same lock, so no line can slip between its last look and its
//! park). Lines are therefore written at most [`BATCH_INTERVAL`] after
//! they were logged, in the order their senders took the lock.
//!
//! (It used to hand each line over in a buffer of its own, through a
//! channel, with a second channel bringing emptied buffers back: counted
//! with callgrind, 224 instructions per line on the request's thread and
//! about as many on the writer's.)
//!
//! Like the writer it replaces, it is lossy: past [`MAX_QUEUED_BYTES`]
//! waiting, new lines are dropped, so that a stderr nobody reads can stop
//! neither the proxy nor its memory. [`LineGuard`] writes what is still
//! queued when dropped.

use std::io::{self, Write};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, Thread};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the thread sleeps between polls while lines keep coming.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(5);

/// Polls that find nothing before the thread parks instead (100 ms).
pub const QUIET_POLLS: u32 = 20;

/// Bytes of lines that may wait for the thread before new ones are
/// dropped (hundreds of thousands of access lines: a second's worth or
/// more at any rate this proxy serves).
pub const MAX_QUEUED_BYTES: usize = 64 << 20;

/// A batch buffer grown past this (by a stalled stderr) is freed once
/// written rather than kept.
const KEPT_CAPACITY: usize = 256 * 1024;

/// How long dropping the guard waits for the queued lines to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// Where log lines are handed to the writer thread (or, if it could not be
/// started, written to stderr directly); cheap to clone.
#[derive(Clone, Debug)]
pub struct LineWriter {
    queue: Option<Queue>,
}

/// The way to the writer thread.
#[derive(Clone, Debug)]
struct Queue {
    shared: Arc<Mutex<Shared>>,
    thread: Thread,
}

/// What the senders and the thread share, under one lock.
#[derive(Debug, Default)]
struct Shared {
    /// The lines not yet taken by the thread.
    lines: Vec<u8>,
    /// The thread is parked (or about to): the next line unparks it.
    parked: bool,
    /// Write what is queued, say so on this, and stop.
    finish: Option<mpsc::SyncSender<()>>,
    /// The thread has stopped taking lines.
    closed: bool,
}

/// How the writer thread polls.
#[derive(Debug, Clone, Copy)]
struct Pace {
    interval: Duration,
    quiet_polls: u32,
}

/// Keeps the writer thread's queue flushed at the end: dropping it writes
/// the lines still queued (waiting at most a second).
#[must_use = "dropping the guard stops the log writer"]
#[derive(Debug)]
pub struct LineGuard {
    queue: Queue,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }
}

/// The shared state; a poisoned lock is taken as it is (nothing panics
/// while holding it, and a lost log line is the worst it could cause).
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LineWriter {
    /// Starts the writer thread, writing to `out`.
    pub fn start<W: Write + Send + 'static>(out: W) -> io::Result<(LineWriter, LineGuard)> {
        LineWriter::start_paced(
            out,
            Pace {
                interval: BATCH_INTERVAL,
                quiet_polls: QUIET_POLLS,
            },
        )
    }

    /// A writer without a thread: each line goes to stderr as it comes (for
    /// when the thread cannot be started).
    pub fn direct() -> LineWriter {
        LineWriter { queue: None }
    }

    fn start_paced<W: Write + Send + 'static>(
        out: W,
        pace: Pace,
    ) -> io::Result<(LineWriter, LineGuard)> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let taken = shared.clone();
        let thread = thread::Builder::new()
            .name("pinproxy-log".into())
            .spawn(move || write_lines(&taken, out, pace))?
            .thread()
            .clone();
        let queue = Queue { shared, thread };
        Ok((
            LineWriter {
                queue: Some(queue.clone()),
            },
            LineGuard { queue },
        ))
    }

    /// Queues one line (whole: what one `write` call is given). Returns
    /// false when it was dropped: the queue full, or the thread stopped.
    pub fn line(&self, bytes: &[u8]) -> bool {
        let Some(queue) = &self.queue else {
            return io::stderr().write_all(bytes).is_ok();
        };
        let mut shared = queue.lock();
        if shared.closed || shared.lines.len().saturating_add(bytes.len()) > MAX_QUEUED_BYTES {
            return false;
        }
        shared.lines.extend_from_slice(bytes);
        let wake = std::mem::take(&mut shared.parked);
        drop(shared);
        if wake {
            queue.thread.unpark();
        }
        true
    }

    /// Bytes of lines waiting for the thread (0 without a thread). Lets a
    /// test wait for the thread to have taken what was queued.
    pub fn queued_bytes(&self) -> usize {
        self.queue
            .as_ref()
            .map_or(0, |queue| queue.lock().lines.len())
    }
}

impl Write for LineWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.line(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LineWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        self.clone()
    }
}

impl Drop for LineGuard {
    fn drop(&mut self) {
        let (done, finished) = mpsc::sync_channel(1);
        {
            let mut shared = self.queue.lock();
            if shared.closed {
                return;
            }
            shared.finish = Some(done);
            shared.parked = false;
        }
        self.queue.thread.unpark();
        let _ = finished.recv_timeout(FLUSH_WAIT);
    }
}

/// The writer thread: takes and writes the queued lines every poll while
/// they keep coming, parks when quiet, stops when told to finish.
fn write_lines(shared: &Mutex<Shared>, mut out: impl Write, pace: Pace) {
    // The thread's buffer: swapped with the senders' one, so each keeps
    // its capacity and a batch allocates nothing.
    let mut batch = Vec::new();
    let mut quiet = 0;
    loop {
        let finish = {
            let mut state = lock(shared);
            if state.lines.is_empty() && state.finish.is_none() {
                if quiet >= pace.quiet_polls {
                    state.parked = true;
                    drop(state);
                    // A line unparks it; so may anything else (it looks
                    // again either way).
                    thread::park();
                } else {
                    quiet += 1;
                    drop(state);
                    thread::sleep(pace.interval);
                }
                continue;
            }
            quiet = 0;
            std::mem::swap(&mut state.lines, &mut batch);
            let finish = state.finish.take();
            state.closed = finish.is_some();
            finish
        };
        write_batch(&mut out, &mut batch);
        if let Some(done) = finish {
            let _ = done.try_send(());
            return;
        }
        thread::sleep(pace.interval);
    }
}

/// Writes and empties `batch`; a batch once much larger than usual is not
/// kept. A failed write loses the batch (stderr gone: nothing to tell).
fn write_batch(out: &mut impl Write, batch: &mut Vec<u8>) {
    let _ = out.write_all(batch).and_then(|()| out.flush());
    batch.clear();
    if batch.capacity() > KEPT_CAPACITY {
        *batch = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A sink that keeps what it is given and counts the writes.
    #[derive(Clone, Default)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
    }

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            if let (Ok(mut kept), Ok(mut writes)) = (self.bytes.lock(), self.writes.lock()) {
                kept.extend_from_slice(bytes);
                *writes += 1;
            }
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_in_order_and_in_batches() {
        let sink = Sink::default();
        let (writer, guard) = LineWriter::start(sink.clone()).unwrap_or_else(|e| panic!("{e}"));
        let mut expected = Vec::new();
        for i in 0..1000 {
            let line = format!("line {i}\n");
            writer.line(line.as_bytes());
            expected.extend_from_slice(line.as_bytes());
        }
        // The guard writes what is still queued.
        drop(guard);
        let kept = sink.bytes.lock().map(|k| k.clone()).unwrap_or_default();
        assert_eq!(kept, expected);
        // One `write` per poll, not per line: a thousand lines sent in a
        // loop span a few polls (a write per line would be 1,000).
        let writes = sink.writes.lock().map(|w| *w).unwrap_or_default();
        assert!(writes < 500, "{writes} writes for 1,000 lines");
    }

    #[test]
    fn a_quiet_writer_wakes_for_the_next_line() {
        let sink = Sink::default();
        // Quiet from the start: the thread blocks on its queue at once.
        let pace = Pace {
            interval: BATCH_INTERVAL,
            quiet_polls: 0,
        };
        let (writer, guard) =
            LineWriter::start_paced(sink.clone(), pace).unwrap_or_else(|e| panic!("{e}"));
        assert!(writer.line(b"after the quiet\n"));
        // Without the guard's flush: the line is written by the thread
        // itself (a bounded wait on what the sink holds).
        let mut written = false;
        for _ in 0..400 {
            if sink
                .bytes
                .lock()
                .is_ok_and(|k| k.as_slice() == b"after the quiet\n")
            {
                written = true;
                break;
            }
            thread::sleep(BATCH_INTERVAL);
        }
        drop(guard);
        assert!(written, "the line was not written within 2 s");
    }

    #[test]
    fn lines_beyond_the_byte_bound_are_dropped_not_waited_for_and_the_rest_written() {
        // A sink that blocks until released, counting what it was given.
        struct Stuck(Arc<Mutex<usize>>);
        impl Write for Stuck {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                let mut written = self.0.lock().unwrap_or_else(|e| e.into_inner());
                *written += bytes.len();
                Ok(bytes.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let written = Arc::new(Mutex::new(0));
        let held = written.lock().unwrap_or_else(|e| panic!("{e}"));
        let (writer, guard) =
            LineWriter::start(Stuck(written.clone())).unwrap_or_else(|e| panic!("{e}"));
        // 64 KiB lines: the queue holds 1,024 of them, and the thread may
        // hold as many again in the batch it is stuck writing. Every call
        // returns at once; the lines beyond are dropped.
        let long = vec![b'x'; 64 * 1024];
        let bound = MAX_QUEUED_BYTES / long.len();
        let taken = (0..3 * bound).filter(|_| writer.line(&long)).count();
        assert!(
            (bound..=2 * bound).contains(&taken),
            "{taken} lines taken (bound {bound})"
        );
        assert!(!writer.line(b"short\n"), "a full queue takes no line");
        drop(held);
        drop(guard);
        let written = *written.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(written, taken * long.len(), "what was taken is written");
        assert!(!writer.line(b"late\n"), "a finished writer takes no line");
    }
}
