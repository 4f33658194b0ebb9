//! The client's address book and private contact discovery against its node.
//!
//! The book lives in the home database (`kv/book`, sealed): each contact's name,
//! E.164 number and whether the node last said it is registered, plus the PRF value of
//! each number under the node's current discovery key, so that a re-sync evaluates
//! only new numbers. The node's membership filter is kept beside it (`kv/filter`) and
//! downloaded again only when its version changed. A sync talks to the node between
//! transactions, so each of its writes reloads the book and merges what it learned:
//! contacts imported meanwhile by another process are kept.
//!
//! A sync blinds the numbers that have no PRF value yet, has the node evaluate them in
//! batches (each counts against the account's daily budget), unblinds them, checks
//! every PRF value against the filter locally, and asks the node about the hits only.
//! The node never sees a number; it learns which PRF values are hits, which are the
//! registered contacts (and the filter's rare false positives, which resolve to
//! "not registered").

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::db::{DbError, HomeDb, Table, Tx};
use super::{Client, ClientError};
use crate::discovery::{self, MembershipFilter, Prf};
use crate::phone::{Number, Region};
use crate::proto::messages::MAX_DISCOVERY_BATCH;

const BOOK_KEY: &[u8] = b"book";
const FILTER_KEY: &[u8] = b"filter";
/// Blinded elements per `Evaluate` request.
const EVALUATE_BATCH: usize = 256;

/// What can go wrong with the address book or a sync.
#[derive(Debug, thiserror::Error)]
pub enum ContactsError {
    /// Reading or writing the home database.
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("the address book in the home database is damaged: {0}")]
    Damaged(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the node's discovery answer is unusable: {0}")]
    Discovery(String),
}

/// One contact: a name and a number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    pub name: String,
    /// E.164.
    pub number: String,
    /// What the last sync found; `None` before any sync.
    pub registered: Option<bool>,
}

/// The address book.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Book {
    pub contacts: Vec<Contact>,
    /// The discovery key version the cached PRF values belong to.
    key_version: Option<u32>,
    /// The version of the filter saved beside the book.
    filter_version: Option<u64>,
    /// E.164 number → hex PRF value under `key_version`.
    prf: BTreeMap<String, String>,
}

/// What an import did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Numbers read from the file.
    pub read: usize,
    /// New contacts added to the book.
    pub added: usize,
    /// Numbers already in the book.
    pub duplicates: usize,
    /// What was skipped, and why (one line each).
    pub skipped: Vec<String>,
}

/// What a sync did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub contacts: usize,
    /// Numbers the node evaluated this time (the rest came from the cache).
    pub evaluated: usize,
    /// Whether the filter was downloaded (it changed).
    pub filter_downloaded: bool,
    pub filter_bytes: usize,
    /// Filter hits asked about.
    pub resolved: usize,
    pub registered: usize,
    /// Evaluations left in today's budget, when the node said.
    pub budget_left: Option<u32>,
}

impl Book {
    /// The book (empty when there is none yet).
    pub fn load(db: &HomeDb) -> Result<Book, ContactsError> {
        db.read(Book::load_in)
    }

