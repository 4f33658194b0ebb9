//! Accounts, devices and registrations in a JetStream key-value bucket
//! (`sb_accounts`, [`REPLICAS`](super::REPLICAS) replicas, one revision kept):
//!
//! - `n.HEX(number)`: the number's entry, holding its pending code, its account id
//!   and a generation bumped by every registration of the number;
//! - `a.ID`: the account (the same [`AccountRecord`] sled keeps), the generation of
//!   the registration that made its primary, and its devices' names and last-seen
//!   times;
//! - `k.HEX(key id)`: which device a key belongs to, or why it was removed.
//!
//! JetStream has no transaction over two keys, so each operation has one entry as
//! its point of decision, changed by compare-and-set ([`Bucket::modify`]), and
//! the others follow it:
//!
//! - A **registration** is decided on the number's entry: the code is consumed and
//!   the generation bumped in one compare-and-set, so of concurrent verifications
//!   of one code, on any nodes, exactly one goes on. It then rewrites the account
//!   only if the account's generation is older than its own (a later registration
//!   of the number that overtook it wins, and the slower one is told there is no
//!   code), and then points the key at the new device.
//! - The **key entries** are hints, checked against the account on every read: a
//!   device found by its key is one its account lists with that key. A crash
//!   between the account and a key entry leaves, at worst, a new device not found
//!   by its key (it was not yet told it is registered, and registers again) or an
//!   old key read as unknown rather than as removed.
//! - A **link** is decided on the account (its device count), then claims the key
//!   entry by compare-and-set; if another device holds the key, the link is undone
//!   and refused as a key in use.
//!
//! The same bucket keeps `l.ID`, the account's registration lock (its PIN hash
//! and wrong tries, a try taken by compare-and-set). Code-send counters
//! ([`LimitStore`]) live in a bucket of their own, `sb_limits`, whose entries the
//! cluster drops a day ([`KEEP_MS`]) after their last write: they need no sweep.
//! JetStream has no transaction over the several keys a send is counted under
//! (number, address, country, global), so a send reads them all, lets the judge see
//! them, and writes them in one fixed order, each by compare-and-set: a counter
//! changed since it was read fails its write, the ones already written take the
//! send back, and the whole is judged again. No judge ever passes a send on counts
//! older than the counter it writes, so no limit is exceeded; a send taken back may
//! for a moment have refused another (never the other way).
//!
//! Left to sled for now: removed keys are never swept here (an entry per removed
//! key stays).

use std::sync::Arc;

use bincode::{Decode, Encode};

use super::bucket::{self, Bucket};
use super::{Cluster, ClusterError};
use crate::discovery::DiscoveryKey;
use crate::store::account_store::AccountStore;
use crate::store::layout::KeyId;
use crate::store::limit_store::LimitStore;
use crate::store::records::{
    AccountRecord, CodeRecord, DeviceRecord, LockRecord, Removal, RemovedKeyRecord,
};
use crate::store::{
    DeviceIdentity, DeviceRef, DeviceView, Judgement, Linked, NewDevice, StoreError, Unlinked,
    VerifyOutcome,
};
use crate::verify::limits::KEEP_MS;

/// The bucket's name.
pub const BUCKET: &str = "sb_accounts";

/// The code-send counters' bucket.
pub const LIMITS_BUCKET: &str = "sb_limits";

/// Reads and writes of a send's counters before giving up as busy.
const SEND_TRIES: u32 = 64;

/// `n.HEX(number)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
struct NumberEntry {
    account_id: Option<u64>,
    code: Option<CodeRecord>,
    /// Bumped by each registration of the number.
    generation: u64,
}

/// `a.ID`.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
struct AccountEntry {
    record: AccountRecord,
    /// The generation of the registration that made the current primary.
    generation: u64,
    /// Companions' names, by device id.
    names: Vec<(u32, String)>,
    /// Last-seen times, by device id.
    seen: Vec<(u32, u64)>,
}

impl AccountEntry {
    /// Drops what the entry keeps beside the record for device `id`.
    fn forget(&mut self, id: u32) {
        self.names.retain(|(d, _)| *d != id);
        self.seen.retain(|(d, _)| *d != id);
    }
}

/// `k.HEX(key id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
enum KeyEntry {
    Device(u64, u32),
    Removed(RemovedKeyRecord),
}

fn number_key(number: &str) -> String {
    format!("n.{}", hex::encode(number.as_bytes()))
}

fn account_key(id: u64) -> String {
    format!("a.{id}")
}

fn key_key(key_id: &KeyId) -> String {
    format!("k.{}", hex::encode(key_id))
}

fn lock_key(account: u64) -> String {
    format!("l.{account}")
}

/// A code-send counter's key (limit keys hold characters a bucket key cannot).
fn send_key(key: &str) -> String {
    format!("s.{}", hex::encode(key.as_bytes()))
}

