//! An account's devices: linking a device to an account, unlinking one, names,
//! last-seen times, lapses, and what the node remembers of removed device keys.
//!
//! An account's first device (`AccountRecord::devices[0]`) is its **primary**: the
//! device that proved the number. Registering the number again replaces every device
//! with a new primary; linking appends a **companion**, which only the primary may
//! authorise (the node checks that before calling in here). Ids are never reused
//! within an account.

use sled::transaction::Transactional;

use super::records::{self, AccountRecord, DeviceRecord, Removal, RemovedKeyRecord};
use super::{DeviceRef, NewDevice, Store, StoreError, abort, be_u64, layout};

/// How long the node remembers why a device key was removed (then it is unknown).
pub const REMOVED_KEY_KEEP_MS: u64 = 180 * 86_400_000;

/// One device of an account, as the account's devices see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    pub device_id: u32,
    /// The name it was linked with; `None` for the primary.
    pub name: Option<String>,
    pub primary: bool,
    /// When it registered (the primary) or was linked (ms).
    pub linked_at_ms: u64,
    /// When it was last seen (ms; written at most hourly), if ever.
    pub last_seen_ms: Option<u64>,
    pub key_id: layout::KeyId,
}

/// What [`Store::link_device`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linked {
    /// The device is the account's, with this address.
    Done { device: DeviceRef, number: String },
    /// The account is gone (deleted, or its number registered anew meanwhile).
    NoAccount,
    /// The account has `max` devices already.
    TooMany { max: u32 },
    /// The key already belongs to a registered device.
    KeyInUse,
}

/// What [`Store::unlink_device`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unlinked {
    /// Removed; the key id of its (now revoked) device key.
    Done { key_id: layout::KeyId },
    /// The account has no such device.
    NotFound,
    /// It is the account's primary, which is never unlinked (registering the number
    /// on a new phone replaces it).
    Primary,
}

impl Store {
    /// The number and devices of `account`, primary first; `None` when there is no
    /// such account.
    pub fn devices(&self, account: u64) -> Result<Option<(String, Vec<DeviceView>)>, StoreError> {
        let Some(record) = self.account(account)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(record.devices.len());
        for (i, d) in record.devices.iter().enumerate() {
            let dk = layout::device(account, d.device_id);
            let (name, last_seen_ms) = self.name_and_seen(dk)?;
            out.push(DeviceView {
                device_id: d.device_id,
                name,
                primary: i == 0,
                linked_at_ms: d.created_at_ms,
                last_seen_ms,
                key_id: d.key_id,
            });
        }
        Ok(Some((record.number, out)))
    }

    /// The name a device was linked with and when it was last seen, as far as known.
    pub(super) fn name_and_seen(
        &self,
        dk: [u8; 12],
    ) -> Result<(Option<String>, Option<u64>), StoreError> {
        let name = self
            .trees
            .device_name
            .get(dk)?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        let seen = match self.trees.device_seen.get(dk)? {
            Some(v) => Some(be_u64(&v, "device_seen value")?),
            None => None,
        };
        Ok((name, seen))
    }

    /// Links `new` to `account` as a companion named `name`, unless the account has
    /// `max_devices` already, in one transaction. The caller bumps the directory
    /// epoch after.
    pub fn link_device(
        &self,
        account: u64,
        new: &NewDevice,
        name: &str,
        max_devices: u32,
        now_ms: u64,
    ) -> Result<Linked, StoreError> {
        let _gate = self.writing();
        let t = &self.trees;
        let linked = (
            &t.account,
            &t.device_key,
            &t.device_name,
            &t.device_seen,
            &t.removed_key,
        )
            .transaction(|(accounts, device_key, names, seen, removed)| {
                let Some(bytes) = accounts.get(layout::account(account))? else {
                    return Ok(Linked::NoAccount);
                };
                let mut record =
                    records::decode::<AccountRecord>(&bytes, "account").or_else(abort)?;
                if device_key.get(new.key_id)?.is_some() {
                    return Ok(Linked::KeyInUse);
                }
                if record.devices.len() >= max_devices as usize {
                    return Ok(Linked::TooMany { max: max_devices });
                }
                let device_id = record.next_device_id;
                record.next_device_id += 1;
                record.devices.push(DeviceRecord {
                    device_id,
                    key_id: new.key_id,
                    public_key: new.public_key.clone(),
                    created_at_ms: now_ms,
                });
                accounts.insert(
                    &layout::account(account),
                    records::encode(&record).or_else(abort)?,
                )?;
                device_key.insert(&new.key_id, &layout::device(account, device_id))?;
                let dk = layout::device(account, device_id);
                names.insert(&dk, name.as_bytes())?;
                // Linking counts as being seen: a lapse runs from here.
                seen.insert(&dk, &now_ms.to_be_bytes())?;
                removed.remove(&new.key_id)?;
                Ok(Linked::Done {
                    device: DeviceRef {
                        account_id: account,
                        device_id,
                    },
                    number: record.number.clone(),
                })
            })?;
        Ok(linked)
    }