    /// The book as `tx` sees it.
    pub fn load_in(tx: &Tx<'_>) -> Result<Book, ContactsError> {
        match tx.get(Table::Kv, BOOK_KEY)? {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| ContactsError::Damaged(e.to_string()))
            }
            None => Ok(Book::default()),
        }
    }

    /// Writes the book in `tx`.
    pub fn store(&self, tx: &Tx<'_>) -> Result<(), ContactsError> {
        let bytes = serde_json::to_vec(self).map_err(|e| ContactsError::Damaged(e.to_string()))?;
        Ok(tx.put(Table::Kv, BOOK_KEY, &bytes)?)
    }

    /// Imports an address-book file into the stored book, in one transaction.
    pub fn import_into(
        db: &HomeDb,
        text: &str,
        region: Option<Region>,
    ) -> Result<ImportReport, ContactsError> {
        db.write(|tx| {
            let mut book = Book::load_in(tx)?;
            let report = book.import(text, region);
            book.store(tx)?;
            Ok(report)
        })
    }

    /// Adds the entries of an address-book file, normalising each number to E.164
    /// (national forms are read in `region`). A number already in the book is not
    /// added twice.
    pub fn import(&mut self, text: &str, region: Option<Region>) -> ImportReport {
        let parsed = super::import::parse(text);
        let mut report = ImportReport {
            read: parsed.entries.len(),
            skipped: parsed.skipped,
            ..ImportReport::default()
        };
        for entry in parsed.entries {
            let number = match Number::parse(&entry.number, region) {
                Ok(n) => n,
                Err(e) => {
                    let who = if entry.name.is_empty() {
                        "a contact".to_string()
                    } else {
                        entry.name.clone()
                    };
                    report.skipped.push(format!("{who}: {e}"));
                    continue;
                }
            };
            if self.contacts.iter().any(|c| c.number == number.as_str()) {
                report.duplicates += 1;
                continue;
            }
            let name = if entry.name.is_empty() {
                number.display_international()
            } else {
                entry.name
            };
            self.contacts.push(Contact {
                name,
                number: number.to_string(),
                registered: None,
            });
            report.added += 1;
        }
        report
    }

    /// Contacts whose name is `name` (case-insensitive).
    pub fn by_name(&self, name: &str) -> Vec<&Contact> {
        let wanted = name.trim().to_lowercase();
        self.contacts
            .iter()
            .filter(|c| c.name.to_lowercase() == wanted)
            .collect()
    }

    /// Runs discovery for every contact against the node behind `client`, saving
    /// what it learns in `db` as it goes. `progress(done, total)` is called as numbers
    /// are evaluated. A key rotation or a filter rebuilt in the middle starts it over
    /// (a bounded number of times).
    pub async fn sync(
        db: &HomeDb,
        client: &Client,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<SyncReport, ContactsError> {
        let mut last = None;
        for _ in 0..3 {
            match Book::sync_once(db, client, &mut progress).await {
                Ok(Some(report)) => return Ok(report),
                Ok(None) => last = Some("the node's discovery key or filter kept changing"),
                Err(e) => return Err(e),
            }
        }
        Err(ContactsError::Discovery(format!(
            "{}; run the sync again",
            last.unwrap_or("the sync did not finish")
        )))
    }

    /// One pass of [`Book::sync`]; `None` when the node's key or filter changed under
    /// it and it must start over.
    async fn sync_once(
        db: &HomeDb,
        client: &Client,
        progress: &mut impl FnMut(usize, usize),
    ) -> Result<Option<SyncReport>, ContactsError> {
        let snapshot = Book::load(db)?;
        let mut report = SyncReport::default();
        // The filter, unless ours is current.
        let stored_filter = db.read(|tx| tx.get(Table::Kv, FILTER_KEY))?;
        let have = snapshot.filter_version.filter(|_| stored_filter.is_some());
        let filter_bytes = match client.fetch_filter(have).await? {
            Some((version, key_version, bytes)) => {
                db.write(|tx| {
                    store_filter(tx, &bytes)?;
                    let mut book = Book::load_in(tx)?;
                    book.filter_version = Some(version);
                    if book.key_version != Some(key_version) {
                        // The node rotated its key: every cached PRF value is stale.
                        book.prf.clear();
                        book.key_version = Some(key_version);
                    }
                    book.store(tx)
                })?;
                report.filter_downloaded = true;
                bytes
            }
            None => stored_filter
                .map(|b| b.to_vec())
                .ok_or_else(|| ContactsError::Damaged("the filter is gone".into()))?,
        };
        report.filter_bytes = filter_bytes.len();
        let filter = MembershipFilter::decode(&filter_bytes)
            .map_err(|e| ContactsError::Discovery(e.to_string()))?;
        let book = Book::load(db)?;
        let Some(key_version) = book.key_version else {
            return Err(ContactsError::Damaged("no discovery key version".into()));
        };
        let filter_version = book.filter_version.unwrap_or_default();
        // Who registered since the filter was built (a node from before the delta
        // answers `Malformed`: then there is none to check).
        let delta: HashSet<u64> = match client.fetch_filter_delta(filter_version).await {
            Ok((v, kv, keys)) if v == filter_version && kv == key_version => {
                keys.into_iter().collect()
            }
            Ok(_) => return Ok(None),
            Err(ClientError::Node(e)) if e.kind == crate::proto::ErrorKind::Malformed => {
                HashSet::new()
            }
            Err(e) => return Err(e.into()),
        };

        // PRF values for the numbers that have none yet.
        let mut todo: Vec<String> = book
            .contacts
            .iter()
            .map(|c| c.number.clone())
            .filter(|n| !book.prf.contains_key(n))
            .collect();
        todo.sort();
        todo.dedup();
        let total = todo.len();
        progress(0, total);
        for (i, batch) in todo
            .chunks(EVALUATE_BATCH.min(MAX_DISCOVERY_BATCH))
            .enumerate()
        {
            let blinded = batch
                .iter()
                .map(|n| discovery::blind(n))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ContactsError::Discovery(e.to_string()))?;
            let (evaluated_version, evaluated, left) = client
                .evaluate(blinded.iter().map(|b| b.element).collect())
                .await?;
            if evaluated_version != key_version {
                return Ok(None);
            }
            let mut prfs = Vec::with_capacity(batch.len());
            for ((number, b), e) in batch.iter().zip(&blinded).zip(&evaluated) {
                let prf = b
                    .finalize(number, e)
                    .map_err(|e| ContactsError::Discovery(e.to_string()))?;
                prfs.push((number.clone(), hex::encode(prf)));
            }
            report.evaluated += batch.len();
            report.budget_left = Some(left);
            progress((i * EVALUATE_BATCH + batch.len()).min(total), total);
            // Keep what was paid for, even if a later batch fails.
            db.write(|tx| {
                let mut book = Book::load_in(tx)?;
                if book.key_version == Some(key_version) {
                    book.prf.extend(prfs);
                    book.store(tx)?;
                }
                Ok::<_, ContactsError>(())
            })?;
        }

        // Check every contact locally, against the filter and the delta; ask the node
        // about the hits only. (The book holds each number once: `import` skips
        // numbers it has.)
        let book = Book::load(db)?;
        let mut hits: Vec<(String, Prf)> = Vec::new();
        let mut checked = HashSet::new();
        for c in &book.contacts {
            let Some(prf) = book.cached_prf(&c.number)? else {
                continue;
            };
            checked.insert(c.number.clone());
            if filter.contains(&prf) || delta.contains(&discovery::filter_key(&prf)) {
                hits.push((c.number.clone(), prf));
            }
        }
        let mut registered = HashSet::new();
        for batch in hits.chunks(MAX_DISCOVERY_BATCH) {
            let answers = match client
                .resolve_under(key_version, batch.iter().map(|(_, p)| *p).collect())
                .await
            {
                Ok(a) => a,
                Err(ClientError::Node(e))
                    if matches!(e.kind, crate::proto::ErrorKind::DiscoveryKeyChanged { .. }) =>
                {
                    // Rotated in the middle: every PRF value is stale.
                    db.write(|tx| {
                        let mut book = Book::load_in(tx)?;
                        book.prf.clear();
                        book.filter_version = None;
                        book.store(tx)
                    })?;
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            };
            for ((number, _), yes) in batch.iter().zip(answers) {
                if yes {
                    registered.insert(number.clone());
                }
            }
        }
        report.resolved = hits.len();
        db.write(|tx| {
            let mut book = Book::load_in(tx)?;
            for c in &mut book.contacts {
                if checked.contains(&c.number) {
                    let yes = registered.contains(&c.number);
                    c.registered = Some(yes);
                    report.registered += usize::from(yes);
                }
            }
            report.contacts = book.contacts.len();
            book.store(tx)
        })?;
        Ok(Some(report))
    }

    /// The cached PRF value of `number` (`None` for a contact added after the
    /// evaluation, by another process).
    fn cached_prf(&self, number: &str) -> Result<Option<Prf>, ContactsError> {
        let Some(hex) = self.prf.get(number) else {
            return Ok(None);
        };
        hex::decode(hex)
            .ok()
            .and_then(|b| Prf::try_from(b.as_slice()).ok())
            .map(Some)
            .ok_or_else(|| ContactsError::Damaged(format!("no valid PRF value for {number}")))
    }
}

/// Stores the node's membership filter in `tx`.
pub fn store_filter(tx: &Tx<'_>, bytes: &[u8]) -> Result<(), DbError> {
    tx.put(Table::Kv, FILTER_KEY, bytes)
}
