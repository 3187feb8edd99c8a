//! Room for rustls' received-plaintext queue, taken at the end of a
//! tunnel's TLS handshake and handed to rustls at its first read.
//!
//! rustls allocates a connection's queue of received plaintext (a
//! `VecDeque<Vec<u8>>` grown to four slots: 96 bytes) when the first
//! application-data record arrives. In a tunnel that is the first request,
//! so the queue lands amid the request's short-lived buffers (hyper's 8 KiB
//! read and write buffers, the head, the upstream exchange). It lives as
//! long as the connection, and once the connection parks that one small
//! chunk keeps a page of freed buffers around it resident: 1.7 KiB per
//! tunnel idle after a request, measured at 10,000 tunnels (12.5 → 10.8 KB
//! of RSS per tunnel).
//!
//! A [`QueueRoom`] is a chunk of the queue's size taken next to the
//! connection's other long-lived allocations, at the end of its handshake.
//! It is freed just before each poll of the first read and taken again while
//! that read is pending. glibc's allocator hands the chunk a thread freed
//! last to that thread's next allocation of the same size (its per-thread
//! cache), so the queue rustls allocates during that poll takes the room's
//! place. With another allocator, or another allocation of that size in
//! between, only the placement is lost: nothing else depends on it.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, ReadBuf};

/// Slots rustls' queue grows to at its first chunk (what `VecDeque`, like
/// `Vec`, first allocates for elements of this size).
const QUEUE_SLOTS: usize = 4;

/// A chunk the size of rustls' received-plaintext queue, or nothing.
#[derive(Debug, Default)]
pub struct QueueRoom {
    /// Same element type and capacity as the queue's buffer, so the same
    /// size and alignment; never holds an element.
    room: Vec<Vec<u8>>,
}

impl QueueRoom {
    /// Takes the room now (at the end of a TLS handshake).
    pub fn reserve() -> QueueRoom {
        QueueRoom {
            room: Vec::with_capacity(QUEUE_SLOTS),
        }
    }

    /// No room: reads through it are plain reads.
    pub fn none() -> QueueRoom {
        QueueRoom::default()
    }

    /// Whether the room is held.
    pub fn is_reserved(&self) -> bool {
        self.room.capacity() > 0
    }

    /// Reads from `io` into `buf`, freeing the room just before each poll
    /// and taking it again while the read is pending; once the read
    /// completes the room is gone, taken over by what the read allocated.
    pub async fn read<T>(&mut self, io: &mut T, buf: &mut [u8]) -> io::Result<usize>
    where
        T: AsyncRead + Unpin,
    {
        let armed = self.is_reserved();
        poll_fn(|cx| {
            if armed {
                self.room = Vec::new();
            }
            let mut read = ReadBuf::new(buf);
            match Pin::new(&mut *io).poll_read(cx, &mut read) {
                Poll::Pending => {
                    if armed {
                        self.room = Vec::with_capacity(QUEUE_SLOTS);
                    }
                    Poll::Pending
                }
                Poll::Ready(result) => Poll::Ready(result.map(|()| read.filled().len())),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::future::Future;
    use std::sync::{Arc, Mutex};
    use std::task::Context;

    use super::*;

    /// A reader that is pending once, then reads one byte after allocating
    /// a queue the way rustls does (first push into an empty `VecDeque`),
    /// and records where that queue's buffer went.
    struct QueueingReader {
        polls: usize,
        queue_at: Arc<Mutex<Option<usize>>>,
        queues: Vec<VecDeque<Vec<u8>>>,
    }

    impl AsyncRead for QueueingReader {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.polls += 1;
            if self.polls == 1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let mut queue = VecDeque::new();
            queue.push_back(Vec::new());
            let (front, _) = queue.as_slices();
            if let Ok(mut at) = self.queue_at.lock() {
                *at = Some(front.as_ptr() as usize);
            }
            self.queues.push(queue);
            buf.put_slice(b"x");
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn the_room_matches_the_queue_rustls_allocates() {
        let mut queue: VecDeque<Vec<u8>> = VecDeque::new();
        queue.push_back(Vec::new());
        let room = QueueRoom::reserve();
        assert_eq!(queue.capacity(), room.room.capacity());
        assert!(room.is_reserved());
        assert!(!QueueRoom::none().is_reserved());
    }

    #[test]
    fn the_room_is_held_while_pending_and_gone_after_the_read() {
        // In a thread of its own and polled by hand, without a runtime: its
        // allocator cache holds nothing but this test's chunks, and nothing
        // allocates between the room's release and the queue's allocation.
        // (Under a runtime on the test harness's thread, a CI run once saw
        // the queue land 256 bytes away.)
        let run = std::thread::spawn(|| {
            let queue_at = Arc::new(Mutex::new(None));
            let mut reader = QueueingReader {
                polls: 0,
                queue_at: queue_at.clone(),
                queues: Vec::new(),
            };
            let mut room = QueueRoom::reserve();
            let mut byte = [0u8; 1];
            let mut cx = Context::from_waker(std::task::Waker::noop());
            {
                let mut reading = std::pin::pin!(room.read(&mut reader, &mut byte));
                assert!(reading.as_mut().poll(&mut cx).is_pending());
            }
            // Pending: the room was taken again.
            assert!(room.is_reserved());
            let kept_at = room.room.as_ptr() as usize;
            let read = {
                let mut reading = std::pin::pin!(room.read(&mut reader, &mut byte));
                reading.as_mut().poll(&mut cx)
            };
            assert!(matches!(read, Poll::Ready(Ok(1))), "{read:?}");
            assert!(!room.is_reserved());
            // glibc's per-thread cache gives the freed room to the queue.
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            assert_eq!(queue_at.lock().ok().and_then(|at| *at), Some(kept_at));
            let _ = kept_at;
        });
        if let Err(panic) = run.join() {
            std::panic::resume_unwind(panic);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn no_room_reads_plainly() {
        let mut reader = QueueingReader {
            polls: 1,
            queue_at: Arc::default(),
            queues: Vec::new(),
        };
        let mut room = QueueRoom::none();
        let mut byte = [0u8; 1];
        assert_eq!(room.read(&mut reader, &mut byte).await.ok(), Some(1));
        assert!(!room.is_reserved());
    }
}
