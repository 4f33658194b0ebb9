//! The key directory: each device's identity and fallback keys and its one-time
//! keys, published by the device and claimed by those who start a session with it.

use sled::transaction::Transactional;

use super::layout::{self, DeviceKey};
use super::records::{self, DeviceKeysRecord, StoredKey};
use super::{DeviceRef, Store, StoreError, TxResult, abort};
/// A device's Curve25519 and Ed25519 identity keys.
pub type IdentityPair = ([u8; 32], [u8; 32]);

/// Why a key upload was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeysRefusal {
    /// Storing them would leave more than `max` one-time keys for the device.
    TooMany { stored: u32, max: u32 },
}

/// One device's keys as handed to a fetcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub device_id: u32,
    pub keys: DeviceKeysRecord,
    pub one_time_key: Option<StoredKey>,
    /// For a linked device: the account identity's signature over its keys.
    pub account_signature: Option<[u8; 64]>,
}

impl Store {
    /// Stores a device's keys. A changed identity replaces the stored keys and drops
    /// the old one-time keys (they belong to an account that no longer exists).
    /// Returns the number of one-time keys stored afterwards.
    pub fn publish_keys(
        &self,
        device: DeviceRef,
        identity: IdentityPair,
        fallback: Option<StoredKey>,
        one_time_keys: &[StoredKey],
        max_one_time_keys: u32,
        now_ms: u64,
    ) -> Result<Result<u32, KeysRefusal>, StoreError> {
        let _gate = self.writing();
        let dk = device.key();
        let current = match self.trees.device_keys.get(dk)? {
            Some(bytes) => Some(records::decode::<DeviceKeysRecord>(&bytes, "device_keys")?),
            None => None,
        };
        let applied = match super::keydir::apply_upload(
            current.as_ref(),
            identity,
            fallback,
            one_time_keys.len(),
            || self.count_one_time_keys(device, u32::MAX),
            max_one_time_keys,
            now_ms,
        )? {
            Ok(applied) => applied,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let stale: Vec<sled::IVec> = if applied.keep_stored {
            Vec::new()
        } else {
            self.trees
                .one_time_key
                .scan_prefix(dk)
                .keys()
                .collect::<Result<_, _>>()?
        };
        let record = applied.record;
        let mut new_keys = Vec::with_capacity(one_time_keys.len());
        for k in one_time_keys {
            new_keys.push((layout::one_time_key(dk, self.next_id()?), k.to_bytes()));
        }
        let t = &self.trees;
        (&t.device_keys, &t.one_time_key).transaction(|(dkeys, otks)| -> TxResult<()> {
            for key in &stale {
                otks.remove(key)?;
            }
            dkeys.insert(&dk[..], records::encode(&record).or_else(abort)?)?;
            for (key, value) in &new_keys {
                otks.insert(&key[..], &value[..])?;
            }
            Ok(())
        })?;
        Ok(Ok(applied.total))
    }

    /// One-time keys stored for `device`, counting no further than `limit`.
    pub fn count_one_time_keys(&self, device: DeviceRef, limit: u32) -> Result<u32, StoreError> {
        let mut n = 0;
        for key in self.trees.one_time_key.scan_prefix(device.key()).keys() {
            key?;
            n += 1;
            if n >= limit {
                break;
            }
        }
        Ok(n)
    }

    /// The published keys of each of `devices` of `account_id` (devices without keys
    /// are left out). With `claim`, each device's oldest one-time key is removed and
    /// returned: two fetchers never get the same key (compare-and-swap on removal).
    pub fn fetch_bundles(
        &self,
        account_id: u64,
        devices: &[u32],
        claim: bool,
    ) -> Result<Vec<Claimed>, StoreError> {
        let _gate = self.writing();
        let mut out = Vec::new();
        for &device_id in devices {
            let device = DeviceRef {
                account_id,
                device_id,
            };
            let dk = device.key();
            let Some(bytes) = self.trees.device_keys.get(dk)? else {
                continue;
            };
            let keys = records::decode::<DeviceKeysRecord>(&bytes, "device_keys")?;
            let one_time_key = if claim { self.claim_one(dk)? } else { None };
            let account_signature = match self.trees.device_vouch.get(dk)? {
                Some(v) => Some(
                    <[u8; 64]>::try_from(v.as_ref())
                        .map_err(|_| StoreError::Corrupt("device_vouch value length".into()))?,
                ),
                None => None,
            };
            out.push(Claimed {
                device_id,
                keys,
                one_time_key,
                account_signature,
            });
        }
        Ok(out)
    }

    /// Keeps (or, with `None`, forgets) the account identity's signature over the
    /// keys of the linked device `device`.
    pub fn set_account_signature(
        &self,
        device: DeviceRef,
        signature: Option<[u8; 64]>,
    ) -> Result<(), StoreError> {
        let _gate = self.writing();
        match signature {
            Some(sig) => self.trees.device_vouch.insert(device.key(), &sig[..])?,
            None => self.trees.device_vouch.remove(device.key())?,
        };
        Ok(())
    }

    /// The stored identity keys of `device`, if it published any.
    pub fn identity_keys(&self, device: DeviceRef) -> Result<Option<IdentityPair>, StoreError> {
        match self.trees.device_keys.get(device.key())? {
            Some(bytes) => {
                let keys = records::decode::<DeviceKeysRecord>(&bytes, "device_keys")?;
                Ok(Some((keys.curve25519, keys.ed25519)))
            }
            None => Ok(None),
        }
    }

    fn claim_one(&self, dk: DeviceKey) -> Result<Option<StoredKey>, StoreError> {
        loop {
            let Some(entry) = self.trees.one_time_key.scan_prefix(dk).next() else {
                return Ok(None);
            };
            let (key, value) = entry?;
            // Only the fetcher whose swap removes the key gets it; a loser tries the next.
            if self
                .trees
                .one_time_key
                .compare_and_swap(&key, Some(&value), None as Option<&[u8]>)?
                .is_ok()
            {
                return StoredKey::from_bytes(&value)
                    .map(Some)
                    .ok_or_else(|| StoreError::Corrupt("one_time_key value length".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::queues::tests::registered;

    #[test]
    fn one_time_keys_are_claimed_once_then_fallback_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bob = registered(&store, "+14155550101", 2);
        let k = |n: u8| StoredKey {
            key: [n; 32],
            signature: [n; 64],
        };
        let n = store
            .publish_keys(bob, ([1; 32], [2; 32]), Some(k(9)), &[k(1), k(2)], 3, 0)
            .unwrap();
        assert_eq!(n, Ok(2));
        let too_many = store
            .publish_keys(bob, ([1; 32], [2; 32]), None, &[k(3), k(4)], 3, 0)
            .unwrap();
        assert_eq!(too_many, Err(KeysRefusal::TooMany { stored: 2, max: 3 }));
        let first = store
            .fetch_bundles(bob.account_id, &[bob.device_id], true)
            .unwrap();
        let second = store
            .fetch_bundles(bob.account_id, &[bob.device_id], true)
            .unwrap();
        let third = store
            .fetch_bundles(bob.account_id, &[bob.device_id], true)
            .unwrap();
        assert_eq!(first[0].one_time_key, Some(k(1)));
        assert_eq!(second[0].one_time_key, Some(k(2)));
        assert_eq!(third[0].one_time_key, None);
        assert_eq!(third[0].keys.fallback, Some(k(9)));
        // A new identity drops what was left and starts again.
        store
            .publish_keys(bob, ([5; 32], [6; 32]), Some(k(8)), &[k(7)], 3, 0)
            .unwrap()
            .unwrap();
        assert_eq!(store.count_one_time_keys(bob, 10).unwrap(), 1);
    }

    #[test]
    fn concurrent_claims_never_share_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bob = registered(&store, "+14155550101", 2);
        let keys: Vec<StoredKey> = (0..200u8)
            .map(|n| StoredKey {
                key: [n; 32],
                signature: [0; 64],
            })
            .collect();
        store
            .publish_keys(bob, ([1; 32], [2; 32]), None, &keys, 200, 0)
            .unwrap()
            .unwrap();
        let claimed: Vec<Vec<[u8; 32]>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..60)
                            .filter_map(|_| {
                                store
                                    .fetch_bundles(bob.account_id, &[bob.device_id], true)
                                    .unwrap()[0]
                                    .one_time_key
                                    .map(|k| k.key)
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<[u8; 32]> = claimed.into_iter().flatten().collect();
        assert_eq!(all.len(), 200);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 200, "a key was handed out twice");
    }
}
