//! Free space on the data dir's filesystem, so the node refuses new messages before
//! the disk is full instead of failing in the middle of a write.
//!
//! sled treats a failed log write as fatal: every later operation of that process
//! fails. So the node keeps `storage.min_free_bytes` in reserve. Below it, sends and key
//! uploads get `StorageFull`, while acknowledgements (which free space) and deliveries
//! go on using the reserve. Space freed by acknowledgements is reused by sled's log, and
//! sled gives the file's tail back to the filesystem when its last segments empty; once
//! free space is back above the reserve, sends work again.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a reading of free space is trusted. A statvfs costs a few microseconds;
/// this keeps it to a hundred per second at most, and the writes that can slip in
/// between two readings to what the node accepts in 10 ms.
const FRESH_FOR: Duration = Duration::from_millis(10);

pub struct SpaceGuard {
    dir: PathBuf,
    min_free: u64,
    /// The last reading: when, and whether free space was below the reserve.
    last: Mutex<Option<(Instant, bool)>>,
}

impl SpaceGuard {
    pub fn new(dir: PathBuf, min_free: u64) -> SpaceGuard {
        SpaceGuard {
            dir,
            min_free,
            last: Mutex::new(None),
        }
    }

    /// True when the filesystem has less than the reserve free. A filesystem whose
    /// free space cannot be read counts as not full (and is logged once a reading).
    pub fn full(&self) -> bool {
        if self.min_free == 0 {
            return false;
        }
        let now = Instant::now();
        let Ok(mut last) = self.last.lock() else {
            return false;
        };
        if let Some((at, full)) = *last
            && now.duration_since(at) < FRESH_FOR
        {
            return full;
        }
        let full = match fs2::available_space(&self.dir) {
            Ok(free) => free < self.min_free,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read free space");
                false
            }
        };
        if full && !last.is_some_and(|(_, was)| was) {
            tracing::warn!(
                dir = %self.dir.display(),
                reserve = self.min_free,
                "storage full: free space is below storage.min_free_bytes; refusing new messages"
            );
        } else if !full && last.is_some_and(|(_, was)| was) {
            tracing::info!(dir = %self.dir.display(), "free space is back above the reserve");
        }
        *last = Some((now, full));
        full
    }
}
