//! Storage: the only code that touches sled.
//!
//! Every tree is declared in [`Trees`], named after what it maps, with its key layout
//! beside it; key encodings live in [`layout`], value types in [`records`]. Few trees
//! with prefixed keys, never a tree per user (sled bloats with many trees). Updates
//! that touch more than one tree run in one sled transaction.
//!
//! The store speaks in storage terms (records, ids, outcomes): it never builds a wire
//! error. Its methods are synchronous and may block on I/O; the node calls them from
//! blocking threads, never from its async workers.

pub mod account_store;
mod admin;
pub mod backup;
mod blobs;
mod devices;
pub mod export;
mod groups;
pub mod keydir;
pub mod layout;
pub mod limit_store;
mod prekeys;
mod profiles;
pub mod queue_store;
mod queues;
pub mod records;
mod registration;
mod staging;
mod ticket;

pub use admin::{AccountSummary, Deleted, DeviceSummary, StoreCounts};
pub use devices::{DeviceView, Linked, Unlinked};
pub use groups::{GroupAppend, GroupChange, GroupRefusal, GroupStore, apply_change, new_group};
pub use prekeys::{Claimed, IdentityPair, KeysRefusal};
pub use profiles::ProfileStore;
pub use queues::{AppendOutcome, InMemory, Queued, SweepStats};
pub use staging::{AppendPolicy, HandOff, HandOffStats, WriteBehind};
pub use ticket::{CarriedReceipts, Ticket, TicketWaiter};

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rand::TryRng;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::discovery::{DiscoveryKey, Prf};
use layout::KeyId;
use records::{AccountRecord, CodeRecord, DeviceRecord};

/// The schema this build writes. Raise it with every change of layout and add a rung
/// to [`Store::migrate`].
pub const SCHEMA_VERSION: u32 = 8;

/// What can go wrong in storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    /// The replicated engine of cluster mode (NATS JetStream) failed or refused.
    #[error("cluster storage: {0}")]
    Engine(String),
    #[error(
        "the data dir was written by a newer switchboard (schema {found}); this build knows schema {SCHEMA_VERSION} and older"
    )]
    TooNew { found: u32 },
}

impl StoreError {
    /// Whether the database can no longer be trusted to take writes: an I/O error
    /// (a full disk, a failing device, a failed sync). sled treats one as fatal (every
    /// later operation of the process fails the same way), and a failed sync may have
    /// lost what it was to make durable; only a new process, which recovers the log
    /// from what is on disk, goes on safely.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            StoreError::Io(_)
                | StoreError::Sled(sled::Error::Io(_) | sled::Error::ReportableBug(_))
        )
    }
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        }
    }
}

