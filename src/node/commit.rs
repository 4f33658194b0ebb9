//! Group commit: one flush makes every write that finished before it durable.
//!
//! A handler that needs its write durable calls [`GroupCommit::durable`] after the
//! write returned. Waiters queue up while a flush runs; the next flush covers all of
//! them at once, so under load the node pays one disk sync per batch, not per message.
//! Durability here means sled's flush: the write survives a crash of the process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::metrics::Metrics;
use crate::store::Store;

type Waiter = oneshot::Sender<Result<(), String>>;

/// The group-commit handle; cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    /// `None` asks the flusher to stop.
    waiters: mpsc::UnboundedSender<Option<Waiter>>,
    stats: Arc<CommitStats>,
    task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

/// Counters for benchmarks and metrics.
#[derive(Default)]
pub struct CommitStats {
    pub flushes: AtomicU64,
    pub commits: AtomicU64,
}

impl GroupCommit {
    /// Starts the flusher task on the current runtime. It ends on [`GroupCommit::stop`]
    /// or when every handle is dropped.
    pub fn start(
        store: Store,
        metrics: Arc<Metrics>,
        fatal: Arc<super::worker::Fatal>,
    ) -> GroupCommit {
        let (tx, mut rx) = mpsc::unbounded_channel::<Option<Waiter>>();
        let stats = Arc::new(CommitStats::default());
        let task_stats = stats.clone();
        let task = tokio::spawn(async move {
            let mut batch = Vec::new();
            let mut stopping = false;
            while !stopping {
                match rx.recv().await {
                    Some(Some(first)) => batch.push(first),
                    Some(None) | None => break,
                }
                while let Ok(more) = rx.try_recv() {
                    match more {
                        Some(waiter) => batch.push(waiter),
                        None => stopping = true,
                    }
                }
                let started = std::time::Instant::now();
                let result = store.flush().await.map_err(|e| {
                    fatal.check(&e);
                    e.to_string()
                });
                metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics.commit_batch.observe(batch.len() as f64);
                if let Err(e) = &result {
                    tracing::error!(error = %e, "group commit: flush failed");
                }
                task_stats.flushes.fetch_add(1, Ordering::Relaxed);
                task_stats
                    .commits
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                for waiter in batch.drain(..) {
                    let _ = waiter.send(result.clone());
                }
            }
        });
        GroupCommit {
            waiters: tx,
            stats,
            task: Arc::new(std::sync::Mutex::new(Some(task))),
        }
    }

    /// Answers the waiters queued so far, then stops the flusher and waits until it
    /// has let go of the store.
    pub async fn stop(&self) {
        let _ = self.waiters.send(None);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Returns once every write that completed before this call is durable.
    pub async fn durable(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .send(Some(tx))
            .map_err(|_| "the group-commit task has stopped".to_string())?;
        rx.await
            .map_err(|_| "the group-commit task has stopped".to_string())?
    }

    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }
}