/// The bucket on `cluster`, created with `replicas` replicas if it is not there.
async fn open_bucket(cluster: &Cluster, replicas: usize) -> Result<Bucket, ClusterError> {
    Bucket::open(
        cluster,
        BUCKET,
        "switchboard: numbers, pending codes, accounts, devices and device keys",
        replicas,
    )
    .await
}

/// What the number's compare-and-set decided.
enum Decided<E> {
    NoCode,
    Rejected(E),
    Won { account_id: u64, generation: u64 },
}

/// What a registration made of the account.
struct Rewritten {
    device_id: u32,
    took_over: bool,
    old: Vec<DeviceRecord>,
}

/// [`AccountStore`] on a JetStream cluster.
#[derive(Clone)]
pub struct JetStreamAccounts {
    bucket: Bucket,
    /// Code-send counters, each dropped a day after its last write.
    limits: Bucket,
    /// The discovery key, for the PRF of a registered number.
    discovery: Arc<DiscoveryKey>,
}

impl std::fmt::Debug for JetStreamAccounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamAccounts")
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl JetStreamAccounts {
    /// The bucket on `cluster`, created with `replicas` replicas if it is not there;
    /// `discovery` gives registered numbers their PRF.
    pub async fn open(
        cluster: &Cluster,
        replicas: usize,
        discovery: Arc<DiscoveryKey>,
    ) -> Result<JetStreamAccounts, ClusterError> {
        let bucket = open_bucket(cluster, replicas).await?;
        let limits = Bucket::open_expiring(
            cluster,
            LIMITS_BUCKET,
            "switchboard: verification code sends by number, address, country and in all",
            replicas,
            std::time::Duration::from_millis(KEEP_MS),
        )
        .await?;
        Ok(JetStreamAccounts {
            bucket,
            limits,
            discovery,
        })
    }

    async fn account_entry(&self, id: u64) -> Result<Option<AccountEntry>, StoreError> {
        Ok(self.bucket.read(&account_key(id)).await?.0)
    }

    /// The device `key_id` points at, if its account lists it with that key.
    async fn holder(&self, key_id: &KeyId) -> Result<Option<(DeviceRef, String)>, StoreError> {
        let (entry, _) = self.bucket.read::<KeyEntry>(&key_key(key_id)).await?;
        let Some(KeyEntry::Device(account_id, device_id)) = entry else {
            return Ok(None);
        };
        let Some(account) = self.account_entry(account_id).await? else {
            return Ok(None);
        };
        let listed = account
            .record
            .devices
            .iter()
            .any(|d| d.device_id == device_id && d.key_id == *key_id);
        Ok(listed.then_some((
            DeviceRef {
                account_id,
                device_id,
            },
            account.record.number,
        )))
    }

    /// Marks `key_id` removed (`why`) if it still points at `device`.
    async fn revoke(
        &self,
        key_id: &KeyId,
        device: DeviceRef,
        why: Removal,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let ours = KeyEntry::Device(device.account_id, device.device_id);
        self.bucket
            .modify(&key_key(key_id), |slot: &mut Option<KeyEntry>| {
                if matches!(slot, Some(e) if *e != ours) {
                    return ((), false);
                }
                *slot = Some(KeyEntry::Removed(RemovedKeyRecord { why, at_ms: now_ms }));
                ((), true)
            })
            .await
    }

    /// An account id nobody has, drawn at random below 2^63 (never 0).
    async fn free_account_id(&self) -> Result<u64, StoreError> {
        loop {
            let id = rand::random::<u64>() >> 1;
            if id != 0 && self.account_entry(id).await?.is_none() {
                return Ok(id);
            }
        }
    }

    /// Takes `key_id` away from a device of an account other than `account_id`, if
    /// it belongs to one: that device is signed out.
    async fn detach(
        &self,
        key_id: &KeyId,
        account_id: u64,
    ) -> Result<Option<DeviceRef>, StoreError> {
        let Some((other, _)) = self.holder(key_id).await? else {
            return Ok(None);
        };
        if other.account_id == account_id {
            return Ok(None);
        }
        let removed = self
            .bucket
            .modify(
                &account_key(other.account_id),
                |slot: &mut Option<AccountEntry>| {
                    let Some(entry) = slot else {
                        return (false, false);
                    };
                    let before = entry.record.devices.len();
                    entry
                        .record
                        .devices
                        .retain(|d| !(d.device_id == other.device_id && d.key_id == *key_id));
                    let changed = entry.record.devices.len() != before;
                    if changed {
                        entry.forget(other.device_id);
                    }
                    (changed, changed)
                },
            )
            .await?;
        Ok(removed.then_some(other))
    }
}