/// Every tree of the database.
#[derive(Clone)]
struct Trees {
    /// `meta`: name (ASCII) → value. `schema_version` (u32 BE), `code_hash_key` (32 bytes),
    /// `discovery_key` (the OPRF key, 32 bytes), `discovery_key_version` (u32 BE),
    /// `id_base` (u64 BE, absent means 0: added to sled's id generator, which a
    /// restore cannot set, so that ids drawn after a restore exceed those restored),
    /// `discovery_rebuild` (present while a key rotation rebuilds the index),
    /// `queue_totals` (items u64 BE ++ bytes u64 BE, saved by a clean shutdown and
    /// removed at open).
    meta: sled::Tree,
    /// `number_account`: E.164 (UTF-8) → account id (u64 BE). One account per number.
    number_account: sled::Tree,
    /// `account`: account id (u64 BE) → [`AccountRecord`] (with its devices).
    account: sled::Tree,
    /// `device_key`: key id (32 bytes, SHA-256 of the SPKI) → account id (u64 BE) ++ device id (u32 BE).
    device_key: sled::Tree,
    /// `number_code`: E.164 (UTF-8) → [`CodeRecord`], the pending verification code.
    number_code: sled::Tree,
    /// `device_keys`: device address (12 bytes) → [`records::DeviceKeysRecord`].
    device_keys: sled::Tree,
    /// `one_time_key`: device address ++ upload seq (u64 BE) → key ++ signature (96 bytes).
    one_time_key: sled::Tree,
    /// `queue`: device address ++ seq (u64 BE) → queue time (u64 BE) ++ [`records::QueueItem`].
    /// One queue per device, oldest first; seqs come from `Store::next_id`, so they only grow.
    queue: sled::Tree,
    /// `sent_message`: sender device address ++ client message id (16 bytes) → accept
    /// time (u64 BE). Makes resending an id idempotent; swept with the queue TTL.
    sent_message: sled::Tree,
    /// `discovery_index`: PRF(discovery key, E.164) (32 bytes) → account id (u64 BE).
    /// The contact-discovery index: no plain or plain-hashed number in it.
    discovery_index: sled::Tree,
    /// `registration_lock`: account id (u64 BE) → [`records::LockRecord`]: the
    /// Argon2id hash of the account's PIN and its wrong tries.
    registration_lock: sled::Tree,
    /// `account_seen`: account id (u64 BE) → when one of its devices was last seen
    /// (ms, u64 BE; written at most hourly). A registration lock lapses on it.
    account_seen: sled::Tree,
    /// `code_sends`: limit key (ASCII: `global`, `cc:44`, `n:+44…`, `ip:…`) → the send
    /// times (ms) of verification codes counted under it in the last day (bincode
    /// `Vec<u64>`).
    code_sends: sled::Tree,
    /// `device_name`: device address (12 bytes) → the name a linked device was given
    /// (UTF-8). The primary (an account's first device) has none.
    device_name: sled::Tree,
    /// `device_seen`: device address → when the device was last seen or linked (ms,
    /// u64 BE; written at most hourly per connection). A linked device lapses on it.
    device_seen: sled::Tree,
    /// `removed_key`: key id → [`records::RemovedKeyRecord`]: why and when the device
    /// of that key was removed, so that it is told so rather than "unknown"; swept
    /// after [`devices::REMOVED_KEY_KEEP_MS`].
    removed_key: sled::Tree,
    /// `device_vouch`: device address → the account identity's Ed25519 signature (64
    /// bytes) over a linked device's identity keys, handed out with its bundle.
    device_vouch: sled::Tree,
    /// `group`: group id (u64 BE) → [`records::GroupRecord`].
    group: sled::Tree,
    /// `account_group`: account id ++ group id (u64 BE each) → empty: the groups of
    /// an account.
    account_group: sled::Tree,
    /// `group_body`: body ref (u64 BE) → recipient devices that still hold it (u32
    /// BE) ++ when it was stored (u64 BE ms) ++ the body: a group message's one copy.
    group_body: sled::Tree,
    /// `group_receipt`: sending device ++ message id → group id (u64 BE), devices it
    /// went to (u32 BE), devices that have it (u32 BE), the sender's queue seq of the
    /// item reporting it (u64 BE, 0 for none), when it was sent (u64 BE ms).
    group_receipt: sled::Tree,
    /// `profile`: account id (u64 BE) → [`records::ProfileRecord`], the account's
    /// encrypted profile and presence.
    profile: sled::Tree,
    /// `blob`: attachment id (16 bytes) → [`records::BlobRecord`]; the bytes are the
    /// file `data_dir/blobs/<id hex>` (`blobs/partial/` while uploading).
    blob: sled::Tree,
    /// `account_blob`: account id (u64 BE) ++ attachment id → its size (u64 BE): an
    /// account's attachments, for its quota.
    account_blob: sled::Tree,
}

