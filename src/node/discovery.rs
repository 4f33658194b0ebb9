//! The node's side of contact discovery: the daily budget per account, and the
//! membership filter that clients download.
//!
//! The budget counts every way of turning a number into an account: each blinded
//! element evaluated, and each distinct number looked up by `Send` or `FetchBundles`
//! in a day. It refills at midnight UTC. Budgets are kept in memory, one entry per
//! account that used discovery today (accounts are registered, not attacker-chosen,
//! and each entry holds at most a budget's worth of number hashes).
//!
//! The filter is rebuilt from the index on a timer when registrations changed it,
//! never per request. Its version is a hash of its bytes, so it is the same across
//! restarts for the same index. What registered since the last build is served beside
//! it as a short list of filter keys (the *delta*), so a contact who registered a
//! moment ago is found by the next sync, not after the next rebuild.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sha2::{Digest, Sha256};

use crate::cluster::discovery::{FilterMeta, JetStreamDiscovery};
use crate::discovery::{MembershipFilter, Prf};
use crate::proto::{ErrorKind, NodeError};
use crate::store::{Store, StoreError};

const DAY_SECS: u64 = 86_400;

/// One account's use of its budget today.
struct Budget {
    day: u64,
    used: u32,
    /// Hashes (keyed per process) of the numbers looked up today.
    numbers: HashSet<u64>,
}

/// A built filter, as served.
pub struct FilterSnapshot {
    pub version: u64,
    pub key_version: u32,
    pub bytes: Vec<u8>,
    pub entries: usize,
}

/// The most registrations the delta holds; past it, a rebuild is due at once.
pub const MAX_DELTA: usize = 32_768;

/// Registrations since the filter was built.
#[derive(Default)]
struct Delta {
    /// The discovery key version the keys are under.
    key_version: u32,
    /// Filter keys of the PRF values indexed since the build began.
    keys: Vec<u64>,
}

pub struct Discovery {
    per_day: u32,
    budgets: Mutex<HashMap<u64, Budget>>,
    hasher: RandomState,
    filter: RwLock<Option<Arc<FilterSnapshot>>>,
    /// Set when the index changed since the filter was built.
    dirty: AtomicBool,
    /// Serialises builds.
    building: tokio::sync::Mutex<()>,
    delta: Mutex<Delta>,
    /// Cluster mode: registrations through any node that the installed filter does
    /// not cover, by index revision (filter keys under the cluster's one key).
    cluster_delta: Mutex<BTreeMap<u64, u64>>,
    /// Cluster mode: the index revision the installed filter covers.
    covers: AtomicU64,
    /// Woken when the delta is full, so the refresher rebuilds without waiting for
    /// its next tick.
    pub rebuild_now: tokio::sync::Notify,
}

impl Discovery {
    pub fn new(per_day: u32) -> Discovery {
        Discovery {
            per_day,
            budgets: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
            filter: RwLock::new(None),
            dirty: AtomicBool::new(true),
            building: tokio::sync::Mutex::new(()),
            delta: Mutex::new(Delta::default()),
            cluster_delta: Mutex::new(BTreeMap::new()),
            covers: AtomicU64::new(0),
            rebuild_now: tokio::sync::Notify::new(),
        }
    }

    /// A new account was indexed under `prf` (key version `key_version`): it joins the
    /// delta at once, and the filter is rebuilt at the next refresh.
    pub fn registered(&self, key_version: u32, prf: &Prf) {
        self.mark_dirty();
        let mut delta = self.delta.lock().unwrap_or_else(|p| p.into_inner());
        if delta.key_version != key_version {
            delta.keys.clear();
            delta.key_version = key_version;
        }
        if delta.keys.len() < MAX_DELTA {
            delta.keys.push(crate::discovery::filter_key(prf));
        }
        if delta.keys.len() >= MAX_DELTA / 2 {
            self.rebuild_now.notify_one();
        }
    }

    /// Cluster mode: `prf` was indexed at revision `revision` of the cluster's index
    /// (through any node); it joins the delta unless the installed filter has it.
    pub fn indexed_at(&self, revision: u64, prf: &Prf) {
        // Under the delta's lock, as `install` moves `covers` and trims under it.
        let mut delta = self.cluster_delta.lock().unwrap_or_else(|p| p.into_inner());
        if revision <= self.covers.load(Ordering::Acquire) {
            return;
        }
        if delta.len() < MAX_DELTA {
            delta.insert(revision, crate::discovery::filter_key(prf));
        }
        if delta.len() >= MAX_DELTA / 2 {
            self.rebuild_now.notify_one();
        }
    }

