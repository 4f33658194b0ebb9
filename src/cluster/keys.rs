//! The key directory in a JetStream key-value bucket (`sb_keys`,
//! [`REPLICAS`](super::REPLICAS) replicas, one revision kept): one entry per device, `d.ACCOUNT.DEVICE`, holding
//! its published keys, its one-time keys oldest first and the account signature.
//!
//! Every change is a compare-and-set on that one entry (the revision read is the
//! revision the update expects): two nodes claiming a device's one-time key at once
//! cannot both win, the loser reads again and takes the next key ([`Bucket`]).

use bincode::{Decode, Encode};

use super::bucket::Bucket;
use super::{Cluster, ClusterError};
use crate::store::keydir::{KeyDirectory, Upload, apply_upload};
use crate::store::records::{DeviceKeysRecord, StoredKey};
use crate::store::{Claimed, DeviceRef, IdentityPair, KeysRefusal, StoreError};

/// The bucket's name.
pub const BUCKET: &str = "sb_keys";

/// What the bucket holds for one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
struct DeviceEntry {
    keys: Option<DeviceKeysRecord>,
    /// Oldest first: the next claim takes the first.
    one_time: Vec<StoredKey>,
    vouch: Option<[u8; 64]>,
}

/// [`KeyDirectory`] on a JetStream cluster.
#[derive(Debug, Clone)]
pub struct JetStreamKeys {
    bucket: Bucket,
}

fn entry_key(device: DeviceRef) -> String {
    format!("d.{}.{}", device.account_id, device.device_id)
}

impl JetStreamKeys {
    /// The bucket on `cluster`, created with `replicas` replicas (at most
    /// [`super::REPLICAS`]) if it is not there.
    pub async fn open(cluster: &Cluster, replicas: usize) -> Result<JetStreamKeys, ClusterError> {
        let bucket = Bucket::open(
            cluster,
            BUCKET,
            "switchboard: devices' identity, fallback and one-time keys",
            replicas,
        )
        .await?;
        Ok(JetStreamKeys { bucket })
    }

    async fn read(&self, device: DeviceRef) -> Result<DeviceEntry, StoreError> {
        let (entry, _) = self.bucket.read(&entry_key(device)).await?;
        Ok(entry.unwrap_or_default())
    }

    /// Applies `change` to the device's entry by compare-and-set (see [`Bucket`]).
    async fn modify<T>(
        &self,
        device: DeviceRef,
        mut change: impl FnMut(&mut DeviceEntry) -> (T, bool),
    ) -> Result<T, StoreError> {
        self.bucket
            .modify(&entry_key(device), |slot: &mut Option<DeviceEntry>| {
                let entry = slot.get_or_insert_with(DeviceEntry::default);
                change(entry)
            })
            .await
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
            // A key already stored (a retried upload whose first try landed) is not
            // stored twice: it could go to two fetchers. A new identity keeps none.
            let same = entry
                .keys
                .as_ref()
                .is_some_and(|k| (k.curve25519, k.ed25519) == upload.identity);
            let fresh: Vec<StoredKey> = upload
                .one_time_keys
                .iter()
                .filter(|k| !same || !entry.one_time.contains(k))
                .copied()
                .collect();
            let applied = apply_upload(
                entry.keys.as_ref(),
                upload.identity,
                upload.fallback,
                fresh.len(),
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
                    entry.one_time.extend_from_slice(&fresh);
                    (Ok(Ok(applied.total)), true)
                }
                other => (other.map(|r| r.map(|a| a.total)), false),
            }
        })
        .await?
    }

    async fn count_one_time_keys(&self, device: DeviceRef, limit: u32) -> Result<u32, StoreError> {
        let entry = self.read(device).await?;
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
        let entry = self.read(device).await?;
        Ok(entry.keys.map(|k| (k.curve25519, k.ed25519)))
    }
}

impl JetStreamKeys {
    /// Drops what `device` published (it was signed out or unlinked).
    pub async fn forget(&self, device: DeviceRef) -> Result<(), StoreError> {
        self.bucket.purge(&entry_key(device)).await
    }

    /// Writes `device`'s keys as the single node kept them (`switchboard admin
    /// export-to-cluster`), replacing what the entry held.
    pub async fn import(
        &self,
        device: DeviceRef,
        keys: &crate::store::export::DeviceKeys,
    ) -> Result<(), StoreError> {
        let entry = DeviceEntry {
            keys: keys.keys.clone(),
            one_time: keys.one_time.clone(),
            vouch: keys.vouch,
        };
        self.bucket.put(&entry_key(device), &entry).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records;

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
