//! Profiles: each account's end-to-end encrypted profile (name, about line, photo)
//! and presence ("last seen"), opaque to the node. The node keeps them with the
//! version the client derived from its profile key, and hands them only to a device
//! that names that version: to those the account gave its profile key.

use std::future::Future;

use super::records::{self, ProfileRecord};
use super::{Store, StoreError, layout};

/// Profiles as a storage concern (sled here, `cluster::profiles` on JetStream).
pub trait ProfileStore: Send + Sync {
    /// Stores `account_id`'s profile, replacing any profile and presence before.
    fn set_profile(
        &self,
        account_id: u64,
        version: [u8; 32],
        blob: Vec<u8>,
        now_ms: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// `account_id`'s profile, if it has one.
    fn profile(
        &self,
        account_id: u64,
    ) -> impl Future<Output = Result<Option<ProfileRecord>, StoreError>> + Send;

    /// Replaces `account_id`'s presence; false (nothing stored) without a profile.
    fn set_presence(
        &self,
        account_id: u64,
        presence: Vec<u8>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Forgets `account_id`'s profile (its account is deleted).
    fn forget_profile(
        &self,
        account_id: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

impl ProfileStore for Store {
    async fn set_profile(
        &self,
        account_id: u64,
        version: [u8; 32],
        blob: Vec<u8>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        super::blocking(self, move |s| {
            Store::set_profile(s, account_id, version, blob, now_ms)
        })
        .await
    }

    async fn profile(&self, account_id: u64) -> Result<Option<ProfileRecord>, StoreError> {
        super::blocking(self, move |s| Store::profile(s, account_id)).await
    }

    async fn set_presence(&self, account_id: u64, presence: Vec<u8>) -> Result<bool, StoreError> {
        super::blocking(self, move |s| Store::set_presence(s, account_id, presence)).await
    }

    async fn forget_profile(&self, account_id: u64) -> Result<(), StoreError> {
        super::blocking(self, move |s| Store::forget_profile(s, account_id)).await
    }
}

impl Store {
    /// Stores `account_id`'s profile (replacing any profile and presence before).
    pub fn set_profile(
        &self,
        account_id: u64,
        version: [u8; 32],
        blob: Vec<u8>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let _gate = self.writing();
        let record = ProfileRecord {
            version,
            blob,
            presence: Vec::new(),
            updated_at_ms: now_ms,
        };
        self.trees
            .profile
            .insert(layout::account(account_id), records::encode(&record)?)?;
        Ok(())
    }

    /// `account_id`'s profile, if it has one.
    pub fn profile(&self, account_id: u64) -> Result<Option<ProfileRecord>, StoreError> {
        self.trees
            .profile
            .get(layout::account(account_id))?
            .map(|v| records::decode(&v, "profile"))
            .transpose()
    }

    /// Replaces `account_id`'s presence; false (and nothing stored) when it has no
    /// profile.
    pub fn set_presence(&self, account_id: u64, presence: Vec<u8>) -> Result<bool, StoreError> {
        let _gate = self.writing();
        let key = layout::account(account_id);
        loop {
            let Some(old) = self.trees.profile.get(key)? else {
                return Ok(false);
            };
            let mut record: ProfileRecord = records::decode(&old, "profile")?;
            record.presence.clone_from(&presence);
            let new = records::encode(&record)?;
            if self
                .trees
                .profile
                .compare_and_swap(key, Some(&old), Some(new))?
                .is_ok()
            {
                return Ok(true);
            }
        }
    }

    /// Forgets `account_id`'s profile (its account is deleted).
    pub(super) fn forget_profile(&self, account_id: u64) -> Result<(), StoreError> {
        self.trees.profile.remove(layout::account(account_id))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_is_stored_replaced_and_its_presence_needs_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(!store.set_presence(7, vec![1]).unwrap());
        assert_eq!(store.profile(7).unwrap(), None);
        store.set_profile(7, [1; 32], vec![9; 10], 5).unwrap();
        assert!(store.set_presence(7, vec![4, 4]).unwrap());
        let p = store.profile(7).unwrap().unwrap();
        assert_eq!(
            (p.version, p.blob.len(), p.presence),
            ([1; 32], 10, vec![4, 4])
        );
        // A new profile (a new key, say) replaces the presence too.
        store.set_profile(7, [2; 32], vec![8], 6).unwrap();
        let p = store.profile(7).unwrap().unwrap();
        assert_eq!((p.version, p.presence.len()), ([2; 32], 0));
        store.forget_profile(7).unwrap();
        assert_eq!(store.profile(7).unwrap(), None);
    }
}
