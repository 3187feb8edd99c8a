//! Log lines written by a thread of their own, in batches.
//!
//! Every request writes an access line, so how a line reaches stderr is on
//! the request path. A writer thread that blocks on its channel between
//! lines must be woken for each one: a `futex` wake from the request's
//! thread, and on the writer's side a spin, four `sched_yield`s and a
//! `futex` wait before it sleeps again (tracing-appender's worker, which
//! this replaces, measured with `strace -c` at one request at a time: 7 of
//! pinproxy's 15 system calls per request, where the peer without a log
//! makes 6 in all).
//!
//! This writer's thread polls instead while lines keep coming: it sleeps
//! [`BATCH_INTERVAL`], then writes everything that arrived meanwhile with
//! one `write`. A line costs its sender a push onto the channel and no
//! system call. After [`QUIET_POLLS`] polls that found nothing the thread
//! blocks on the channel, so an idle daemon does not wake; the first line
//! after the quiet wakes it once. Lines are therefore written at most
//! [`BATCH_INTERVAL`] after they were logged, in order.
//!
//! A line travels in a buffer of its own, and the thread hands each buffer
//! back once the line is in its batch: the next line, from whichever
//! request thread, is copied into an emptied buffer instead of a new one.
//! A buffer allocated on one thread and freed on another defeats the
//! allocator's per-thread caches: past the few a thread caches, glibc
//! frees such a chunk into the arena that allocated it, under that arena's
//! lock, which the request threads' own allocations take too. Counted
//! with callgrind, handing a line over cost the request's thread 424
//! instructions with a new buffer and 273 with a spare.
//!
//! Like the writer it replaces, it is lossy: beyond [`BUFFERED_LINES`]
//! waiting lines new ones are dropped, so that a stderr nobody reads cannot
//! stop the proxy, and so are lines longer than [`LONG_LINE`] once
//! [`LONG_LINE_BYTES`] of them wait: a line can name a request's cookies,
//! and lines of kilobytes by the hundred thousand would otherwise wait in
//! memory. [`LineGuard`] writes what is still queued when dropped.

use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the thread sleeps between polls while lines keep coming.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(5);

/// Polls that find nothing before the thread blocks instead (100 ms).
pub const QUIET_POLLS: u32 = 20;

/// Lines waiting for the thread before new ones are dropped.
pub const BUFFERED_LINES: usize = 128 * 1024;

/// A line longer than this counts against [`LONG_LINE_BYTES`] while it
/// waits (an access line is a few hundred bytes, so the count is not
/// touched on the request path's usual lines).
pub const LONG_LINE: usize = 1024;

/// Bytes of long lines that may wait for the thread before new long ones
/// are dropped: with at most [`BUFFERED_LINES`] short ones besides, a
/// stalled stderr holds at most about 192 MiB of lines.
pub const LONG_LINE_BYTES: usize = 64 << 20;

/// Emptied line buffers kept for the next lines, at most (a few batches'
/// worth at tens of thousands of lines a second).
const SPARE_BUFFERS: usize = 1024;

/// A buffer grown past this by a long line is freed rather than kept.
const SPARE_CAPACITY: usize = 1024;

/// A batch larger than this is written before the rest is taken.
const BATCH_BYTES: usize = 64 * 1024;

/// How long dropping the guard waits for the queued lines to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

enum Message {
    Line(Vec<u8>),
    /// Write what is queued, say so, and stop.
    Finish(SyncSender<()>),
}

/// Where log lines are handed to the writer thread (or, if it could not be
/// started, written to stderr directly); cheap to clone.
#[derive(Clone, Debug)]
pub struct LineWriter {
    queue: Option<Queue>,
}

/// The way to the writer thread: lines one way, emptied buffers back.
#[derive(Clone, Debug)]
struct Queue {
    lines: SyncSender<Message>,
    spares: crossbeam_channel::Receiver<Vec<u8>>,
    /// Bytes of lines longer than [`LONG_LINE`] waiting for the thread.
    long_bytes: Arc<AtomicUsize>,
}

/// How the writer thread polls.
#[derive(Debug, Clone, Copy)]
struct Pace {
    interval: Duration,
    quiet_polls: u32,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Line(line) => write!(f, "Line({} bytes)", line.len()),
            Message::Finish(_) => f.write_str("Finish"),
        }
    }
}