/// The node's database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    trees: Trees,
    /// Serialises every write to `queue`, so that seqs are committed in the order they
    /// are drawn (a reader that has seen seq n never later finds a new item below n),
    /// and holds the queue lengths (loaded per device on first use).
    queue_writer: Arc<Mutex<QueueState>>,
    /// sled's log file, opened a second time so that [`Store::flush`] can `fdatasync`
    /// it after sled's flush (which syncs only with `sync_file_range`: safe from a
    /// process crash, not from a power cut). `None` when power-loss sync is off.
    log_file: Option<Arc<std::fs::File>>,
    /// The OPRF key of the discovery index (replaced only by a rotation).
    discovery: Arc<std::sync::RwLock<Arc<DiscoveryKey>>>,
    /// Every write holds this shared; a backup holds it exclusively while it reads
    /// the trees, so that it sees the database as it was at one instant (sled has no
    /// snapshots). Taken only at the top of a public method, never nested: std's
    /// `RwLock` makes new readers wait behind a waiting writer.
    gate: Arc<std::sync::RwLock<()>>,
    /// Items and bytes in all queues, for stats and metrics. Changed only under the
    /// queue writer lock; read without it.
    queue_totals: Arc<QueueTotals>,
    /// Added to every id sled generates (see `meta/id_base`).
    id_base: u64,
    /// Where staged items went (see [`staging`]).
    handoff_stats: Arc<HandOffStats>,
}

/// Items and stored bytes in all device queues (receipts included).
#[derive(Debug, Default)]
pub struct QueueTotals {
    pub items: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
}

impl QueueTotals {
    fn add(&self, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.items.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes as u64, Relaxed);
    }

    fn remove(&self, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = self
            .items
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
        let _ = self
            .bytes
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(bytes as u64)));
    }
}

/// What the queue writer lock guards.
#[derive(Default)]
struct QueueState {
    /// Items per device queue (staged ones included), for quotas. Exact: only code
    /// holding the writer lock changes a queue.
    lens: HashMap<layout::DeviceKey, u64>,
    /// Items held in memory before they are written (see [`staging`]).
    staged: staging::Staging,
}

/// A device as the rest of the node refers to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceRef {
    pub account_id: u64,
    pub device_id: u32,
}

impl DeviceRef {
    /// The device's address, the prefix of its keys in per-device trees.
    pub fn key(self) -> layout::DeviceKey {
        layout::device(self.account_id, self.device_id)
    }
}

/// A device that is being registered.
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct NewDevice {
    pub key_id: KeyId,
    pub public_key: Vec<u8>,
}

/// The verdict on a guessed code, given by the caller (the store does not know codes).
#[derive(Debug, Clone)]
pub enum Judgement<E> {
    /// The code is right: consume it and register the device.
    Accept,
    /// The code is refused with `error`; the pending record becomes `update`
    /// (`None` deletes it). The update is committed although the guess failed.
    Reject {
        update: Option<CodeRecord>,
        error: E,
    },
}

/// What a verification did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyOutcome<E> {
    Registered {
        device: DeviceRef,
        /// True when the number had an account, which now belongs to this device.
        took_over: bool,
        /// Devices that were signed out because the account moved.
        signed_out: Vec<DeviceRef>,
        /// The device keys of those devices, other than the registering key itself, so
        /// their live connections can be closed.
        revoked_keys: Vec<KeyId>,
        /// The discovery index entry written: the key version and the PRF value.
        indexed: (u32, Prf),
    },
    Rejected(E),
    NoCode,
}

/// A device together with its account's number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub device: DeviceRef,
    pub number: String,
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// Milliseconds since the Unix epoch, for the few store operations that stamp a
/// time themselves (the others are given the caller's clock), and for the cluster's
/// engines, which are storage too.
pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn be_u64(bytes: &[u8], what: &str) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(bytes.try_into().map_err(|_| {
        StoreError::Corrupt(format!("{what} is not 8 bytes"))
    })?))
}

fn discovery_error(e: crate::discovery::DiscoveryError) -> StoreError {
    StoreError::Corrupt(format!("discovery: {e}"))
}

/// The discovery key from `meta`, made (version 1) on first use.
fn load_or_make_discovery_key(meta: &sled::Tree) -> Result<DiscoveryKey, StoreError> {
    if let (Some(bytes), Some(version)) = (
        meta.get("discovery_key")?,
        meta.get("discovery_key_version")?,
    ) {
        let version = u32::from_be_bytes(version.as_ref().try_into().map_err(|_| {
            StoreError::Corrupt("meta/discovery_key_version is not 4 bytes".into())
        })?);
        return DiscoveryKey::from_bytes(&bytes, version).map_err(discovery_error);
    }
    let key = DiscoveryKey::generate(1).map_err(discovery_error)?;
    meta.insert("discovery_key", key.to_bytes())?;
    meta.insert("discovery_key_version", &1u32.to_be_bytes())?;
    Ok(key)
}

