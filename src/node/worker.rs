//! The store thread: one OS thread that runs the store operations of the request path
//! that write to sled (the hand-off's in-memory operations run on the async workers).
//!
//! Handlers must not block async workers on sled, and `spawn_blocking` per operation
//! proved costly under load (a thread handoff per call, new threads spawned whenever
//! none is idle: it dominated the relay profile). One long-lived thread fed by a
//! channel does the same job: under load it runs operations back to back without
//! sleeping, so the handoff costs next to nothing. Writes to queues are serialised by
//! the store anyway. Long maintenance (the TTL sweep) stays off this thread. The node
//! runs two: one for writes and one for reads.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::proto::{ErrorKind, NodeError};
use crate::store::{Store, StoreError};

type Job = Box<dyn FnOnce(&Store) + Send>;

/// Set when the store failed for good (see [`StoreError::is_fatal`]): the node stops
/// taking work and exits with an error, so that its supervisor (systemd's
/// `Restart=on-failure`) starts a new process, which recovers from what is on disk.
#[derive(Default)]
pub struct Fatal {
    token: tokio_util::sync::CancellationToken,
    why: std::sync::Mutex<Option<String>>,
}

impl Fatal {
    /// Notes `e` if it is fatal.
    pub fn check(&self, e: &StoreError) {
        if e.is_fatal() {
            let mut why = self
                .why
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if why.is_none() {
                tracing::error!(error = %e, "the database failed: the node stops so that a restart recovers it");
                *why = Some(e.to_string());
            }
            self.token.cancel();
        }
    }

    /// Completes once the store failed.
    pub async fn raised(&self) {
        self.token.cancelled().await;
    }

    /// Why the store failed, if it did.
    pub fn why(&self) -> Option<String> {
        self.why
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// A handle to the store thread.
pub struct StoreWorker {
    jobs: mpsc::Sender<Option<Job>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    fatal: std::sync::Arc<Fatal>,
}

impl StoreWorker {
    pub fn start(
        store: Store,
        name: &str,
        fatal: std::sync::Arc<Fatal>,
    ) -> std::io::Result<StoreWorker> {
        let (jobs, queue) = mpsc::channel::<Option<Job>>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // `None` (or every handle gone) stops the thread, which drops its Store.
                while let Ok(Some(job)) = queue.recv() {
                    // A panicking operation fails its own request (its reply channel
                    // is dropped), never the thread.
                    if std::panic::catch_unwind(AssertUnwindSafe(|| job(&store))).is_err() {
                        tracing::error!("a store operation panicked");
                    }
                }
            })?;
        Ok(StoreWorker {
            jobs,
            thread: std::sync::Mutex::new(Some(thread)),
            fatal,
        })
    }

    /// Finishes the queued operations, stops the thread and waits until it has let go
    /// of the store (so the database can be opened again in this process).
    pub async fn stop(&self) {
        let _ = self.jobs.send(None);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    /// Queues `op` on the store thread without waiting for it; a failure is logged
    /// as `what`. For work nobody waits on.
    pub fn detach(
        &self,
        what: &'static str,
        op: impl FnOnce(&Store) -> Result<(), StoreError> + Send + 'static,
    ) {
        let fatal = self.fatal.clone();
        let job: Job = Box::new(move |store| {
            if let Err(e) = op(store) {
                tracing::warn!(error = %e, "{what} failed");
                fatal.check(&e);
            }
        });
        if self.jobs.send(Some(job)).is_err() {
            tracing::debug!("{what} dropped: the store thread has stopped");
        }
    }

    /// Runs `op` on the store thread and waits for it without blocking.
    pub async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let fatal = self.fatal.clone();
        self.jobs
            .send(Some(Box::new(move |store| {
                let result = op(store);
                if let Err(e) = &result {
                    fatal.check(e);
                }
                let _ = tx.send(result);
            })))
            .map_err(|_| StoreError::Corrupt("the store thread has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Corrupt("a store operation failed inside".into()))?
    }
}

/// A storage failure, as the client hears of it (the details go to the log).
pub(crate) fn internal(e: StoreError) -> NodeError {
    tracing::error!(error = %e, "storage failure");
    NodeError::new(
        ErrorKind::Internal,
        "the node's storage failed; nothing was changed",
    )
}

/// Runs a store operation on the store thread, so sled never blocks an async worker.
pub(crate) async fn blocking<T: Send + 'static>(
    shared: &std::sync::Arc<super::Shared>,
    op: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, NodeError> {
    shared.worker.run(op).await.map_err(internal)
}

/// Runs a read-only store operation on the reader thread, beside the writes.
pub(crate) async fn read<T: Send + 'static>(
    shared: &std::sync::Arc<super::Shared>,
    op: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, NodeError> {
    shared.reader.run(op).await.map_err(internal)
}
