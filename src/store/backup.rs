//! Backups: the whole database, as it was at one instant, in one self-checking file.
//!
//! [`Store::write_backup`] holds the store's write gate exclusively while it reads the
//! trees, so no write lands midway (sled has no snapshots; writers wait meanwhile, and
//! reads go on). [`restore`] rebuilds a data dir from the file, checking everything
//! before anything becomes visible.
//!
//! # Format (all integers big-endian)
//!
//! ```text
//! header:  "SWBACKUP" (8 bytes)  format version u32 (= 1)  schema version u32
//!          next id u64 (larger than every id the database ever drew)
//! records: tag u8, then by tag:
//!   1 tree   name length u16, name (UTF-8)         — the entries that follow are its
//!   2 entry  key length u32, key, value length u32, value
//!   3 file   path length u16, path (UTF-8: `tls/cert.pem` or `tls/key.pem`, relative
//!            to the data dir), length u32, bytes
//!   0 end    entries u64 (entry records in the file), SHA-256 (32 bytes) of every
//!            byte before the digest, from the header's first byte to the entry count
//! ```
//!
//! Nothing may follow the end record. Lengths are bounded (see the constants) so a
//! damaged file cannot ask for huge allocations.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{SCHEMA_VERSION, Store, StoreError};

const MAGIC: &[u8; 8] = b"SWBACKUP";
const FORMAT_VERSION: u32 = 1;
const MAX_NAME: usize = 255;
const MAX_KEY: usize = 64 * 1024;
const MAX_VALUE: usize = 64 * 1024 * 1024;
const MAX_FILE: usize = 1024 * 1024;

/// The only files a backup may carry, relative to the data dir: the self-signed
/// certificate and its key. A file record for anything else is refused, so a crafted
/// backup cannot write elsewhere (not even over the restored database).
pub const FILES: [&str; 2] = ["tls/cert.pem", "tls/key.pem"];

const TAG_END: u8 = 0;
const TAG_TREE: u8 = 1;
const TAG_ENTRY: u8 = 2;
const TAG_FILE: u8 = 3;

/// What a backup holds, or what a restore wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupSummary {
    pub trees: u32,
    pub entries: u64,
    pub files: u32,
    /// Bytes of the backup file.
    pub bytes: u64,
    pub schema_version: u32,
}

/// Why a backup or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("backup I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a switchboard backup, or a damaged one: {0}")]
    Invalid(String),
    #[error(
        "the backup is of schema {found}, newer than this build's {SCHEMA_VERSION}; restore it with a newer switchboard"
    )]
    TooNew { found: u32 },
    #[error("{0} is not empty: restore only into a new or empty data dir")]
    NotEmpty(PathBuf),
}

impl From<sled::Error> for BackupError {
    fn from(e: sled::Error) -> Self {
        BackupError::Store(StoreError::Sled(e))
    }
}

fn invalid(what: impl Into<String>) -> BackupError {
    BackupError::Invalid(what.into())
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Hashing<W> {
    fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.hash.update(data);
        self.bytes += data.len() as u64;
        self.inner.write_all(data)
    }

    fn put_len16(&mut self, data: &[u8]) -> Result<(), BackupError> {
        let len = u16::try_from(data.len()).map_err(|_| invalid("name too long"))?;
        self.put(&len.to_be_bytes())?;
        Ok(self.put(data)?)
    }

    fn put_len32(&mut self, data: &[u8]) -> Result<(), BackupError> {
        let len = u32::try_from(data.len()).map_err(|_| invalid("value too long"))?;
        self.put(&len.to_be_bytes())?;
        Ok(self.put(data)?)
    }
}

impl Store {
    /// Entries in all trees now, for a progress bar (counted without the gate, so
    /// the backup may hold a few more or less).
    pub fn entry_estimate(&self) -> u64 {
        self.db
            .tree_names()
            .iter()
            .filter_map(|name| self.db.open_tree(name).ok())
            .map(|tree| tree.len() as u64)
            .sum()
    }

