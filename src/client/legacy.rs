//! Homes from before the home database: moved into it once, when it is made.
//!
//! Those homes kept the Olm state in `e2e.state` (XChaCha20-Poly1305 under
//! `e2e.key`: format byte 1, nonce, sealed JSON of [`State`]), the address book in
//! `contacts.json` and the discovery filter in `discovery.filter`. [`import`] reads
//! them inside the transaction that creates the schema; [`remove`] deletes them after
//! that transaction committed, so a crash in between leaves both copies and the next
//! open (which finds the schema there) only removes the old files.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use chacha20poly1305::aead::Aead;
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use serde::Deserialize;
use vodozemac::olm::{AccountPickle, SessionPickle};

use super::db::{DbError, Tx};
use super::e2e::{KnownIdentity, Olm};

const STATE_FILE: &str = "e2e.state";
const BOOK_FILE: &str = "contacts.json";
const FILTER_FILE: &str = "discovery.filter";
const STATE_VERSION: u8 = 1;

#[derive(Deserialize)]
struct Contact {
    identity: Option<KnownIdentity>,
    sessions: BTreeMap<u32, Vec<SessionPickle>>,
}

#[derive(Deserialize)]
struct State {
    account: AccountPickle,
    published_for: Option<(u64, u32)>,
    contacts: BTreeMap<String, Contact>,
    /// `"<sender>/<hex id>"` of messages received lately.
    seen: VecDeque<String>,
}

/// Whether `dir` holds Olm state of the old format.
pub fn has_state(dir: &Path) -> bool {
    dir.join(STATE_FILE).exists()
}

fn damaged(path: &Path, reason: impl Into<String>) -> DbError {
    DbError::Damaged {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Moves what the old files of `dir` hold into the database (inside `tx`).
pub fn import(tx: &Tx<'_>, dir: &Path) -> Result<(), DbError> {
    let state_path = dir.join(STATE_FILE);
    if let Some(bytes) = read(&state_path)? {
        // The old state is sealed under the home key itself.
        let state = decrypt_state(tx.home_key(), &bytes).map_err(|r| damaged(&state_path, r))?;
        let now = super::now_ms();
        let mut olm = Olm::new(tx);
        let contacts = state
            .contacts
            .into_iter()
            .map(|(number, c)| (number, c.identity, c.sessions.into_iter().collect()))
            .collect();
        olm.import_legacy(state.account, state.published_for, contacts)
            .and_then(|()| olm.flush())
            .map_err(|e| damaged(&state_path, e.to_string()))?;
        for seen in state.seen {
            let Some((from, id)) = seen.split_once('/') else {
                continue;
            };
            if let Ok(id) = hex::decode(id) {
                tx.see(&super::messenger::seen_key(tx, from, &id), now)?;
            }
        }
    }
    let book_path = dir.join(BOOK_FILE);
    if let Some(bytes) = read(&book_path)? {
        let book: super::contacts::Book =
            serde_json::from_slice(&bytes).map_err(|e| damaged(&book_path, e.to_string()))?;
        book.store(tx)
            .map_err(|e| damaged(&book_path, e.to_string()))?;
    }
    let filter_path = dir.join(FILTER_FILE);
    if let Some(bytes) = read(&filter_path)? {
        super::contacts::store_filter(tx, &bytes)?;
    }
    Ok(())
}

/// Deletes the old files (their contents are in the database).
pub fn remove(dir: &Path) {
    for name in [STATE_FILE, BOOK_FILE, FILTER_FILE] {
        let _ = std::fs::remove_file(dir.join(name));
    }
}

fn read(path: &Path) -> Result<Option<Vec<u8>>, DbError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DbError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn decrypt_state(key: &[u8; 32], bytes: &[u8]) -> Result<State, String> {
    let (&version, rest) = bytes.split_first().ok_or("empty file")?;
    if version != STATE_VERSION {
        return Err(format!("unknown format version {version}"));
    }
    let (nonce, sealed) = rest
        .split_first_chunk::<24>()
        .ok_or("shorter than its nonce")?;
    let cipher = XChaCha20Poly1305::new(&(*key).into());
    let plain = zeroize::Zeroizing::new(
        cipher
            .decrypt(&XNonce::from(*nonce), sealed)
            .map_err(|_| "wrong key or damaged file (authentication failed)".to_string())?,
    );
    serde_json::from_slice(&plain).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use chacha20poly1305::aead::Aead;
    use serde::Serialize;
    use vodozemac::olm::Account;

    use super::*;
    use crate::client::db::{HomeDb, KEY_FILE};

    #[derive(Serialize)]
    struct OldState<'a> {
        account: AccountPickle,
        published_for: Option<(u64, u32)>,
        contacts: BTreeMap<String, serde_json::Value>,
        seen: &'a [&'a str],
    }

    #[test]
    fn an_old_home_moves_into_the_database_keeping_its_identity_and_book() {
        let dir = tempfile::tempdir().unwrap();
        let key = [7u8; 32];
        std::fs::write(dir.path().join(KEY_FILE), key).unwrap();
        let account = Account::new();
        let identity = account.identity_keys();
        let mut contacts = BTreeMap::new();
        contacts.insert(
            "+14155550101".to_string(),
            serde_json::json!({
                "identity": {"curve25519": vec![3u8; 32], "ed25519": null},
                "sessions": {},
            }),
        );
        let old = OldState {
            account: account.pickle(),
            published_for: Some((1, 1)),
            contacts,
            seen: &["+14155550101/00112233445566778899aabbccddeeff"],
        };
        let json = serde_json::to_vec(&old).unwrap();
        let nonce = [1u8; 24];
        let sealed = XChaCha20Poly1305::new(&key.into())
            .encrypt(&XNonce::from(nonce), json.as_slice())
            .unwrap();
        let mut file = vec![STATE_VERSION];
        file.extend_from_slice(&nonce);
        file.extend_from_slice(&sealed);
        std::fs::write(dir.path().join(STATE_FILE), file).unwrap();
        std::fs::write(
            dir.path().join(BOOK_FILE),
            br#"{"contacts":[{"name":"Bob","number":"+14155550101","registered":true}],"key_version":null,"filter_version":null,"prf":{}}"#,
        )
        .unwrap();

        let db = HomeDb::open(dir.path(), None).unwrap();
        let keys = crate::client::e2e::identity(&db).unwrap();
        assert_eq!(keys.curve25519, identity.curve25519.to_bytes());
        assert!(crate::client::e2e::published_for(&db, (1, 1)).unwrap());
        let seen = db
            .read(|tx| {
                let id = hex::decode("00112233445566778899aabbccddeeff").unwrap();
                tx.seen(&crate::client::messenger::seen_key(tx, "+14155550101", &id))
            })
            .unwrap();
        assert!(seen, "the seen ids came along");
        let book = crate::client::contacts::Book::load(&db).unwrap();
        assert_eq!(book.contacts[0].name, "Bob");
        assert!(!dir.path().join(STATE_FILE).exists());
        assert!(!dir.path().join(BOOK_FILE).exists());
    }
}
