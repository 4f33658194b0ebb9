//! The home database: what a device keeps besides its TLS key, in one SQLite file
//! (`home.db`) that any number of processes on the home use at once.
//!
//! Every change is one SQLite transaction begun `IMMEDIATE`: it takes the database's
//! write lock first, so it reads the latest committed state and nobody writes in
//! between; other processes wait for it (`busy_timeout`). The journal is a WAL with
//! `synchronous = FULL`, so a committed transaction survives a crash or a power cut,
//! and an interrupted one leaves nothing. ARCHITECTURE.md says why SQLite.
//!
//! Every value is sealed with a key derived from the home key (`e2e.key`):
//! XChaCha20-Poly1305 under a random nonce, with the table and the row key as
//! associated data, so a value cannot be moved to another row. A row key that would
//! name a person or a message is a keyed hash (HMAC-SHA256 under a second derived
//! key, 16 bytes), so the file shows how many rows there are, never whose.
//!
//! Tables (every one declared here, in [`SCHEMA`]):
//!
//! | table | key | value (sealed) |
//! | --- | --- | --- |
//! | `kv` | name (`account`, `book`, `filter`) | the Olm account, the address book, the discovery filter |
//! | `peer` | H(`peer`, number) | what is known of a contact's identity |
//! | `session` | H(`peer`, number) ++ device (u32 BE) | the Olm sessions with that device, newest first |
//! | `seen` | H(`seen`, sender, node id) | (plain: when) envelopes already handled, to drop redeliveries |
//! | `message` | seq (local order); `conv` H(`conv`, number); `key` H(direction, number, id) | the history record; plain `state`, and `shown` (an app showed it) |
//! | `sent_id` | H(`sent`, node id) | the `message` seq a node id of ours belongs to |
//! | `outbox` | message seq | the encrypted `Outgoing` not yet accepted by the node |
//! | `pending` | H(`seen`, sender, node id) | an envelope that could not be decrypted yet |
//! | `job` | id; plain `due` | work that needs the network (retry requests, resends) |

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use hmac::Mac;
use rand::RngExt;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use zeroize::Zeroizing;

use super::sealed::Passphrase;
use crate::fsutil;

/// The database file in the home.
pub const DB_FILE: &str = "home.db";
/// The home key: 32 random bytes (sealed under the passphrase when there is one).
pub const KEY_FILE: &str = "e2e.key";
/// The schema this build writes. `PRAGMA user_version` holds a home's.
const SCHEMA_VERSION: i64 = 2;
/// The first byte of every sealed value.
const SEAL_VERSION: u8 = 1;
/// How long a transaction waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

