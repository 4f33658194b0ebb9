//! Contact discovery on the cluster: the index of registered numbers in the
//! `sb_discovery` bucket, and one membership filter for the whole cluster in the
//! object store `sb_filters`.
//!
//! - **Index.** `p.HEX(PRF)` → account id, written when a number registers, before
//!   the device is told it is registered. The PRF key is the cluster's (derived from
//!   the shared TLS key), so every node computes the same value.
//! - **Filter.** Built by one node at a time: whichever takes the `build` lease (a
//!   compare-and-set on an expiry time) when the index has entries the announced
//!   filter does not cover. It lists the index, stores the filter as the object
//!   `filter.VERSION`, and announces it in the `filter` entry (version, key version,
//!   entries, and the index revision it covers). Every node serves the announced
//!   filter; none builds one of its own.
//! - **Delta.** Each node watches `p.>` from the revision the filter covers, so a
//!   number registered through any node after the build is served beside the filter
//!   at once (`node::discovery`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::object_store::ObjectStore;
use bincode::{Decode, Encode};
use futures_util::TryStreamExt;
use tokio::io::AsyncReadExt;

use super::bucket::{Bucket, engine};
use super::{Cluster, ClusterError};
use crate::discovery::{DiscoveryKey, Prf, filter_key};
use crate::store::StoreError;

/// The index's bucket.
pub const BUCKET: &str = "sb_discovery";

/// The object store of built filters.
pub const FILTERS: &str = "sb_filters";

/// How long a builder holds the lease if it never releases it (it died midway).
const LEASE: Duration = Duration::from_secs(60);

/// The announced filter.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct FilterMeta {
    pub version: u64,
    pub key_version: u32,
    pub entries: u64,
    /// Every index entry up to this revision is in the filter.
    pub covers: u64,
}

/// Who may build the filter until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
struct Lease {
    until_ms: u64,
}

const FILTER_KEY: &str = "filter";
const LEASE_KEY: &str = "build";

/// The index key of `prf`.
fn index_key(prf: &Prf) -> String {
    format!("p.{}", hex::encode(prf))
}

/// The PRF value of index key `key`, if it is one.
pub fn indexed_prf(key: &str) -> Option<Prf> {
    let hex = key.strip_prefix("p.")?;
    hex::decode(hex).ok()?.try_into().ok()
}

fn object_name(version: u64) -> String {
    format!("filter.{version:016x}")
}

/// Contact discovery's index and filter on a JetStream cluster.
#[derive(Clone)]
pub struct JetStreamDiscovery {
    bucket: Bucket,
    filters: ObjectStore,
    key: Arc<DiscoveryKey>,
}

impl std::fmt::Debug for JetStreamDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamDiscovery").finish_non_exhaustive()
    }
}

impl JetStreamDiscovery {
    /// The bucket and object store on `cluster`, created with `replicas` replicas
    /// if they are not there; `key` is the cluster's discovery key.
    pub async fn open(
        cluster: &Cluster,
        replicas: usize,
        key: Arc<DiscoveryKey>,
    ) -> Result<JetStreamDiscovery, ClusterError> {
        let bucket = Bucket::open(
            cluster,
            BUCKET,
            "switchboard: registered numbers by their discovery PRF; the filter's version",
            replicas,
        )
        .await?;
        let filters = super::bucket::object_store(
            cluster,
            FILTERS,
            "switchboard: contact-discovery filters",
            replicas,
            Duration::ZERO,
        )
        .await?;
        Ok(JetStreamDiscovery {
            bucket,
            filters,
            key,
        })
    }

    /// The cluster's discovery key (the OPRF key clients' numbers are evaluated
    /// under).
    pub fn key(&self) -> Arc<DiscoveryKey> {
        self.key.clone()
    }

    /// Indexes `prf` as `account`'s (again: no change).
    pub async fn index(&self, prf: &Prf, account: u64) -> Result<(), StoreError> {
        self.bucket.put(&index_key(prf), &account).await
    }

    /// Drops `prf` from the index if it is `account`'s (a deleted account's; after a
    /// re-registration of the number under another account it stays).
    pub async fn unindex(&self, prf: &Prf, account: u64) -> Result<(), StoreError> {
        self.bucket
            .modify(&index_key(prf), |slot: &mut Option<u64>| {
                if *slot != Some(account) {
                    return ((), false);
                }
                *slot = None;
                ((), true)
            })
            .await
    }