    /// Cluster mode: the index revision the installed filter covers (0: none yet).
    pub fn covers(&self) -> u64 {
        self.covers.load(Ordering::Acquire)
    }

    /// The registrations since `filter` was built, as filter keys.
    pub fn delta_since(&self, filter: &FilterSnapshot) -> Vec<u64> {
        let delta = self.delta.lock().unwrap_or_else(|p| p.into_inner());
        let mut keys = if delta.key_version == filter.key_version {
            delta.keys.clone()
        } else {
            Vec::new()
        };
        // Empty on one node, as the other is in cluster mode.
        let cluster = self.cluster_delta.lock().unwrap_or_else(|p| p.into_inner());
        keys.extend(cluster.values().copied());
        keys
    }

    pub(crate) fn refused(&self, now_secs: u64) -> NodeError {
        let retry = DAY_SECS - now_secs % DAY_SECS;
        NodeError::new(
            ErrorKind::RateLimited {
                retry_after_secs: retry as u32,
            },
            format!(
                "the daily contact-discovery budget of {} lookups is used up; it refills \
                 at midnight UTC, in {}",
                self.per_day,
                humantime::format_duration(std::time::Duration::from_secs(retry))
            ),
        )
    }

    fn with_budget<T>(&self, account: u64, now_secs: u64, f: impl FnOnce(&mut Budget) -> T) -> T {
        let day = now_secs / DAY_SECS;
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        // A new day: yesterday's entries are worth nothing.
        if budgets.values().next().is_some_and(|b| b.day != day) {
            budgets.retain(|_, b| b.day == day);
        }
        let budget = budgets.entry(account).or_insert_with(|| Budget {
            day,
            used: 0,
            numbers: HashSet::new(),
        });
        f(budget)
    }

    /// Charges `n` evaluations to `account`; returns what is left of today's budget.
    pub fn charge(&self, account: u64, n: u32, now_secs: u64) -> Result<u32, NodeError> {
        let per_day = self.per_day;
        let left = self.with_budget(account, now_secs, |b| {
            if b.used.saturating_add(n) > per_day {
                return None;
            }
            b.used += n;
            Some(per_day - b.used)
        });
        left.ok_or_else(|| self.refused(now_secs))
    }

    /// Charges a lookup of `number` by `account`, unless it looked the same number up
    /// earlier today.
    pub fn charge_lookup(
        &self,
        account: u64,
        number: &str,
        now_secs: u64,
    ) -> Result<(), NodeError> {
        let hash = self.hasher.hash_one(number);
        let per_day = self.per_day;
        let ok = self.with_budget(account, now_secs, |b| {
            if b.numbers.contains(&hash) {
                return true;
            }
            if b.used >= per_day {
                return false;
            }
            b.used += 1;
            b.numbers.insert(hash);
            true
        });
        if ok {
            Ok(())
        } else {
            Err(self.refused(now_secs))
        }
    }

    /// Cluster mode: whether this node saw `account`'s lookup of `number` counted
    /// by the cluster today ([`Discovery::counted_by_cluster`]), so a repeat (each
    /// message to a contact) needs no PRF and no round trip.
    pub fn counted_today(&self, account: u64, number: &str, now_secs: u64) -> bool {
        let hash = self.hasher.hash_one(number);
        self.with_budget(account, now_secs, |b| b.numbers.contains(&hash))
    }

    /// Cluster mode: the cluster counted `account`'s lookup of `number` against its
    /// budget today (the day's count there holds it until the day ends, so the fact
    /// stays true). Remembered beside the single node's own lookups, which cluster
    /// mode does not use; at most the day's budget per account, as there.
    pub fn counted_by_cluster(&self, account: u64, number: &str, now_secs: u64) {
        let hash = self.hasher.hash_one(number);
        self.with_budget(account, now_secs, |b| b.numbers.insert(hash));
    }

    /// The index changed: rebuild the filter at the next refresh.
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// The current filter, built now if there is none yet.
    pub async fn filter(&self, store: &Store) -> Result<Arc<FilterSnapshot>, StoreError> {
        if let Some(f) = self.current() {
            return Ok(f);
        }
        self.refresh(store).await
    }