    /// Writes a backup of every tree and of `files` (paths relative to the data dir,
    /// with their contents) to `out`. Writes wait until it is done. `progress` is
    /// called with the entries written so far, every few thousand entries.
    pub fn write_backup(
        &self,
        out: impl Write,
        files: &[(String, Vec<u8>)],
        mut progress: impl FnMut(u64),
    ) -> Result<BackupSummary, BackupError> {
        let _exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
        // Items held in memory for the hand-off belong in the backup too.
        self.write_staged_ungated(None)?;
        let mut w = Hashing {
            inner: std::io::BufWriter::with_capacity(256 * 1024, out),
            hash: Sha256::new(),
            bytes: 0,
        };
        let mut summary = BackupSummary {
            schema_version: SCHEMA_VERSION,
            ..BackupSummary::default()
        };
        w.put(MAGIC)?;
        w.put(&FORMAT_VERSION.to_be_bytes())?;
        w.put(&SCHEMA_VERSION.to_be_bytes())?;
        w.put(&self.next_id()?.to_be_bytes())?;
        for name in self.db.tree_names() {
            let tree = self.db.open_tree(&name)?;
            w.put(&[TAG_TREE])?;
            w.put_len16(&name)?;
            summary.trees += 1;
            for entry in tree.iter() {
                let (key, value) = entry?;
                w.put(&[TAG_ENTRY])?;
                w.put_len32(&key)?;
                w.put_len32(&value)?;
                summary.entries += 1;
                if summary.entries.is_multiple_of(4096) {
                    progress(summary.entries);
                }
            }
        }
        for (path, bytes) in files {
            w.put(&[TAG_FILE])?;
            w.put_len16(path.as_bytes())?;
            w.put_len32(bytes)?;
            summary.files += 1;
        }
        w.put(&[TAG_END])?;
        w.put(&summary.entries.to_be_bytes())?;
        let digest = w.hash.clone().finalize();
        w.inner.write_all(&digest)?;
        w.inner.flush()?;
        summary.bytes = w.bytes + digest.len() as u64;
        progress(summary.entries);
        Ok(summary)
    }
}

/// Reads exactly `n` bytes, hashing them.
struct Reader<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Reader<R> {
    fn take(&mut self, n: usize) -> Result<Vec<u8>, BackupError> {
        let mut buf = vec![0u8; n];
        self.inner.read_exact(&mut buf).map_err(truncated)?;
        self.hash.update(&buf);
        self.bytes += n as u64;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], BackupError> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(truncated)?;
        self.hash.update(buf);
        self.bytes += N as u64;
        Ok(buf)
    }

    fn bytes16(&mut self, max: usize, what: &str) -> Result<Vec<u8>, BackupError> {
        let len = usize::from(u16::from_be_bytes(self.array()?));
        if len > max {
            return Err(invalid(format!("{what} of {len} bytes (at most {max})")));
        }
        self.take(len)
    }

    fn bytes32(&mut self, max: usize, what: &str) -> Result<Vec<u8>, BackupError> {
        let len = u32::from_be_bytes(self.array()?) as usize;
        if len > max {
            return Err(invalid(format!("{what} of {len} bytes (at most {max})")));
        }
        self.take(len)
    }
}

fn truncated(e: std::io::Error) -> BackupError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        invalid("the file ends early (truncated)")
    } else {
        BackupError::Io(e)
    }
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Tree(Vec<u8>),
    Entry(Vec<u8>, Vec<u8>),
    File(String, Vec<u8>),
}

/// The header of a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub schema_version: u32,
    pub next_id: u64,
}

