//! Sender keys: a Megolm session (vodozemac) per group and sending device, so that a
//! group message is encrypted once and uploaded once.
//!
//! Each device keeps one outbound [`GroupSession`] per group and hands its session key
//! to every other member device over Olm (plaintext kind 8,
//! [`super::content::Body::SenderKey`]). The outbound record remembers which devices
//! have it ([`Outbound::shared`]); the node tells a sender when the group's devices are
//! not those (`GroupDevicesChanged`), and the sender then starts a new session if any
//! device is gone (a member removed or left, a device unlinked), so nothing after can be
//! read by it, and shares the session with the new devices.
//!
//! A group message's body (what the node stores once):
//! `0x01` · session id length (u8) · the session id (its base64 text) · the Megolm
//! message (`MegolmMessage::to_bytes`), whose plaintext is the usual end-to-end
//! plaintext ([`super::content::Plaintext`]). An inbound session is kept under the
//! group, the sender's number and device, and the session id, as the Olm session it
//! came over named them: a node that relabels a message's sender or group finds no
//! session, and a forged message fails the session's signature.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vodozemac::megolm::{
    GroupSession, GroupSessionPickle, InboundGroupSession, InboundGroupSessionPickle,
    MegolmMessage, SessionConfig, SessionKey,
};

use super::db::{DbError, Table, Tx};
use crate::proto::MemberDevices;

const BODY_FORMAT: u8 = 1;

/// Why a group message could not be decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No session of that sender with that id (yet): its key may still come.
    NoSession,
    /// Not a group message body, or one that fails its session's checks: it never
    /// will decrypt.
    Bad(String),
}

/// This device's sending session for a group.
#[derive(Serialize, Deserialize)]
struct OutboundRecord {
    session: GroupSessionPickle,
    shared: BTreeMap<String, Vec<u32>>,
    created_at_ms: u64,
}

/// The state of this device's sending session for a group, as apps see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub session_id: String,
    /// The devices (by number) that were given this session's key.
    pub shared: BTreeMap<String, Vec<u32>>,
    pub created_at_ms: u64,
}

fn outbound_key(tx: &Tx<'_>, group_id: u64) -> Vec<u8> {
    tx.hash(b"megolm-out", &[&group_id.to_be_bytes()]).to_vec()
}

fn inbound_prefix(tx: &Tx<'_>, group_id: u64) -> Vec<u8> {
    tx.hash(b"megolm-in", &[&group_id.to_be_bytes()]).to_vec()
}

fn inbound_key(tx: &Tx<'_>, group_id: u64, from: &str, device: u32, session_id: &str) -> Vec<u8> {
    let mut key = inbound_prefix(tx, group_id);
    key.extend_from_slice(&tx.hash(
        b"megolm-in-session",
        &[
            from.as_bytes(),
            &device.to_be_bytes(),
            session_id.as_bytes(),
        ],
    ));
    key
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|e| unreachable!("a Megolm record serialises: {e}"))
}

/// [`OutboundRecord`] opened.
struct Sending {
    session: GroupSession,
    shared: BTreeMap<String, Vec<u32>>,
    created_at_ms: u64,
}

impl Sending {
    fn new(now_ms: u64) -> Sending {
        Sending {
            session: GroupSession::new(SessionConfig::version_1()),
            shared: BTreeMap::new(),
            created_at_ms: now_ms,
        }
    }

    fn store(&self, tx: &Tx<'_>, group_id: u64) -> Result<(), DbError> {
        let record = OutboundRecord {
            session: self.session.pickle(),
            shared: self.shared.clone(),
            created_at_ms: self.created_at_ms,
        };
        tx.put(Table::Peer, &outbound_key(tx, group_id), &json(&record))
    }
}

fn load(tx: &Tx<'_>, group_id: u64) -> Result<Option<Sending>, DbError> {
    match tx.get(Table::Peer, &outbound_key(tx, group_id))? {
        Some(v) => serde_json::from_slice::<OutboundRecord>(&v)
            .map(|r| {
                Some(Sending {
                    session: GroupSession::from_pickle(r.session),
                    shared: r.shared,
                    created_at_ms: r.created_at_ms,
                })
            })
            .map_err(|e| tx.damaged(format!("the sender key of group {group_id}: {e}"))),
        None => Ok(None),
    }
}

/// This device's sending session for group `group_id`, if it has one.
pub fn outbound(tx: &Tx<'_>, group_id: u64) -> Result<Option<Outbound>, DbError> {
    Ok(load(tx, group_id)?.map(|r| Outbound {
        session_id: r.session.session_id(),
        shared: r.shared,
        created_at_ms: r.created_at_ms,
    }))
}

