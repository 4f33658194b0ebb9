//! One JetStream key-value bucket with typed (bincode) entries and changes by
//! compare-and-set: what every storage concern of cluster mode is kept in.
//!
//! A change reads the entry and its revision (from the stream leader), applies the
//! caller's change, and writes expecting that revision (0 for a key never
//! written). NATS reports a lost race as error 10071 (wrong last sequence) or, on
//! some paths, 10164, and a briefly unavailable check as 10163: read again and
//! re-apply, with a growing pause. A write no member answered (a bucket just
//! created, a leader being elected) stored nothing and is sent again. Any other failure, including a timeout (the
//! write may have landed), is the caller's error: never applied twice here.

use std::time::Duration;

use async_nats::jetstream::kv;
use bincode::{Decode, Encode};
use bytes::Bytes;

use super::{Cluster, ClusterError};
use crate::store::StoreError;
use crate::store::records;

/// Reads and compare-and-sets of one entry before giving up as busy.
const TRIES: u32 = 64;

/// The object store `name` on `cluster`, created with `replicas` replicas (file
/// storage, objects dropped `max_age` after they were stored; zero: never) if it is
/// not there.
pub async fn object_store(
    cluster: &Cluster,
    name: &'static str,
    description: &str,
    replicas: usize,
    max_age: Duration,
) -> Result<async_nats::jetstream::object_store::ObjectStore, ClusterError> {
    use async_nats::jetstream::object_store;
    let js = &cluster.jetstream;
    match js.get_object_store(name).await {
        Ok(store) => Ok(store),
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket: name.into(),
                description: Some(description.into()),
                max_age,
                num_replicas: replicas.clamp(1, super::REPLICAS),
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::JetStream(format!("object store {name}: {e}"))),
    }
}

/// A bucket of entries of one kind.
#[derive(Clone)]
pub struct Bucket {
    kv: kv::Store,
    name: &'static str,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket").field("name", &self.name).finish()
    }
}

pub(super) fn engine(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(format!("{what}: {e}"))
}