    /// The filter served now, if one was built or installed.
    pub fn current_filter(&self) -> Option<Arc<FilterSnapshot>> {
        self.current()
    }

    fn current(&self) -> Option<Arc<FilterSnapshot>> {
        self.filter
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rebuilds the filter if the index changed since the last build (or none was
    /// built), and returns the current one.
    pub async fn refresh(&self, store: &Store) -> Result<Arc<FilterSnapshot>, StoreError> {
        let _one_at_a_time = self.building.lock().await;
        if let Some(f) = self.current()
            && !self.dirty.load(Ordering::Acquire)
        {
            return Ok(f);
        }
        self.dirty.store(false, Ordering::Release);
        // What the delta holds now is in the index the build reads; what comes after,
        // the delta keeps for the new filter.
        let (delta_version, delta_len) = {
            let delta = self.delta.lock().unwrap_or_else(|p| p.into_inner());
            (delta.key_version, delta.keys.len())
        };
        let store = store.clone();
        let built = tokio::task::spawn_blocking(move || build(&store))
            .await
            .map_err(|e| StoreError::Corrupt(format!("filter build task failed: {e}")));
        let snapshot = match built.and_then(|r| r) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                self.dirty.store(true, Ordering::Release);
                return Err(e);
            }
        };
        *self.filter.write().unwrap_or_else(|p| p.into_inner()) = Some(snapshot.clone());
        let mut delta = self.delta.lock().unwrap_or_else(|p| p.into_inner());
        if delta.key_version == delta_version && delta.key_version == snapshot.key_version {
            let done = delta_len.min(delta.keys.len());
            delta.keys.drain(..done);
        } else if delta.key_version != snapshot.key_version {
            delta.keys.clear();
            delta.key_version = snapshot.key_version;
        }
        Ok(snapshot)
    }
}

