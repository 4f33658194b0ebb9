//! What a single node's data holds, read out for `switchboard admin
//! export-to-cluster` (`cluster::export` writes it to the cluster). Read from a
//! stopped node's database: nothing here writes.
//!
//! Left out, on purpose: pending verification codes and code-send counters (minutes
//! and a day of life; a registration under way starts again), the ids of messages
//! sent (the cluster deduplicates by its own window), and the discovery index (the
//! cluster gives numbers its own PRF, so the index is written anew from the
//! accounts' numbers).

use super::layout::{self, KeyId};
use super::records::{
    self, AccountRecord, BlobRecord, DeviceKeysRecord, GroupRecord, LockRecord, ProfileRecord,
    QueueItem, RemovedKeyRecord, StoredKey,
};
use super::{DeviceRef, Store, StoreError, be_u64};

/// One account with everything kept about it beside its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedAccount {
    pub id: u64,
    pub record: AccountRecord,
    /// Companions' names, by device id.
    pub names: Vec<(u32, String)>,
    /// When each device was last seen, by device id.
    pub seen: Vec<(u32, u64)>,
    pub lock: Option<LockRecord>,
    /// Each device's published keys, by device id.
    pub keys: Vec<(u32, DeviceKeys)>,
    pub profile: Option<ProfileRecord>,
}

/// A device's entry in the key directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceKeys {
    pub keys: Option<DeviceKeysRecord>,
    /// Oldest first (the next claim takes the first).
    pub one_time: Vec<StoredKey>,
    /// The account's signature over a companion's identity keys.
    pub vouch: Option<[u8; 64]>,
}

/// One queued item, as the queue tree holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedItem {
    pub device: DeviceRef,
    pub seq: u64,
    pub queued_at_ms: u64,
    /// A disappearing message's own expiry.
    pub expires_at_ms: Option<u64>,
    pub item: QueueItem,
    /// The stored value's length (for progress).
    pub bytes: usize,
}

impl Store {
    /// Every account id, in order.
    pub fn export_account_ids(&self) -> Result<Vec<u64>, StoreError> {
        self.trees
            .account
            .iter()
            .keys()
            .map(|k| {
                let k = k?;
                layout::parse_account(&k).ok_or_else(|| StoreError::Corrupt("account key".into()))
            })
            .collect()
    }

    /// Account `id` with its devices' names, last-seen times and keys, its lock and
    /// its profile; `None` if it went meanwhile.
    pub fn export_account(&self, id: u64) -> Result<Option<ExportedAccount>, StoreError> {
        let Some(record) = self.account(id)? else {
            return Ok(None);
        };
        let mut names = Vec::new();
        let mut seen = Vec::new();
        let mut keys = Vec::new();
        for device in &record.devices {
            let dk = layout::device(id, device.device_id);
            let (name, at) = self.name_and_seen(dk)?;
            if let Some(name) = name {
                names.push((device.device_id, name));
            }
            if let Some(at) = at {
                seen.push((device.device_id, at));
            }
            keys.push((device.device_id, self.export_device_keys(dk)?));
        }
        // The account's own last-seen time (a registration lock lapses on it) goes
        // with the primary where no device's is as late.
        if let Some(v) = self.trees.account_seen.get(layout::account(id))? {
            let at = be_u64(&v, "account_seen value")?;
            if let Some(primary) = record.devices.first()
                && seen.iter().all(|(_, s)| *s < at)
            {
                seen.retain(|(d, _)| *d != primary.device_id);
                seen.push((primary.device_id, at));
            }
        }
        let lock = match self.trees.registration_lock.get(layout::account(id))? {
            Some(v) => Some(records::decode(&v, "registration_lock")?),
            None => None,
        };
        let profile = match self.trees.profile.get(layout::account(id))? {
            Some(v) => Some(records::decode(&v, "profile")?),
            None => None,
        };
        Ok(Some(ExportedAccount {
            id,
            record,
            names,
            seen,
            lock,
            keys,
            profile,
        }))
    }

