//! What an operator asks of the store: counts, accounts, and deleting an account.
//!
//! These scan whole trees: they serve a person at a terminal, not the request path.

use serde::{Deserialize, Serialize};
use sled::transaction::Transactional;

use super::layout;
use super::records::{self, AccountRecord, QueueItem};
use super::{DeviceRef, Store, StoreError, TxResult, be_u64};

/// Counts over the whole store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreCounts {
    pub accounts: u64,
    pub devices: u64,
    /// Messages waiting in device queues.
    pub queued_messages: u64,
    /// Delivery receipts waiting in device queues.
    pub queued_receipts: u64,
    /// Stored bytes of all queued items.
    pub queued_bytes: u64,
    /// When the oldest queued item was queued (ms since the Unix epoch).
    pub oldest_queued_ms: Option<u64>,
}

/// One device of an account, as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSummary {
    pub device_id: u32,
    /// The account's primary (the device that proved the number), or a companion.
    pub primary: bool,
    /// The name a companion was linked with.
    #[serde(default)]
    pub name: Option<String>,
    /// When it was last seen (ms; written at most hourly), if ever.
    #[serde(default)]
    pub last_seen_ms: Option<u64>,
    /// The device key id (SHA-256 of its public key), hex.
    pub key_id: String,
    pub created_at_ms: u64,
    pub queued: u64,
    pub queued_bytes: u64,
    /// Whether the device has published its end-to-end keys.
    pub keys_published: bool,
    pub one_time_keys: u64,
}

/// One account, as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountSummary {
    pub number: String,
    pub account_id: u64,
    pub created_at_ms: u64,
    /// When one of its devices was last seen (ms; written at most hourly).
    pub last_seen_ms: Option<u64>,
    pub registration_lock: bool,
    pub devices: Vec<DeviceSummary>,
}

/// What deleting an account removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    pub account_id: u64,
    pub devices: Vec<DeviceRef>,
    /// The device key ids, so their live connections can be closed.
    pub key_ids: Vec<layout::KeyId>,
    pub queued_items: u64,
}

/// One pass of [`Store::delete_account`].
enum Attempt {
    NoAccount,
    /// The account changed under the deletion; this many queued items were dropped.
    Changed {
        queued_items: u64,
    },
    Done(Deleted),
}

impl Store {
    /// Counts accounts, devices and queued items, reading every account and queue item.
    pub fn counts(&self) -> Result<StoreCounts, StoreError> {
        let mut counts = StoreCounts::default();
        for value in self.trees.account.iter().values() {
            let account: AccountRecord = records::decode(&value?, "account")?;
            counts.accounts += 1;
            counts.devices += account.devices.len() as u64;
        }
        for value in self.trees.queue.iter().values() {
            let value = value?;
            let (at, item) = records::decode_queued(&value)?;
            match item {
                QueueItem::Message { .. } | QueueItem::GroupMessage { .. } => {
                    counts.queued_messages += 1
                }
                QueueItem::Delivered { .. } | QueueItem::GroupDelivered { .. } => {
                    counts.queued_receipts += 1
                }
            }
            counts.queued_bytes += value.len() as u64;
            counts.oldest_queued_ms = Some(counts.oldest_queued_ms.map_or(at, |o| o.min(at)));
        }
        Ok(counts)
    }

    /// Every account, in number order.
    pub fn accounts(&self) -> Result<Vec<AccountSummary>, StoreError> {
        let mut out = Vec::new();
        for entry in self.trees.number_account.iter() {
            let (_, id) = entry?;
            let id = layout::parse_account(&id)
                .ok_or_else(|| StoreError::Corrupt("number_account value".into()))?;
            if let Some(account) = self.account(id)? {
                out.push(self.summarise(id, account)?);
            }
        }
        Ok(out)
    }

    /// The account of `number`, if it has one.
    pub fn account_summary(&self, number: &str) -> Result<Option<AccountSummary>, StoreError> {
        match self.account_by_number(number)? {
            Some((id, account)) => Ok(Some(self.summarise(id, account)?)),
            None => Ok(None),
        }
    }