impl AccountStore for JetStreamAccounts {
    async fn replace_code<E: Send + 'static>(
        &self,
        number: String,
        decide: impl Fn(Option<&CodeRecord>) -> Result<CodeRecord, E> + Send + Sync + 'static,
    ) -> Result<Result<CodeRecord, E>, StoreError> {
        self.bucket
            .modify(&number_key(&number), |slot: &mut Option<NumberEntry>| {
                let entry = slot.get_or_insert_with(NumberEntry::default);
                match decide(entry.code.as_ref()) {
                    Ok(record) => {
                        entry.code = Some(record.clone());
                        (Ok(record), true)
                    }
                    Err(e) => (Err(e), false),
                }
            })
            .await
    }

    async fn remove_code(&self, number: String) -> Result<(), StoreError> {
        self.bucket
            .modify(&number_key(&number), |slot: &mut Option<NumberEntry>| {
                let Some(entry) = slot else {
                    return ((), false);
                };
                if entry.code.take().is_none() {
                    return ((), false);
                }
                if entry.account_id.is_none() {
                    *slot = None;
                }
                ((), true)
            })
            .await
    }

    async fn verify_and_register<E: Clone + Send + 'static>(
        &self,
        number: String,
        device: NewDevice,
        now_ms: u64,
        judge: impl Fn(&CodeRecord) -> Judgement<E> + Send + Sync + 'static,
    ) -> Result<VerifyOutcome<E>, StoreError> {
        let nkey = number_key(&number);
        // No code pending: nothing to judge, and no id worth drawing.
        let (entry, _) = self.bucket.read::<NumberEntry>(&nkey).await?;
        if entry.is_none_or(|e| e.code.is_none()) {
            return Ok(VerifyOutcome::NoCode);
        }
        // Drawn whether or not the number has an account now: if it is deleted
        // before the decision, the id read here must not be taken again.
        let fresh = self.free_account_id().await?;
        // The point of decision: the code is consumed here, once.
        let decided = self
            .bucket
            .modify(&nkey, |slot: &mut Option<NumberEntry>| {
                let Some(entry) = slot.as_mut() else {
                    return (Decided::NoCode, false);
                };
                let Some(code) = &entry.code else {
                    return (Decided::NoCode, false);
                };
                match judge(code) {
                    Judgement::Reject { update, error } => {
                        entry.code = update;
                        if entry.code.is_none() && entry.account_id.is_none() {
                            *slot = None;
                        }
                        (Decided::Rejected(error), true)
                    }
                    Judgement::Accept => {
                        entry.code = None;
                        entry.generation += 1;
                        let account_id = *entry.account_id.get_or_insert(fresh);
                        let generation = entry.generation;
                        (
                            Decided::Won {
                                account_id,
                                generation,
                            },
                            true,
                        )
                    }
                }
            })
            .await?;
        let (account_id, generation) = match decided {
            Decided::NoCode => return Ok(VerifyOutcome::NoCode),
            Decided::Rejected(e) => return Ok(VerifyOutcome::Rejected(e)),
            Decided::Won {
                account_id,
                generation,
            } => (account_id, generation),
        };
        let prf = self
            .discovery
            .prf(&number)
            .map_err(|e| StoreError::Corrupt(format!("the PRF of a number: {e}")))?;
        let mut signed_out: Vec<DeviceRef> = self
            .detach(&device.key_id, account_id)
            .await?
            .into_iter()
            .collect();
        let rewritten = self
            .bucket
            .modify(
                &account_key(account_id),
                |slot: &mut Option<AccountEntry>| {
                    if let Some(entry) = slot.as_ref() {
                        if entry.generation >= generation {
                            // A later registration of the number got here first.
                            return (Ok(None), false);
                        }
                        if entry.record.number != number {
                            return (
                                Err(StoreError::Corrupt(format!(
                                    "account {account_id} belongs to another number"
                                ))),
                                false,
                            );
                        }
                    }
                    let took_over = slot.is_some();
                    let entry = slot.get_or_insert_with(|| AccountEntry {
                        record: AccountRecord {
                            number: number.clone(),
                            created_at_ms: now_ms,
                            next_device_id: 1,
                            devices: Vec::new(),
                        },
                        generation,
                        names: Vec::new(),
                        seen: Vec::new(),
                    });
                    let old = std::mem::take(&mut entry.record.devices);
                    let device_id = entry.record.next_device_id;
                    entry.record.next_device_id += 1;
                    entry.record.devices.push(DeviceRecord {
                        device_id,
                        key_id: device.key_id,
                        public_key: device.public_key.clone(),
                        created_at_ms: now_ms,
                    });
                    entry.generation = generation;
                    entry.names.clear();
                    entry.seen.clear();
                    (
                        Ok(Some(Rewritten {
                            device_id,
                            took_over,
                            old,
                        })),
                        true,
                    )
                },
            )
            .await??;
        let Some(Rewritten {
            device_id,
            took_over,
            old,
        }) = rewritten
        else {
            return Ok(VerifyOutcome::NoCode);
        };
        let mut revoked_keys = Vec::new();
        for d in &old {
            let was = DeviceRef {
                account_id,
                device_id: d.device_id,
            };
            if d.key_id != device.key_id {
                self.revoke(&d.key_id, was, Removal::SignedOut, now_ms)
                    .await?;
                revoked_keys.push(d.key_id);
            }
            signed_out.push(was);
        }
        self.bucket
            .put(
                &key_key(&device.key_id),
                &KeyEntry::Device(account_id, device_id),
            )
            .await?;
        Ok(VerifyOutcome::Registered {
            device: DeviceRef {
                account_id,
                device_id,
            },
            took_over,
            signed_out,
            revoked_keys,
            indexed: (self.discovery.version(), prf),
        })
    }

    async fn account(&self, id: u64) -> Result<Option<AccountRecord>, StoreError> {
        Ok(self.account_entry(id).await?.map(|e| e.record))
    }

    async fn account_by_number(
        &self,
        number: String,
    ) -> Result<Option<(u64, AccountRecord)>, StoreError> {
        let Some(id) = self.id_of(&number).await? else {
            return Ok(None);
        };
        Ok(self.account(id).await?.map(|a| (id, a)))
    }

    async fn device_by_key(&self, key_id: KeyId) -> Result<Option<DeviceIdentity>, StoreError> {
        Ok(self
            .holder(&key_id)
            .await?
            .map(|(device, number)| DeviceIdentity { device, number }))
    }

    async fn devices(&self, account: u64) -> Result<Option<(String, Vec<DeviceView>)>, StoreError> {
        let Some(entry) = self.account_entry(account).await? else {
            return Ok(None);
        };
        let find = |list: &[(u32, String)], id: u32| {
            list.iter().find(|(d, _)| *d == id).map(|(_, n)| n.clone())
        };
        let views = entry
            .record
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| DeviceView {
                device_id: d.device_id,
                name: find(&entry.names, d.device_id),
                primary: i == 0,
                linked_at_ms: d.created_at_ms,
                last_seen_ms: entry
                    .seen
                    .iter()
                    .find(|(id, _)| *id == d.device_id)
                    .map(|(_, at)| *at),
                key_id: d.key_id,
            })
            .collect();
        Ok(Some((entry.record.number, views)))
    }

    async fn mark_device_seen(&self, device: DeviceRef, now_ms: u64) -> Result<(), StoreError> {
        self.bucket
            .modify(
                &account_key(device.account_id),
                |slot: &mut Option<AccountEntry>| {
                    let Some(entry) = slot else {
                        return ((), false);
                    };
                    if !entry
                        .record
                        .devices
                        .iter()
                        .any(|d| d.device_id == device.device_id)
                    {
                        return ((), false);
                    }
                    entry.seen.retain(|(d, _)| *d != device.device_id);
                    entry.seen.push((device.device_id, now_ms));
                    ((), true)
                },
            )
            .await
    }

    async fn link_device(
        &self,
        account: u64,
        new: NewDevice,
        name: String,
        max_devices: u32,
        now_ms: u64,
    ) -> Result<Linked, StoreError> {
        if self.holder(&new.key_id).await?.is_some() {
            return Ok(Linked::KeyInUse);
        }
        let linked = self
            .bucket
            .modify(&account_key(account), |slot: &mut Option<AccountEntry>| {
                // An account without devices was deleted (`delete_account`).
                let Some(entry) = slot.as_mut().filter(|e| !e.record.devices.is_empty()) else {
                    return (Linked::NoAccount, false);
                };
                let devices = &mut entry.record.devices;
                if devices.iter().any(|d| d.key_id == new.key_id) {
                    return (Linked::KeyInUse, false);
                }
                if devices.len() >= max_devices as usize {
                    return (Linked::TooMany { max: max_devices }, false);
                }
                let device_id = entry.record.next_device_id;
                entry.record.next_device_id += 1;
                devices.push(DeviceRecord {
                    device_id,
                    key_id: new.key_id,
                    public_key: new.public_key.clone(),
                    created_at_ms: now_ms,
                });
                entry.names.push((device_id, name.clone()));
                // Linking counts as being seen: a lapse runs from here.
                entry.seen.push((device_id, now_ms));
                let done = Linked::Done {
                    device: DeviceRef {
                        account_id: account,
                        device_id,
                    },
                    number: entry.record.number.clone(),
                };
                (done, true)
            })
            .await?;
        let Linked::Done { device, .. } = &linked else {
            return Ok(linked);
        };
        // Claim the key. Another device that took it meanwhile keeps it (and this
        // link is undone), unless its entry is a stale hint.
        let ours = KeyEntry::Device(device.account_id, device.device_id);
        let mut stale = None;
        loop {
            let taken = self
                .bucket
                .modify(
                    &key_key(&new.key_id),
                    |slot: &mut Option<KeyEntry>| match slot {
                        Some(KeyEntry::Device(a, d))
                            if KeyEntry::Device(*a, *d) != ours && stale != Some((*a, *d)) =>
                        {
                            (Some((*a, *d)), false)
                        }
                        _ => {
                            *slot = Some(ours);
                            (None, true)
                        }
                    },
                )
                .await?;
            let Some(other) = taken else {
                return Ok(linked);
            };
            match self.holder(&new.key_id).await? {
                Some((holder, _)) if (holder.account_id, holder.device_id) == other => {
                    self.unlink_device(*device, Removal::Unlinked, now_ms)
                        .await?;
                    return Ok(Linked::KeyInUse);
                }
                _ => stale = Some(other),
            }
        }
    }

    async fn unlink_device(
        &self,
        device: DeviceRef,
        why: Removal,
        now_ms: u64,
    ) -> Result<Unlinked, StoreError> {
        let outcome = self
            .bucket
            .modify(
                &account_key(device.account_id),
                |slot: &mut Option<AccountEntry>| {
                    let Some(entry) = slot else {
                        return (Unlinked::NotFound, false);
                    };
                    let Some(at) = entry
                        .record
                        .devices
                        .iter()
                        .position(|d| d.device_id == device.device_id)
                    else {
                        return (Unlinked::NotFound, false);
                    };
                    if at == 0 {
                        return (Unlinked::Primary, false);
                    }
                    let old = entry.record.devices.remove(at);
                    entry.forget(device.device_id);
                    (Unlinked::Done { key_id: old.key_id }, true)
                },
            )
            .await?;
        if let Unlinked::Done { key_id } = &outcome {
            self.revoke(key_id, device, why, now_ms).await?;
        }
        Ok(outcome)
    }

    async fn removed_key(&self, key_id: KeyId) -> Result<Option<RemovedKeyRecord>, StoreError> {
        let (entry, _) = self.bucket.read::<KeyEntry>(&key_key(&key_id)).await?;
        Ok(match entry {
            Some(KeyEntry::Removed(r)) => Some(r),
            _ => None,
        })
    }
}

