//! The client's address book and private contact discovery against its node.
//!
//! The book lives in the home as `contacts.json` (owner-only): each contact's name,
//! E.164 number and whether the node last said it is registered, plus the PRF value of
//! each number under the node's current discovery key, so that a re-sync evaluates
//! only new numbers. The node's membership filter is kept beside it in
//! `discovery.filter` and downloaded again only when its version changed.
//!
//! A sync blinds the numbers that have no PRF value yet, has the node evaluate them in
//! batches (each counts against the account's daily budget), unblinds them, checks
//! every PRF value against the filter locally, and asks the node about the hits only.
//! The node never sees a number; it learns which PRF values are hits, which are the
//! registered contacts (and the filter's rare false positives, which resolve to
//! "not registered").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Client, ClientError, HomeError};
use crate::discovery::{self, MembershipFilter, Prf};
use crate::fsutil;
use crate::phone::{Number, Region};
use crate::proto::messages::MAX_DISCOVERY_BATCH;

const BOOK_FILE: &str = "contacts.json";
const FILTER_FILE: &str = "discovery.filter";
/// Blinded elements per `Evaluate` request.
const EVALUATE_BATCH: usize = 256;

/// What can go wrong with the address book or a sync.
#[derive(Debug, thiserror::Error)]
pub enum ContactsError {
    /// Reading or writing the files in the home.
    #[error(transparent)]
    File(#[from] HomeError),
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

fn io(path: &Path) -> impl Fn(std::io::Error) -> ContactsError {
    let path = path.to_path_buf();
    move |source| {
        ContactsError::File(HomeError::Io {
            path: path.clone(),
            source,
        })
    }
}

fn damaged(path: PathBuf, reason: String) -> ContactsError {
    ContactsError::File(HomeError::Damaged { path, reason })
}

impl Book {
    /// The book in the home `dir` (empty when there is none yet).
    pub fn load(dir: &Path) -> Result<Book, ContactsError> {
        let path = dir.join(BOOK_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| damaged(path, e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Book::default()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Writes the book atomically, owner-only.
    pub fn save(&self, dir: &Path) -> Result<(), ContactsError> {
        fsutil::create_private_dir(dir).map_err(io(dir))?;
        let path = dir.join(BOOK_FILE);
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| damaged(path.clone(), e.to_string()))?;
        fsutil::write_private(&path, &bytes).map_err(io(&path))
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

    /// Runs discovery for every contact against the node behind `client`, and saves
    /// the book and the filter in `dir`. `progress(done, total)` is called as numbers
    /// are evaluated.
    pub async fn sync(
        &mut self,
        client: &Client,
        dir: &Path,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<SyncReport, ContactsError> {
        let mut report = SyncReport {
            contacts: self.contacts.len(),
            ..SyncReport::default()
        };
        fsutil::create_private_dir(dir).map_err(io(dir))?;
        // The filter, unless ours is current.
        let filter_path = dir.join(FILTER_FILE);
        let have = self.filter_version.filter(|_| filter_path.exists());
        let filter_bytes = match client.fetch_filter(have).await? {
            Some((version, key_version, bytes)) => {
                fsutil::write_private(&filter_path, &bytes).map_err(io(&filter_path))?;
                self.filter_version = Some(version);
                if self.key_version != Some(key_version) {
                    // The node rotated its key: every cached PRF value is stale.
                    self.prf.clear();
                    self.key_version = Some(key_version);
                }
                report.filter_downloaded = true;
                bytes
            }
            None => std::fs::read(&filter_path).map_err(io(&filter_path))?,
        };
        report.filter_bytes = filter_bytes.len();
        let filter = MembershipFilter::decode(&filter_bytes)
            .map_err(|e| ContactsError::Discovery(e.to_string()))?;

        // PRF values for the numbers that have none yet.
        let mut todo: Vec<String> = self
            .contacts
            .iter()
            .map(|c| c.number.clone())
            .filter(|n| !self.prf.contains_key(n))
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
            let (key_version, evaluated, left) = client
                .evaluate(blinded.iter().map(|b| b.element).collect())
                .await?;
            if Some(key_version) != self.key_version {
                return Err(ContactsError::Discovery(
                    "the node's discovery key changed during the sync; run it again".into(),
                ));
            }
            for ((number, b), e) in batch.iter().zip(&blinded).zip(&evaluated) {
                let prf = b
                    .finalize(number, e)
                    .map_err(|e| ContactsError::Discovery(e.to_string()))?;
                self.prf.insert(number.clone(), hex::encode(prf));
            }
            report.evaluated += batch.len();
            report.budget_left = Some(left);
            progress((i * EVALUATE_BATCH + batch.len()).min(total), total);
            // Keep what was paid for, even if a later batch fails.
            self.save(dir)?;
        }

        // Check every contact locally; ask the node about the hits only. (The book
        // holds each number once: `import` skips numbers it has.)
        let mut hits: Vec<(String, Prf)> = Vec::new();
        for c in &self.contacts {
            let prf = self.cached_prf(&c.number)?;
            if filter.contains(&prf) {
                hits.push((c.number.clone(), prf));
            }
        }
        let mut registered = std::collections::HashSet::new();
        for batch in hits.chunks(MAX_DISCOVERY_BATCH) {
            let answers = client
                .resolve(batch.iter().map(|(_, p)| *p).collect())
                .await?;
            for ((number, _), yes) in batch.iter().zip(answers) {
                if yes {
                    registered.insert(number.clone());
                }
            }
        }
        report.resolved = hits.len();
        for c in &mut self.contacts {
            let yes = registered.contains(&c.number);
            c.registered = Some(yes);
            report.registered += usize::from(yes);
        }
        self.save(dir)?;
        Ok(report)
    }

    fn cached_prf(&self, number: &str) -> Result<Prf, ContactsError> {
        let missing = || {
            damaged(
                PathBuf::from(BOOK_FILE),
                format!("no valid PRF value for {number}"),
            )
        };
        let hex = self.prf.get(number).ok_or_else(missing)?;
        hex::decode(hex)
            .ok()
            .and_then(|b| Prf::try_from(b.as_slice()).ok())
            .ok_or_else(missing)
    }
}