    fn summarise(&self, id: u64, account: AccountRecord) -> Result<AccountSummary, StoreError> {
        let last_seen_ms = match self.trees.account_seen.get(layout::account(id))? {
            Some(v) => Some(be_u64(&v, "account_seen value")?),
            None => None,
        };
        let mut devices = Vec::with_capacity(account.devices.len());
        for (i, d) in account.devices.iter().enumerate() {
            let dk = layout::device(id, d.device_id);
            let (name, device_seen_ms) = self.name_and_seen(dk)?;
            let (mut queued, mut queued_bytes) = (0, 0);
            for value in self.trees.queue.scan_prefix(dk).values() {
                queued += 1;
                queued_bytes += value?.len() as u64;
            }
            devices.push(DeviceSummary {
                device_id: d.device_id,
                primary: i == 0,
                name,
                last_seen_ms: device_seen_ms,
                key_id: hex::encode(d.key_id),
                created_at_ms: d.created_at_ms,
                queued,
                queued_bytes,
                keys_published: self.trees.device_keys.contains_key(dk)?,
                one_time_keys: self.trees.one_time_key.scan_prefix(dk).keys().count() as u64,
            });
        }
        Ok(AccountSummary {
            number: account.number,
            account_id: id,
            created_at_ms: account.created_at_ms,
            last_seen_ms,
            registration_lock: self
                .trees
                .registration_lock
                .contains_key(layout::account(id))?,
            devices,
        })
    }

    /// Deletes the account of `number` and everything the node holds for it: its
    /// devices, their keys, queues and sent-id records, its registration lock, its
    /// pending code and its discovery index entry. Messages it sent that still wait
    /// in other devices' queues stay: they are the recipients' mail.
    ///
    /// The queues go first, under the queue writer lock held to the end, then the
    /// account in one transaction: a crash in between leaves an account with empty
    /// queues, and deleting again finishes the work. A registration that changes the
    /// account's devices meanwhile makes it start over (the transaction checks that
    /// the account is still the one whose devices were cleared).
    pub fn delete_account(&self, number: &str) -> Result<Option<Deleted>, StoreError> {
        let _gate = self.writing();
        let mut total_items = 0;
        for _ in 0..8 {
            match self.delete_account_once(number)? {
                Attempt::NoAccount => return Ok(None),
                Attempt::Changed { queued_items } => total_items += queued_items,
                Attempt::Done(mut deleted) => {
                    deleted.queued_items += total_items;
                    // It leaves its groups (an admin's role passes on as on a leave).
                    let now_ms = super::wall_ms();
                    for group in self.groups_of(deleted.account_id)? {
                        let leave = super::GroupChange::Leave;
                        let _ = self.change_group_held(
                            group,
                            deleted.account_id,
                            &leave,
                            u32::MAX,
                            now_ms,
                        )?;
                    }
                    return Ok(Some(deleted));
                }
            }
        }
        Err(StoreError::Corrupt(format!(
            "{number} kept changing while it was being deleted; try again"
        )))
    }