impl JetStreamAccounts {
    /// Every change of numbers, accounts, device keys and locks from now on, through
    /// whichever node: what a node's caches of who is registered must hear of.
    pub async fn changes(&self) -> Result<async_nats::jetstream::kv::Watch, StoreError> {
        self.bucket.watch().await
    }

    /// Takes the send at `at_ms` off the counter `key`, if it is there.
    async fn uncount(&self, key: &str, at_ms: u64) -> Result<(), StoreError> {
        self.limits
            .modify(&send_key(key), |slot: &mut Option<Vec<u64>>| {
                let Some(times) = slot else {
                    return ((), false);
                };
                let Some(i) = times.iter().position(|t| *t == at_ms) else {
                    return ((), false);
                };
                times.remove(i);
                ((), true)
            })
            .await
    }
}

impl LimitStore for JetStreamAccounts {
    async fn record_code_send<E: Send + 'static>(
        &self,
        keys: Vec<String>,
        now_ms: u64,
        keep_ms: u64,
        judge: impl Fn(&[Vec<u64>]) -> Result<(), E> + Send + Sync + 'static,
    ) -> Result<Result<(), E>, StoreError> {
        for attempt in 0..SEND_TRIES {
            let mut read = Vec::with_capacity(keys.len());
            for key in &keys {
                let (times, revision) = self.limits.read::<Vec<u64>>(&send_key(key)).await?;
                let mut times = times.unwrap_or_default();
                times.retain(|t| now_ms < t.saturating_add(keep_ms));
                read.push((times, revision));
            }
            let seen: Vec<Vec<u64>> = read.iter().map(|(t, _)| t.clone()).collect();
            if let Err(e) = judge(&seen) {
                return Ok(Err(e));
            }
            let mut written = Vec::with_capacity(keys.len());
            let mut lost = false;
            for (key, (mut times, revision)) in keys.iter().zip(read) {
                times.push(now_ms);
                if self
                    .limits
                    .write_expecting(&send_key(key), &Some(times), revision)
                    .await?
                {
                    written.push(key);
                } else {
                    lost = true;
                    break;
                }
            }
            if !lost {
                return Ok(Ok(()));
            }
            // Another send changed a counter since it was read: take this one back
            // from those already written, and judge it again on fresh counts.
            for key in written {
                self.uncount(key, now_ms).await?;
            }
            bucket::contended(attempt).await;
        }
        Err(StoreError::Engine(format!(
            "{LIMITS_BUCKET}: the counters kept changing while a send was counted; try again"
        )))
    }

    async fn forget_code_send(&self, keys: Vec<String>, at_ms: u64) -> Result<(), StoreError> {
        for key in &keys {
            self.uncount(key, at_ms).await?;
        }
        Ok(())
    }

    async fn sweep_code_sends(&self, _now_ms: u64, _keep_ms: u64) -> Result<usize, StoreError> {
        // The bucket's max_age drops a counter a day after its last write.
        Ok(0)
    }

    async fn judge_code<E: Send + 'static>(
        &self,
        number: String,
        judge: impl Fn(&CodeRecord) -> (Option<CodeRecord>, E) + Send + Sync + 'static,
    ) -> Result<Option<E>, StoreError> {
        self.bucket
            .modify(&number_key(&number), |slot: &mut Option<NumberEntry>| {
                let Some(entry) = slot else {
                    return (None, false);
                };
                let Some(code) = &entry.code else {
                    return (None, false);
                };
                let (update, answer) = judge(code);
                entry.code = update;
                (Some(answer), true)
            })
            .await
    }

    async fn registration_lock(
        &self,
        number: String,
    ) -> Result<Option<(u64, LockRecord, u64)>, StoreError> {
        let Some(account) = self.id_of(&number).await? else {
            return Ok(None);
        };
        let (lock, _) = self.bucket.read::<LockRecord>(&lock_key(account)).await?;
        let Some(lock) = lock else {
            return Ok(None);
        };
        let seen = self
            .account_entry(account)
            .await?
            .and_then(|a| a.seen.iter().map(|(_, at)| *at).max())
            .unwrap_or(0);
        Ok(Some((account, lock, seen)))
    }

    async fn take_pin_try(
        &self,
        account: u64,
        max: u32,
    ) -> Result<Option<(u32, LockRecord)>, StoreError> {
        self.bucket
            .modify(&lock_key(account), |slot: &mut Option<LockRecord>| {
                let Some(lock) = slot else {
                    return (None, false);
                };
                if lock.wrong_tries >= max {
                    return (None, false);
                }
                lock.wrong_tries += 1;
                (Some((max - lock.wrong_tries, lock.clone())), true)
            })
            .await
    }

    async fn set_registration_lock(
        &self,
        account: u64,
        lock: Option<LockRecord>,
    ) -> Result<(), StoreError> {
        match lock {
            Some(lock) => self.bucket.put(&lock_key(account), &lock).await,
            None => {
                self.bucket
                    .modify(&lock_key(account), |slot: &mut Option<LockRecord>| {
                        let had = slot.is_some();
                        *slot = None;
                        ((), had)
                    })
                    .await
            }
        }
    }
}