/// Encrypts `plaintext` for group `group_id` with this device's session (a new one
/// if it has none), moving its ratchet on; returns the group message body and the
/// digest of the devices that hold the session's key.
pub fn encrypt(
    tx: &Tx<'_>,
    group_id: u64,
    plaintext: &[u8],
    now_ms: u64,
) -> Result<(Vec<u8>, [u8; 32]), DbError> {
    let mut record = load(tx, group_id)?.unwrap_or_else(|| Sending::new(now_ms));
    let message = record.session.encrypt(plaintext);
    let id = record.session.session_id();
    record.store(tx, group_id)?;
    let mut body = vec![BODY_FORMAT, id.len() as u8];
    body.extend_from_slice(id.as_bytes());
    body.extend(message.to_bytes());
    Ok((body, digest(&record.shared)))
}

fn digest(shared: &BTreeMap<String, Vec<u32>>) -> [u8; 32] {
    let members: Vec<MemberDevices> = shared
        .iter()
        .map(|(number, devices)| MemberDevices {
            number: number.clone(),
            devices: devices.clone(),
        })
        .collect();
    crate::proto::group_devices_digest(&members)
}

/// What the sender must do for the group's devices to be `now` (the node's list):
/// start a new session if a device that has the key is not among them (the session
/// is replaced here), then give the key to the numbers returned (each with the
/// devices it has now). Returns the session key to give.
pub fn reconcile(
    tx: &Tx<'_>,
    group_id: u64,
    now: &[MemberDevices],
    now_ms: u64,
) -> Result<(Vec<u8>, Vec<MemberDevices>), DbError> {
    let current: BTreeMap<&str, &[u32]> = now
        .iter()
        .map(|m| (m.number.as_str(), m.devices.as_slice()))
        .collect();
    let mut record = load(tx, group_id)?;
    let gone = record.as_ref().is_some_and(|r| {
        r.shared.iter().any(|(number, devices)| {
            let kept = current.get(number.as_str()).copied().unwrap_or_default();
            devices.iter().any(|d| !kept.contains(d))
        })
    });
    let record = match record.take() {
        Some(r) if !gone => r,
        _ => Sending::new(now_ms),
    };
    let key = record.session.session_key().to_bytes();
    let missing = now
        .iter()
        .filter(|m| {
            let has = record.shared.get(&m.number).cloned().unwrap_or_default();
            m.devices.iter().any(|d| !has.contains(d))
        })
        .cloned()
        .collect();
    record.store(tx, group_id)?;
    Ok((key, missing))
}

/// The key `session_key` (of the current session) reached `member`'s devices.
pub fn mark_shared(
    tx: &Tx<'_>,
    group_id: u64,
    session_key: &[u8],
    member: &MemberDevices,
) -> Result<(), DbError> {
    let Some(mut record) = load(tx, group_id)? else {
        return Ok(());
    };
    // Only if the session is still the one whose key went out.
    let current = record.session.session_id();
    let shared = SessionKey::from_bytes(session_key)
        .map(|k| InboundGroupSession::new(&k, SessionConfig::version_1()).session_id());
    if shared.ok().as_deref() != Some(current.as_str()) {
        return Ok(());
    }
    record
        .shared
        .insert(member.number.clone(), member.devices.clone());
    record.store(tx, group_id)
}

/// Stores the session key `key` that `from`'s device `device` sent for group
/// `group_id` (over Olm). A session already known is kept as it is (a copy of its
/// key from a later message index would only lose messages). Returns its session
/// id, or why the key is unusable.
pub fn add_inbound(
    tx: &Tx<'_>,
    group_id: u64,
    from: &str,
    device: u32,
    key: &[u8],
) -> Result<Result<String, String>, DbError> {
    let key = match SessionKey::from_bytes(key) {
        Ok(k) => k,
        Err(e) => return Ok(Err(format!("an unusable sender key: {e}"))),
    };
    let session = InboundGroupSession::new(&key, SessionConfig::version_1());
    let id = session.session_id();
    let row = inbound_key(tx, group_id, from, device, &id);
    if tx.get(Table::Peer, &row)?.is_none() {
        tx.put(Table::Peer, &row, &json(&session.pickle()))?;
    }
    Ok(Ok(id))
}

/// Splits a group message body into its session id and Megolm message.
pub fn parse_body(body: &[u8]) -> Result<(&str, MegolmMessage), String> {
    let (&format, rest) = body.split_first().ok_or("an empty group message")?;
    if format != BODY_FORMAT {
        return Err(format!("a group message of unknown format {format}"));
    }
    let (&len, rest) = rest.split_first().ok_or("a cut group message")?;
    let (id, message) = rest
        .split_at_checked(usize::from(len))
        .ok_or("a cut group message")?;
    let id = std::str::from_utf8(id).map_err(|_| "a group message's session id is not text")?;
    let message =
        MegolmMessage::from_bytes(message).map_err(|e| format!("not a Megolm message: {e}"))?;
    Ok((id, message))
}