    fn delete_account_once(&self, number: &str) -> Result<Attempt, StoreError> {
        let Some((account_id, account)) = self.account_by_number(number)? else {
            return Ok(Attempt::NoAccount);
        };
        let record = records::encode(&account)?;
        let devices: Vec<DeviceRef> = account
            .devices
            .iter()
            .map(|d| DeviceRef {
                account_id,
                device_id: d.device_id,
            })
            .collect();
        let key_ids: Vec<layout::KeyId> = account.devices.iter().map(|d| d.key_id).collect();
        let mut q = self.queue_writer();
        let mut queued_items = 0;
        for device in &devices {
            queued_items += self.forget_device(&mut q, device.key())?;
        }
        let prf = self
            .discovery_key()
            .prf(number)
            .map_err(super::discovery_error)?;
        let t = &self.trees;
        let done =
            (
                &t.number_account,
                &t.account,
                &t.device_key,
                &t.device_keys,
                &t.discovery_index,
                &t.registration_lock,
                &t.account_seen,
                &t.number_code,
            )
                .transaction(
                    |(
                        number_account,
                        account,
                        device_key,
                        device_keys,
                        index,
                        lock,
                        seen,
                        code,
                    )|
                     -> TxResult<bool> {
                        let now = account.get(layout::account(account_id))?;
                        if now.as_deref() != Some(record.as_slice())
                            || number_account.get(layout::number(number))?.as_deref()
                                != Some(&account_id.to_be_bytes()[..])
                        {
                            return Ok(false);
                        }
                        number_account.remove(layout::number(number))?;
                        account.remove(&layout::account(account_id))?;
                        for (key_id, device) in key_ids.iter().zip(&devices) {
                            device_key.remove(&key_id[..])?;
                            device_keys.remove(&device.key()[..])?;
                        }
                        // Only the entry that points at this account: after a rotation
                        // the index is rebuilt, so the current key's PRF finds it.
                        if let Some(owner) = index.get(prf)?
                            && owner.as_ref() == account_id.to_be_bytes()
                        {
                            index.remove(&prf[..])?;
                        }
                        lock.remove(&layout::account(account_id))?;
                        seen.remove(&layout::account(account_id))?;
                        code.remove(layout::number(number))?;
                        Ok(true)
                    },
                )?;
        drop(q);
        if !done {
            return Ok(Attempt::Changed { queued_items });
        }
        let now_ms = super::wall_ms();
        self.record_removed(&key_ids, records::Removal::AccountDeleted, now_ms)?;
        for device in &devices {
            self.trees.device_name.remove(device.key())?;
            self.trees.device_seen.remove(device.key())?;
            self.trees.device_vouch.remove(device.key())?;
        }
        self.forget_profile(account_id)?;
        Ok(Attempt::Done(Deleted {
            account_id,
            devices,
            key_ids,
            queued_items,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewDevice;
    use crate::store::records::CodeRecord;
    use crate::store::{Judgement, VerifyOutcome};

    fn register(store: &Store, number: &str, key: u8) -> DeviceRef {
        store
            .replace_code(number, |_| {
                Ok::<_, ()>(CodeRecord {
                    hash: [0; 32],
                    sent_at_ms: 0,
                    expires_at_ms: u64::MAX,
                    tries_left: 3,
                })
            })
            .expect("store")
            .expect("code");
        let device = NewDevice {
            key_id: [key; 32],
            public_key: vec![key],
        };
        match store
            .verify_and_register::<()>(number, &device, 0, |_| Judgement::Accept)
            .expect("store")
        {
            VerifyOutcome::Registered { device, .. } => device,
            other => panic!("not registered: {other:?}"),
        }
    }

    #[test]
    fn delete_removes_everything_of_the_account_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let alice = register(&store, "+14155550100", 1);
        let bob = register(&store, "+14155550101", 2);
        for (i, (from, to)) in [(alice, bob), (bob, alice), (alice, bob)]
            .iter()
            .enumerate()
        {
            let number = if *from == alice {
                "+14155550100"
            } else {
                "+14155550101"
            };
            store
                .append(
                    *from,
                    number,
                    [i as u8; 16],
                    vec![(*to, vec![7; 10])],
                    5 + i as u64,
                    100,
                )
                .expect("append");
        }
        let before = store.counts().expect("counts");
        assert_eq!(
            (before.accounts, before.devices, before.queued_messages),
            (2, 2, 3)
        );
        assert_eq!(before.oldest_queued_ms, Some(5));
        assert_eq!(store.queue_totals(), (3, before.queued_bytes));
        let bob_prf = store.discovery_key().prf("+14155550101").expect("prf");
        assert_eq!(
            store.discovery_lookup(&bob_prf).expect("lookup"),
            Some(bob.account_id)
        );

        let deleted = store
            .delete_account("+14155550101")
            .expect("delete")
            .expect("bob existed");
        assert_eq!(deleted.devices, vec![bob]);
        assert_eq!(deleted.queued_items, 2);
        assert_eq!(deleted.key_ids, vec![[2; 32]]);

        let after = store.counts().expect("counts");
        assert_eq!(
            (after.accounts, after.devices, after.queued_messages),
            (1, 1, 1)
        );
        assert_eq!(store.queue_totals(), (1, after.queued_bytes));
        assert_eq!(store.account_by_number("+14155550101").expect("read"), None);
        assert_eq!(store.device_by_key(&[2; 32]).expect("read"), None);
        assert_eq!(store.discovery_lookup(&bob_prf).expect("lookup"), None);
        assert_eq!(store.queue_len(bob).unwrap(), 0);
        // Alice keeps her account, her queue (Bob's message to her) and her index entry.
        let alice_prf = store.discovery_key().prf("+14155550100").expect("prf");
        assert_eq!(
            store.discovery_lookup(&alice_prf).expect("lookup"),
            Some(alice.account_id)
        );
        assert_eq!(store.queue_len(alice).unwrap(), 1);
        assert!(
            store
                .delete_account("+14155550101")
                .expect("delete")
                .is_none()
        );
        let summary = store.accounts().expect("accounts");
        assert_eq!(summary.len(), 1);
        assert_eq!(summary[0].devices[0].queued, 1);
    }

    /// Lookups racing key rotations never answer "not registered" for a registered
    /// number: they are under the current key and found, or under an old one and told
    /// so.
    #[test]
    fn a_lookup_during_a_rotation_is_never_a_wrong_no() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        for i in 0..200u8 {
            register(&store, &format!("+1415555{:04}", 1000 + u32::from(i)), i);
        }
        let number = "+14155551100";
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let done = AtomicBool::new(false);
        let lookups = AtomicUsize::new(0);
        let (mut found, mut told) = (0, 0);
        std::thread::scope(|s| {
            s.spawn(|| {
                for round in 0..10 {
                    // On a busy machine the rotations could all run before the first
                    // lookup: each waits until a lookup ran since the one before.
                    while lookups.load(Ordering::SeqCst) <= round {
                        std::thread::yield_now();
                    }
                    store.rotate_discovery_key().expect("rotate");
                }
                done.store(true, Ordering::SeqCst);
            });
            while !done.load(Ordering::SeqCst) {
                let key = store.discovery_key();
                let prf = key.prf(number).expect("prf");
                match store
                    .discovery_resolve(key.version(), &[prf])
                    .expect("resolve")
                {
                    Ok(answer) => {
                        assert_eq!(answer, [true], "a registered number read as unknown");
                        found += 1;
                    }
                    Err(current) => {
                        assert!(current > key.version());
                        told += 1;
                    }
                }
                lookups.fetch_add(1, Ordering::SeqCst);
            }
        });
        assert!(
            found + told >= 10,
            "{found} found, {told} told of a new key"
        );
        let key = store.discovery_key();
        let prf = key.prf(number).expect("prf");
        assert_eq!(
            store
                .discovery_resolve(key.version(), &[prf])
                .expect("resolve"),
            Ok(vec![true])
        );
        assert_eq!(store.discovery_key().version(), 11);
    }

    #[test]
    fn a_rotation_cut_short_is_finished_at_the_next_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            register(&store, "+14155550100", 1);
            // As a crash would leave it: marker set, index half-written (here, empty).
            store
                .trees
                .meta
                .insert("discovery_rebuild", &[1u8])
                .expect("marker");
            store.trees.discovery_index.clear().expect("clear");
            store.flush_blocking().expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let prf = store.discovery_key().prf("+14155550100").expect("prf");
        assert!(store.discovery_lookup(&prf).expect("lookup").is_some());
        assert!(
            store
                .trees
                .meta
                .get("discovery_rebuild")
                .expect("meta")
                .is_none()
        );
    }

    #[test]
    fn queue_totals_survive_a_clean_close_and_are_recounted_otherwise() {
        let dir = tempfile::tempdir().expect("tempdir");
        let expected = {
            let store = Store::open(dir.path()).expect("open");
            let alice = register(&store, "+14155550100", 1);
            let bob = register(&store, "+14155550101", 2);
            for i in 0..5u8 {
                store
                    .append(
                        alice,
                        "+14155550100",
                        [i; 16],
                        vec![(bob, vec![i; 40])],
                        1,
                        100,
                    )
                    .expect("append");
            }
            store.save_queue_totals().expect("save");
            store.flush_blocking().expect("flush");
            store.queue_totals()
        };
        assert_eq!(expected.0, 5);
        {
            // Opened after a clean close: the saved totals, taken out of meta.
            let store = Store::open(dir.path()).expect("reopen");
            assert_eq!(store.queue_totals(), expected);
            assert!(
                store
                    .trees
                    .meta
                    .get("queue_totals")
                    .expect("meta")
                    .is_none()
            );
            // Changed without a clean close afterwards...
            store.delete_account("+14155550101").expect("delete");
            store.flush_blocking().expect("flush");
        }
        // ...so the next open counts again.
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.queue_totals(), (0, 0));
    }
}
