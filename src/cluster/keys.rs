//! The key directory in a JetStream key-value bucket (`sb_keys`, [`REPLICAS`]
//! replicas, one revision kept): one entry per device, `d.ACCOUNT.DEVICE`, holding
//! its published keys, its one-time keys oldest first and the account signature.
//!
//! Every change is a compare-and-set on that one entry (the revision read is the
//! revision the update expects): two nodes claiming a device's one-time key at once
//! cannot both win, the loser reads again and takes the next key. NATS reports a
//! lost race as error 10071 (wrong last sequence) or, on some paths, 10164; both,
//! and a `create` finding the key there, are treated as "read again".

use std::time::Duration;

use bincode::{Decode, Encode};
use bytes::Bytes;

use super::{Cluster, ClusterError, REPLICAS};
use crate::store::keydir::{KeyDirectory, Upload, apply_upload};
use crate::store::records::{self, DeviceKeysRecord, StoredKey};
use crate::store::{Claimed, DeviceRef, IdentityPair, KeysRefusal, StoreError};

/// The bucket's name.
pub const BUCKET: &str = "sb_keys";
/// Reads and compare-and-sets of one entry before giving up as busy.
const TRIES: u32 = 64;

/// What the bucket holds for one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
struct DeviceEntry {
    keys: Option<DeviceKeysRecord>,
    /// Oldest first: the next claim takes the first.
    one_time: Vec<StoredKey>,
    vouch: Option<[u8; 64]>,
}

/// [`KeyDirectory`] on a JetStream cluster.
#[derive(Clone)]
pub struct JetStreamKeys {
    kv: async_nats::jetstream::kv::Store,
}

impl std::fmt::Debug for JetStreamKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamKeys").finish_non_exhaustive()
    }
}

fn engine(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(format!("{what}: {e}"))
}

fn entry_key(device: DeviceRef) -> String {
    format!("d.{}.{}", device.account_id, device.device_id)
}

/// Whether `e` (or what caused it) is JetStream saying another writer got there
/// first.
fn lost_race(e: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::ErrorCode;
    let mut at: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = at {
        if let Some(js) = err.downcast_ref::<async_nats::jetstream::Error>()
            && matches!(js.error_code(), ErrorCode(10071) | ErrorCode(10164))
        {
            return true;
        }
        if let Some(u) = err.downcast_ref::<async_nats::jetstream::kv::UpdateError>()
            && u.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision
        {
            return true;
        }
        if let Some(c) = err.downcast_ref::<async_nats::jetstream::kv::CreateError>()
            && c.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists
        {
            return true;
        }
        at = err.source();
    }
    false
}

