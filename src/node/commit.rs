//! Group commit: one flush makes every write that finished before it durable.
//!
//! A handler that needs its write durable calls [`GroupCommit::durable`] after the
//! write returned. Waiters queue up while a flush runs; the next flush covers all of
//! them at once, so under load the node pays one disk sync per batch, not per message.
//! Durability here means sled's flush: the write survives a crash of the process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::store::Store;

type Waiter = oneshot::Sender<Result<(), String>>;

/// The group-commit handle; cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    waiters: mpsc::UnboundedSender<Waiter>,
    stats: Arc<CommitStats>,
}

/// Counters for benchmarks and metrics.
#[derive(Default)]
pub struct CommitStats {
    pub flushes: AtomicU64,
    pub commits: AtomicU64,
}

impl GroupCommit {
    /// Starts the flusher task on the current runtime. It ends when every handle is
    /// dropped.
    pub fn start(store: Store) -> GroupCommit {
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiter>();
        let stats = Arc::new(CommitStats::default());
        let task_stats = stats.clone();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some(first) = rx.recv().await {
                batch.push(first);
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let result = store.flush().await.map_err(|e| e.to_string());
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
        GroupCommit { waiters: tx, stats }
    }

    /// Returns once every write that completed before this call is durable.
    pub async fn durable(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .send(tx)
            .map_err(|_| "the group-commit task has stopped".to_string())?;
        rx.await
            .map_err(|_| "the group-commit task has stopped".to_string())?
    }

    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }
}
