//! Code-send counters, pending-code judgements and registration locks as a storage
//! concern: what the node needs to rate-limit verification codes and to guard an
//! account with a PIN, whatever engine keeps them. [`Store`] (sled, one node) and
//! `cluster::accounts::JetStreamAccounts` (JetStream key-value buckets, several
//! nodes) both implement [`LimitStore`], and `tests/it/cluster_accounts.rs` runs
//! one set of tests against each.
//!
//! The promises every implementation keeps:
//! - a code send is counted under all of its keys (number, address, country,
//!   global) or under none, and only when the judge allowed it seeing every send
//!   already counted under them: of any number of requests at once, through any
//!   nodes, no more pass than a limit allows;
//! - a guess judged against a pending code and a registration judging it at the
//!   same time never both count against the same try;
//! - a wrong-PIN try is taken before the PIN is judged, each concurrent guess its
//!   own, and none once the lock's tries are spent.

use std::future::Future;

use super::records::{CodeRecord, LockRecord};
use super::{Store, StoreError};

/// Counters of code sends, judgements of pending codes, registration locks.
pub trait LimitStore: Send + Sync {
    /// Counts one code send at `now_ms` under every key of `keys`, if `judge`
    /// allows it given the send times already counted under them (in the same
    /// order, each pruned to the last `keep_ms`). A refused request records nothing.
    fn record_code_send<E: Send + 'static>(
        &self,
        keys: Vec<String>,
        now_ms: u64,
        keep_ms: u64,
        judge: impl Fn(&[Vec<u64>]) -> Result<(), E> + Send + Sync + 'static,
    ) -> impl Future<Output = Result<Result<(), E>, StoreError>> + Send;

    /// Takes back a send counted at `at_ms` under `keys` (the code could not be
    /// delivered after all).
    fn forget_code_send(
        &self,
        keys: Vec<String>,
        at_ms: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Drops counters with no send in the last `keep_ms`; how many went. (An engine
    /// whose entries expire by themselves drops none here.)
    fn sweep_code_sends(
        &self,
        now_ms: u64,
        keep_ms: u64,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Judges the code pending for `number` without registering anything: `judge`
    /// says what the record becomes (`None` deletes it) and what to answer; it may
    /// be asked more than once, each time about the code as it is then. `None` when
    /// no code is pending.
    fn judge_code<E: Send + 'static>(
        &self,
        number: String,
        judge: impl Fn(&CodeRecord) -> (Option<CodeRecord>, E) + Send + Sync + 'static,
    ) -> impl Future<Output = Result<Option<E>, StoreError>> + Send;

    /// The account of `number` with its registration lock, if it has both, and when
    /// the account was last seen (ms; 0 when never recorded).
    fn registration_lock(
        &self,
        number: String,
    ) -> impl Future<Output = Result<Option<(u64, LockRecord, u64)>, StoreError>> + Send;

    /// Takes one wrong-PIN try of `account`'s lock: `Some((tries left after this
    /// one, the lock as now stored))` when one was left, `None` when none is (or
    /// there is no lock).
    fn take_pin_try(
        &self,
        account: u64,
        max: u32,
    ) -> impl Future<Output = Result<Option<(u32, LockRecord)>, StoreError>> + Send;

    /// Sets (`Some`) or clears (`None`) the registration lock of `account`.
    fn set_registration_lock(
        &self,
        account: u64,
        lock: Option<LockRecord>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

impl LimitStore for Store {
    async fn record_code_send<E: Send + 'static>(
        &self,
        keys: Vec<String>,
        now_ms: u64,
        keep_ms: u64,
        judge: impl Fn(&[Vec<u64>]) -> Result<(), E> + Send + Sync + 'static,
    ) -> Result<Result<(), E>, StoreError> {
        super::blocking(self, move |s| {
            s.record_code_send(&keys, now_ms, keep_ms, judge)
        })
        .await
    }

    async fn forget_code_send(&self, keys: Vec<String>, at_ms: u64) -> Result<(), StoreError> {
        super::blocking(self, move |s| s.forget_code_send(&keys, at_ms)).await
    }

    async fn sweep_code_sends(&self, now_ms: u64, keep_ms: u64) -> Result<usize, StoreError> {
        super::blocking(self, move |s| s.sweep_code_sends(now_ms, keep_ms)).await
    }

    async fn judge_code<E: Send + 'static>(
        &self,
        number: String,
        judge: impl Fn(&CodeRecord) -> (Option<CodeRecord>, E) + Send + Sync + 'static,
    ) -> Result<Option<E>, StoreError> {
        super::blocking(self, move |s| s.judge_code(&number, judge)).await
    }

    async fn registration_lock(
        &self,
        number: String,
    ) -> Result<Option<(u64, LockRecord, u64)>, StoreError> {
        super::blocking(self, move |s| s.registration_lock(&number)).await
    }

    async fn take_pin_try(
        &self,
        account: u64,
        max: u32,
    ) -> Result<Option<(u32, LockRecord)>, StoreError> {
        super::blocking(self, move |s| s.take_pin_try(account, max)).await
    }

    async fn set_registration_lock(
        &self,
        account: u64,
        lock: Option<LockRecord>,
    ) -> Result<(), StoreError> {
        super::blocking(self, move |s| {
            s.set_registration_lock(account, lock.as_ref())
        })
        .await
    }
}