    /// Unlinks the companion `device` (`why`: unlinked, or lapsed): it leaves the
    /// account and its key is revoked in one transaction; then its queue, keys, name
    /// and last-seen time go. A crash in between leaves the queue to the TTL sweep
    /// (nobody can read it any more). The caller bumps the directory epoch and closes
    /// the device's connections.
    pub fn unlink_device(
        &self,
        device: DeviceRef,
        why: Removal,
        now_ms: u64,
    ) -> Result<Unlinked, StoreError> {
        let _gate = self.writing();
        let t = &self.trees;
        let gone = RemovedKeyRecord { why, at_ms: now_ms };
        let outcome = (&t.account, &t.device_key, &t.device_keys, &t.removed_key).transaction(
            |(accounts, device_key, device_keys, removed)| {
                let Some(bytes) = accounts.get(layout::account(device.account_id))? else {
                    return Ok(Unlinked::NotFound);
                };
                let mut record =
                    records::decode::<AccountRecord>(&bytes, "account").or_else(abort)?;
                let Some(at) = record
                    .devices
                    .iter()
                    .position(|d| d.device_id == device.device_id)
                else {
                    return Ok(Unlinked::NotFound);
                };
                if at == 0 {
                    return Ok(Unlinked::Primary);
                }
                let old = record.devices.remove(at);
                accounts.insert(
                    &layout::account(device.account_id),
                    records::encode(&record).or_else(abort)?,
                )?;
                device_key.remove(&old.key_id)?;
                device_keys.remove(&device.key()[..])?;
                removed.insert(&old.key_id, records::encode(&gone).or_else(abort)?)?;
                Ok(Unlinked::Done { key_id: old.key_id })
            },
        )?;
        if matches!(outcome, Unlinked::Done { .. }) {
            self.forget_device(&mut self.queue_writer(), device.key())?;
            self.trees.device_name.remove(device.key())?;
            self.trees.device_seen.remove(device.key())?;
            self.trees.device_vouch.remove(device.key())?;
        }
        Ok(outcome)
    }

    /// Why the device of `key_id` was removed, if the node remembers that it was.
    pub fn removed_key(
        &self,
        key_id: &layout::KeyId,
    ) -> Result<Option<RemovedKeyRecord>, StoreError> {
        match self.trees.removed_key.get(key_id)? {
            Some(v) => Ok(Some(records::decode(&v, "removed_key")?)),
            None => Ok(None),
        }
    }

    /// Records that `device` was seen at `now_ms` (and so its account).
    pub fn mark_device_seen(&self, device: DeviceRef, now_ms: u64) -> Result<(), StoreError> {
        let _gate = self.writing();
        let at = now_ms.to_be_bytes();
        self.trees.device_seen.insert(device.key(), &at)?;
        self.trees
            .account_seen
            .insert(layout::account(device.account_id), &at)?;
        Ok(())
    }

    /// Companions (never a primary) not seen since `cutoff_ms` (linking counts as
    /// being seen): the devices that lapse. Reads the companions only: they are the
    /// devices with a name.
    pub fn lapsed_companions(&self, cutoff_ms: u64) -> Result<Vec<DeviceRef>, StoreError> {
        let mut out = Vec::new();
        for key in self.trees.device_name.iter().keys() {
            let key = key?;
            let (account_id, device_id) = layout::parse_device(&key)
                .ok_or_else(|| StoreError::Corrupt("device_name key".into()))?;
            let seen = match self.trees.device_seen.get(&key)? {
                Some(v) => be_u64(&v, "device_seen value")?,
                None => 0,
            };
            if seen < cutoff_ms {
                out.push(DeviceRef {
                    account_id,
                    device_id,
                });
            }
        }
        Ok(out)
    }

    /// Records that the keys `key_ids` were removed, `why`, at `now_ms`.
    pub(super) fn record_removed(
        &self,
        key_ids: &[layout::KeyId],
        why: Removal,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let gone = records::encode(&RemovedKeyRecord { why, at_ms: now_ms })?;
        for key in key_ids {
            self.trees.removed_key.insert(key, gone.as_slice())?;
        }
        Ok(())
    }

