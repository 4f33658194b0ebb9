//! The key directory as a storage concern: what the node needs of it, whatever
//! engine keeps it. [`Store`] (sled, one node) and `cluster::JetStreamKeys` (a NATS
//! JetStream key-value bucket, several nodes) both implement [`KeyDirectory`], and
//! `tests/it/cluster.rs` runs one set of tests against each.
//!
//! The promise every implementation keeps: a one-time key is handed to at most one
//! fetcher, whichever node (or connection) asks; a changed identity drops the old
//! one-time keys; an upload that would leave more than the maximum changes nothing.

use std::future::Future;

use super::prekeys::{Claimed, IdentityPair, KeysRefusal};
use super::records::{DeviceKeysRecord, StoredKey};
use super::{DeviceRef, Store, StoreError};

/// A device's keys as published: identity, fallback, new one-time keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub identity: IdentityPair,
    pub fallback: Option<StoredKey>,
    pub one_time_keys: Vec<StoredKey>,
}

/// Each device's identity, fallback and one-time keys, and the account signature
/// over a linked device's keys.
pub trait KeyDirectory: Send + Sync {
    /// Stores `upload` for `device`; the one-time keys stored afterwards, or why not.
    fn publish_keys(
        &self,
        device: DeviceRef,
        upload: Upload,
        max_one_time_keys: u32,
        now_ms: u64,
    ) -> impl Future<Output = Result<Result<u32, KeysRefusal>, StoreError>> + Send;

    /// One-time keys stored for `device`, counting no further than `limit`.
    fn count_one_time_keys(
        &self,
        device: DeviceRef,
        limit: u32,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;

    /// The keys of each of `devices` of `account_id` that has any; with `claim`, each
    /// one's oldest one-time key is taken (never by two fetchers).
    fn fetch_bundles(
        &self,
        account_id: u64,
        devices: Vec<u32>,
        claim: bool,
    ) -> impl Future<Output = Result<Vec<Claimed>, StoreError>> + Send;

    /// Keeps (or, with `None`, forgets) the account signature over `device`'s keys.
    fn set_account_signature(
        &self,
        device: DeviceRef,
        signature: Option<[u8; 64]>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The identity keys `device` published, if any.
    fn identity_keys(
        &self,
        device: DeviceRef,
    ) -> impl Future<Output = Result<Option<IdentityPair>, StoreError>> + Send;
}

/// What an accepted upload makes of a device's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub record: DeviceKeysRecord,
    /// The identity is unchanged: the stored one-time keys stay (otherwise they go).
    pub keep_stored: bool,
    /// One-time keys stored afterwards.
    pub total: u32,
}

/// The rules of an upload, whatever keeps the keys: `current` is what is stored,
/// `stored` counts its one-time keys (asked only when the identity is unchanged).
/// A changed identity drops the old one-time keys; the fallback stays when the
/// upload has none and the identity is the same; more than `max` one-time keys is
/// refused.
pub fn apply_upload(
    current: Option<&DeviceKeysRecord>,
    (curve25519, ed25519): IdentityPair,
    fallback: Option<StoredKey>,
    new_keys: usize,
    stored: impl FnOnce() -> Result<u32, StoreError>,
    max: u32,
    now_ms: u64,
) -> Result<Result<Applied, KeysRefusal>, StoreError> {
    let keep_stored = current.is_some_and(|c| c.curve25519 == curve25519 && c.ed25519 == ed25519);
    let stored = if keep_stored { stored()? } else { 0 };
    let total = stored.saturating_add(u32::try_from(new_keys).unwrap_or(u32::MAX));
    if total > max {
        return Ok(Err(KeysRefusal::TooMany { stored, max }));
    }
    let fallback = fallback.or(if keep_stored {
        current.and_then(|c| c.fallback)
    } else {
        None
    });
    Ok(Ok(Applied {
        record: DeviceKeysRecord {
            curve25519,
            ed25519,
            fallback,
            updated_at_ms: now_ms,
        },
        keep_stored,
        total,
    }))
}

impl Store {
    /// [`Store::publish_keys`] of an [`Upload`].
    pub fn publish_upload(
        &self,
        device: DeviceRef,
        upload: Upload,
        max_one_time_keys: u32,
        now_ms: u64,
    ) -> Result<Result<u32, KeysRefusal>, StoreError> {
        self.publish_keys(
            device,
            upload.identity,
            upload.fallback,
            &upload.one_time_keys,
            max_one_time_keys,
            now_ms,
        )
    }
}

impl KeyDirectory for Store {
    async fn publish_keys(
        &self,
        device: DeviceRef,
        upload: Upload,
        max_one_time_keys: u32,
        now_ms: u64,
    ) -> Result<Result<u32, KeysRefusal>, StoreError> {
        super::blocking(self, move |s| {
            s.publish_upload(device, upload, max_one_time_keys, now_ms)
        })
        .await
    }

    async fn count_one_time_keys(&self, device: DeviceRef, limit: u32) -> Result<u32, StoreError> {
        super::blocking(self, move |s| s.count_one_time_keys(device, limit)).await
    }

    async fn fetch_bundles(
        &self,
        account_id: u64,
        devices: Vec<u32>,
        claim: bool,
    ) -> Result<Vec<Claimed>, StoreError> {
        super::blocking(self, move |s| s.fetch_bundles(account_id, &devices, claim)).await
    }

    async fn set_account_signature(
        &self,
        device: DeviceRef,
        signature: Option<[u8; 64]>,
    ) -> Result<(), StoreError> {
        super::blocking(self, move |s| s.set_account_signature(device, signature)).await
    }

    async fn identity_keys(&self, device: DeviceRef) -> Result<Option<IdentityPair>, StoreError> {
        super::blocking(self, move |s| s.identity_keys(device)).await
    }
}