/// `x.export`: a single node's data being moved in (`switchboard admin
/// export-to-cluster`), or moved.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ExportMark {
    /// The certificate fingerprint of the node it came from.
    pub source: String,
    pub started_at_ms: u64,
    pub done: bool,
    /// The discovery key version the cluster's nodes serve: one above the node's,
    /// so that clients see the key change and look their contacts up again.
    pub discovery_version: u32,
}

const EXPORT_KEY: &str = "x.export";

/// The mark of an export into `cluster`, if one began (read before the stores are
/// opened: it decides the discovery key version).
pub async fn export_mark(
    cluster: &Cluster,
    replicas: usize,
) -> Result<Option<ExportMark>, ClusterError> {
    let (mark, _) = open_bucket(cluster, replicas)
        .await?
        .read(EXPORT_KEY)
        .await
        .map_err(|e| ClusterError::JetStream(e.to_string()))?;
    Ok(mark)
}

/// How an export may go on, as its mark says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportStart {
    /// No export began: this one may, into an empty cluster.
    Fresh,
    /// This node's export, broken off: go on.
    Resume(ExportMark),
    /// Another node's export, unfinished.
    Other(String),
    Finished,
}

/// What an account's number entry says when an imported account is not its own.
#[derive(Debug, thiserror::Error)]
#[error("{number} belongs to account {holder} on the cluster, not {id}")]
pub struct NumberTaken {
    pub number: String,
    pub holder: u64,
    pub id: u64,
}