    /// Forgets removed keys recorded more than [`REMOVED_KEY_KEEP_MS`] before
    /// `now_ms`. Returns how many.
    pub fn sweep_removed_keys(&self, now_ms: u64) -> Result<usize, StoreError> {
        let _gate = self.writing();
        let mut dropped = 0;
        for entry in self.trees.removed_key.iter() {
            let (key, value) = entry?;
            let record: RemovedKeyRecord = records::decode(&value, "removed_key")?;
            if now_ms.saturating_sub(record.at_ms) > REMOVED_KEY_KEEP_MS
                && self
                    .trees
                    .removed_key
                    .compare_and_swap(&key, Some(value), None::<&[u8]>)?
                    .is_ok()
            {
                dropped += 1;
            }
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::super::registration::tests::{code, device};
    use super::super::{Judgement, VerifyOutcome};
    use super::*;

    fn registered(store: &Store, n: u8) -> DeviceRef {
        let number = "+14155550100";
        store
            .replace_code::<()>(number, |_| Ok(code(5)))
            .unwrap()
            .unwrap();
        match store
            .verify_and_register::<()>(number, &device(n), 10, |_| Judgement::Accept)
            .unwrap()
        {
            VerifyOutcome::Registered { device, .. } => device,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn companions_are_linked_up_to_the_limit_and_unlinked_but_never_the_primary() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let primary = registered(&store, 1);
        let account = primary.account_id;
        let laptop = match store
            .link_device(account, &device(2), "laptop", 3, 20)
            .unwrap()
        {
            Linked::Done { device, number } => {
                assert_eq!(number, "+14155550100");
                device
            }
            other => panic!("{other:?}"),
        };
        assert_ne!(laptop.device_id, primary.device_id);
        // A key that is some device's already cannot be linked again.
        assert_eq!(
            store
                .link_device(account, &device(1), "again", 3, 21)
                .unwrap(),
            Linked::KeyInUse
        );
        store
            .link_device(account, &device(3), "tablet", 3, 22)
            .unwrap();
        assert_eq!(
            store
                .link_device(account, &device(4), "fourth", 3, 23)
                .unwrap(),
            Linked::TooMany { max: 3 }
        );
        let (_, list) = store.devices(account).unwrap().unwrap();
        let names: Vec<_> = list.iter().map(|d| (d.primary, d.name.clone())).collect();
        assert_eq!(
            names,
            [
                (true, None),
                (false, Some("laptop".to_string())),
                (false, Some("tablet".to_string()))
            ]
        );
        assert_eq!(
            store.device_by_key(&[2; 32]).unwrap().unwrap().device,
            laptop
        );

        assert_eq!(
            store.unlink_device(primary, Removal::Unlinked, 30).unwrap(),
            Unlinked::Primary
        );
        assert_eq!(
            store.unlink_device(laptop, Removal::Unlinked, 30).unwrap(),
            Unlinked::Done { key_id: [2; 32] }
        );
        assert_eq!(store.device_by_key(&[2; 32]).unwrap(), None);
        assert_eq!(
            store.removed_key(&[2; 32]).unwrap(),
            Some(RemovedKeyRecord {
                why: Removal::Unlinked,
                at_ms: 30
            })
        );
        assert_eq!(
            store.unlink_device(laptop, Removal::Unlinked, 31).unwrap(),
            Unlinked::NotFound
        );
        // Its slot is free again, and ids are never reused.
        let Linked::Done { device: again, .. } = store
            .link_device(account, &device(5), "new laptop", 3, 40)
            .unwrap()
        else {
            panic!("not linked")
        };
        assert!(again.device_id > laptop.device_id);
        // The removal is forgotten only after its keep time.
        assert_eq!(
            store.sweep_removed_keys(30 + REMOVED_KEY_KEEP_MS).unwrap(),
            0
        );
        assert_eq!(
            store.sweep_removed_keys(31 + REMOVED_KEY_KEEP_MS).unwrap(),
            1
        );
        assert_eq!(store.removed_key(&[2; 32]).unwrap(), None);
    }

    #[test]
    fn only_companions_that_stayed_away_lapse() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let primary = registered(&store, 1);
        let link = |n: u8, at: u64| match store
            .link_device(primary.account_id, &device(n), "d", 5, at)
            .unwrap()
        {
            Linked::Done { device, .. } => device,
            other => panic!("{other:?}"),
        };
        let (old, fresh, seen) = (link(2, 100), link(3, 1_000), link(4, 100));
        store.mark_device_seen(seen, 2_000).unwrap();
        // The primary was never marked seen and is older than the cutoff: it stays.
        assert_eq!(store.lapsed_companions(500).unwrap(), vec![old]);
        let mut lapsed = store.lapsed_companions(5_000).unwrap();
        lapsed.sort_by_key(|d| d.device_id);
        assert_eq!(lapsed, vec![old, fresh, seen]);
        assert!(!lapsed.contains(&primary));
    }
}
