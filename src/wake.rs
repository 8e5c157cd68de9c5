//! Waking workers after a commit without a lock in the writer's transaction (invariant 9).
//!
//! A `NOTIFY` inside the writer's transaction takes PostgreSQL's global notification lock at
//! COMMIT and holds it through the WAL flush, so committers queue behind one another. Instead:
//! - workers in this process are woken directly, in memory, after the COMMIT;
//! - workers in other processes are woken by an [`Announcer`]: after a commit it waits a few
//!   milliseconds, so that every commit in that window shares one notification, then sends one
//!   `NOTIFY` on its own pooled connection, outside any application transaction. Under a steady
//!   stream of commits the window widens (up to 8× the interval): a worker that keeps finding
//!   jobs claims again at once without being told, so frequent notifications would only cost
//!   the writers' process CPU; the first commit after a quiet spell is announced at the base
//!   interval again;
//! - workers poll as a fallback, and claim again at once while claims come back non-empty.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::Error;
use crate::store::BoxFuture;

static LOCAL: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::channel(0).0);

/// Wakes the workers running in this process.
pub(crate) fn wake_local() {
    LOCAL.send_modify(|n| *n = n.wrapping_add(1));
}

/// What a worker in this process waits on to hear of commits made in it.
#[cfg_attr(not(feature = "worker"), allow(dead_code))]
pub(crate) fn subscribe_local() -> watch::Receiver<u64> {
    LOCAL.subscribe()
}

/// Sends one notification to other processes' workers.
pub(crate) type Announce = Arc<dyn Fn() -> BoxFuture<'static, Result<(), Error>> + Send + Sync>;

/// A window that gathered at least this many commits is widened for the next one: commits
/// are arriving faster than one per window, so workers elsewhere are busy claiming anyway.
/// (At 8, a single writer at 700 transactions/s never widened it, and its process sent a
/// NOTIFY, each a transaction of its own, every 5 ms.)
const BUSY_WINDOW_COMMITS: u64 = 2;
/// The widest window, in base intervals.
const MAX_WINDOW_FACTOR: u32 = 8;

struct Inner {
    pending: AtomicBool,
    /// Commits since the last notification was sent.
    commits: AtomicU64,
    notify: Notify,
    closed: AtomicBool,
}

/// Coalesces commits into at most one notification per interval, sent by a task of its own.
pub(crate) struct Announcer {
    inner: Arc<Inner>,
    announce: Announce,
    interval: Duration,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Announcer {
    pub(crate) fn new(announce: Announce, interval: Duration) -> Self {
        Announcer {
            inner: Arc::new(Inner {
                pending: AtomicBool::new(false),
                commits: AtomicU64::new(0),
                notify: Notify::new(),
                closed: AtomicBool::new(false),
            }),
            announce,
            interval,
            task: Mutex::new(None),
        }
    }

    /// Called after a commit: one atomic swap when a notification is already pending.
    pub(crate) fn poke(&self) {
        self.inner.commits.fetch_add(1, Ordering::Relaxed);
        if self.inner.pending.swap(true, Ordering::AcqRel) {
            return; // the pending notification covers this commit too
        }
        {
            let mut task = self.task.lock().expect("poisoned");
            if task.as_ref().is_none_or(JoinHandle::is_finished) {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    self.inner.pending.store(false, Ordering::Release);
                    return; // no runtime to send from: workers poll
                };
                *task = Some(runtime.spawn(run(
                    self.inner.clone(),
                    self.announce.clone(),
                    self.interval,
                )));
            }
        }
        self.inner.notify.notify_one();
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.notify.notify_one();
    }
}

impl std::fmt::Debug for Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcer")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

async fn run(inner: Arc<Inner>, announce: Announce, interval: Duration) {
    let mut window = interval;
    loop {
        inner.notify.notified().await;
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        tokio::time::sleep(window).await;
        // Commits from here on need a notification of their own: the next round sends it.
        inner.pending.store(false, Ordering::Release);
        let gathered = inner.commits.swap(0, Ordering::Relaxed);
        window = next_window(window, interval, gathered);
        if let Err(e) = announce().await {
            tracing::warn!(error = %e, "could not notify workers; they find the jobs by polling");
        }
    }
}

/// The next coalescing window: wider after a busy one, the base interval after a quiet one.
fn next_window(window: Duration, interval: Duration, gathered: u64) -> Duration {
    if gathered >= BUSY_WINDOW_COMMITS {
        (window * 2).min(interval * MAX_WINDOW_FACTOR)
    } else {
        interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_widens_under_load_and_resets_when_quiet() {
        let base = Duration::from_millis(5);
        let mut window = base;
        for expected in [10, 20, 40, 40] {
            window = next_window(window, base, 20);
            assert_eq!(window, Duration::from_millis(expected));
        }
        assert_eq!(next_window(window, base, 1), base);
        assert_eq!(next_window(base, base, 2), base * 2);
        assert_eq!(next_window(base, base, 1), base);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn commits_in_one_window_share_one_notification() {
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let announcer = Announcer::new(
            Arc::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                Box::pin(std::future::ready(Ok(())))
            }),
            Duration::from_millis(5),
        );
        for _ in 0..5 {
            announcer.poke();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(sent.load(Ordering::SeqCst), 1);
        announcer.poke();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            sent.load(Ordering::SeqCst),
            2,
            "a later commit gets its own"
        );
    }
}