    fn export_device_keys(&self, dk: layout::DeviceKey) -> Result<DeviceKeys, StoreError> {
        let keys = match self.trees.device_keys.get(dk)? {
            Some(v) => Some(records::decode(&v, "device_keys")?),
            None => None,
        };
        let one_time = self
            .trees
            .one_time_key
            .scan_prefix(dk)
            .values()
            .map(|v| {
                StoredKey::from_bytes(&v?)
                    .ok_or_else(|| StoreError::Corrupt("one_time_key value".into()))
            })
            .collect::<Result<_, _>>()?;
        let vouch = match self.trees.device_vouch.get(dk)? {
            Some(v) => Some(
                <[u8; 64]>::try_from(v.as_ref())
                    .map_err(|_| StoreError::Corrupt("device_vouch value length".into()))?,
            ),
            None => None,
        };
        Ok(DeviceKeys {
            keys,
            one_time,
            vouch,
        })
    }

    /// Why each removed key was removed.
    pub fn export_removed_keys(&self) -> Result<Vec<(KeyId, RemovedKeyRecord)>, StoreError> {
        self.trees
            .removed_key
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let key = KeyId::try_from(k.as_ref())
                    .map_err(|_| StoreError::Corrupt("removed_key key".into()))?;
                Ok((key, records::decode(&v, "removed_key")?))
            })
            .collect()
    }

    /// Every group, by id.
    pub fn export_groups(&self) -> Result<Vec<(u64, GroupRecord)>, StoreError> {
        self.trees
            .group
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let id = layout::parse_account(&k)
                    .ok_or_else(|| StoreError::Corrupt("group key".into()))?;
                Ok((id, records::decode(&v, "group")?))
            })
            .collect()
    }

    /// Every queued item's place, (seq, device), in the order the items were queued
    /// (seqs come from one counter, so this order keeps each device's and each
    /// sender's).
    pub fn export_queue_order(&self) -> Result<Vec<(u64, DeviceRef)>, StoreError> {
        let mut order = self
            .trees
            .queue
            .iter()
            .keys()
            .map(|k| {
                let (dk, seq) = layout::parse_queue(&k?)
                    .ok_or_else(|| StoreError::Corrupt("queue key".into()))?;
                let (account_id, device_id) = layout::parse_device(&dk)
                    .ok_or_else(|| StoreError::Corrupt("queue key".into()))?;
                Ok((
                    seq,
                    DeviceRef {
                        account_id,
                        device_id,
                    },
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        order.sort_unstable_by_key(|(seq, _)| *seq);
        Ok(order)
    }

    /// The item `seq` of `device`'s queue; `None` if it went meanwhile.
    pub fn export_queue_item(
        &self,
        device: DeviceRef,
        seq: u64,
    ) -> Result<Option<ExportedItem>, StoreError> {
        let Some(v) = self.trees.queue.get(layout::queue(device.key(), seq))? else {
            return Ok(None);
        };
        let (queued_at_ms, item) = records::decode_queued(&v)?;
        Ok(Some(ExportedItem {
            device,
            seq,
            queued_at_ms,
            expires_at_ms: records::expires_at(&v),
            item,
            bytes: v.len(),
        }))
    }

    /// The body of a group message, by the `body_ref` its items name.
    pub fn export_group_body(&self, body_ref: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.group_body(body_ref)
    }

    /// Every attachment's record, by id.
    pub fn export_blobs(&self) -> Result<Vec<([u8; 16], BlobRecord)>, StoreError> {
        self.trees
            .blob
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let id = <[u8; 16]>::try_from(k.as_ref())
                    .map_err(|_| StoreError::Corrupt("blob key".into()))?;
                Ok((id, records::decode(&v, "blob")?))
            })
            .collect()
    }
}
