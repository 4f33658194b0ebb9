//! Quotas counted for the whole cluster (`sb_quotas`), so that a client spreading
//! its requests over several nodes gets no more than through one: the daily
//! contact-discovery budget, one-time-key claims, group changes and link joins.
//!
//! Each count is one entry, `KIND.KEY.WINDOW`, changed by compare-and-set: no two
//! nodes can both take the last unit. A window is fixed (a UTC day, an hour since
//! the epoch) where the single node counts a sliding hour (GCRA): at a window's
//! turn a client may spend one window's quota at its end and the next one's at
//! once. The cluster drops an entry two days after its last write, so nothing
//! sweeps them.

use std::time::Duration;

use bincode::{Decode, Encode};

use super::bucket::Bucket;
use super::{Cluster, ClusterError};
use crate::store::StoreError;

/// The bucket's name.
pub const BUCKET: &str = "sb_quotas";

/// How long the cluster keeps a count after its last write (a day's window, and
/// a day more).
const KEEP: Duration = Duration::from_secs(2 * 86_400);

/// What one window of one quota has used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
struct Used {
    used: u32,
    /// The items counted once each (`take_once`).
    items: Vec<u64>,
}

/// Quotas on a JetStream cluster.
#[derive(Debug, Clone)]
pub struct JetStreamQuotas {
    bucket: Bucket,
}

impl JetStreamQuotas {
    /// The bucket on `cluster`, created with `replicas` replicas if it is not there.
    pub async fn open(cluster: &Cluster, replicas: usize) -> Result<JetStreamQuotas, ClusterError> {
        let bucket = Bucket::open_expiring(
            cluster,
            BUCKET,
            "switchboard: discovery budgets, key claims, group changes and link joins per window",
            replicas,
            KEEP,
        )
        .await?;
        Ok(JetStreamQuotas { bucket })
    }

    /// Takes `n` of the `limit` of quota `key` (which names its window): what is
    /// left, or `None` (nothing taken) when `n` more would pass the limit.
    pub async fn take(&self, key: &str, n: u32, limit: u32) -> Result<Option<u32>, StoreError> {
        self.bucket
            .modify(key, |slot: &mut Option<Used>| {
                let count = slot.get_or_insert_with(Used::default);
                match count.used.checked_add(n).filter(|&u| u <= limit) {
                    Some(used) => {
                        count.used = used;
                        (Some(limit - used), n > 0)
                    }
                    None => (None, false),
                }
            })
            .await
    }

    /// Takes one of the `limit` of quota `key` for `item`, unless one was taken
    /// for it in this window already: whether it may go on.
    pub async fn take_once(&self, key: &str, item: u64, limit: u32) -> Result<bool, StoreError> {
        self.bucket
            .modify(key, |slot: &mut Option<Used>| {
                let count = slot.get_or_insert_with(Used::default);
                if count.items.contains(&item) {
                    return (true, false);
                }
                if count.used >= limit {
                    return (false, false);
                }
                count.used += 1;
                count.items.push(item);
                (true, true)
            })
            .await
    }
}

impl JetStreamQuotas {
    /// Takes the cluster's turn at the periodic job `job` (run every `every_ms` by
    /// each node's sweep), if no node holds it: one node per interval runs it. A
    /// turn is held for three quarters of the interval, so the holder's next sweep,
    /// a little early, takes the next one.
    pub async fn take_turn(
        &self,
        job: &str,
        now_ms: u64,
        every_ms: u64,
    ) -> Result<bool, StoreError> {
        let hold = every_ms / 4 * 3;
        self.bucket
            .modify(&format!("turn.{job}"), |slot: &mut Option<u64>| {
                if slot.is_some_and(|until| until > now_ms) {
                    return (false, false);
                }
                *slot = Some(now_ms.saturating_add(hold.max(1)));
                (true, true)
            })
            .await
    }

    /// Whether a node's sweep took a turn within `since_ms` of `now_ms`: a node
    /// serves (or just served) on this cluster.
    pub async fn node_ran_recently(&self, now_ms: u64, since_ms: u64) -> Result<bool, StoreError> {
        let (until, _) = self.bucket.read::<u64>("turn.lapse").await?;
        Ok(until.is_some_and(|until| until.saturating_add(since_ms) > now_ms))
    }
}

/// The UTC day of `now_secs`, for a daily window.
pub fn day(now_secs: u64) -> u64 {
    now_secs / 86_400
}

/// The hour since the epoch of `now_secs`, for an hourly window.
pub fn hour(now_secs: u64) -> u64 {
    now_secs / 3_600
}