/// The queue totals a clean shutdown saved ([`Store::save_queue_totals`]), taken out
/// of `meta` (durably, so that a crash before the next clean shutdown makes the next
/// open count again); or, after a crash or a run that saved none, one pass over the
/// queues. Nobody writes yet.
fn load_queue_totals(db: &sled::Db, trees: &Trees) -> Result<QueueTotals, StoreError> {
    if let Some(saved) = trees.meta.remove("queue_totals")? {
        db.flush()?;
        if let (Some(items), Some(bytes)) = (saved.get(..8), saved.get(8..16)) {
            let totals = QueueTotals::default();
            totals.items.store(
                be_u64(items, "meta/queue_totals")?,
                std::sync::atomic::Ordering::Relaxed,
            );
            totals.bytes.store(
                be_u64(bytes, "meta/queue_totals")?,
                std::sync::atomic::Ordering::Relaxed,
            );
            return Ok(totals);
        }
    }
    let totals = QueueTotals::default();
    for value in trees.queue.iter().values() {
        totals.add(value?.len());
    }
    Ok(totals)
}

/// Opens sled in `dir`. sled lets go of its file lock only when its background flusher
/// notices the last handle is gone (up to its 500 ms flush interval), so a database
/// closed a moment ago in this same process (an in-process restart, a test) may still
/// be locked: retry for a bounded time. Another process holding it still fails.
///
/// sled's default segment size (512 KiB) is kept on purpose: larger segments halve the
/// disk space, but a node whose disk filled up stays full after everything is
/// acknowledged (ARCHITECTURE.md, "Storage layout").
fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match sled::Config::new().path(dir).open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return Ok(other?),
        }
    }
}