impl JetStreamKeys {
    /// The bucket on `cluster`, created (with [`REPLICAS`] replicas, or as many as
    /// `replicas` says for a smaller cluster) if it is not there.
    pub async fn open(cluster: &Cluster, replicas: usize) -> Result<JetStreamKeys, ClusterError> {
        let js = &cluster.jetstream;
        let kv = match js.get_key_value(BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(async_nats::jetstream::kv::Config {
                    bucket: BUCKET.into(),
                    description: "switchboard: devices' identity, fallback and one-time keys"
                        .into(),
                    history: 1,
                    num_replicas: replicas.clamp(1, REPLICAS),
                    storage: async_nats::jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| ClusterError::JetStream(format!("bucket {BUCKET}: {e}")))?,
        };
        Ok(JetStreamKeys { kv })
    }

    /// The device's entry and the revision to expect when changing it (0: none yet).
    async fn read(&self, device: DeviceRef) -> Result<(DeviceEntry, u64), StoreError> {
        use async_nats::jetstream::kv::Operation;
        match self
            .kv
            .entry(entry_key(device))
            .await
            .map_err(|e| engine("reading a device's keys", e))?
        {
            Some(e) if e.operation == Operation::Put => {
                let entry = records::decode::<DeviceEntry>(&e.value, "sb_keys entry")?;
                Ok((entry, e.revision))
            }
            Some(e) => Ok((DeviceEntry::default(), e.revision)),
            None => Ok((DeviceEntry::default(), 0)),
        }
    }

    /// Applies `change` to the device's entry by compare-and-set, reading again
    /// whenever another writer changed it first. `change` says what to answer and
    /// whether to write (a refusal writes nothing).
    async fn modify<T>(
        &self,
        device: DeviceRef,
        mut change: impl FnMut(&mut DeviceEntry) -> (T, bool),
    ) -> Result<T, StoreError> {
        let key = entry_key(device);
        for attempt in 0..TRIES {
            let (mut entry, revision) = self.read(device).await?;
            let (answer, write) = change(&mut entry);
            if !write {
                return Ok(answer);
            }
            let value = Bytes::from(records::encode(&entry)?);
            let written = if revision == 0 {
                self.kv
                    .create(&key, value)
                    .await
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            } else {
                self.kv
                    .update(&key, value, revision)
                    .await
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            };
            match written {
                Ok(_) => return Ok(answer),
                Err(e) if lost_race(e.as_ref()) => {
                    // Another node changed it: read again, after a moment if it
                    // keeps happening.
                    if attempt > 2 {
                        tokio::time::sleep(Duration::from_millis(u64::from(attempt.min(20)))).await;
                    }
                }
                Err(e) => return Err(engine("writing a device's keys", e)),
            }
        }
        Err(StoreError::Engine(format!(
            "the keys of device {}/{} changed {TRIES} times while being written; try again",
            device.account_id, device.device_id
        )))
    }
}

impl KeyDirectory for JetStreamKeys {
    async fn publish_keys(
        &self,
        device: DeviceRef,
        upload: Upload,
        max_one_time_keys: u32,
        now_ms: u64,
    ) -> Result<Result<u32, KeysRefusal>, StoreError> {
        self.modify(device, |entry| {
            let applied = apply_upload(
                entry.keys.as_ref(),
                upload.identity,
                upload.fallback,
                upload.one_time_keys.len(),
                || Ok(u32::try_from(entry.one_time.len()).unwrap_or(u32::MAX)),
                max_one_time_keys,
                now_ms,
            );
            match applied {
                Ok(Ok(applied)) => {
                    if !applied.keep_stored {
                        // A new identity: the old one-time keys belong to no one now.
                        entry.one_time.clear();
                    }
                    entry.keys = Some(applied.record);
                    entry.one_time.extend_from_slice(&upload.one_time_keys);
                    (Ok(Ok(applied.total)), true)
                }
                other => (other.map(|r| r.map(|a| a.total)), false),
            }
        })
        .await?
    }

    async fn count_one_time_keys(&self, device: DeviceRef, limit: u32) -> Result<u32, StoreError> {
        let (entry, _) = self.read(device).await?;
        Ok(u32::try_from(entry.one_time.len())
            .unwrap_or(u32::MAX)
            .min(limit))
    }

    async fn fetch_bundles(
        &self,
        account_id: u64,
        devices: Vec<u32>,
        claim: bool,
    ) -> Result<Vec<Claimed>, StoreError> {
        let mut out = Vec::new();
        for device_id in devices {
            let device = DeviceRef {
                account_id,
                device_id,
            };
            let found = self
                .modify(device, |entry| {
                    let Some(keys) = entry.keys.clone() else {
                        return (None, false);
                    };
                    let one_time_key = if claim && !entry.one_time.is_empty() {
                        Some(entry.one_time.remove(0))
                    } else {
                        None
                    };
                    let write = one_time_key.is_some();
                    (
                        Some(Claimed {
                            device_id,
                            keys,
                            one_time_key,
                            account_signature: entry.vouch,
                        }),
                        write,
                    )
                })
                .await?;
            out.extend(found);
        }
        Ok(out)
    }

    async fn set_account_signature(
        &self,
        device: DeviceRef,
        signature: Option<[u8; 64]>,
    ) -> Result<(), StoreError> {
        self.modify(device, |entry| {
            let write = entry.vouch != signature;
            entry.vouch = signature;
            ((), write)
        })
        .await
    }

    async fn identity_keys(&self, device: DeviceRef) -> Result<Option<IdentityPair>, StoreError> {
        let (entry, _) = self.read(device).await?;
        Ok(entry.keys.map(|k| (k.curve25519, k.ed25519)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_round_trips_and_garbage_is_refused() {
        let entry = DeviceEntry {
            keys: Some(DeviceKeysRecord {
                curve25519: [1; 32],
                ed25519: [2; 32],
                fallback: None,
                updated_at_ms: 5,
            }),
            one_time: vec![StoredKey {
                key: [3; 32],
                signature: [4; 64],
            }],
            vouch: Some([5; 64]),
        };
        let bytes = records::encode(&entry).unwrap();
        assert_eq!(records::decode::<DeviceEntry>(&bytes, "t").unwrap(), entry);
        assert!(records::decode::<DeviceEntry>(&bytes[..bytes.len() - 1], "t").is_err());
        assert_eq!(
            entry_key(DeviceRef {
                account_id: 7,
                device_id: 2
            }),
            "d.7.2"
        );
    }
}