/// Decrypts group message `body` from `from`'s device `device` to group `group_id`.
pub fn decrypt(
    tx: &Tx<'_>,
    group_id: u64,
    from: &str,
    device: u32,
    body: &[u8],
) -> Result<Result<Vec<u8>, Failure>, DbError> {
    let (id, message) = match parse_body(body) {
        Ok(parsed) => parsed,
        Err(why) => return Ok(Err(Failure::Bad(why))),
    };
    let Some(stored) = tx.get(Table::Peer, &inbound_key(tx, group_id, from, device, id))? else {
        return Ok(Err(Failure::NoSession));
    };
    let pickle: InboundGroupSessionPickle = serde_json::from_slice(&stored)
        .map_err(|e| tx.damaged(format!("a sender key of group {group_id}: {e}")))?;
    let mut session = InboundGroupSession::from_pickle(pickle);
    Ok(session
        .decrypt(&message)
        .map(|d| d.plaintext)
        .map_err(|e| Failure::Bad(e.to_string())))
}

/// Forgets every session of group `group_id` (this account left or was removed).
pub fn forget(tx: &Tx<'_>, group_id: u64) -> Result<(), DbError> {
    tx.delete(Table::Peer, &outbound_key(tx, group_id))?;
    for (key, _) in tx.scan(Table::Peer, &inbound_prefix(tx, group_id))? {
        tx.delete(Table::Peer, &key)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::db::HomeDb;

    fn member(number: &str, devices: &[u32]) -> MemberDevices {
        MemberDevices {
            number: number.into(),
            devices: devices.to_vec(),
        }
    }

    /// Alice's device sends to Bob's; Carol's key is of the session before she left.
    #[test]
    fn a_sender_key_opens_its_messages_and_a_new_session_follows_a_removal() {
        let dir = tempfile::tempdir().unwrap();
        let alice = HomeDb::open(&dir.path().join("a"), None).unwrap();
        let bob = HomeDb::open(&dir.path().join("b"), None).unwrap();
        let carol = HomeDb::open(&dir.path().join("c"), None).unwrap();
        let both = [member("+2", &[1]), member("+3", &[1])];
        let (key, missing) = alice.write(|tx| reconcile(tx, 7, &both, 1)).unwrap();
        assert_eq!(missing, both);
        for (db, m) in [(&bob, &both[0]), (&carol, &both[1])] {
            db.write(|tx| add_inbound(tx, 7, "+1", 1, &key))
                .unwrap()
                .unwrap();
            alice.write(|tx| mark_shared(tx, 7, &key, m)).unwrap();
        }
        let (body, digest) = alice.write(|tx| encrypt(tx, 7, b"hello", 2)).unwrap();
        assert_eq!(digest, crate::proto::group_devices_digest(&both));
        for db in [&bob, &carol] {
            let plain = db.write(|tx| decrypt(tx, 7, "+1", 1, &body)).unwrap();
            assert_eq!(plain.unwrap(), b"hello");
            // Relabelled by the node: another group, another sender, another device.
            for (g, from, d) in [(8, "+1", 1), (7, "+9", 1), (7, "+1", 2)] {
                let out = db.write(|tx| decrypt(tx, g, from, d, &body)).unwrap();
                assert_eq!(out, Err(Failure::NoSession));
            }
        }
        // Carol is removed: a new session, shared with Bob only.
        let (new_key, missing) = alice.write(|tx| reconcile(tx, 7, &both[..1], 3)).unwrap();
        assert_ne!(new_key, key);
        assert_eq!(missing, both[..1]);
        bob.write(|tx| add_inbound(tx, 7, "+1", 1, &new_key))
            .unwrap()
            .unwrap();
        alice
            .write(|tx| mark_shared(tx, 7, &new_key, &both[0]))
            .unwrap();
        let (after, digest) = alice.write(|tx| encrypt(tx, 7, b"after", 4)).unwrap();
        assert_eq!(digest, crate::proto::group_devices_digest(&both[..1]));
        let shared = alice.write(|tx| outbound(tx, 7)).unwrap().unwrap().shared;
        assert_eq!(shared.keys().collect::<Vec<_>>(), ["+2"]);
        assert_eq!(
            bob.write(|tx| decrypt(tx, 7, "+1", 1, &after))
                .unwrap()
                .unwrap(),
            b"after"
        );
        assert_eq!(
            carol.write(|tx| decrypt(tx, 7, "+1", 1, &after)).unwrap(),
            Err(Failure::NoSession)
        );
        // A tampered body fails the session's checks.
        let mut bad = after.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            bob.write(|tx| decrypt(tx, 7, "+1", 1, &bad)).unwrap(),
            Err(Failure::Bad(_))
        ));
        // An old key marked shared after a rotation does not count.
        alice
            .write(|tx| mark_shared(tx, 7, &key, &both[1]))
            .unwrap();
        let shared = alice.write(|tx| outbound(tx, 7)).unwrap().unwrap().shared;
        assert_eq!(shared.len(), 1);
        bob.write(|tx| forget(tx, 7)).unwrap();
        assert_eq!(
            bob.write(|tx| decrypt(tx, 7, "+1", 1, &after)).unwrap(),
            Err(Failure::NoSession)
        );
    }

    #[test]
    fn bodies_that_are_not_group_messages_are_refused() {
        for body in [
            &b""[..],
            b"\x02",
            b"\x01",
            b"\x01\x05ab",
            b"\x01\x01a\x03\x00",
        ] {
            assert!(parse_body(body).is_err(), "{body:?}");
        }
    }
}
