//! Profiles in a JetStream key-value bucket (`sb_profiles`): one entry per account,
//! `p.ACCOUNT`, the same [`ProfileRecord`] sled keeps. A new profile is a plain
//! put (it replaces everything); presence is a compare-and-set on the entry, so it
//! never lands on a profile that was replaced meanwhile.

use super::bucket::Bucket;
use super::{Cluster, ClusterError};
use crate::store::records::ProfileRecord;
use crate::store::{ProfileStore, StoreError};

/// The bucket's name.
pub const BUCKET: &str = "sb_profiles";

/// [`ProfileStore`] on a JetStream cluster.
#[derive(Debug, Clone)]
pub struct JetStreamProfiles {
    bucket: Bucket,
}

fn entry_key(account_id: u64) -> String {
    format!("p.{account_id}")
}

impl JetStreamProfiles {
    /// The bucket on `cluster`, created with `replicas` replicas if it is not there.
    pub async fn open(
        cluster: &Cluster,
        replicas: usize,
    ) -> Result<JetStreamProfiles, ClusterError> {
        let bucket = Bucket::open(
            cluster,
            BUCKET,
            "switchboard: accounts' encrypted profiles and presence",
            replicas,
        )
        .await?;
        Ok(JetStreamProfiles { bucket })
    }
}

impl ProfileStore for JetStreamProfiles {
    async fn set_profile(
        &self,
        account_id: u64,
        version: [u8; 32],
        blob: Vec<u8>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let record = ProfileRecord {
            version,
            blob,
            presence: Vec::new(),
            updated_at_ms: now_ms,
        };
        self.bucket.put(&entry_key(account_id), &record).await
    }

    async fn profile(&self, account_id: u64) -> Result<Option<ProfileRecord>, StoreError> {
        Ok(self.bucket.read(&entry_key(account_id)).await?.0)
    }

    async fn set_presence(&self, account_id: u64, presence: Vec<u8>) -> Result<bool, StoreError> {
        self.bucket
            .modify(
                &entry_key(account_id),
                |slot: &mut Option<ProfileRecord>| match slot {
                    Some(record) => {
                        record.presence.clone_from(&presence);
                        (true, true)
                    }
                    None => (false, false),
                },
            )
            .await
    }

    async fn forget_profile(&self, account_id: u64) -> Result<(), StoreError> {
        self.bucket.purge(&entry_key(account_id)).await
    }
}

impl JetStreamProfiles {
    /// Writes `account_id`'s profile as the single node kept it (`switchboard admin
    /// export-to-cluster`).
    pub async fn import(&self, account_id: u64, record: &ProfileRecord) -> Result<(), StoreError> {
        self.bucket.put(&entry_key(account_id), record).await
    }
}