impl Store {
    /// Opens (or creates) the database in `dir`, with power-loss sync on.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, true)
    }

    /// Opens (or creates) the database in `dir`. With `power_loss_sync`, every
    /// [`Store::flush`] ends with an `fdatasync` of sled's log, so a flushed write
    /// survives a power cut, not only a crash of the process.
    pub fn open_with(dir: &Path, power_loss_sync: bool) -> Result<Store, StoreError> {
        let db = open_db(dir)?;
        let log_file = if power_loss_sync {
            let file = std::fs::File::open(dir.join("db"))?;
            // The files sled just created must be reachable after a power cut too.
            file.sync_all()?;
            std::fs::File::open(dir)?.sync_all()?;
            Some(Arc::new(file))
        } else {
            None
        };
        let trees = Trees {
            meta: db.open_tree("meta")?,
            number_account: db.open_tree("number_account")?,
            account: db.open_tree("account")?,
            device_key: db.open_tree("device_key")?,
            number_code: db.open_tree("number_code")?,
            device_keys: db.open_tree("device_keys")?,
            one_time_key: db.open_tree("one_time_key")?,
            queue: db.open_tree("queue")?,
            sent_message: db.open_tree("sent_message")?,
            discovery_index: db.open_tree("discovery_index")?,
            code_sends: db.open_tree("code_sends")?,
            registration_lock: db.open_tree("registration_lock")?,
            account_seen: db.open_tree("account_seen")?,
            device_name: db.open_tree("device_name")?,
            device_seen: db.open_tree("device_seen")?,
            device_vouch: db.open_tree("device_vouch")?,
            group: db.open_tree("group")?,
            account_group: db.open_tree("account_group")?,
            group_body: db.open_tree("group_body")?,
            group_receipt: db.open_tree("group_receipt")?,
            profile: db.open_tree("profile")?,
            blob: db.open_tree("blob")?,
            account_blob: db.open_tree("account_blob")?,
            removed_key: db.open_tree("removed_key")?,
        };
        let discovery = Arc::new(std::sync::RwLock::new(Arc::new(
            load_or_make_discovery_key(&trees.meta)?,
        )));
        let queue_totals = load_queue_totals(&db, &trees)?;
        let id_base = match trees.meta.get("id_base")? {
            Some(v) => be_u64(&v, "meta/id_base")?,
            None => 0,
        };
        let store = Store {
            id_base,
            db,
            trees,
            queue_writer: Arc::default(),
            log_file,
            discovery,
            gate: Arc::default(),
            queue_totals: Arc::new(queue_totals),
            handoff_stats: Arc::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Brings an older schema up to [`SCHEMA_VERSION`], one rung at a time.
    fn migrate(&self) -> Result<(), StoreError> {
        let found =
            match self.trees.meta.get("schema_version")? {
                None => 0,
                Some(v) => u32::from_be_bytes(v.as_ref().try_into().map_err(|_| {
                    StoreError::Corrupt("meta/schema_version is not 4 bytes".into())
                })?),
            };
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew { found });
        }
        // Rung 0 → 1: a new database; nothing to convert.
        // Rung 1 → 2: the messaging trees (`device_keys`, `one_time_key`, `queue`,
        // `sent_message`) appear empty; nothing to convert, but a build that knows
        // only schema 1 must not open a database that holds queues it would ignore.
        // Rung 2 → 3: the discovery index is built for the accounts already there.
        // Rung 3 → 4: `code_sends`, `registration_lock` and `account_seen` appear
        // empty (limits start counting now; accounts count as seen once they are).
        // Rung 4 → 5: `meta/id_base` may appear (a restore writes it); nothing to
        // convert, but an older build would ignore it and reuse restored ids.
        // Rung 5 → 6: `device_name`, `device_seen`, `removed_key`, `device_vouch`, `group`, `account_group` and `group_body` appear empty (every
        // account so far has one device, its primary; devices count as seen once
        // they are). An older build would ignore linked devices' names and lapses.
        // Rung 6 → 7: `group_receipt` appears empty (group messages sent before count
        // no deliveries).
        // Rung 7 → 8: `profile`, `blob` and `account_blob` appear empty; queue values may carry an expiry of
        // their own (the top bit of their time), which an older build would misread.
        // A rotation cut short (see `rotate_discovery_key`) left the index partial.
        if (1..3).contains(&found) || self.trees.meta.get("discovery_rebuild")?.is_some() {
            self.rebuild_discovery_index(&self.discovery_key())?;
            self.trees.meta.remove("discovery_rebuild")?;
        }
        if found < SCHEMA_VERSION {
            self.trees
                .meta
                .insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
            self.db.flush()?;
        }
        Ok(())
    }

    /// A fresh id (queue seqs, upload seqs, account ids): larger than every id drawn
    /// before, on this database or on the one it was restored from.
    fn next_id(&self) -> Result<u64, StoreError> {
        self.id_base
            .checked_add(self.db.generate_id()?)
            .ok_or_else(|| StoreError::Corrupt("the id space is exhausted".into()))
    }

    /// Holds off a backup while this write runs (see `Store::gate`).
    fn writing(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        // The guarded data is `()`: a poisoned lock protects nothing broken.
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Saves the queue totals in `meta`, so the next open need not count the queues.
    /// Call it last, once nothing writes any more (a clean shutdown); the next open
    /// takes them out again.
    pub fn save_queue_totals(&self) -> Result<(), StoreError> {
        let _gate = self.writing();
        let (items, bytes) = self.queue_totals();
        let mut value = items.to_be_bytes().to_vec();
        value.extend_from_slice(&bytes.to_be_bytes());
        self.trees.meta.insert("queue_totals", value)?;
        Ok(())
    }

    /// Items and bytes queued for all devices now.
    pub fn queue_totals(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.queue_totals.items.load(Relaxed),
            self.queue_totals.bytes.load(Relaxed),
        )
    }

    /// The schema version on disk.
    pub fn schema_version(&self) -> u32 {
        SCHEMA_VERSION
    }

    /// A 32-byte random secret kept in `meta` under `name`, made on first use.
    pub fn secret(&self, name: &str) -> Result<[u8; 32], StoreError> {
        let mut fresh = [0u8; 32];
        rand::rngs::SysRng
            .try_fill_bytes(&mut fresh)
            .map_err(|e| StoreError::Corrupt(format!("the system random generator failed: {e}")))?;
        // compare_and_swap makes two racing first uses agree on one secret.
        let _ = self
            .trees
            .meta
            .compare_and_swap(name, None as Option<&[u8]>, Some(&fresh[..]))?;
        let stored = self
            .trees
            .meta
            .get(name)?
            .ok_or_else(|| StoreError::Corrupt(format!("meta/{name} vanished")))?;
        stored
            .as_ref()
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("meta/{name} is not 32 bytes")))
    }

    /// The current discovery key.
    pub fn discovery_key(&self) -> Arc<DiscoveryKey> {
        match self.discovery.read() {
            Ok(key) => key.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Which of `prfs` are indexed, when they are PRF values under discovery key
    /// version `key_version`; `Err(current version)` when the key is another one (it
    /// was rotated: the client must evaluate its numbers again). Holds the key's lock
    /// across the lookups, so a rotation, which holds it while it rebuilds the index,
    /// is never seen half done.
    pub fn discovery_resolve(
        &self,
        key_version: u32,
        prfs: &[Prf],
    ) -> Result<Result<Vec<bool>, u32>, StoreError> {
        let key = self.discovery.read().unwrap_or_else(|p| p.into_inner());
        if key.version() != key_version {
            return Ok(Err(key.version()));
        }
        prfs.iter()
            .map(|p| self.discovery_lookup(p).map(|a| a.is_some()))
            .collect::<Result<Vec<_>, _>>()
            .map(Ok)
    }

    /// The account indexed under `prf`, if any (whatever key it is under: see
    /// [`Store::discovery_resolve`]).
    pub fn discovery_lookup(&self, prf: &Prf) -> Result<Option<u64>, StoreError> {
        match self.trees.discovery_index.get(prf)? {
            None => Ok(None),
            Some(v) => {
                Ok(Some(layout::parse_account(&v).ok_or_else(|| {
                    StoreError::Corrupt("discovery_index value".into())
                })?))
            }
        }
    }

    /// The discovery key version and the filter key of every index entry under it, in
    /// index order (read under the key's lock: never half a rotation).
    pub fn discovery_filter_keys(&self) -> Result<(u32, Vec<u64>), StoreError> {
        let key = self.discovery.read().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(self.trees.discovery_index.len());
        for entry in self.trees.discovery_index.iter().keys() {
            let key = entry?;
            let prf: Prf = key
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::Corrupt("discovery_index key length".into()))?;
            out.push(crate::discovery::filter_key(&prf));
        }
        Ok((key.version(), out))
    }

    /// Replaces the discovery key with a fresh one (version + 1) and rebuilds the index
    /// under it. Holds the write gate exclusively, so no registration or deletion
    /// computes an index entry under the old key meanwhile; a running node may call it.
    /// A crash midway leaves `meta/discovery_rebuild` set, and the next open rebuilds.
    /// Returns the new version.
    pub fn rotate_discovery_key(&self) -> Result<u32, StoreError> {
        let _exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
        // Held until the index is rebuilt: lookups wait, then see the new version.
        let mut current = self.discovery.write().unwrap_or_else(|p| p.into_inner());
        let version = current.version() + 1;
        let key = Arc::new(DiscoveryKey::generate(version).map_err(discovery_error)?);
        self.trees.meta.insert("discovery_rebuild", &[1u8])?;
        self.trees.meta.insert("discovery_key", key.to_bytes())?;
        self.trees
            .meta
            .insert("discovery_key_version", &version.to_be_bytes())?;
        *current = key.clone();
        self.rebuild_discovery_index(&key)?;
        self.trees.meta.remove("discovery_rebuild")?;
        self.flush_blocking()?;
        Ok(version)
    }

    /// Writes the index afresh from `number_account`, under `key`.
    fn rebuild_discovery_index(&self, key: &DiscoveryKey) -> Result<(), StoreError> {
        self.trees.discovery_index.clear()?;
        for entry in self.trees.number_account.iter() {
            let (number, account) = entry?;
            let number = std::str::from_utf8(&number)
                .map_err(|_| StoreError::Corrupt("number_account key is not UTF-8".into()))?;
            let prf = key.prf(number).map_err(discovery_error)?;
            self.trees.discovery_index.insert(prf, account)?;
        }
        Ok(())
    }

    /// The device whose key id is `key_id`, with its number.
    pub fn device_by_key(&self, key_id: &KeyId) -> Result<Option<DeviceIdentity>, StoreError> {
        let Some(bytes) = self.trees.device_key.get(key_id)? else {
            return Ok(None);
        };
        let (account_id, device_id) = layout::parse_device(&bytes)
            .ok_or_else(|| StoreError::Corrupt("device_key value".into()))?;
        let Some(account) = self.account(account_id)? else {
            return Ok(None);
        };
        Ok(Some(DeviceIdentity {
            device: DeviceRef {
                account_id,
                device_id,
            },
            number: account.number,
        }))
    }

    /// The account `id`.
    pub fn account(&self, id: u64) -> Result<Option<AccountRecord>, StoreError> {
        match self.trees.account.get(layout::account(id))? {
            Some(bytes) => Ok(Some(records::decode(&bytes, "account")?)),
            None => Ok(None),
        }
    }

    /// The account of `number`.
    pub fn account_by_number(
        &self,
        number: &str,
    ) -> Result<Option<(u64, AccountRecord)>, StoreError> {
        let Some(id) = self.trees.number_account.get(layout::number(number))? else {
            return Ok(None);
        };
        let id = layout::parse_account(&id)
            .ok_or_else(|| StoreError::Corrupt("number_account value".into()))?;
        Ok(self.account(id)?.map(|a| (id, a)))
    }

    /// Bytes of the database on disk, as sled counts them (0 if it cannot tell).
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// The number of accounts.
    pub fn account_count(&self) -> usize {
        self.trees.number_account.len()
    }

    /// Makes every write so far durable: against a process crash always, and against a
    /// power cut when the store was opened with power-loss sync. Waits without
    /// blocking the async runtime: the flush runs on tokio's blocking pool. (sled's own
    /// `flush_async` runs on sled's thread pool, which spawns threads under load and
    /// was seen to hang with several flushes in flight.)
    pub async fn flush(&self) -> Result<(), StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.flush_blocking())
            .await
            .map_err(|e| StoreError::Corrupt(format!("flush task failed: {e}")))?
    }

    /// Blocking variant of [`Store::flush`], for shutdown and tools.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        if let Some(file) = &self.log_file {
            file.sync_data()?;
        }
        Ok(())
    }
}

/// A `Store` call for the async storage traits (`keydir`, `profiles`, `groups`):
/// sled's calls block, so each runs on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    store: &Store,
    op: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || op(&store))
        .await
        .map_err(|e| StoreError::Corrupt(format!("a storage task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::registration::tests::{code, device};
    use super::*;

    #[test]
    fn reopen_keeps_data_and_secret_and_refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let secret = {
            let store = Store::open(dir.path()).unwrap();
            store
                .replace_code::<()>("+14155550100", |_| Ok(code(5)))
                .unwrap()
                .unwrap();
            store
                .verify_and_register::<()>("+14155550100", &device(3), 1, |_| Judgement::Accept)
                .unwrap();
            let s = store.secret("code_hash_key").unwrap();
            assert_eq!(store.secret("code_hash_key").unwrap(), s);
            store.flush_blocking().unwrap();
            s
        };
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.secret("code_hash_key").unwrap(), secret);
            assert!(store.device_by_key(&[3; 32]).unwrap().is_some());
            store
                .trees
                .meta
                .insert("schema_version", &99u32.to_be_bytes())
                .unwrap();
            store.flush_blocking().unwrap();
        }
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::TooNew { found: 99 })
        ));
    }
}
