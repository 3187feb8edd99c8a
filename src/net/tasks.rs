//! The tasks that serve connections (client connections, their tunnels,
//! passed-through and WebSocket relays, the admin endpoint's connections,
//! and the daemon's loops beside them) and how they hear of a stop.
//!
//! A graceful stop waits for them for its grace period; what is still
//! running then is dropped, its sockets closed. Without that, a relay (or a
//! client that keeps its connection busy) would outlive `Daemon::shutdown`
//! whenever pinproxy runs inside another program's runtime: the binary ends
//! its process, an embedding program does not.
//!
//! A connection's task is polled several times per request, and each poll
//! asks whether the daemon is stopping. [`Cancelled`] answers that with one
//! atomic load once its task is registered for the stop's wake-up, where
//! `CancellationToken::cancelled` takes the token's lock, which every
//! connection shares, on every poll.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// Tracked connection tasks that can all be abandoned at once (cheap to
/// clone: every clone is the same set).
#[derive(Clone, Debug, Default)]
pub struct ConnectionTasks {
    tracker: TaskTracker,
    /// Cancelled when the grace period is over: every task ends at its
    /// next poll, dropping what it holds.
    abandon: CancellationToken,
}

impl ConnectionTasks {
    /// An empty set.
    pub fn new() -> ConnectionTasks {
        ConnectionTasks::default()
    }

    /// Spawns `task` on the current runtime, tracked; it runs to its end
    /// unless [`ConnectionTasks::abandon`] comes first (then the handle
    /// yields `None`).
    pub fn spawn<F>(&self, task: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let abandoned = Cancelled::new(self.abandon.clone());
        self.tracker.spawn(async move {
            tokio::select! {
                // The task first: its end wins over a simultaneous abandon.
                biased;
                output = task => Some(output),
                () = abandoned => None,
            }
        })
    }

    /// Takes no more tasks into account for [`ConnectionTasks::wait`]'s
    /// end: it returns once the tasks spawned so far have ended.
    pub fn close(&self) {
        self.tracker.close();
    }

    /// Waits until the set is closed and every task in it has ended.
    pub async fn wait(&self) {
        self.tracker.wait().await;
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether no task is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Ends every task, running or spawned from now on, at its next poll.
    pub fn abandon(&self) {
        self.abandon.cancel();
    }
}

/// Resolves once its token is cancelled, as `CancellationToken::cancelled`
/// does, but a poll with the waker it already registered costs one atomic
/// load instead of the token's lock.
///
/// No wake-up is lost: the first poll (and any poll with another waker)
/// registers the waker with the token, whose cancellation sets its flag
/// before waking what is registered; a later poll with the same waker
/// reads the flag, and a cancellation after that read wakes the task.
#[derive(Debug)]
pub struct Cancelled {
    token: CancellationToken,
    /// The token's own wait, boxed so that this future is `Unpin` (one
    /// allocation per connection, not per request).
    wait: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The waker the wait holds, once it holds one.
    registered: Option<Waker>,
}

impl Cancelled {
    /// Waits for `token`.
    pub fn new(token: CancellationToken) -> Cancelled {
        Cancelled {
            wait: Box::pin(token.clone().cancelled_owned()),
            token,
            registered: None,
        }
    }
}

impl Future for Cancelled {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.token.is_cancelled() {
            return Poll::Ready(());
        }
        if let Some(waker) = &this.registered {
            if waker.will_wake(cx.waker()) {
                return Poll::Pending;
            }
        }
        ready!(this.wait.as_mut().poll(cx));
        this.registered = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Polls `future` once with the calling task's waker.
    async fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *future).poll(cx))).await
    }

    #[tokio::test]
    async fn cancelled_wakes_its_task_when_the_token_is_cancelled_after_it_registered() {
        let token = CancellationToken::new();
        let (registered, is_registered) = tokio::sync::oneshot::channel();
        let waiter = tokio::spawn({
            let token = token.clone();
            async move {
                let mut cancelled = Cancelled::new(token);
                // The first poll registers the task's waker; the later ones
                // (same waker) read the flag alone.
                for _ in 0..3 {
                    assert!(poll_once(&mut cancelled).await.is_pending());
                }
                let _ = registered.send(());
                cancelled.await;
            }
        });
        is_registered.await.expect("the waiter registered");
        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the cancellation woke the waiting task")
            .expect("the task ran");
        // Moved to another task (another waker), or made after the
        // cancellation: ready at its next poll.
        assert!(poll_once(&mut Cancelled::new(token)).await.is_ready());
    }

    #[tokio::test]
    async fn a_cancelled_moved_to_another_task_wakes_that_one() {
        let token = CancellationToken::new();
        let mut cancelled = Cancelled::new(token.clone());
        assert!(
            poll_once(&mut cancelled).await.is_pending(),
            "registered here"
        );
        let waiter = tokio::spawn(cancelled);
        tokio::task::yield_now().await;
        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the cancellation woke the task it moved to")
            .expect("the task ran");
    }

    #[tokio::test]
    async fn abandoning_drops_what_the_tasks_hold_and_ends_the_wait() {
        let tasks = ConnectionTasks::new();
        let (held, mut dropped) = tokio::sync::mpsc::channel::<()>(1);
        let forever = tasks.spawn(async move {
            let _held = held;
            std::future::pending::<()>().await
        });
        let quick = tasks.spawn(async { 7 });
        assert_eq!(
            quick.await.ok(),
            Some(Some(7)),
            "a task that ends keeps its output"
        );
        tasks.close();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), tasks.wait())
                .await
                .is_err(),
            "the wait holds while a task runs"
        );
        assert_eq!(tasks.len(), 1);
        tasks.abandon();
        tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .expect("abandoned tasks end");
        assert!(tasks.is_empty());
        assert_eq!(dropped.recv().await, None, "what the task held was dropped");
        assert_eq!(forever.await.ok(), Some(None));
        // Spawned after abandoning: ends at once.
        let late = tasks.spawn(std::future::pending::<()>());
        let late = tokio::time::timeout(Duration::from_secs(5), late).await;
        assert!(matches!(late, Ok(Ok(None))), "{late:?}");
    }
}
