//! Groups on the client side: each group's key (shared by its members over their Olm
//! sessions), the name it seals, and the local list of groups this device knows.
//!
//! The node keeps the membership; the group's `meta` on the node is the name sealed
//! with the group key (XChaCha20-Poly1305, a 24-byte nonce first; a new key per
//! group, so the label alone is the associated data). The key travels inside end-to-end messages (plaintext kind 6,
//! [`super::content::Body::GroupKey`]) to every member when they are added, and a new
//! key to those who remain when someone is removed.

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use rand::RngExt;
use serde::{Deserialize, Serialize};

use super::db::{DbError, Table, Tx};

/// What this device knows of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownGroup {
    pub group_id: u64,
    pub name: String,
    /// 32 bytes.
    pub key: Vec<u8>,
}

const AAD: &[u8] = b"switchboard group meta v1";

/// A fresh group key.
pub fn new_key() -> Vec<u8> {
    let key: [u8; 32] = rand::rng().random();
    key.to_vec()
}

fn cipher(key: &[u8]) -> Option<XChaCha20Poly1305> {
    let key: [u8; 32] = key.try_into().ok()?;
    Some(XChaCha20Poly1305::new(&key.into()))
}

/// `name` sealed under `key`, as the node stores it.
pub fn seal_name(key: &[u8], name: &str) -> Vec<u8> {
    let Some(cipher) = cipher(key) else {
        return Vec::new();
    };
    let nonce: [u8; 24] = rand::rng().random();
    let sealed = cipher
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: name.as_bytes(),
                aad: AAD,
            },
        )
        .unwrap_or_else(|_| unreachable!("XChaCha20-Poly1305 encrypts any buffer this size"));
    [&nonce[..], &sealed].concat()
}

/// The name in `meta`, if `key` opens it.
pub fn open_name(key: &[u8], meta: &[u8]) -> Option<String> {
    let (nonce, body) = meta.split_first_chunk::<24>()?;
    let plain = cipher(key)?
        .decrypt(
            &XNonce::from(*nonce),
            Payload {
                msg: body,
                aad: AAD,
            },
        )
        .ok()?;
    String::from_utf8(plain).ok()
}

fn row_key(tx: &Tx<'_>, group_id: u64) -> Vec<u8> {
    let mut key = tx.hash(b"groups", &[]).to_vec();
    key.extend_from_slice(&group_id.to_be_bytes());
    key
}

/// Records (or replaces) what this device knows of a group.
pub fn remember(tx: &Tx<'_>, group: &KnownGroup) -> Result<(), DbError> {
    let value = serde_json::to_vec(group)
        .unwrap_or_else(|e| unreachable!("a group record always serialises: {e}"));
    tx.put(Table::Peer, &row_key(tx, group.group_id), &value)
}

/// Forgets a group (this account left it, or was removed).
pub fn forget(tx: &Tx<'_>, group_id: u64) -> Result<(), DbError> {
    tx.delete(Table::Peer, &row_key(tx, group_id))?;
    Ok(())
}

/// What this device knows of group `group_id`.
pub fn known(tx: &Tx<'_>, group_id: u64) -> Result<Option<KnownGroup>, DbError> {
    match tx.get(Table::Peer, &row_key(tx, group_id))? {
        Some(v) => Ok(serde_json::from_slice(&v).ok()),
        None => Ok(None),
    }
}

/// Every group this device knows, by id.
pub fn all(tx: &Tx<'_>) -> Result<Vec<KnownGroup>, DbError> {
    let prefix = tx.hash(b"groups", &[]);
    Ok(tx
        .scan(Table::Peer, &prefix)?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_opens_with_its_key_only() {
        let key = new_key();
        let meta = seal_name(&key, "Family");
        assert_eq!(open_name(&key, &meta).as_deref(), Some("Family"));
        assert_eq!(open_name(&new_key(), &meta), None);
        assert_eq!(open_name(&key, b"short"), None);
    }

    #[test]
    fn groups_are_remembered_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::db::HomeDb::open(dir.path(), None).unwrap();
        db.write(|tx| {
            for id in [3, 1] {
                remember(
                    tx,
                    &KnownGroup {
                        group_id: id,
                        name: format!("g{id}"),
                        key: new_key(),
                    },
                )?;
            }
            let ids: Vec<u64> = all(tx)?.iter().map(|g| g.group_id).collect();
            assert_eq!(ids, [1, 3]);
            forget(tx, 1)?;
            assert!(known(tx, 1)?.is_none());
            assert_eq!(known(tx, 3)?.map(|g| g.name).as_deref(), Some("g3"));
            Ok::<_, DbError>(())
        })
        .unwrap();
    }
}