impl Discovery {
    /// Cluster mode: the filter the cluster announced, installed first if there is
    /// none here yet (waiting up to a minute for the first build).
    pub async fn cluster_filter(
        &self,
        cluster: &JetStreamDiscovery,
    ) -> Result<Arc<FilterSnapshot>, StoreError> {
        if let Some(f) = self.current() {
            return Ok(f);
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(f) = self
                .refresh_cluster(cluster, crate::store::wall_ms())
                .await?
            {
                return Ok(f);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Engine(
                    "the cluster has no discovery filter yet; try again".into(),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Cluster mode: installs the filter the cluster announced if it is newer than
    /// this node's, and builds one for the whole cluster (if this node gets the
    /// lease) when registrations came after it or none was built. The filter now
    /// installed, if any.
    pub async fn refresh_cluster(
        &self,
        cluster: &JetStreamDiscovery,
        now_ms: u64,
    ) -> Result<Option<Arc<FilterSnapshot>>, StoreError> {
        let _one_at_a_time = self.building.lock().await;
        // A filter under another key version (announced before an export gave the
        // cluster a new key) is none: it is built again under this one.
        let version = cluster.key().version();
        let announced = cluster
            .announced()
            .await?
            .filter(|meta| meta.key_version == version);
        if let Some(meta) = &announced {
            self.install(cluster, meta).await?;
        }
        let behind = announced.is_none()
            || !self
                .cluster_delta
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
        if behind && let Some(lease) = cluster.lease(now_ms).await? {
            let built = self.build_for_cluster(cluster).await;
            let released = cluster.release(lease).await;
            let meta = built?;
            released?;
            self.install(cluster, &meta).await?;
        }
        Ok(self.current())
    }

    /// Builds the filter from the cluster's whole index and announces it.
    async fn build_for_cluster(
        &self,
        cluster: &JetStreamDiscovery,
    ) -> Result<FilterMeta, StoreError> {
        let (covers, keys) = cluster.collect().await?;
        let key_version = cluster.key().version();
        let snapshot = tokio::task::spawn_blocking(move || snapshot(key_version, keys))
            .await
            .map_err(|e| StoreError::Corrupt(format!("filter build task failed: {e}")))??;
        let meta = FilterMeta {
            version: snapshot.version,
            key_version,
            entries: snapshot.entries as u64,
            covers,
        };
        let announced = cluster.announce(&meta, &snapshot.bytes).await?;
        tracing::info!(
            entries = snapshot.entries,
            bytes = snapshot.bytes.len(),
            covers,
            "built the discovery filter for the cluster"
        );
        Ok(announced)
    }

    /// Serves the announced filter `meta` from now on, unless what is served covers
    /// more; the delta keeps only what it does not cover. A filter of the same
    /// bytes (a number registered again changes no key) is not fetched again, but
    /// what it covers moves on all the same.
    async fn install(
        &self,
        cluster: &JetStreamDiscovery,
        meta: &FilterMeta,
    ) -> Result<(), StoreError> {
        let installed = self.current();
        if installed.is_some() && self.covers() >= meta.covers {
            return Ok(());
        }
        let same = installed.is_some_and(|f| f.version == meta.version);
        if !same {
            let bytes = cluster.fetch(meta).await?;
            let snapshot = Arc::new(FilterSnapshot {
                version: meta.version,
                key_version: meta.key_version,
                bytes,
                entries: usize::try_from(meta.entries).unwrap_or(usize::MAX),
            });
            *self.filter.write().unwrap_or_else(|p| p.into_inner()) = Some(snapshot);
        }
        let mut delta = self.cluster_delta.lock().unwrap_or_else(|p| p.into_inner());
        self.covers.store(meta.covers, Ordering::Release);
        delta.retain(|&revision, _| revision > meta.covers);
        Ok(())
    }
}

/// Builds the filter from the index (blocking: it reads the whole index).
pub fn build(store: &Store) -> Result<FilterSnapshot, StoreError> {
    let (key_version, keys) = store.discovery_filter_keys()?;
    snapshot(key_version, keys)
}

/// The filter of `keys` (filter keys under key version `key_version`), its version a
/// hash of its bytes.
fn snapshot(key_version: u32, keys: Vec<u64>) -> Result<FilterSnapshot, StoreError> {
    let entries = keys.len();
    let filter = MembershipFilter::build(keys)
        .map_err(|e| StoreError::Corrupt(format!("building the discovery filter: {e}")))?;
    let bytes = filter.encode();
    let digest = Sha256::new()
        .chain_update(key_version.to_be_bytes())
        .chain_update(&bytes)
        .finalize();
    let mut version = [0u8; 8];
    version.copy_from_slice(&digest[..8]);
    Ok(FilterSnapshot {
        version: u64::from_be_bytes(version),
        key_version,
        bytes,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_counts_evaluations_and_new_numbers_and_refills_daily() {
        let d = Discovery::new(10);
        let noon = 20_000 * DAY_SECS + 43_200;
        assert_eq!(d.charge(1, 6, noon).unwrap(), 4);
        d.charge_lookup(1, "+14155550100", noon).unwrap();
        // The same number again costs nothing.
        d.charge_lookup(1, "+14155550100", noon).unwrap();
        assert_eq!(d.charge(1, 3, noon).unwrap(), 0);
        let refused = d.charge_lookup(1, "+14155550101", noon).unwrap_err();
        assert_eq!(
            refused.kind,
            ErrorKind::RateLimited {
                retry_after_secs: 43_200
            }
        );
        assert!(refused.message.contains("refills at midnight UTC, in 12h"));
        assert!(d.charge(1, 1, noon).is_err());
        // Another account has its own budget; tomorrow the budget is full again.
        assert_eq!(d.charge(2, 10, noon).unwrap(), 0);
        assert_eq!(d.charge(1, 10, noon + DAY_SECS).unwrap(), 0);
    }

    #[test]
    fn lookups_counted_by_the_cluster_are_held_for_their_day_and_account_only() {
        let d = Discovery::new(10);
        let day = 20_000 * DAY_SECS;
        assert!(!d.counted_today(1, "+14155550100", day));
        d.counted_by_cluster(1, "+14155550100", day);
        assert!(d.counted_today(1, "+14155550100", day));
        assert!(!d.counted_today(2, "+14155550100", day), "another account");
        assert!(!d.counted_today(1, "+14155550101", day), "another number");
        assert!(
            !d.counted_today(1, "+14155550100", day + DAY_SECS),
            "the next day"
        );
        d.counted_by_cluster(1, "+14155550101", day + DAY_SECS);
        assert!(
            !d.counted_today(1, "+14155550100", day),
            "the day before went"
        );
        // They cost nothing of this node's own budget.
        assert_eq!(d.charge(1, 10, day + DAY_SECS).unwrap(), 0);
    }
}