/// Decodes a backup, handing each record to `sink` as it is read, and checks the end
/// record (entry count and digest). A file that fails the check has still been
/// passed to `sink` up to the damage: callers write somewhere invisible until this
/// returns `Ok`.
pub fn read_backup(
    input: impl BufRead,
    mut sink: impl FnMut(&Header, Record) -> Result<(), BackupError>,
) -> Result<(Header, BackupSummary), BackupError> {
    let mut r = Reader {
        inner: input,
        hash: Sha256::new(),
        bytes: 0,
    };
    if &r.array::<8>()? != MAGIC {
        return Err(invalid("it does not start with SWBACKUP"));
    }
    let format = u32::from_be_bytes(r.array()?);
    if format != FORMAT_VERSION {
        return Err(invalid(format!(
            "format version {format}; this build reads version {FORMAT_VERSION}"
        )));
    }
    let schema_version = u32::from_be_bytes(r.array()?);
    if schema_version > SCHEMA_VERSION {
        return Err(BackupError::TooNew {
            found: schema_version,
        });
    }
    let header = Header {
        schema_version,
        next_id: u64::from_be_bytes(r.array()?),
    };
    let mut summary = BackupSummary {
        schema_version,
        ..BackupSummary::default()
    };
    let mut in_tree = false;
    loop {
        let [tag] = r.array::<1>()?;
        match tag {
            TAG_TREE => {
                let name = r.bytes16(MAX_NAME, "a tree name")?;
                summary.trees += 1;
                in_tree = true;
                sink(&header, Record::Tree(name))?;
            }
            TAG_ENTRY => {
                if !in_tree {
                    return Err(invalid("an entry before any tree"));
                }
                let key = r.bytes32(MAX_KEY, "a key")?;
                let value = r.bytes32(MAX_VALUE, "a value")?;
                summary.entries += 1;
                sink(&header, Record::Entry(key, value))?;
            }
            TAG_FILE => {
                let path = String::from_utf8(r.bytes16(MAX_NAME, "a file path")?)
                    .map_err(|_| invalid("a file path that is not UTF-8"))?;
                if !FILES.contains(&path.as_str()) {
                    return Err(invalid(format!(
                        "a file record for {path:?}; a backup carries only {FILES:?}"
                    )));
                }
                let bytes = r.bytes32(MAX_FILE, "a file")?;
                summary.files += 1;
                sink(&header, Record::File(path, bytes))?;
            }
            TAG_END => {
                let count = u64::from_be_bytes(r.array()?);
                let expected = r.hash.clone().finalize();
                let mut digest = [0u8; 32];
                r.inner.read_exact(&mut digest).map_err(truncated)?;
                if count != summary.entries {
                    return Err(invalid(format!(
                        "the end record counts {count} entries, the file holds {}",
                        summary.entries
                    )));
                }
                if digest[..] != expected[..] {
                    return Err(invalid("the checksum does not match (damaged file)"));
                }
                let mut rest = [0u8; 1];
                if r.inner.read(&mut rest)? != 0 {
                    return Err(invalid("bytes after the end record"));
                }
                summary.bytes = r.bytes + 32;
                return Ok((header, summary));
            }
            other => return Err(invalid(format!("unknown record tag {other}"))),
        }
    }
}

