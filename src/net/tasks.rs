//! The tasks that serve connections: client connections, their tunnels,
//! passed-through and WebSocket relays, the admin endpoint's connections,
//! and the daemon's loops beside them.
//!
//! A graceful stop waits for them for its grace period; what is still
//! running then is aborted, its sockets closed. Without that, a relay (or a
//! client that keeps its connection busy) would outlive `Daemon::shutdown`
//! whenever pinproxy runs inside another program's runtime: the binary ends
//! its process, an embedding program does not.
//!
//! Each task is registered by its abort handle while it runs, at its start
//! and end only: a connection's task is polled several times per request,
//! and nothing here adds to those polls.
//!
//! A connection also asks, at each of those polls, whether the daemon is
//! stopping (to stop taking requests). [`Stopping`] answers with an atomic
//! load: `CancellationToken::cancelled` takes the token's lock, which every
//! connection shares, on every poll.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use futures_util::FutureExt as _;
use tokio::task::{AbortHandle, Id, JoinHandle};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// Tracked connection tasks that can all be aborted at once (cheap to
/// clone: every clone is the same set).
#[derive(Clone, Debug, Default)]
pub struct ConnectionTasks {
    tracker: TaskTracker,
    registry: Arc<Registry>,
}

/// The running tasks' abort handles, and whether they were abandoned.
#[derive(Debug, Default)]
struct Registry {
    /// By task: its abort handle, or `None` for a task that ended before
    /// its spawner registered it (the spawner then takes the entry out).
    running: DashMap<Id, Option<AbortHandle>>,
    abandoned: AtomicBool,
}

/// `task`, taking its entry out of `registry` when it ends or is dropped
/// (aborted).
///
/// Mapped, not wrapped in an `async move` block awaiting the task: such a
/// block keeps the task's future twice (captured, and again once awaited;
/// the compiler cannot overlap the two), which doubled the memory of every
/// connection's task (an idle tunnel held 10.4 KiB of RSS where it held
/// 9.5) and copied the future once more at its first poll. The map holds
/// the future and its closure, and the closure holds the guard.
fn registered<F: Future>(task: F, registry: &Arc<Registry>) -> impl Future<Output = F::Output> {
    let deregister = Deregister(registry.clone());
    task.map(move |output| {
        drop(deregister);
        output
    })
}

/// Takes its task's entry out of the registry when the task ends (or is
/// aborted: its future is dropped either way).
struct Deregister(Arc<Registry>);

impl Drop for Deregister {
    fn drop(&mut self) {
        // The task's own id: tokio sets it while a task's future is dropped.
        if let Some(id) = tokio::task::try_id() {
            // Not registered yet (its spawner has not got that far): left
            // marked ended, for the spawner to take out. Whether it has
            // ended cannot be asked of its handle instead: the handle says
            // finished only once the output is stored, after this.
            match self.0.running.entry(id) {
                Entry::Occupied(registered) => {
                    registered.remove();
                }
                Entry::Vacant(unregistered) => {
                    unregistered.insert(None);
                }
            }
        }
    }
}

impl ConnectionTasks {
    /// An empty set.
    pub fn new() -> ConnectionTasks {
        ConnectionTasks::default()
    }

    /// Spawns `task` on the current runtime, tracked; it runs to its end
    /// unless [`ConnectionTasks::abandon`] aborts it first.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let handle = self.tracker.spawn(registered(task, &self.registry));
        let registry = &self.registry;
        match registry.running.entry(handle.id()) {
            // Ended already (see `Deregister`): nothing to register.
            Entry::Occupied(ended) => {
                ended.remove();
            }
            Entry::Vacant(running) => {
                running.insert(Some(handle.abort_handle()));
                // Abandoned before it was registered, so not aborted by
                // `abandon`: aborted here.
                if registry.abandoned.load(Ordering::SeqCst) {
                    handle.abort();
                }
            }
        }
        handle
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

    /// Aborts every task, running or spawned from now on: each ends at its
    /// next poll, dropping what it holds.
    pub fn abandon(&self) {
        let registry = &self.registry;
        registry.abandoned.store(true, Ordering::SeqCst);
        // Handles copied out first: an aborted task that ends at once takes
        // its own entry out, which must not wait for this iteration's lock.
        let handles: Vec<AbortHandle> = registry
            .running
            .iter()
            .filter_map(|entry| entry.value().clone())
            .collect();
        for handle in handles {
            handle.abort();
        }
    }