impl JetStreamAccounts {
    /// Whether the cluster has an account.
    pub async fn any_account(&self) -> Result<bool, StoreError> {
        use futures_util::TryStreamExt;
        let mut listed = self.bucket.keys().await?;
        while let Some(key) = listed
            .try_next()
            .await
            .map_err(|e| bucket::engine(BUCKET, e))?
        {
            if key.starts_with("a.") {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The mark of an export into the cluster, if one began.
    pub async fn export_mark(&self) -> Result<Option<ExportMark>, StoreError> {
        Ok(self.bucket.read(EXPORT_KEY).await?.0)
    }

    /// Marks the export `mark` begun, unless one began meanwhile (both checked and
    /// written in one compare-and-set): how it may go on.
    pub async fn begin_export(&self, mark: &ExportMark) -> Result<ExportStart, StoreError> {
        self.bucket
            .modify(EXPORT_KEY, |slot: &mut Option<ExportMark>| match slot {
                None => {
                    *slot = Some(mark.clone());
                    (ExportStart::Fresh, true)
                }
                Some(m) if m.done => (ExportStart::Finished, false),
                Some(m) if m.source != mark.source => (ExportStart::Other(m.source.clone()), false),
                Some(m) => (ExportStart::Resume(m.clone()), false),
            })
            .await
    }

    pub async fn set_export_mark(&self, mark: &ExportMark) -> Result<(), StoreError> {
        self.bucket.put(EXPORT_KEY, mark).await
    }

    /// Writes account `a` as the single node kept it: its number's entry (no
    /// pending code), the account with its devices' names and last-seen times, each
    /// device's key entry, and its registration lock. Written again, it changes
    /// nothing; a number held by another account on the cluster is refused.
    pub async fn import(
        &self,
        a: &crate::store::export::ExportedAccount,
    ) -> Result<Result<(), NumberTaken>, StoreError> {
        let id = a.id;
        let decided = self
            .bucket
            .modify(
                &number_key(&a.record.number),
                |slot: &mut Option<NumberEntry>| {
                    let entry = slot.get_or_insert_with(NumberEntry::default);
                    match entry.account_id {
                        Some(holder) if holder != id => (Err(holder), false),
                        Some(_) => (Ok(entry.generation), false),
                        None => {
                            entry.account_id = Some(id);
                            entry.generation += 1;
                            (Ok(entry.generation), true)
                        }
                    }
                },
            )
            .await?;
        let generation = match decided {
            Ok(generation) => generation,
            Err(holder) => {
                return Ok(Err(NumberTaken {
                    number: a.record.number.clone(),
                    holder,
                    id,
                }));
            }
        };
        let entry = AccountEntry {
            record: a.record.clone(),
            generation,
            names: a.names.clone(),
            seen: a.seen.clone(),
        };
        self.bucket.put(&account_key(id), &entry).await?;
        for device in &a.record.devices {
            self.bucket
                .put(
                    &key_key(&device.key_id),
                    &KeyEntry::Device(id, device.device_id),
                )
                .await?;
        }
        if let Some(lock) = &a.lock {
            self.bucket.put(&lock_key(id), lock).await?;
        }
        Ok(Ok(()))
    }

    /// Remembers why the device of `key_id` was removed, unless the key is in use.
    pub async fn import_removed(
        &self,
        key_id: &KeyId,
        removed: RemovedKeyRecord,
    ) -> Result<(), StoreError> {
        self.bucket
            .modify(&key_key(key_id), |slot: &mut Option<KeyEntry>| {
                if slot.is_some() {
                    return ((), false);
                }
                *slot = Some(KeyEntry::Removed(removed));
                ((), true)
            })
            .await
    }
}

/// An account as the bucket holds it, for an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountView {
    pub record: AccountRecord,
    /// Companions' names, by device id.
    pub names: Vec<(u32, String)>,
    /// Last-seen times, by device id.
    pub seen: Vec<(u32, u64)>,
    /// Whether it has a registration lock.
    pub locked: bool,
}

/// The key whose entry `entry` is, when that entry now says the key was removed:
/// every node closes that key's connections when it hears of it.
pub fn removed_in(entry: &async_nats::jetstream::kv::Entry) -> Option<(KeyId, Removal)> {
    let hex_id = entry.key.strip_prefix("k.")?;
    let key_id: KeyId = hex::decode(hex_id).ok()?.try_into().ok()?;
    match crate::store::records::decode::<KeyEntry>(&entry.value, BUCKET).ok()? {
        KeyEntry::Removed(r) => Some((key_id, r.why)),
        KeyEntry::Device(..) => None,
    }
}

impl JetStreamAccounts {
    /// Every registered number with its account id, in no order (an operator's
    /// listing: it reads every number entry).
    pub async fn numbers(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut numbers = Vec::new();
        for key in self.keys_starting("n.").await? {
            let (entry, _) = self.bucket.read::<NumberEntry>(&key).await?;
            let Some(id) = entry.and_then(|e| e.account_id) else {
                continue;
            };
            let number = hex::decode(&key[2..])
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| StoreError::Corrupt(format!("{BUCKET} key {key:?}")))?;
            numbers.push((number, id));
        }
        Ok(numbers)
    }

    /// The bucket's keys that start with `prefix`.
    async fn keys_starting(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        use futures_util::TryStreamExt;
        let mut keys = Vec::new();
        let mut listed = self.bucket.keys().await?;
        while let Some(key) = listed
            .try_next()
            .await
            .map_err(|e| bucket::engine(BUCKET, e))?
        {
            if key.starts_with(prefix) {
                keys.push(key);
            }
        }
        Ok(keys)
    }

    /// Account `id` with its devices' names and last-seen times.
    pub async fn view(&self, id: u64) -> Result<Option<AccountView>, StoreError> {
        let Some(entry) = self.account_entry(id).await? else {
            return Ok(None);
        };
        let (lock, _) = self.bucket.read::<LockRecord>(&lock_key(id)).await?;
        Ok(Some(AccountView {
            record: entry.record,
            names: entry.names,
            seen: entry.seen,
            locked: lock.is_some(),
        }))
    }

    /// The id of `number`'s account, if it has one.
    pub async fn id_of(&self, number: &str) -> Result<Option<u64>, StoreError> {
        let (entry, _) = self.bucket.read::<NumberEntry>(&number_key(number)).await?;
        Ok(entry.and_then(|e| e.account_id))
    }

    /// Deletes the account of `number` (the operator's `admin delete`): the number
    /// entry goes (with a pending code), the account keeps no device, each device
    /// key is marked removed as [`Removal::AccountDeleted`], and the registration
    /// lock goes. The account's id and the devices it had; `None` when the number
    /// has no account. What other concerns hold for the devices is the caller's to
    /// drop.
    ///
    /// The number entry is the point of decision, as for a registration. The
    /// account entry stays, emptied, at a generation above the deleted one: a
    /// registration of the number that won its code before the deletion then finds
    /// itself overtaken and writes nothing, instead of bringing the account back.
    pub async fn delete_account(
        &self,
        number: &str,
        now_ms: u64,
    ) -> Result<Option<(u64, Vec<DeviceRecord>)>, StoreError> {
        let decided = self
            .bucket
            .modify(&number_key(number), |slot: &mut Option<NumberEntry>| {
                let Some(id) = slot.as_ref().and_then(|e| e.account_id) else {
                    return (None, false);
                };
                let generation = slot.as_ref().map_or(0, |e| e.generation) + 1;
                *slot = None;
                (Some((id, generation)), true)
            })
            .await?;
        let Some((account_id, generation)) = decided else {
            return Ok(None);
        };
        let devices = self
            .bucket
            .modify(
                &account_key(account_id),
                |slot: &mut Option<AccountEntry>| {
                    let Some(entry) = slot.as_mut() else {
                        return (Vec::new(), false);
                    };
                    let devices = std::mem::take(&mut entry.record.devices);
                    entry.generation = entry.generation.max(generation);
                    entry.names.clear();
                    entry.seen.clear();
                    (devices, true)
                },
            )
            .await?;
        for d in &devices {
            let device = DeviceRef {
                account_id,
                device_id: d.device_id,
            };
            self.revoke(&d.key_id, device, Removal::AccountDeleted, now_ms)
                .await?;
        }
        self.bucket.purge(&lock_key(account_id)).await?;
        Ok(Some((account_id, devices)))
    }
}

impl JetStreamAccounts {
    /// The companions (never a primary) not seen since `cutoff_ms` (being linked
    /// counts as being seen), over every account: the devices that lapse.
    pub async fn lapsed_companions(&self, cutoff_ms: u64) -> Result<Vec<DeviceRef>, StoreError> {
        let ids: Vec<u64> = self
            .keys_starting("a.")
            .await?
            .iter()
            .filter_map(|key| key[2..].parse().ok())
            .collect();
        let mut lapsed = Vec::new();
        for account_id in ids {
            let Some(entry) = self.account_entry(account_id).await? else {
                continue;
            };
            for device in entry.record.devices.iter().skip(1) {
                let seen = entry
                    .seen
                    .iter()
                    .find(|(d, _)| *d == device.device_id)
                    .map_or(device.created_at_ms, |(_, at)| *at);
                if seen < cutoff_ms {
                    lapsed.push(DeviceRef {
                        account_id,
                        device_id: device.device_id,
                    });
                }
            }
        }
        Ok(lapsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::kv::{Entry, Operation};
    use proptest::prelude::*;

    fn entry(key: &str, value: Vec<u8>) -> Entry {
        Entry {
            bucket: BUCKET.into(),
            key: key.into(),
            value: value.into(),
            revision: 1,
            delta: 0,
            created: std::time::UNIX_EPOCH.into(),
            operation: Operation::Put,
            seen_current: true,
        }
    }

    fn encoded(e: &KeyEntry) -> Vec<u8> {
        crate::store::records::encode(e).expect("encode")
    }

    #[test]
    fn a_removed_key_is_read_from_its_entry_and_nothing_else_is() {
        let removed = KeyEntry::Removed(RemovedKeyRecord {
            why: Removal::AccountDeleted,
            at_ms: 5,
        });
        let key = key_key(&[7; 32]);
        assert_eq!(
            removed_in(&entry(&key, encoded(&removed))),
            Some(([7; 32], Removal::AccountDeleted))
        );
        // A key that points at a device, another kind of entry, a deletion (no
        // value), a key id of the wrong length or not hex: none.
        assert_eq!(
            removed_in(&entry(&key, encoded(&KeyEntry::Device(1, 2)))),
            None
        );
        assert_eq!(removed_in(&entry("a.1", encoded(&removed))), None);
        assert_eq!(removed_in(&entry(&key, Vec::new())), None);
        assert_eq!(removed_in(&entry("k.0707", encoded(&removed))), None);
        assert_eq!(removed_in(&entry("k.zz", encoded(&removed))), None);
    }

    proptest! {
        /// Whatever the bucket holds, reading it never panics.
        #[test]
        fn any_entry_is_read_without_panic(key in "k?\\.?[0-9a-f]{0,70}", value in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = removed_in(&entry(&key, value));
        }
    }
}