/// Restores a backup into `data_dir`, which must not exist or be empty. The database
/// is built in `data_dir/db.restoring` and renamed to `data_dir/db` only once the
/// whole file checked out; the files (the certificate) are written after that.
/// `progress` is called with the entries restored so far.
pub fn restore(
    input: impl BufRead,
    data_dir: &Path,
    mut progress: impl FnMut(u64),
) -> Result<BackupSummary, BackupError> {
    if data_dir.exists() {
        let mut entries = std::fs::read_dir(data_dir)?;
        if entries.next().is_some() {
            return Err(BackupError::NotEmpty(data_dir.to_path_buf()));
        }
    }
    crate::fsutil::create_private_dir(data_dir)?;
    let staging = data_dir.join("db.restoring");
    let result = (|| {
        let db = sled::Config::new()
            .path(&staging)
            .open()
            .map_err(StoreError::from)?;
        let mut tree: Option<sled::Tree> = None;
        let mut batch = sled::Batch::default();
        let mut pending = 0usize;
        let mut pending_bytes = 0usize;
        let mut entries = 0u64;
        let mut files = Vec::new();
        let (header, summary) = read_backup(input, |_, record| {
            match record {
                Record::Tree(name) => {
                    if let Some(t) = &tree {
                        t.apply_batch(std::mem::take(&mut batch))
                            .map_err(StoreError::from)?;
                        pending = 0;
                        pending_bytes = 0;
                    }
                    tree = Some(db.open_tree(name).map_err(StoreError::from)?);
                }
                Record::Entry(key, value) => {
                    pending_bytes += key.len() + value.len();
                    batch.insert(key, value);
                    pending += 1;
                    entries += 1;
                    if pending == 4096 || pending_bytes >= 16 << 20 {
                        if let Some(t) = &tree {
                            t.apply_batch(std::mem::take(&mut batch))
                                .map_err(StoreError::from)?;
                        }
                        pending = 0;
                        pending_bytes = 0;
                        progress(entries);
                    }
                }
                Record::File(path, bytes) => files.push((path, bytes)),
            }
            Ok(())
        })?;
        if let Some(t) = &tree {
            t.apply_batch(std::mem::take(&mut batch))
                .map_err(StoreError::from)?;
        }
        db.open_tree("meta")
            .and_then(|meta| meta.insert("id_base", &header.next_id.to_be_bytes()))
            .map_err(StoreError::from)?;
        db.flush().map_err(StoreError::from)?;
        drop(tree);
        drop(db);
        // Opening it as a store checks the schema and brings it up to this build's.
        Store::open(&staging)?.flush_blocking()?;
        progress(entries);
        Ok::<_, BackupError>((summary, files))
    })();
    let (summary, files) = match result {
        Ok(done) => done,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    // The certificate first, then the database: a data dir with a `db` is complete.
    for (path, bytes) in &files {
        let target = data_dir.join(path);
        if let Some(parent) = target.parent() {
            crate::fsutil::create_private_dir(parent)?;
        }
        crate::fsutil::write_private(&target, bytes)?;
    }
    std::fs::rename(&staging, data_dir.join("db"))?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn backup_of(store: &Store, files: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        store.write_backup(&mut out, files, |_| {}).expect("backup");
        out
    }

    #[test]
    fn round_trip_keeps_every_tree_and_ids_keep_growing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db")).expect("open");
        store
            .trees
            .queue
            .insert(b"some-queue-key", b"value".as_slice())
            .expect("insert");
        let drawn = store.next_id().expect("id");
        let bytes = backup_of(&store, &[("tls/cert.pem".into(), b"CERT".to_vec())]);

        let target = dir.path().join("restored");
        let summary = restore(&bytes[..], &target, |_| {}).expect("restore");
        assert_eq!(summary.files, 1);
        assert_eq!(summary.bytes, bytes.len() as u64);
        assert_eq!(
            std::fs::read(target.join("tls/cert.pem")).expect("cert"),
            b"CERT"
        );
        let restored = Store::open(&target.join("db")).expect("open restored");
        assert_eq!(
            restored
                .trees
                .queue
                .get(b"some-queue-key")
                .expect("get")
                .as_deref(),
            Some(&b"value"[..])
        );
        assert_eq!(
            restored.discovery_key().to_bytes(),
            store.discovery_key().to_bytes()
        );
        assert!(restored.next_id().expect("id") > drawn);
        assert!(matches!(
            restore(&bytes[..], &target, |_| {}),
            Err(BackupError::NotEmpty(_))
        ));
    }

    #[test]
    fn any_damage_is_refused_and_leaves_no_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db")).expect("open");
        let bytes = backup_of(&store, &[]);
        for (i, cut) in [1, 9, bytes.len() / 2, bytes.len() - 1]
            .into_iter()
            .enumerate()
        {
            let target = dir.path().join(format!("cut{i}"));
            let err = restore(&bytes[..cut], &target, |_| {}).expect_err("truncated");
            assert!(matches!(err, BackupError::Invalid(_)), "{err}");
            assert!(!target.join("db").exists());
        }
        let mut flipped = bytes.clone();
        let at = flipped.len() / 2;
        flipped[at] ^= 1;
        let target = dir.path().join("flipped");
        assert!(restore(&flipped[..], &target, |_| {}).is_err());
        assert!(!target.join("db").exists());
        assert!(!target.join("db.restoring").exists());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn the_decoder_survives_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut input = MAGIC.to_vec();
            input.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
            input.extend_from_slice(&bytes);
            let _ = read_backup(&input[..], |_, _| Ok(()));
            let _ = read_backup(&bytes[..], |_, _| Ok(()));
        }

        #[test]
        fn file_records_other_than_the_certificate_are_refused(path in "[a-z./]{0,14}") {
            let mut input = MAGIC.to_vec();
            input.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
            input.extend_from_slice(&SCHEMA_VERSION.to_be_bytes());
            input.extend_from_slice(&1u64.to_be_bytes());
            input.push(TAG_FILE);
            input.extend_from_slice(&(path.len() as u16).to_be_bytes());
            input.extend_from_slice(path.as_bytes());
            input.extend_from_slice(&1u32.to_be_bytes());
            input.push(b'x');
            let mut files = Vec::new();
            let _ = read_backup(&input[..], |_, r| {
                if let Record::File(p, _) = r {
                    files.push(p);
                }
                Ok(())
            });
            prop_assert!(files.iter().all(|p| FILES.contains(&p.as_str())));
            if !FILES.contains(&path.as_str()) {
                prop_assert!(files.is_empty());
            }
        }
    }
}
