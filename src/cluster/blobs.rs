//! Attachments on the cluster: records in the `sb_blobs` bucket, bytes in the
//! object store `sb_attachments`, both expiring with the message TTL.
//!
//! - `b.HEX(ID)`: the [`BlobRecord`] sled keeps (owner, size, bytes received, whole,
//!   downloads left, who downloaded it), changed by compare-and-set.
//! - `o.ACCOUNT`: the blobs an account stored, with their sizes and when (its quota
//!   counts those younger than the TTL).
//! - Object `HEX(ID).K`: the K-th [`SEGMENT`] bytes of the upload. A segment is
//!   stored once it is whole (or the upload's last), and only then counted as
//!   received, so an upload broken off resumes from the last stored segment
//!   through any node.

use async_nats::jetstream::object_store::{self, ObjectStore};
use bincode::{Decode, Encode};
use std::time::Duration;

use super::bucket::{Bucket, engine};
use super::{Cluster, ClusterError};
use crate::store::StoreError;
use crate::store::records::BlobRecord;

/// The records' bucket.
pub const BUCKET: &str = "sb_blobs";

/// The object store of attachment bytes.
pub const OBJECTS: &str = "sb_attachments";

/// Bytes per stored segment (the single node makes an upload durable as often).
pub const SEGMENT: u64 = 8 << 20;

/// The blobs an account stored: (id, size, stored at ms).
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
struct AccountBlobs {
    blobs: Vec<([u8; 16], u64, u64)>,
}

fn record_key(id: &[u8; 16]) -> String {
    format!("b.{}", hex::encode(id))
}

fn account_key(owner: u64) -> String {
    format!("o.{owner}")
}

fn segment_name(id: &[u8; 16], k: u64) -> String {
    format!("{}.{k}", hex::encode(id))
}

/// How many segments `size` bytes take.
pub fn segments(size: u64) -> u64 {
    size.div_ceil(SEGMENT)
}

/// Attachment records and bytes on a JetStream cluster.
#[derive(Clone)]
pub struct JetStreamBlobs {
    records: Bucket,
    objects: ObjectStore,
    ttl: Duration,
}

impl std::fmt::Debug for JetStreamBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamBlobs").finish_non_exhaustive()
    }
}

impl JetStreamBlobs {
    /// The bucket and object store on `cluster` (created with `replicas` replicas
    /// if they are not there), their entries dropped after `ttl`.
    pub async fn open(
        cluster: &Cluster,
        replicas: usize,
        ttl: Duration,
    ) -> Result<JetStreamBlobs, ClusterError> {
        let records = Bucket::open_expiring(
            cluster,
            BUCKET,
            "switchboard: attachment records (owner, size, downloads)",
            replicas,
            ttl,
        )
        .await?;
        let objects = super::bucket::object_store(
            cluster,
            OBJECTS,
            "switchboard: attachment bytes (ciphertext)",
            replicas,
            ttl,
        )
        .await?;
        Ok(JetStreamBlobs {
            records,
            objects,
            ttl,
        })
    }

    /// Blob `id`'s record.
    pub async fn record(&self, id: &[u8; 16]) -> Result<Option<BlobRecord>, StoreError> {
        Ok(self.records.read(&record_key(id)).await?.0)
    }

    /// Bytes of the blobs `owner` stored within the TTL: whole ones, and unfinished
    /// ones begun within `incomplete` (older ones are abandoned: the single node's
    /// sweep would have dropped them); and how many those are.
    pub async fn account_bytes(
        &self,
        owner: u64,
        now_ms: u64,
        incomplete: Duration,
    ) -> Result<(u64, usize), StoreError> {
        let since = now_ms.saturating_sub(self.ttl.as_millis() as u64);
        let abandoned = now_ms.saturating_sub(incomplete.as_millis() as u64);
        let (list, _) = self
            .records
            .read::<AccountBlobs>(&account_key(owner))
            .await?;
        let (mut bytes, mut count) = (0u64, 0usize);
        for (id, size, at) in list.map(|l| l.blobs).unwrap_or_default() {
            if at < since {
                continue;
            }
            if at < abandoned && !self.record(&id).await?.is_some_and(|r| r.complete) {
                continue;
            }
            bytes = bytes.saturating_add(size);
            count += 1;
        }
        Ok((bytes, count))
    }