/// Whether `e` (or what caused it) is JetStream saying the write was not applied
/// and may be tried again on a fresh read: another writer got there first (10071,
/// 10164), or the per-subject check was briefly unavailable (10163, during a
/// leader change).
fn lost_race(e: &(dyn std::error::Error + 'static)) -> bool {
    super::jetstream_error(e, &[10071, 10163, 10164]).is_some()
        || super::causes(e).any(|err| {
            err.downcast_ref::<kv::UpdateError>()
                .is_some_and(|u| u.kind() == kv::UpdateErrorKind::WrongLastRevision)
        })
}

type Boxed = Box<dyn std::error::Error + Send + Sync>;

fn boxed(e: impl std::error::Error + Send + Sync + 'static) -> Boxed {
    Box::new(e)
}

/// After the `attempt`-th lost race on one entry (from 0): go on at once the first
/// few times, then after a growing pause.
pub(super) async fn contended(attempt: u32) {
    if attempt > 2 {
        tokio::time::sleep(Duration::from_millis(u64::from(attempt.min(20)))).await;
    }
}

impl Bucket {
    /// Bucket `name` on `cluster`, created with `replicas` replicas (file storage,
    /// one revision kept) if it is not there.
    pub async fn open(
        cluster: &Cluster,
        name: &'static str,
        description: &str,
        replicas: usize,
    ) -> Result<Bucket, ClusterError> {
        Bucket::open_expiring(cluster, name, description, replicas, Duration::ZERO).await
    }

    /// Like [`Bucket::open`], with every entry dropped by the cluster once it was
    /// last written `max_age` ago (zero: never).
    pub async fn open_expiring(
        cluster: &Cluster,
        name: &'static str,
        description: &str,
        replicas: usize,
        max_age: Duration,
    ) -> Result<Bucket, ClusterError> {
        let js = &cluster.jetstream;
        let kv = match js.get_key_value(name).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: name.into(),
                    description: description.into(),
                    history: 1,
                    num_replicas: replicas.clamp(1, super::REPLICAS),
                    storage: async_nats::jetstream::stream::StorageType::File,
                    max_age,
                    ..Default::default()
                })
                .await
                .map_err(|e| ClusterError::JetStream(format!("bucket {name}: {e}")))?,
        };
        Ok(Bucket { kv, name })
    }

    /// Every change to the bucket from now on (a put, delete or purge of any key).
    pub async fn watch(&self) -> Result<kv::Watch, StoreError> {
        self.kv.watch_all().await.map_err(|e| engine(self.name, e))
    }

    /// Every change to the keys matching `filter` (a NATS wildcard such as `p.>`)
    /// from revision `from` on (the entry there, if any, first).
    pub async fn watch_from(&self, filter: &str, from: u64) -> Result<kv::Watch, StoreError> {
        self.kv
            .watch_from_revision(filter, from.max(1))
            .await
            .map_err(|e| engine(self.name, e))
    }

    /// Every key the bucket holds now.
    pub async fn keys(&self) -> Result<kv::Keys, StoreError> {
        self.kv.keys().await.map_err(|e| engine(self.name, e))
    }

    /// The revision of the bucket's latest write (0: none yet): every write up to it
    /// is in what [`Bucket::keys`] lists from now on.
    pub async fn last_revision(&self) -> Result<u64, StoreError> {
        let mut stream = self.kv.stream.clone();
        let info = stream.info().await.map_err(|e| engine(self.name, e))?;
        Ok(info.state.last_sequence)
    }

    /// The entry at `key` (`None`: none, or deleted) and the revision a change must
    /// expect (0: never written). Read from the stream's leader, not any replica
    /// (async-nats's `entry` uses direct get, which a lagging replica may answer):
    /// a read that writes nothing afterwards, such as a fetch finding no keys, must
    /// not be stale.
    pub async fn read<T: Decode<()>>(&self, key: &str) -> Result<(Option<T>, u64), StoreError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let subject = format!("{}{key}", self.kv.prefix);
        match self
            .kv
            .stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(m) => {
                let operation = m.headers.get("KV-Operation").map(|v| v.as_str());
                if matches!(operation, Some("DEL" | "PURGE")) {
                    Ok((None, m.sequence))
                } else {
                    Ok((
                        Some(records::decode::<T>(&m.payload, self.name)?),
                        m.sequence,
                    ))
                }
            }
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok((None, 0)),
            Err(e) => Err(engine(self.name, e)),
        }
    }

    /// Writes `entry` at `key` (`None` deletes it) if the key is still at
    /// `revision` (0: never written): `false` when another writer changed it first.
    /// A write no member answered (the bucket is new to this member, or its leader
    /// is being elected) stored nothing and is sent again.
    pub async fn write_expecting<T: Encode>(
        &self,
        key: &str,
        entry: &Option<T>,
        revision: u64,
    ) -> Result<bool, StoreError> {
        let value = entry
            .as_ref()
            .map(|v| records::encode(v).map(Bytes::from))
            .transpose()?;
        let written = super::sent_again(
            |e: &Boxed| super::unanswered(e.as_ref()),
            || async {
                match &value {
                    // Revision 0: "no message on this subject yet". Not `create`,
                    // which re-reads after an ambiguous failure and would call our
                    // own landed write "already exists", a lost race.
                    Some(value) => self
                        .kv
                        .update(key, value.clone(), revision)
                        .await
                        .map(drop)
                        .map_err(boxed),
                    None => self
                        .kv
                        .delete_expect_revision(key, Some(revision))
                        .await
                        .map_err(boxed),
                }
            },
        )
        .await;
        match written {
            Ok(()) => Ok(true),
            Err(e) if lost_race(e.as_ref()) => Ok(false),
            Err(e) => Err(engine(self.name, e)),
        }
    }

    /// Applies `change` to the entry at `key` by compare-and-set, reading again
    /// whenever another writer changed it first. `change` returns the answer and
    /// whether to write (a refusal writes nothing); leaving `None` deletes it.
    pub async fn modify<T: Encode + Decode<()>, A>(
        &self,
        key: &str,
        mut change: impl FnMut(&mut Option<T>) -> (A, bool),
    ) -> Result<A, StoreError> {
        for attempt in 0..TRIES {
            let (mut entry, revision) = self.read::<T>(key).await?;
            let (answer, write) = change(&mut entry);
            if !write || (entry.is_none() && revision == 0) {
                return Ok(answer);
            }
            if self.write_expecting(key, &entry, revision).await? {
                return Ok(answer);
            }
            contended(attempt).await;
        }
        Err(StoreError::Engine(format!(
            "{} {key} changed {TRIES} times while being written; try again",
            self.name
        )))
    }

    /// Writes `value` at `key` whatever was there.
    pub async fn put<T: Encode>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let value = Bytes::from(records::encode(value)?);
        super::sent_again(|e| super::unanswered(e), || self.kv.put(key, value.clone()))
            .await
            .map(drop)
            .map_err(|e| engine(self.name, e))
    }

    /// Removes `key` and its history.
    pub async fn purge(&self, key: &str) -> Result<(), StoreError> {
        super::sent_again(|e| super::unanswered(e), || self.kv.purge(key))
            .await
            .map_err(|e| engine(self.name, e))
    }
}