/// Keeps the writer thread's queue flushed at the end: dropping it writes
/// the lines still queued (waiting at most a second).
#[must_use = "dropping the guard stops the log writer"]
#[derive(Debug)]
pub struct LineGuard {
    lines: SyncSender<Message>,
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
        let (lines, queue) = mpsc::sync_channel(BUFFERED_LINES);
        let (give_back, spares) = crossbeam_channel::bounded(SPARE_BUFFERS);
        let long_bytes = Arc::new(AtomicUsize::new(0));
        let taken = long_bytes.clone();
        thread::Builder::new()
            .name("pinproxy-log".into())
            .spawn(move || write_lines(&queue, &give_back, &taken, out, pace))?;
        Ok((
            LineWriter {
                queue: Some(Queue {
                    lines: lines.clone(),
                    spares,
                    long_bytes,
                }),
            },
            LineGuard { lines },
        ))
    }

    /// Queues one line (whole: what one `write` call is given). Returns
    /// false when it was dropped: the queue full, or the thread gone.
    pub fn line(&self, bytes: &[u8]) -> bool {
        match &self.queue {
            Some(queue) => {
                let long = bytes.len() > LONG_LINE;
                if long {
                    let waiting = queue.long_bytes.fetch_add(bytes.len(), Ordering::Relaxed);
                    if waiting.saturating_add(bytes.len()) > LONG_LINE_BYTES {
                        queue.long_bytes.fetch_sub(bytes.len(), Ordering::Relaxed);
                        return false;
                    }
                }
                let mut line = queue.spares.try_recv().unwrap_or_default();
                line.extend_from_slice(bytes);
                let sent = queue.lines.try_send(Message::Line(line)).is_ok();
                if long && !sent {
                    queue.long_bytes.fetch_sub(bytes.len(), Ordering::Relaxed);
                }
                sent
            }
            None => io::stderr().write_all(bytes).is_ok(),
        }
    }

    /// How many emptied buffers wait for the next lines (0 without a
    /// thread). Lets a test wait for the thread to have handed one back.
    pub fn spare_buffers(&self) -> usize {
        self.queue.as_ref().map_or(0, |queue| queue.spares.len())
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
        // Blocking: the finish must queue behind the lines already sent.
        if self.lines.send(Message::Finish(done)).is_ok() {
            let _ = finished.recv_timeout(FLUSH_WAIT);
        }
    }
}

/// The writer thread: batches while lines keep coming, blocks when quiet.
fn write_lines(
    queue: &Receiver<Message>,
    give_back: &crossbeam_channel::Sender<Vec<u8>>,
    long_bytes: &AtomicUsize,
    mut out: impl Write,
    pace: Pace,
) {
    let mut batch = Vec::new();
    let mut quiet = 0;
    loop {
        let first = if quiet >= pace.quiet_polls {
            match queue.recv() {
                Ok(message) => Some(message),
                Err(_) => return,
            }
        } else {
            match queue.try_recv() {
                Ok(message) => Some(message),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => return,
            }
        };
        // Quiet means a poll that found nothing.
        if first.is_some() {
            quiet = 0;
        } else {
            quiet = quiet.saturating_add(1);
        }
        let mut finish = None;
        let mut next = first;
        while let Some(message) = next.take() {
            match message {
                Message::Line(mut line) => {
                    batch.extend_from_slice(&line);
                    if line.len() > LONG_LINE {
                        long_bytes.fetch_sub(line.len(), Ordering::Relaxed);
                    }
                    if line.capacity() <= SPARE_CAPACITY {
                        line.clear();
                        // Full: enough spares wait already; this one is freed.
                        let _ = give_back.try_send(line);
                    }
                }
                Message::Finish(done) => {
                    finish = Some(done);
                    break;
                }
            }
            if batch.len() >= BATCH_BYTES {
                write_batch(&mut out, &mut batch);
            }
            next = queue.try_recv().ok();
        }
        if !batch.is_empty() {
            write_batch(&mut out, &mut batch);
        }
        if let Some(done) = finish {
            let _ = done.try_send(());
            return;
        }
        if quiet < pace.quiet_polls {
            thread::sleep(pace.interval);
        }
    }
}

/// Writes and empties `batch`; a batch once much larger than usual is not
/// kept. A failed write loses the batch (stderr gone: nothing to tell).
fn write_batch(out: &mut impl Write, batch: &mut Vec<u8>) {
    let _ = out.write_all(batch).and_then(|()| out.flush());
    batch.clear();
    if batch.capacity() > 4 * BATCH_BYTES {
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
    fn lines_beyond_the_queue_are_dropped_not_waited_for() {
        // A sink that blocks until released: the queue fills.
        struct Stuck(Arc<Mutex<()>>);
        impl Write for Stuck {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                let _held = self.0.lock();
                Ok(bytes.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap_or_else(|e| panic!("{e}"));
        let (writer, guard) =
            LineWriter::start(Stuck(gate.clone())).unwrap_or_else(|e| panic!("{e}"));
        // More than the queue (and the batch the thread is stuck writing)
        // holds: every call returns at once, and the lines beyond are
        // dropped.
        let line = [b'x'; 100];
        let dropped = (0..BUFFERED_LINES + 2000)
            .filter(|_| !writer.line(&line))
            .count();
        drop(held);
        drop(guard);
        assert!(dropped >= 1000, "{dropped} lines dropped");
    }

    #[test]
    fn long_lines_wait_up_to_their_byte_budget_and_short_ones_still_pass() {
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
        // 64 KiB lines: the budget holds 1,024 of them (one more may be in
        // the batch the thread is stuck writing).
        let long = vec![b'x'; 64 * 1024];
        let taken = (0..2_000).filter(|_| writer.line(&long)).count();
        assert!(
            (LONG_LINE_BYTES / long.len()..=LONG_LINE_BYTES / long.len() + 1).contains(&taken),
            "{taken} long lines taken"
        );
        assert!(writer.line(&[b'y'; LONG_LINE]), "a short line still passes");
        drop(held);
        drop(guard);
        let written = *written.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(
            written,
            taken * long.len() + LONG_LINE,
            "what was taken is written"
        );
    }
}