    /// Records a new upload `id` of `owner`, `size` bytes for `downloads` devices.
    pub async fn create(
        &self,
        id: [u8; 16],
        owner: u64,
        size: u64,
        downloads: u32,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let since = now_ms.saturating_sub(self.ttl.as_millis() as u64);
        self.records
            .modify(&account_key(owner), |slot: &mut Option<AccountBlobs>| {
                let list = slot.get_or_insert_with(AccountBlobs::default);
                list.blobs.retain(|(_, _, at)| *at >= since);
                list.blobs.push((id, size, now_ms));
                ((), true)
            })
            .await?;
        let record = BlobRecord::new(owner, size, downloads, now_ms);
        self.records.put(&record_key(&id), &record).await
    }

    async fn update(
        &self,
        id: &[u8; 16],
        f: impl Fn(&mut BlobRecord) -> bool,
    ) -> Result<Option<BlobRecord>, StoreError> {
        self.records
            .modify(&record_key(id), |slot: &mut Option<BlobRecord>| {
                let Some(record) = slot.as_mut() else {
                    return (None, false);
                };
                let changed = f(record);
                (Some(record.clone()), changed)
            })
            .await
    }

    /// Stores segment `k` of upload `id` from `bytes` (then counted as received up
    /// to `received`; whole when that is the size).
    pub async fn put_segment(
        &self,
        id: &[u8; 16],
        k: u64,
        bytes: &mut (impl tokio::io::AsyncRead + Unpin),
        received: u64,
    ) -> Result<(), StoreError> {
        self.objects
            .put(segment_name(id, k).as_str(), bytes)
            .await
            .map_err(|e| engine(OBJECTS, e))?;
        let counted = self
            .update(id, |r| {
                r.received = received.max(r.received);
                r.complete = r.received >= r.size;
                true
            })
            .await?;
        if counted.is_none() {
            // Dropped meanwhile (abandoned past `incomplete_ttl`): what was just
            // stored belongs to nothing.
            let _ = self.objects.delete(segment_name(id, k)).await;
            return Err(StoreError::Engine(format!(
                "attachment {} was dropped while uploading (begun too long ago)",
                hex::encode(id)
            )));
        }
        Ok(())
    }

    /// Upload `id` (of no bytes: no segment) is whole.
    pub async fn complete(&self, id: &[u8; 16]) -> Result<(), StoreError> {
        self.update(id, |r| {
            r.received = r.size;
            r.complete = true;
            true
        })
        .await
        .map(drop)
    }

    /// Segment `k` of blob `id`, to read.
    pub async fn segment(&self, id: &[u8; 16], k: u64) -> Result<object_store::Object, StoreError> {
        self.objects
            .get(segment_name(id, k))
            .await
            .map_err(|e| engine(OBJECTS, e))
    }

    /// `device` downloaded blob `id` whole (counted once per device); true when it
    /// was the last device it was for.
    pub async fn count_download(
        &self,
        id: &[u8; 16],
        device: (u64, u32),
    ) -> Result<bool, StoreError> {
        self.records
            .modify(&record_key(id), |slot: &mut Option<BlobRecord>| {
                let Some(r) = slot.as_mut() else {
                    return (false, false);
                };
                if r.downloads_left == 0 || r.downloaded_by.contains(&device) {
                    return (false, false);
                }
                r.downloads_left -= 1;
                r.downloaded_by.push(device);
                (r.downloads_left == 0, true)
            })
            .await
    }

    /// Drops upload `id` if it is still unfinished and begun before `before_ms`:
    /// its record first, by compare-and-set (an upload that finished meanwhile
    /// stays; one still sending fails its next segment), then its segments.
    pub async fn remove_abandoned(&self, id: &[u8; 16], before_ms: u64) -> Result<(), StoreError> {
        let taken = self
            .records
            .modify(
                &record_key(id),
                |slot: &mut Option<BlobRecord>| match slot {
                    Some(r) if !r.complete && r.created_at_ms < before_ms => (slot.take(), true),
                    _ => (None, false),
                },
            )
            .await?;
        match taken {
            Some(record) => self.drop_stored(id, record).await,
            None => Ok(()),
        }
    }

