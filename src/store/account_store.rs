//! Accounts, devices and registrations as a storage concern: what the node needs of
//! them, whatever engine keeps them. [`Store`] (sled, one node) and
//! `cluster::accounts::JetStreamAccounts` (a JetStream key-value bucket, several
//! nodes) both implement [`AccountStore`], and `tests/it/cluster_accounts.rs` runs
//! one set of tests against each.
//!
//! The promises every implementation keeps:
//! - a pending code is consumed once: of any number of verifications of one code at
//!   once, through any nodes, exactly one registers and the others find no code;
//! - registering a number that has an account keeps the account and signs out all
//!   its devices (their keys revoked, reported so their connections can be closed);
//!   a key that belonged to a device of another account leaves that account first;
//! - a key belongs to at most one device, and a device found by its key is one its
//!   account lists;
//! - linking refuses a key in use and an account with its maximum of devices;
//!   the primary is never unlinked.
//!
//! On sled a change is durable at the node's next group commit (the caller waits
//! for it before answering); on JetStream, once the cluster acknowledged it.

use std::future::Future;

use super::devices::{DeviceView, Linked, Unlinked};
use super::layout::KeyId;
use super::records::{AccountRecord, CodeRecord, Removal, RemovedKeyRecord};
use super::{DeviceIdentity, DeviceRef, Judgement, NewDevice, Store, StoreError, VerifyOutcome};

/// Accounts with their devices, pending verification codes, and device keys.
pub trait AccountStore: Send + Sync {
    /// Replaces the pending code of `number` with the one `decide` makes from the
    /// current one, or leaves it as it is when `decide` refuses.
    fn replace_code<E: Send + 'static>(
        &self,
        number: String,
        decide: impl Fn(Option<&CodeRecord>) -> Result<CodeRecord, E> + Send + Sync + 'static,
    ) -> impl Future<Output = Result<Result<CodeRecord, E>, StoreError>> + Send;

    /// Deletes the pending code of `number`, if any.
    fn remove_code(&self, number: String) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Judges a guess at the pending code of `number` (`judge` may be asked more
    /// than once, each time about the code as it is then) and, when it is accepted,
    /// consumes the code and makes `device` the number's primary (see the module
    /// doc). `indexed` in the outcome is the number's discovery PRF.
    fn verify_and_register<E: Clone + Send + 'static>(
        &self,
        number: String,
        device: NewDevice,
        now_ms: u64,
        judge: impl Fn(&CodeRecord) -> Judgement<E> + Send + Sync + 'static,
    ) -> impl Future<Output = Result<VerifyOutcome<E>, StoreError>> + Send;

    /// The account `id`.
    fn account(
        &self,
        id: u64,
    ) -> impl Future<Output = Result<Option<AccountRecord>, StoreError>> + Send;

    /// The account of `number`.
    fn account_by_number(
        &self,
        number: String,
    ) -> impl Future<Output = Result<Option<(u64, AccountRecord)>, StoreError>> + Send;

    /// The device whose key is `key_id`, with its account's number.
    fn device_by_key(
        &self,
        key_id: KeyId,
    ) -> impl Future<Output = Result<Option<DeviceIdentity>, StoreError>> + Send;

    /// The number and devices of `account`, primary first; `None` when there is no
    /// such account.
    fn devices(
        &self,
        account: u64,
    ) -> impl Future<Output = Result<Option<(String, Vec<DeviceView>)>, StoreError>> + Send;

    /// Records that `device` was seen at `now_ms` (the caller writes it at most
    /// hourly).
    fn mark_device_seen(
        &self,
        device: DeviceRef,
        now_ms: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Links `new` to `account` as a companion named `name`, unless the account has
    /// `max_devices` already or the key is in use.
    fn link_device(
        &self,
        account: u64,
        new: NewDevice,
        name: String,
        max_devices: u32,
        now_ms: u64,
    ) -> impl Future<Output = Result<Linked, StoreError>> + Send;

    /// Unlinks the companion `device` (`why`: unlinked, or lapsed): it leaves the
    /// account and its key is revoked. What other concerns hold for it (its queue,
    /// its published keys) is the caller's to drop; sled drops them in this call.
    fn unlink_device(
        &self,
        device: DeviceRef,
        why: Removal,
        now_ms: u64,
    ) -> impl Future<Output = Result<Unlinked, StoreError>> + Send;

    /// Why the device of `key_id` was removed, if that is remembered.
    fn removed_key(
        &self,
        key_id: KeyId,
    ) -> impl Future<Output = Result<Option<RemovedKeyRecord>, StoreError>> + Send;
}

impl AccountStore for Store {
    async fn replace_code<E: Send + 'static>(
        &self,
        number: String,
        decide: impl Fn(Option<&CodeRecord>) -> Result<CodeRecord, E> + Send + Sync + 'static,
    ) -> Result<Result<CodeRecord, E>, StoreError> {
        super::blocking(self, move |s| s.replace_code(&number, decide)).await
    }

    async fn remove_code(&self, number: String) -> Result<(), StoreError> {
        super::blocking(self, move |s| s.remove_code(&number)).await
    }

    async fn verify_and_register<E: Clone + Send + 'static>(
        &self,
        number: String,
        device: NewDevice,
        now_ms: u64,
        judge: impl Fn(&CodeRecord) -> Judgement<E> + Send + Sync + 'static,
    ) -> Result<VerifyOutcome<E>, StoreError> {
        super::blocking(self, move |s| {
            s.verify_and_register(&number, &device, now_ms, judge)
        })
        .await
    }

    async fn account(&self, id: u64) -> Result<Option<AccountRecord>, StoreError> {
        super::blocking(self, move |s| s.account(id)).await
    }

    async fn account_by_number(
        &self,
        number: String,
    ) -> Result<Option<(u64, AccountRecord)>, StoreError> {
        super::blocking(self, move |s| s.account_by_number(&number)).await
    }

    async fn device_by_key(&self, key_id: KeyId) -> Result<Option<DeviceIdentity>, StoreError> {
        super::blocking(self, move |s| s.device_by_key(&key_id)).await
    }

    async fn devices(&self, account: u64) -> Result<Option<(String, Vec<DeviceView>)>, StoreError> {
        super::blocking(self, move |s| s.devices(account)).await
    }

    async fn mark_device_seen(&self, device: DeviceRef, now_ms: u64) -> Result<(), StoreError> {
        super::blocking(self, move |s| s.mark_device_seen(device, now_ms)).await
    }

    async fn link_device(
        &self,
        account: u64,
        new: NewDevice,
        name: String,
        max_devices: u32,
        now_ms: u64,
    ) -> Result<Linked, StoreError> {
        super::blocking(self, move |s| {
            s.link_device(account, &new, &name, max_devices, now_ms)
        })
        .await
    }

    async fn unlink_device(
        &self,
        device: DeviceRef,
        why: Removal,
        now_ms: u64,
    ) -> Result<Unlinked, StoreError> {
        super::blocking(self, move |s| s.unlink_device(device, why, now_ms)).await
    }

    async fn removed_key(&self, key_id: KeyId) -> Result<Option<RemovedKeyRecord>, StoreError> {
        super::blocking(self, move |s| s.removed_key(&key_id)).await
    }
}