const SCHEMA: &str = "
CREATE TABLE kv (name TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE peer (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE session (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE seen (key BLOB PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX seen_at ON seen (at);
CREATE TABLE message (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    conv BLOB NOT NULL,
    key BLOB NOT NULL UNIQUE,
    state INTEGER NOT NULL,
    shown INTEGER NOT NULL,
    value BLOB NOT NULL
);
CREATE INDEX message_conv ON message (conv, seq);
CREATE TABLE sent_id (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE outbox (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE pending (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE job (id INTEGER PRIMARY KEY AUTOINCREMENT, due INTEGER NOT NULL, value BLOB NOT NULL);
CREATE INDEX job_due ON job (due);
";

/// Schema 1 → 2: when a disappearing message goes (ms; NULL: never).
const SCHEMA_2: &str = "
ALTER TABLE message ADD COLUMN expires INTEGER;
CREATE INDEX message_expires ON message (expires) WHERE expires IS NOT NULL;
";

/// What can go wrong with the home database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the home database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error(
        "the home database {path} was written by a newer switchboard (schema {found}; this \
         build knows {known}): upgrade switchboard to use this home"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error(transparent)]
    Home(#[from] super::HomeError),
}

/// The keys derived from the home key.
struct Keys {
    /// The home key itself (the old state files were sealed under it).
    home: Zeroizing<[u8; 32]>,
    /// Seals values.
    seal: Zeroizing<[u8; 32]>,
    /// Keys the hashes that stand for numbers and ids in row keys (keyed once;
    /// each hash starts from a copy).
    index: hmac::Hmac<sha2::Sha256>,
}

struct Inner {
    path: PathBuf,
    conn: Mutex<Connection>,
    keys: Keys,
}

/// The home database, shared by the tasks of a process (cheap to clone).
#[derive(Clone)]
pub struct HomeDb {
    inner: Arc<Inner>,
}

/// The tables whose rows are a key and a sealed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Kv,
    Peer,
    Session,
    SentId,
    Outbox,
    Pending,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Kv => "kv",
            Table::Peer => "peer",
            Table::Session => "session",
            Table::SentId => "sent_id",
            Table::Outbox => "outbox",
            Table::Pending => "pending",
        }
    }

    /// The key column (`kv` is keyed by a text name).
    fn key_column(self) -> &'static str {
        match self {
            Table::Kv => "name",
            _ => "key",
        }
    }
}

/// A row key that stands for something private: a keyed hash.
pub type Hashed = [u8; 16];

/// A value as opened: wiped from memory when dropped.
pub type Value = Zeroizing<Vec<u8>>;

/// One row of `message`.
#[derive(Debug, Clone)]
pub struct MessageRow {
    pub seq: i64,
    pub key: Hashed,
    pub state: i64,
    pub value: Zeroizing<Vec<u8>>,
}

impl HomeDb {
    /// Opens (creating it if needed) the database of the home `dir`, with the home key
    /// unsealed by `passphrase` when it is sealed (and sealed with it when it is not).
    /// A home from before the database (`e2e.state`, `contacts.json`) is moved into it.
    pub fn open(dir: &Path, passphrase: Option<&Passphrase>) -> Result<HomeDb, DbError> {
        fsutil::create_private_dir(dir).map_err(io(dir))?;
        let path = dir.join(DB_FILE);
        let home_key = home_key(dir, passphrase, &path)?;
        let keys = Keys {
            home: home_key.clone(),
            seal: derive(&home_key, b"switchboard home values"),
            index: <hmac::Hmac<sha2::Sha256>>::new_from_slice(
                &derive(&home_key, b"switchboard home index")[..],
            )
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length")),
        };
        // The file is made owner-only before SQLite opens it; SQLite gives its WAL and
        // shared-memory files the database file's permissions.
        if !path.exists() {
            match fsutil::create_private(&path) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        let conn = Connection::open(&path).map_err(sqlite(&path))?;
        let db = HomeDb {
            inner: Arc::new(Inner {
                path: path.clone(),
                conn: Mutex::new(conn),
                keys,
            }),
        };
        db.configure()?;
        db.migrate(dir)?;
        Ok(db)
    }

    fn configure(&self) -> Result<(), DbError> {
        let conn = self.lock();
        let err = sqlite(&self.inner.path);
        conn.busy_timeout(BUSY_TIMEOUT).map_err(&err)?;
        // WAL: readers never wait for the writer; FULL: a commit is on disk (the WAL
        // fsynced) before it returns, since a message is acknowledged to the node
        // right after.
        let mode = wal_mode(&conn).map_err(&err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(DbError::Damaged {
                path: self.inner.path.clone(),
                reason: format!("cannot use a write-ahead log (journal mode {mode})"),
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(&err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(&err)?;
        Ok(())
    }

    /// Brings the schema up to [`SCHEMA_VERSION`], one step at a time, each in the
    /// transaction that checks the version (so two processes never both migrate).
    fn migrate(&self, dir: &Path) -> Result<(), DbError> {
        let path = self.inner.path.clone();
        self.write(|tx| {
            let version: i64 = tx
                .conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(sqlite(&path))?;
            if version > SCHEMA_VERSION {
                return Err(DbError::TooNew {
                    path: path.clone(),
                    found: version,
                    known: SCHEMA_VERSION,
                });
            }
            if version == 0 {
                tx.conn.execute_batch(SCHEMA).map_err(sqlite(&path))?;
                super::legacy::import(tx, dir)?;
            }
            if version < 2 {
                tx.conn.execute_batch(SCHEMA_2).map_err(sqlite(&path))?;
            }
            tx.conn
                .pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(sqlite(&path))?;
            Ok(())
        })?;
        // The old files go once the database holding their contents is committed.
        super::legacy::remove(dir);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.inner
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` in a write transaction: it sees the latest committed state, nobody
    /// else writes until it ends, and its changes are durable when this returns `Ok`.
    /// On `Err` nothing it did is kept.
    pub fn write<R, E: From<DbError>>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        self.transaction(TransactionBehavior::Immediate, f)
    }

    /// [`HomeDb::write`] without waiting for the disk: the commit survives the
    /// process being killed (it is in the WAL file), not a power cut. For marks that
    /// cost little if lost (what was shown), made often.
    pub fn write_light<R, E: From<DbError>>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        let mut conn = self.lock();
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sqlite(&self.inner.path))?;
        // Back to FULL whatever happens (an error, a panic in `f`), under the same
        // lock, so no other transaction of this process ever commits under NORMAL.
        struct Full<'c>(&'c mut Connection);
        impl Drop for Full<'_> {
            fn drop(&mut self) {
                let _ = self.0.pragma_update(None, "synchronous", "FULL");
            }
        }
        let full = Full(&mut conn);
        Self::run(full.0, &self.inner, TransactionBehavior::Immediate, f)
    }

    /// Runs `f` on one consistent snapshot, without taking the write lock.
    pub fn read<R, E: From<DbError>>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        self.transaction(TransactionBehavior::Deferred, f)
    }

    fn transaction<R, E: From<DbError>>(
        &self,
        behavior: TransactionBehavior,
        f: impl FnOnce(&Tx<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        let mut conn = self.lock();
        Self::run(&mut conn, &self.inner, behavior, f)
    }

    fn run<R, E: From<DbError>>(
        conn: &mut Connection,
        inner: &Inner,
        behavior: TransactionBehavior,
        f: impl FnOnce(&Tx<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        let err = sqlite(&inner.path);
        let tx = conn.transaction_with_behavior(behavior).map_err(&err)?;
        let out = f(&Tx {
            conn: &tx,
            keys: &inner.keys,
            path: &inner.path,
        })?;
        tx.commit().map_err(&err)?;
        Ok(out)
    }

    /// [`HomeDb::write`] on tokio's blocking pool, so a wait for another process's
    /// lock (or a disk sync) never holds up an async worker.
    pub async fn write_async<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnOnce(&Tx<'_>) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let db = self.clone();
        blocking(move || db.write(f)).await
    }

    /// [`HomeDb::read`] on tokio's blocking pool.
    pub async fn read_async<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnOnce(&Tx<'_>) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let db = self.clone();
        blocking(move || db.read(f)).await
    }
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// One transaction on the home database: typed access to its tables, with values
/// sealed and opened here.
pub struct Tx<'a> {
    conn: &'a Connection,
    keys: &'a Keys,
    path: &'a Path,
}

impl Tx<'_> {
    fn err(&self) -> impl Fn(rusqlite::Error) -> DbError + '_ {
        sqlite(self.path)
    }

    /// An error saying the database holds something it should not.
    pub fn damaged(&self, reason: impl Into<String>) -> DbError {
        DbError::Damaged {
            path: self.path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// The home key, for reading the files of a home from before the database.
    pub(crate) fn home_key(&self) -> &[u8; 32] {
        &self.keys.home
    }

    /// The keyed hash of `parts` under `label`, for a row key.
    pub fn hash(&self, label: &[u8], parts: &[&[u8]]) -> Hashed {
        let mut mac = self.keys.index.clone();
        mac.update(&(label.len() as u32).to_be_bytes());
        mac.update(label);
        for part in parts {
            // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part);
        }
        let out = mac.finalize().into_bytes();
        let mut hashed = [0u8; 16];
        hashed.copy_from_slice(&out[..16]);
        hashed
    }

    fn seal(&self, table: Table, key: &[u8], plain: &[u8]) -> Vec<u8> {
        seal_value(&self.keys.seal, table.name(), key, plain)
    }

    fn open(&self, table: &str, key: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, DbError> {
        open_value(&self.keys.seal, table, key, sealed).ok_or_else(|| {
            self.damaged(format!(
                "a value in `{table}` does not open (wrong key, or altered)"
            ))
        })
    }

    /// The value of `key` in `table`.
    pub fn get(&self, table: Table, key: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, DbError> {
        let sql = format!(
            "SELECT value FROM {} WHERE {} = ?1",
            table.name(),
            table.key_column()
        );
        let sealed: Option<Vec<u8>> = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut s| {
                s.query_row([key_param(table, key)], |r| r.get(0))
                    .optional()
            })
            .map_err(self.err())?;
        sealed.map(|s| self.open(table.name(), key, &s)).transpose()
    }

    /// Sets `key` in `table` to `value`.
    pub fn put(&self, table: Table, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        let sql = format!(
            "INSERT OR REPLACE INTO {} ({}, value) VALUES (?1, ?2)",
            table.name(),
            table.key_column()
        );
        let sealed = self.seal(table, key, value);
        self.conn
            .prepare_cached(&sql)
            .and_then(|mut s| s.execute(params![key_param(table, key), sealed]))
            .map_err(self.err())?;
        Ok(())
    }

    /// Removes `key` from `table`; whether it was there.
    pub fn delete(&self, table: Table, key: &[u8]) -> Result<bool, DbError> {
        let sql = format!(
            "DELETE FROM {} WHERE {} = ?1",
            table.name(),
            table.key_column()
        );
        let n = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut s| s.execute([key_param(table, key)]))
            .map_err(self.err())?;
        Ok(n > 0)
    }

    /// Every row of `table` whose key starts with `prefix`, in key order.
    pub fn scan(&self, table: Table, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Value)>, DbError> {
        let sql = format!(
            "SELECT key, value FROM {} WHERE key >= ?1 ORDER BY key",
            table.name()
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(self.err())?;
        let rows = stmt
            .query_map([prefix], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            let (key, sealed) = row.map_err(self.err())?;
            if !key.starts_with(prefix) {
                break;
            }
            let value = self.open(table.name(), &key, &sealed)?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// Records `key` as seen at `at` (ms); false when it already was.
    pub fn see(&self, key: &Hashed, at: u64) -> Result<bool, DbError> {
        let n = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO seen (key, at) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![&key[..], at as i64]))
            .map_err(self.err())?;
        Ok(n > 0)
    }

    /// Whether `key` was seen.
    pub fn seen(&self, key: &Hashed) -> Result<bool, DbError> {
        self.conn
            .prepare_cached("SELECT 1 FROM seen WHERE key = ?1")
            .and_then(|mut s| s.exists([&key[..]]))
            .map_err(self.err())
    }

    /// Forgets what was seen before `before` (ms); how many.
    pub fn forget_seen(&self, before: u64) -> Result<usize, DbError> {
        self.conn
            .prepare_cached("DELETE FROM seen WHERE at < ?1")
            .and_then(|mut s| s.execute([before as i64]))
            .map_err(self.err())
    }

    /// Adds a history row; `None` (and nothing written) when `key` is there already.
    pub fn insert_message(
        &self,
        conv: &Hashed,
        key: &Hashed,
        state: i64,
        shown: bool,
        value: &[u8],
    ) -> Result<Option<i64>, DbError> {
        let sealed = seal_value(&self.keys.seal, "message", key, value);
        let n = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO message (conv, key, state, shown, value) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| s.execute(params![&conv[..], &key[..], state, shown, sealed]))
            .map_err(self.err())?;
        Ok((n > 0).then(|| self.conn.last_insert_rowid()))
    }

    /// History row `seq` goes at `until` (ms).
    pub fn set_message_expiry(&self, seq: i64, until: u64) -> Result<(), DbError> {
        self.conn
            .prepare_cached("UPDATE message SET expires = ?1 WHERE seq = ?2")
            .and_then(|mut s| s.execute(params![until.min(i64::MAX as u64) as i64, seq]))
            .map_err(self.err())?;
        Ok(())
    }

    /// Deletes the history rows whose time ran out by `now` (ms), but those in state
    /// `keep`; how many.
    pub fn delete_expired_messages(&self, now: u64, keep: i64) -> Result<usize, DbError> {
        self.conn
            .prepare_cached(
                "DELETE FROM message WHERE expires IS NOT NULL AND expires <= ?1 AND state != ?2",
            )
            .and_then(|mut s| s.execute(params![now.min(i64::MAX as u64) as i64, keep]))
            .map_err(self.err())
    }

    /// Marks history row `seq` as shown; true when this call did (it was not yet).
    pub fn claim_shown(&self, seq: i64) -> Result<bool, DbError> {
        let n = self
            .conn
            .prepare_cached("UPDATE message SET shown = 1 WHERE seq = ?1 AND shown = 0")
            .and_then(|mut s| s.execute([seq]))
            .map_err(self.err())?;
        Ok(n > 0)
    }

    /// Marks history row `seq` as not shown (its content changed for the user).
    pub fn unshow(&self, seq: i64) -> Result<(), DbError> {
        self.conn
            .prepare_cached("UPDATE message SET shown = 0 WHERE seq = ?1")
            .and_then(|mut s| s.execute([seq]))
            .map_err(self.err())?;
        Ok(())
    }

    /// Up to `limit` history rows from `from` on not yet shown, oldest first.
    pub fn unshown(&self, from: i64, limit: usize) -> Result<Vec<MessageRow>, DbError> {
        self.message_rows(
            "SELECT seq, key, state, value FROM message WHERE seq >= ?1 AND shown = 0 \
             ORDER BY seq LIMIT ?2",
            params![from, limit.min(i64::MAX as usize) as i64],
        )
    }

    /// The newest history row's seq.
    pub fn last_message_seq(&self) -> Result<Option<i64>, DbError> {
        self.conn
            .query_row("SELECT max(seq) FROM message", [], |r| r.get(0))
            .map_err(self.err())
    }

    /// Whether a history row has `key`.
    pub fn has_message_key(&self, key: &Hashed) -> Result<bool, DbError> {
        self.conn
            .prepare_cached("SELECT 1 FROM message WHERE key = ?1")
            .and_then(|mut s| s.exists([&key[..]]))
            .map_err(self.err())
    }

    /// Replaces the state and value of the history row `seq`.
    pub fn update_message(
        &self,
        row: &MessageRow,
        state: i64,
        value: &[u8],
    ) -> Result<(), DbError> {
        let sealed = seal_value(&self.keys.seal, "message", &row.key, value);
        self.conn
            .prepare_cached("UPDATE message SET state = ?1, value = ?2 WHERE seq = ?3")
            .and_then(|mut s| s.execute(params![state, sealed, row.seq]))
            .map_err(self.err())?;
        Ok(())
    }

    /// The history row `seq`.
    pub fn message(&self, seq: i64) -> Result<Option<MessageRow>, DbError> {
        self.message_where("seq = ?1", rusqlite::types::Value::Integer(seq))
    }

    /// The history row of `key`.
    pub fn message_by_key(&self, key: &Hashed) -> Result<Option<MessageRow>, DbError> {
        self.message_where("key = ?1", rusqlite::types::Value::Blob(key.to_vec()))
    }

    fn message_where(
        &self,
        condition: &str,
        value: rusqlite::types::Value,
    ) -> Result<Option<MessageRow>, DbError> {
        let sql = format!("SELECT seq, key, state, value FROM message WHERE {condition}");
        let row: Option<(i64, Vec<u8>, i64, Vec<u8>)> = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut s| {
                s.query_row([value], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()
            })
            .map_err(self.err())?;
        row.map(|(seq, key, state, sealed)| self.message_row(seq, key, state, sealed))
            .transpose()
    }

    fn message_row(
        &self,
        seq: i64,
        key: Vec<u8>,
        state: i64,
        sealed: Vec<u8>,
    ) -> Result<MessageRow, DbError> {
        let key: Hashed = key
            .as_slice()
            .try_into()
            .map_err(|_| self.damaged("a history row has a key of the wrong size"))?;
        let value = self.open("message", &key, &sealed)?;
        Ok(MessageRow {
            seq,
            key,
            state,
            value,
        })
    }

    /// Up to `limit` history rows of the conversation `conv` before `before` (all
    /// when `None`), newest first.
    pub fn messages(
        &self,
        conv: &Hashed,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<MessageRow>, DbError> {
        self.message_rows(
            "SELECT seq, key, state, value FROM message WHERE conv = ?1 AND seq < ?2 \
             ORDER BY seq DESC LIMIT ?3",
            params![
                &conv[..],
                before.unwrap_or(i64::MAX),
                limit.min(i64::MAX as usize) as i64
            ],
        )
    }

    /// Every conversation (by its hashed key) with its newest position, newest
    /// first: read from the `message_conv` index, nothing unsealed.
    pub fn conversation_heads(&self) -> Result<Vec<(Vec<u8>, i64)>, DbError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT conv, max(seq) AS last FROM message GROUP BY conv ORDER BY last DESC",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// How many rows of conversation `conv` after position `after` have a state
    /// number of at least `state`.
    pub fn count_messages_after(
        &self,
        conv: &[u8],
        after: i64,
        state: i64,
    ) -> Result<usize, DbError> {
        let n: i64 = self
            .conn
            .prepare_cached(
                "SELECT count(*) FROM message WHERE conv = ?1 AND seq > ?2 AND state >= ?3",
            )
            .and_then(|mut s| s.query_row(params![conv, after, state], |r| r.get(0)))
            .map_err(self.err())?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// Up to `limit` messages of every conversation after position `after`, oldest
    /// first.
    pub fn messages_after(&self, after: i64, limit: usize) -> Result<Vec<MessageRow>, DbError> {
        self.message_rows(
            "SELECT seq, key, state, value FROM message WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            params![after, limit.min(i64::MAX as usize) as i64],
        )
    }

    fn message_rows(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<MessageRow>, DbError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.err())?;
        let rows = stmt
            .query_map(params, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, key, state, sealed) = row.map_err(self.err())?;
            out.push(self.message_row(seq, key, state, sealed)?);
        }
        Ok(out)
    }

    /// Adds a job due at `due` (ms); its id.
    pub fn add_job(&self, due: u64, value: &[u8]) -> Result<i64, DbError> {
        let sealed = seal_value(&self.keys.seal, "job", &[], value);
        self.conn
            .prepare_cached("INSERT INTO job (due, value) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![due as i64, sealed]))
            .map_err(self.err())?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Takes up to `limit` jobs due by `now`, each leased until `lease_until` (it is
    /// not due again before then, so another process does not run it meanwhile).
    pub fn take_jobs(
        &self,
        now: u64,
        lease_until: u64,
        limit: usize,
    ) -> Result<Vec<(i64, Value)>, DbError> {
        let rows: Vec<(i64, Vec<u8>)> = {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT id, value FROM job WHERE due <= ?1 ORDER BY due LIMIT ?2")
                .map_err(self.err())?;
            let rows = stmt
                .query_map(
                    params![now as i64, limit.min(i64::MAX as usize) as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(self.err())?;
            rows.collect::<Result<_, _>>().map_err(self.err())?
        };
        let mut out = Vec::with_capacity(rows.len());
        for (id, sealed) in rows {
            self.reschedule_job(id, lease_until)?;
            out.push((id, self.open("job", &[], &sealed)?));
        }
        Ok(out)
    }

    /// Makes job `id` due at `due`.
    pub fn reschedule_job(&self, id: i64, due: u64) -> Result<(), DbError> {
        self.conn
            .prepare_cached("UPDATE job SET due = ?1 WHERE id = ?2")
            .and_then(|mut s| s.execute(params![due as i64, id]))
            .map_err(self.err())?;
        Ok(())
    }

    /// Removes job `id` (done, or given up).
    pub fn finish_job(&self, id: i64) -> Result<(), DbError> {
        self.conn
            .prepare_cached("DELETE FROM job WHERE id = ?1")
            .and_then(|mut s| s.execute([id]))
            .map_err(self.err())?;
        Ok(())
    }

    /// When the next job is due, if there is one.
    pub fn next_job_due(&self) -> Result<Option<u64>, DbError> {
        let due: Option<i64> = self
            .conn
            .query_row("SELECT min(due) FROM job", [], |r| r.get(0))
            .map_err(self.err())?;
        Ok(due.map(|d| d.max(0) as u64))
    }
}

fn key_param(table: Table, key: &[u8]) -> rusqlite::types::Value {
    match table {
        Table::Kv => rusqlite::types::Value::Text(String::from_utf8_lossy(key).into_owned()),
        _ => rusqlite::types::Value::Blob(key.to_vec()),
    }
}

fn aad(table: &str, key: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(table.len() + key.len() + 1);
    aad.extend_from_slice(table.as_bytes());
    aad.push(0);
    aad.extend_from_slice(key);
    aad
}

/// `SEAL_VERSION` · nonce (24) · XChaCha20-Poly1305 of `plain` with the table and key
/// as associated data.
fn seal_value(key: &[u8; 32], table: &str, row: &[u8], plain: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(&(*key).into());
    // The thread's generator is a CSPRNG seeded from the OS; a nonce needs to be
    // unique, not secret.
    let nonce: [u8; 24] = rand::rng().random();
    let sealed = cipher
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: plain,
                aad: &aad(table, row),
            },
        )
        .unwrap_or_else(|_| unreachable!("XChaCha20-Poly1305 encrypts any buffer this size"));
    let mut out = Vec::with_capacity(1 + 24 + sealed.len());
    out.push(SEAL_VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

fn open_value(
    key: &[u8; 32],
    table: &str,
    row: &[u8],
    sealed: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    let (&version, rest) = sealed.split_first()?;
    if version != SEAL_VERSION {
        return None;
    }
    let (nonce, body) = rest.split_first_chunk::<24>()?;
    let cipher = XChaCha20Poly1305::new(&(*key).into());
    cipher
        .decrypt(
            &XNonce::from(*nonce),
            Payload {
                msg: body,
                aad: &aad(table, row),
            },
        )
        .ok()
        .map(Zeroizing::new)
}

/// A 32-byte key for `purpose`, from the home key (HKDF-SHA256).
fn derive(home_key: &[u8; 32], purpose: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    hkdf::Hkdf::<sha2::Sha256>::new(None, home_key)
        .expand(purpose, out.as_mut())
        .unwrap_or_else(|_| unreachable!("HKDF-SHA256 gives 32 bytes"));
    out
}

/// The home key from `e2e.key`, made (and sealed under `passphrase`) if the home has
/// none yet.
fn home_key(
    dir: &Path,
    passphrase: Option<&Passphrase>,
    db_path: &Path,
) -> Result<Zeroizing<[u8; 32]>, DbError> {
    let key_path = dir.join(KEY_FILE);
    match std::fs::read(&key_path) {
        Ok(bytes) => {
            let plain = super::home::unseal(&key_path, bytes, passphrase)?;
            let key: [u8; 32] = plain.as_slice().try_into().map_err(|_| DbError::Damaged {
                path: key_path.clone(),
                reason: "not 32 bytes".into(),
            })?;
            Ok(Zeroizing::new(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if db_path.exists() || super::legacy::has_state(dir) {
                return Err(DbError::Damaged {
                    path: key_path,
                    reason: "missing, so the encrypted state beside it cannot be read".into(),
                });
            }
            let key = Zeroizing::new(rand::rng().random::<[u8; 32]>());
            let stored = match passphrase {
                Some(p) => super::sealed::seal(p.as_str(), &key[..]).map_err(|source| {
                    super::HomeError::Seal {
                        path: key_path.clone(),
                        source,
                    }
                })?,
                None => key.to_vec(),
            };
            // Two processes making a home at once: the first key written wins, and
            // the other reads it back.
            let tmp = dir.join(format!(
                ".{KEY_FILE}.{}.{}.new",
                std::process::id(),
                hex::encode(rand::rng().random::<[u8; 8]>())
            ));
            {
                use std::io::Write;
                let mut file = fsutil::create_private(&tmp).map_err(io(&tmp))?;
                file.write_all(&stored).map_err(io(&tmp))?;
                file.sync_all().map_err(io(&tmp))?;
            }
            let linked = std::fs::hard_link(&tmp, &key_path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    fsutil::sync_dir(dir).map_err(io(dir))?;
                    Ok(key)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    home_key(dir, passphrase, db_path)
                }
                Err(e) => Err(io(&key_path)(e)),
            }
        }
        Err(e) => Err(io(&key_path)(e)),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DbError + '_ {
    move |source| DbError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> DbError + '_ {
    move |source| DbError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

/// Switches the database to its write-ahead log and returns the journal mode now in
/// force. Switching needs the file to itself, and SQLite answers `SQLITE_BUSY` at
/// once, without its busy handler, when two openers of a new home both hold it shared
/// and ask for it whole (the handler would only wait for a deadlock). So this waits
/// and tries again itself, for as long as the busy timeout, a little longer each time.
fn wal_mode(conn: &Connection) -> rusqlite::Result<String> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut wait = Duration::from_millis(1);
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, HomeDb) {
        let dir = tempfile::tempdir().unwrap();
        let db = HomeDb::open(dir.path(), None).unwrap();
        (dir, db)
    }

    #[test]
    fn values_are_sealed_and_bound_to_their_row() {
        let (dir, db) = db();
        db.write(|tx| {
            tx.put(Table::Peer, b"row-a", b"the secret value")?;
            tx.put(Table::Peer, b"row-b", b"another value")?;
            Ok::<_, DbError>(())
        })
        .unwrap();
        let got = db.read(|tx| tx.get(Table::Peer, b"row-a")).unwrap();
        assert_eq!(
            got.as_deref().map(Vec::as_slice),
            Some(&b"the secret value"[..])
        );
        drop(db);
        // Nothing readable on disk (the WAL included).
        for name in [DB_FILE, "home.db-wal"] {
            if let Ok(bytes) = std::fs::read(dir.path().join(name)) {
                assert!(!bytes.windows(10).any(|w| w == b"the secret"), "{name}");
            }
        }
        // A value moved to another row does not open.
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute(
            "UPDATE peer SET value = (SELECT value FROM peer WHERE key = ?1) WHERE key = ?2",
            params![&b"row-a"[..], &b"row-b"[..]],
        )
        .unwrap();
        drop(conn);
        let db = HomeDb::open(dir.path(), None).unwrap();
        assert!(matches!(
            db.read(|tx| tx.get(Table::Peer, b"row-b")),
            Err(DbError::Damaged { .. })
        ));
    }

    #[test]
    fn a_failed_transaction_leaves_nothing() {
        let (_dir, db) = db();
        let r: Result<(), DbError> = db.write(|tx| {
            tx.put(Table::Kv, b"book", b"half")?;
            Err(tx.damaged("stop here"))
        });
        assert!(r.is_err());
        assert!(db.read(|tx| tx.get(Table::Kv, b"book")).unwrap().is_none());
    }

    #[test]
    fn processes_sharing_a_home_never_lose_an_update() {
        // Threads with a connection each stand in for processes: every one adds to
        // a counter by read-modify-write; the total is exact.
        let dir = tempfile::tempdir().unwrap();
        HomeDb::open(dir.path(), None).unwrap();
        std::thread::scope(|s| {
            for _ in 0..6 {
                let dir = dir.path();
                s.spawn(move || {
                    let db = HomeDb::open(dir, None).unwrap();
                    for _ in 0..40 {
                        db.write(|tx| {
                            let n = tx
                                .get(Table::Kv, b"counter")?
                                .map(|v| u64::from_be_bytes(v[..8].try_into().unwrap()))
                                .unwrap_or(0);
                            tx.put(Table::Kv, b"counter", &(n + 1).to_be_bytes())
                        })
                        .unwrap();
                    }
                });
            }
        });
        let db = HomeDb::open(dir.path(), None).unwrap();
        let n = db
            .read(|tx| tx.get(Table::Kv, b"counter"))
            .unwrap()
            .unwrap();
        assert_eq!(u64::from_be_bytes(n[..8].try_into().unwrap()), 240);
    }

    #[test]
    fn the_home_key_is_made_once_even_by_racing_openers() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<[u8; 16]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let dir = dir.path();
                    s.spawn(move || {
                        let db = HomeDb::open(dir, None).unwrap();
                        db.read(|tx| Ok::<_, DbError>(tx.hash(b"x", &[b"y"])))
                            .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.windows(2).all(|w| w[0] == w[1]), "different home keys");
    }

    #[test]
    fn a_home_from_a_newer_build_is_refused() {
        let (dir, db) = db();
        drop(db);
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        assert!(matches!(
            HomeDb::open(dir.path(), None),
            Err(DbError::TooNew { .. })
        ));
    }

    #[test]
    fn jobs_are_leased_to_one_taker() {
        let (_dir, db) = db();
        db.write(|tx| tx.add_job(10, b"retry")).unwrap();
        let first = db.write(|tx| tx.take_jobs(20, 1000, 10)).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(&first[0].1[..], b"retry");
        assert!(
            db.write(|tx| tx.take_jobs(500, 1500, 10))
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            db.write(|tx| tx.take_jobs(1000, 2000, 10)).unwrap().len(),
            1
        );
        db.write(|tx| tx.finish_job(first[0].0)).unwrap();
        assert_eq!(db.read(|tx| tx.next_job_due()).unwrap(), None);
    }
}