    /// Drops blob `id`: its segments, then its record and its place in the owner's
    /// list.
    pub async fn remove(&self, id: &[u8; 16]) -> Result<(), StoreError> {
        let Some(record) = self.record(id).await? else {
            return Ok(());
        };
        self.drop_stored(id, record).await
    }

    /// Drops the segments of blob `id` (recorded as `record`), its record if still
    /// there, and its place in the owner's list.
    async fn drop_stored(&self, id: &[u8; 16], record: BlobRecord) -> Result<(), StoreError> {
        for k in 0..segments(record.size) {
            match self.objects.delete(segment_name(id, k)).await {
                Ok(()) => {}
                // Never stored (an upload broken off) or gone already.
                Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => {}
                Err(e) => return Err(engine(OBJECTS, e)),
            }
        }
        self.records.purge(&record_key(id)).await?;
        self.records
            .modify(
                &account_key(record.owner),
                |slot: &mut Option<AccountBlobs>| {
                    let Some(list) = slot.as_mut() else {
                        return ((), false);
                    };
                    list.blobs.retain(|(b, _, _)| b != id);
                    ((), true)
                },
            )
            .await
    }
}

impl JetStreamBlobs {
    /// The uploads begun before `before_ms` and never finished: abandoned (what the
    /// cluster drops by itself at the TTL, the sweep drops sooner).
    pub async fn abandoned(&self, before_ms: u64) -> Result<Vec<[u8; 16]>, StoreError> {
        use futures_util::TryStreamExt;
        let mut ids = Vec::new();
        let mut listed = self.records.keys().await?;
        while let Some(key) = listed.try_next().await.map_err(|e| engine(BUCKET, e))? {
            let Some(id) = key
                .strip_prefix("b.")
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
            else {
                continue;
            };
            ids.push(id);
        }
        let mut abandoned = Vec::new();
        for id in ids {
            if self
                .record(&id)
                .await?
                .is_some_and(|r| !r.complete && r.created_at_ms < before_ms)
            {
                abandoned.push(id);
            }
        }
        Ok(abandoned)
    }

    /// Stores blob `id` as the single node kept it (`switchboard admin
    /// export-to-cluster`), its bytes read from `file`: the record counts nothing
    /// received until every segment is stored, then it is the node's record. False
    /// when the cluster has it whole already (an export run again).
    pub async fn import(
        &self,
        id: [u8; 16],
        record: &BlobRecord,
        file: &std::path::Path,
    ) -> Result<bool, StoreError> {
        use tokio::io::AsyncReadExt;
        if self.record(&id).await?.is_some_and(|r| r.complete) {
            return Ok(false);
        }
        self.records
            .modify(
                &account_key(record.owner),
                |slot: &mut Option<AccountBlobs>| {
                    let list = slot.get_or_insert_with(AccountBlobs::default);
                    if list.blobs.iter().any(|(b, _, _)| *b == id) {
                        return ((), false);
                    }
                    list.blobs.push((id, record.size, record.created_at_ms));
                    ((), true)
                },
            )
            .await?;
        let mut unfinished = record.clone();
        unfinished.received = 0;
        unfinished.complete = false;
        self.records.put(&record_key(&id), &unfinished).await?;
        let mut f = tokio::fs::File::open(file).await?;
        let on_disk = f.metadata().await?.len();
        if on_disk != record.size {
            return Err(StoreError::Corrupt(format!(
                "attachment {} holds {on_disk} bytes, its record {}",
                hex::encode(id),
                record.size
            )));
        }
        for k in 0..segments(record.size) {
            let len = SEGMENT.min(record.size - k * SEGMENT);
            let mut part = (&mut f).take(len);
            self.objects
                .put(segment_name(&id, k).as_str(), &mut part)
                .await
                .map_err(|e| engine(OBJECTS, e))?;
        }
        self.records.put(&record_key(&id), record).await?;
        Ok(true)
    }
}