    /// Which of `prfs` are registered, read concurrently; `Err(current)` when they
    /// were computed under `key_version`, not the current key.
    pub async fn resolve(
        &self,
        key_version: Option<u32>,
        prfs: Vec<Prf>,
    ) -> Result<Result<Vec<bool>, u32>, StoreError> {
        let current = self.key.version();
        if key_version.is_some_and(|v| v != current) {
            return Ok(Err(current));
        }
        let keys: Vec<String> = prfs.iter().map(index_key).collect();
        let found =
            futures_util::future::join_all(keys.iter().map(|key| self.bucket.read::<u64>(key)))
                .await;
        found
            .into_iter()
            .map(|r| r.map(|(account, _)| account.is_some()))
            .collect::<Result<Vec<_>, _>>()
            .map(Ok)
    }

    /// The announced filter, if one was built.
    pub async fn announced(&self) -> Result<Option<FilterMeta>, StoreError> {
        Ok(self.bucket.read(FILTER_KEY).await?.0)
    }

    /// The bytes of the announced filter `meta`.
    pub async fn fetch(&self, meta: &FilterMeta) -> Result<Vec<u8>, StoreError> {
        let mut object = self
            .filters
            .get(object_name(meta.version))
            .await
            .map_err(|e| engine(FILTERS, e))?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| engine(FILTERS, e))?;
        Ok(bytes)
    }

    /// Takes the build lease at `now_ms`: its expiry (which [`Self::release`]
    /// names), or `None` while another node holds it.
    pub async fn lease(&self, now_ms: u64) -> Result<Option<u64>, StoreError> {
        let until_ms = now_ms.saturating_add(LEASE.as_millis() as u64);
        self.bucket
            .modify(LEASE_KEY, |slot: &mut Option<Lease>| {
                if slot.is_some_and(|l| l.until_ms > now_ms) {
                    return (None, false);
                }
                *slot = Some(Lease { until_ms });
                (Some(until_ms), true)
            })
            .await
    }

    /// Gives back the build lease taken with expiry `until_ms`, unless another node
    /// took it since (this one's ran out).
    pub async fn release(&self, until_ms: u64) -> Result<(), StoreError> {
        self.bucket
            .modify(LEASE_KEY, |slot: &mut Option<Lease>| {
                if slot.is_some_and(|l| l.until_ms == until_ms) {
                    *slot = Some(Lease { until_ms: 0 });
                    return ((), true);
                }
                ((), false)
            })
            .await
    }

    /// The filter key of every indexed PRF value, and the revision the list covers.
    pub async fn collect(&self) -> Result<(u64, Vec<u64>), StoreError> {
        // Read first: whatever was written up to it is in the listing after it.
        let covers = self.bucket.last_revision().await?;
        let mut keys = Vec::new();
        let mut listed = self.bucket.keys().await?;
        while let Some(key) = listed.try_next().await.map_err(|e| engine(BUCKET, e))? {
            if key == FILTER_KEY || key == LEASE_KEY {
                continue;
            }
            let prf = indexed_prf(&key)
                .ok_or_else(|| StoreError::Corrupt(format!("{BUCKET}: key {key}")))?;
            keys.push(filter_key(&prf));
        }
        Ok((covers, keys))
    }

    /// Stores the filter `bytes` and announces it as `meta`, unless a filter that
    /// covers more was announced meanwhile (a build that outlived its lease); the
    /// filter it replaces goes (a node still reading it reads the new one at its
    /// next refresh). The filter announced now.
    pub async fn announce(
        &self,
        meta: &FilterMeta,
        bytes: &[u8],
    ) -> Result<FilterMeta, StoreError> {
        let mut reader = bytes;
        self.filters
            .put(object_name(meta.version).as_str(), &mut reader)
            .await
            .map_err(|e| engine(FILTERS, e))?;
        let (replaced, announced) = self
            .bucket
            .modify(FILTER_KEY, |slot: &mut Option<FilterMeta>| match slot {
                Some(newer) if newer.covers > meta.covers => ((None, newer.clone()), false),
                _ => ((slot.replace(meta.clone()), meta.clone()), true),
            })
            .await?;
        // The filter no longer announced: the one replaced, or this one if it lost.
        let gone = match replaced {
            Some(old) => Some(old.version),
            None if announced.version != meta.version => Some(meta.version),
            None => None,
        };
        if let Some(version) = gone.filter(|&v| v != announced.version)
            && let Err(e) = self.filters.delete(object_name(version)).await
        {
            tracing::warn!(error = %e, "an old discovery filter was not deleted");
        }
        Ok(announced)
    }

    /// Every change to the index from revision `from` on.
    pub async fn changes_from(
        &self,
        from: u64,
    ) -> Result<async_nats::jetstream::kv::Watch, StoreError> {
        self.bucket.watch_from("p.>", from).await
    }
}