    /// Tasks registered for [`ConnectionTasks::abandon`] (those running),
    /// and ended ones not yet taken out by their spawner.
    #[cfg(test)]
    fn registered(&self) -> usize {
        self.registry.running.len()
    }
}

/// Resolves once its token is cancelled, as `CancellationToken::cancelled`
/// does, at the cost of an atomic load and a waker comparison per poll
/// after the first.
///
/// The token's wait is polled with a waker of this future's own
/// ([`Signal`]), at the first poll and again only when the token woke it;
/// the task's waker is kept in an `AtomicWaker`, which the signal wakes.
#[derive(Debug)]
pub struct Stopping {
    signal: Arc<Signal>,
    /// The token's own wait, boxed so that this future is `Unpin` (one
    /// allocation per connection, not per request).
    wait: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Whether the wait holds the signal's waker.
    armed: bool,
}

/// What the token's wait wakes: it marks the wake and passes it on to the
/// task waiting.
#[derive(Debug, Default)]
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Marked before the task is woken, so its poll sees the mark.
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Stopping {
    /// Waits for `token`.
    pub fn new(token: CancellationToken) -> Stopping {
        Stopping {
            signal: Arc::default(),
            wait: Box::pin(token.cancelled_owned()),
            armed: false,
        }
    }
}

impl Future for Stopping {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        // First, so that a wake from here on reaches this task.
        this.signal.task.register(cx.waker());
        let woken = this.signal.woken.load(Ordering::Acquire)
            && this.signal.woken.swap(false, Ordering::AcqRel);
        if !this.armed || woken {
            let waker = Waker::from(this.signal.clone());
            if this
                .wait
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_ready()
            {
                return Poll::Ready(());
            }
            this.armed = true;
        }
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
    async fn stopping_wakes_its_task_when_the_token_is_cancelled_after_it_armed() {
        let token = CancellationToken::new();
        let (armed, is_armed) = tokio::sync::oneshot::channel();
        let waiter = tokio::spawn({
            let token = token.clone();
            async move {
                let mut stopping = Stopping::new(token);
                for _ in 0..3 {
                    assert!(poll_once(&mut stopping).await.is_pending());
                }
                let _ = armed.send(());
                stopping.await;
            }
        });
        is_armed.await.expect("the waiter armed");
        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the cancellation woke the waiting task")
            .expect("the task ran");
        // Made after the cancellation: ready at its first poll.
        assert!(poll_once(&mut Stopping::new(token)).await.is_ready());
    }

    #[tokio::test]
    async fn stopping_moved_to_another_task_wakes_that_one() {
        let token = CancellationToken::new();
        let mut stopping = Stopping::new(token.clone());
        assert!(poll_once(&mut stopping).await.is_pending(), "armed here");
        let (polled, was_polled) = tokio::sync::oneshot::channel();
        let waiter = tokio::spawn(async move {
            assert!(poll_once(&mut stopping).await.is_pending());
            let _ = polled.send(());
            stopping.await;
        });
        was_polled.await.expect("the other task polled it");
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
            Some(7),
            "a task that ends keeps its output"
        );
        assert_eq!(tasks.registered(), 1, "an ended task left the registry");
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
        assert_eq!(tasks.registered(), 0, "an aborted task left the registry");
        assert_eq!(dropped.recv().await, None, "what the task held was dropped");
        assert!(forever.await.is_err_and(|e| e.is_cancelled()));
        // Spawned after abandoning: aborted at once.
        let late = tasks.spawn(std::future::pending::<()>());
        let late = tokio::time::timeout(Duration::from_secs(5), late).await;
        assert!(matches!(&late, Ok(Err(e)) if e.is_cancelled()), "{late:?}");
    }

    #[test]
    fn a_registered_task_holds_its_future_once() {
        let buffer = [7u8; 4096];
        let task = async move { std::hint::black_box(&buffer).len() };
        let alone = std::mem::size_of_val(&task);
        let registered = registered(task, &Arc::default());
        assert!(
            std::mem::size_of_val(&registered) <= alone + 16,
            "{} bytes around a {alone}-byte future",
            std::mem::size_of_val(&registered)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tasks_that_end_at_once_leave_nothing_registered() {
        let tasks = ConnectionTasks::new();
        let handles: Vec<_> = (0..1_000).map(|i| tasks.spawn(async move { i })).collect();
        for handle in handles {
            handle.await.expect("the task ran");
        }
        tasks.close();
        tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .expect("every task ended");
        assert_eq!(tasks.registered(), 0);
    }
}
