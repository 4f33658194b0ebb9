//! Free space on the data dir's filesystem, so the node refuses new messages before
//! the disk is full instead of failing in the middle of a write.
//!
//! sled treats a failed log write as fatal: every later operation of that process
//! fails. So the node keeps `storage.min_free_bytes` in reserve. Below it, sends and key
//! uploads get `StorageFull`, while acknowledgements (which free space) and deliveries
//! go on using the reserve. Space freed by acknowledgements is reused by sled's log, and
//! sled gives the file's tail back to the filesystem when its last segments empty; once
//! free space is back above the reserve, sends work again.
//!
//! The reserve must cover what is accepted between two readings plus what sled
//! rewrites while a backlog drains. Measured by `tests/it/disk.rs`: a 64 MiB tmpfs
//! filled to a 24 MiB reserve with 32 KiB envelopes, then drained, lost another
//! 1.4 MiB of free space at its lowest; the 64 MiB default leaves room for far more.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a reading of free space is trusted. A statvfs costs a few microseconds;
/// this keeps it to a hundred per second at most, and the writes that can slip in
/// between two readings to what the node accepts in 10 ms.
const FRESH_FOR: Duration = Duration::from_millis(10);

pub struct SpaceGuard {
    dir: PathBuf,
    min_free: u64,
    /// The clock readings are measured from.
    epoch: Instant,
    /// When free space was last read (ms since `epoch`, plus one; 0: never).
    read_at: AtomicU64,
    /// Whether free space was below the reserve at that reading.
    full: AtomicBool,
}

impl SpaceGuard {
    pub fn new(dir: PathBuf, min_free: u64) -> SpaceGuard {
        SpaceGuard {
            dir,
            min_free,
            epoch: Instant::now(),
            read_at: AtomicU64::new(0),
            full: AtomicBool::new(false),
        }
    }

    /// Whether `bytes` more fit on the filesystem and leave the reserve (read now).
    pub fn room_for(&self, bytes: u64) -> bool {
        if self.min_free == 0 {
            return true;
        }
        match fs2::available_space(&self.dir) {
            Ok(free) => free >= self.min_free.saturating_add(bytes),
            Err(_) => true,
        }
    }

    /// True when the filesystem has less than the reserve free. A filesystem whose
    /// free space cannot be read counts as not full (and is logged once a reading).
    /// Lock-free: every send asks, and one caller per `FRESH_FOR` reads statvfs.
    pub fn full(&self) -> bool {
        if self.min_free == 0 {
            return false;
        }
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.read_at.load(Ordering::Acquire);
        if (last != 0 && now < last + FRESH_FOR.as_millis() as u64)
            || self
                .read_at
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return self.full.load(Ordering::Acquire);
        }
        let full = match fs2::available_space(&self.dir) {
            Ok(free) => free < self.min_free,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read free space");
                false
            }
        };
        let was = self.full.swap(full, Ordering::AcqRel);
        if full && !was {
            tracing::warn!(
                dir = %self.dir.display(),
                reserve = self.min_free,
                "storage full: free space is below storage.min_free_bytes; refusing new messages"
            );
        } else if !full && was {
            tracing::info!(dir = %self.dir.display(), "free space is back above the reserve");
        }
        full
    }
}
