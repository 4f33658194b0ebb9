//! Attachment blobs: the records of the files under `data_dir/blobs` (the bytes are
//! files, written by `node::blobs`; sled holds only who owns each, its size, how much
//! of it is durable and how many downloads it waits for).

use super::records::{self, BlobRecord};
use super::{Store, StoreError, layout};

fn account_blob_key(owner: u64, id: &[u8; 16]) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&layout::account(owner));
    key[8..].copy_from_slice(id);
    key
}

impl Store {
    /// Records a new upload `id` of `owner`, of `size` bytes, for `downloads` devices.
    pub fn new_blob(
        &self,
        id: [u8; 16],
        owner: u64,
        size: u64,
        downloads: u32,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let _gate = self.writing();
        let record = BlobRecord::new(owner, size, downloads, now_ms);
        self.trees
            .account_blob
            .insert(account_blob_key(owner, &id), &size.to_be_bytes())?;
        self.trees.blob.insert(id, records::encode(&record)?)?;
        Ok(())
    }

    /// Blob `id`'s record.
    pub fn blob(&self, id: &[u8; 16]) -> Result<Option<BlobRecord>, StoreError> {
        self.trees
            .blob
            .get(id)?
            .map(|v| records::decode(&v, "blob"))
            .transpose()
    }

    fn update_blob(
        &self,
        id: &[u8; 16],
        f: impl Fn(&mut BlobRecord),
    ) -> Result<Option<BlobRecord>, StoreError> {
        let _gate = self.writing();
        loop {
            let Some(old) = self.trees.blob.get(id)? else {
                return Ok(None);
            };
            let mut record: BlobRecord = records::decode(&old, "blob")?;
            f(&mut record);
            let new = records::encode(&record)?;
            if self
                .trees
                .blob
                .compare_and_swap(id, Some(&old), Some(new))?
                .is_ok()
            {
                return Ok(Some(record));
            }
        }
    }

    /// The first `received` bytes of upload `id` are durable in its file.
    pub fn blob_received(&self, id: &[u8; 16], received: u64) -> Result<(), StoreError> {
        self.update_blob(id, |r| r.received = received)?;
        Ok(())
    }

    /// Upload `id` is whole and its file in place.
    pub fn complete_blob(&self, id: &[u8; 16]) -> Result<(), StoreError> {
        self.update_blob(id, |r| {
            r.received = r.size;
            r.complete = true;
        })?;
        Ok(())
    }

    /// `device` (account, device) downloaded blob `id` whole (counted once per
    /// device); true when it was the last device it was for.
    pub fn count_download(&self, id: &[u8; 16], device: (u64, u32)) -> Result<bool, StoreError> {
        let Some(before) = self.blob(id)? else {
            return Ok(false);
        };
        if before.downloads_left == 0 || before.downloaded_by.contains(&device) {
            return Ok(false);
        }
        let after = self.update_blob(id, |r| {
            if r.downloads_left > 0 && !r.downloaded_by.contains(&device) {
                r.downloads_left -= 1;
                r.downloaded_by.push(device);
            }
        })?;
        Ok(after.is_some_and(|r| r.downloads_left == 0))
    }

    /// Bytes of the blobs `owner` has stored (whole or not).
    pub fn account_blob_bytes(&self, owner: u64) -> Result<u64, StoreError> {
        let mut total = 0u64;
        for entry in self.trees.account_blob.scan_prefix(layout::account(owner)) {
            let (_, size) = entry?;
            let size = size
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("an account_blob value is not 8 bytes".into()))?;
            total = total.saturating_add(size);
        }
        Ok(total)
    }

    /// Forgets blob `id` (its file goes first).
    pub fn remove_blob(&self, id: &[u8; 16]) -> Result<(), StoreError> {
        let _gate = self.writing();
        if let Some(r) = self.blob(id)? {
            self.trees
                .account_blob
                .remove(account_blob_key(r.owner, id))?;
        }
        self.trees.blob.remove(id)?;
        Ok(())
    }

    /// The blobs to drop: whole ones stored before `cutoff_ms`, unfinished ones
    /// begun before `incomplete_cutoff_ms`.
    pub fn expired_blobs(
        &self,
        cutoff_ms: u64,
        incomplete_cutoff_ms: u64,
    ) -> Result<Vec<[u8; 16]>, StoreError> {
        let mut out = Vec::new();
        for entry in self.trees.blob.iter() {
            let (key, value) = entry?;
            let r: BlobRecord = records::decode(&value, "blob")?;
            let due = if r.complete {
                r.created_at_ms < cutoff_ms
            } else {
                r.created_at_ms < incomplete_cutoff_ms
            };
            if due && let Ok(id) = <[u8; 16]>::try_from(key.as_ref()) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Every blob id recorded (to find files no record names).
    pub fn blob_ids(&self) -> Result<Vec<[u8; 16]>, StoreError> {
        let mut out = Vec::new();
        for key in self.trees.blob.iter().keys() {
            if let Ok(id) = <[u8; 16]>::try_from(key?.as_ref()) {
                out.push(id);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_is_recorded_counted_downloaded_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        store.new_blob(a, 7, 1000, 2, 10).unwrap();
        store.new_blob(b, 7, 500, 0, 20).unwrap();
        store.new_blob([3; 16], 8, 1, 0, 20).unwrap();
        assert_eq!(store.account_blob_bytes(7).unwrap(), 1500);
        store.blob_received(&a, 400).unwrap();
        assert_eq!(store.blob(&a).unwrap().unwrap().received, 400);
        store.complete_blob(&a).unwrap();
        let r = store.blob(&a).unwrap().unwrap();
        assert!(r.complete && r.received == 1000);
        assert!(!store.count_download(&a, (9, 1)).unwrap());
        // The same device again counts nothing; another is the last.
        assert!(!store.count_download(&a, (9, 1)).unwrap());
        assert!(store.count_download(&a, (9, 2)).unwrap());
        // A blob for an unknown number of devices is never "done".
        assert!(!store.count_download(&b, (9, 1)).unwrap());
        // b is unfinished: it goes by the incomplete cutoff, a by the TTL.
        assert_eq!(store.expired_blobs(0, 21).unwrap().len(), 2);
        assert_eq!(store.expired_blobs(11, 0).unwrap(), vec![a]);
        store.remove_blob(&a).unwrap();
        assert_eq!(store.account_blob_bytes(7).unwrap(), 500);
        assert_eq!(store.blob(&a).unwrap(), None);
    }
}
