//! End-to-end encryption in the client: the Olm account, sessions with contacts, and
//! what a device remembers of them, kept in the home encrypted at rest.
//!
//! The node only ever sees ciphertext. A [`Vault`] holds this device's Olm account
//! (identity keys, one-time keys, fallback key), one or more Olm sessions per contact
//! device, each contact's identity key (to warn when it changes) and the ids of
//! recently received messages (to drop redeliveries). All crypto is vodozemac's.
//!
//! Envelope body (client to client, opaque to the node): one byte of Olm message type
//! (0 pre-key, 1 normal) then the Olm message. The Olm plaintext is a bincode
//! [`Content`].

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

use bincode::{Decode, Encode};
use chacha20poly1305::aead::Aead;
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use rand::TryRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};
use vodozemac::Curve25519PublicKey;
use vodozemac::olm::{Account, AccountPickle, OlmMessage, Session, SessionConfig, SessionPickle};

use super::sealed::Passphrase;
use super::{Client, ClientError};
use crate::fsutil;
use crate::phone::Number;
use crate::proto::{
    Bundle, DeviceEnvelope, ErrorKind, IdentityKeys, Incoming, KeyUpload, MessageId, Outgoing,
    SignedKey,
};

/// One-time keys a device keeps published; it tops up when the node says it is low.
pub const ONE_TIME_KEY_TARGET: u32 = 50;
/// Message ids remembered for de-duplication.
const SEEN_MAX: usize = 10_000;
/// Sessions kept per contact device (newest first).
const SESSIONS_MAX: usize = 4;
const STATE_FILE: &str = "e2e.state";
const KEY_FILE: &str = "e2e.key";
const STATE_VERSION: u8 = 1;

/// What a message carries inside its encryption.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Content {
    Text(String),
}

/// What can go wrong with end-to-end encryption.
#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} cannot be decrypted or is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("{0}")]
    Keys(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Home(#[from] super::HomeError),
}

/// What this device knows of one contact.
#[derive(Serialize, Deserialize, Default)]
struct Contact {
    /// The contact's identity keys as last seen.
    identity: Option<KnownIdentity>,
    /// Olm sessions per device id, newest first.
    sessions: BTreeMap<u32, Vec<SessionPickle>>,
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq)]
struct KnownIdentity {
    curve25519: [u8; 32],
    /// Known once a bundle was fetched (pre-key messages carry only the Curve25519 key).
    ed25519: Option<[u8; 32]>,
}

#[derive(Serialize, Deserialize)]
struct State {
    account: AccountPickle,
    /// The (account, device) the keys were last published for.
    published_for: Option<(u64, u32)>,
    contacts: BTreeMap<String, Contact>,
    seen: VecDeque<String>,
}

/// [`State`] as written: the same fields, borrowed from the vault, so a save copies no
/// session (vodozemac's pickles are not `Clone`).
#[derive(Serialize)]
struct StateRef<'a> {
    account: AccountPickle,
    published_for: Option<(u64, u32)>,
    contacts: &'a BTreeMap<String, Contact>,
    seen: &'a VecDeque<String>,
}

/// A received message, decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub from: String,
    pub id: MessageId,
    pub content: Content,
    /// Set when the sender's identity key differs from the one this device knew.
    pub identity_changed: bool,
}

/// The outcome of decrypting one incoming envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    Message(Received),
    /// Seen before (a redelivery): drop it.
    Duplicate,
    /// Could not be decrypted; the reason is for people.
    Unreadable(String),
}

/// This device's end-to-end state, loaded from and saved to its home.
pub struct Vault {
    path: PathBuf,
    key: [u8; 32],
    account: Account,
    published_for: Option<(u64, u32)>,
    contacts: BTreeMap<String, Contact>,
    seen: VecDeque<String>,
    seen_set: HashSet<String>,
}

fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    // The OS generator failing is not something a messenger can work around.
    if let Err(e) = rand::rngs::SysRng.try_fill_bytes(&mut out) {
        panic!("the system random generator failed: {e}");
    }
    out
}

/// A fresh random message id.
pub fn new_message_id() -> MessageId {
    random()
}

impl Vault {
    /// Loads the vault of the home `dir`, creating a new Olm account if it has none.
    /// Its key (`e2e.key`) is kept plain (owner-only); see [`Vault::open_with`].
    pub fn open(dir: &Path) -> Result<Vault, E2eError> {
        Vault::open_with(dir, None)
    }

    /// Like [`Vault::open`], with the vault key sealed under `passphrase` at rest (a
    /// plain key found on disk is sealed now).
    pub fn open_with(dir: &Path, passphrase: Option<&Passphrase>) -> Result<Vault, E2eError> {
        let path = dir.join(STATE_FILE);
        let key_path = dir.join(KEY_FILE);
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| E2eError::Io { path: p, source }
        };
        fsutil::create_private_dir(dir).map_err(io(dir))?;
        let key: [u8; 32] = match std::fs::read(&key_path) {
            Ok(bytes) => super::home::unseal(&key_path, bytes, passphrase)?
                .as_slice()
                .try_into()
                .map_err(|_| E2eError::Damaged {
                    path: key_path.clone(),
                    reason: "not 32 bytes".into(),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if path.exists() {
                    return Err(E2eError::Damaged {
                        path: key_path,
                        reason: "missing, so the encrypted state beside it cannot be read".into(),
                    });
                }
                let key = random::<32>();
                let stored = match passphrase {
                    Some(p) => super::sealed::seal(p.as_str(), &key).map_err(|source| {
                        super::HomeError::Seal {
                            path: key_path.clone(),
                            source,
                        }
                    })?,
                    None => key.to_vec(),
                };
                fsutil::write_private(&key_path, &stored).map_err(io(&key_path))?;
                key
            }
            Err(e) => return Err(io(&key_path)(e)),
        };
        let state = match std::fs::read(&path) {
            Ok(bytes) => Some(
                decrypt_state(&key, &bytes).map_err(|reason| E2eError::Damaged {
                    path: path.clone(),
                    reason,
                })?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&path)(e)),
        };
        let vault = match state {
            Some(s) => {
                let seen_set = s.seen.iter().cloned().collect();
                Vault {
                    path,
                    key,
                    account: Account::from_pickle(s.account),
                    published_for: s.published_for,
                    contacts: s.contacts,
                    seen: s.seen,
                    seen_set,
                }
            }
            None => {
                let vault = Vault {
                    path,
                    key,
                    account: Account::new(),
                    published_for: None,
                    contacts: BTreeMap::new(),
                    seen: VecDeque::new(),
                    seen_set: HashSet::new(),
                };
                vault.save()?;
                vault
            }
        };
        Ok(vault)
    }

    /// Writes the vault, encrypted, atomically.
    pub fn save(&self) -> Result<(), E2eError> {
        let state = StateRef {
            account: self.account.pickle(),
            published_for: self.published_for,
            contacts: &self.contacts,
            seen: &self.seen,
        };
        let json = serde_json::to_vec(&state).map_err(|e| E2eError::Damaged {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let sealed = encrypt_state(&self.key, &json);
        fsutil::write_private(&self.path, &sealed).map_err(|source| E2eError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// This device's identity keys.
    pub fn identity(&self) -> IdentityKeys {
        let keys = self.account.identity_keys();
        IdentityKeys {
            curve25519: keys.curve25519.to_bytes(),
            ed25519: *keys.ed25519.as_bytes(),
        }
    }

    fn sign(&self, label: &[u8], key: Curve25519PublicKey) -> SignedKey {
        let key = key.to_bytes();
        SignedKey {
            key,
            signature: self
                .account
                .sign(SignedKey::signed_bytes(label, &key))
                .to_bytes(),
        }
    }

    /// Publishes keys for the device `(account_id, device_id)`: everything not yet
    /// published, plus a fresh fallback key and a full stock of one-time keys when the
    /// device is new to this vault, or `top_up` more one-time keys.
    pub async fn publish(
        &mut self,
        client: &Client,
        device: (u64, u32),
        top_up: u32,
    ) -> Result<u32, E2eError> {
        let fresh = self.published_for != Some(device);
        if fresh {
            self.account.generate_fallback_key();
            self.account
                .generate_one_time_keys(ONE_TIME_KEY_TARGET as usize);
        } else if top_up > 0 {
            self.account.generate_one_time_keys(top_up as usize);
        }
        // The private halves must be on disk before the node can hand the public
        // halves out.
        self.save()?;
        let fallback = self
            .account
            .fallback_key()
            .values()
            .next()
            .map(|k| self.sign(SignedKey::FALLBACK, *k));
        let one_time_keys = self
            .account
            .one_time_keys()
            .values()
            .map(|k| self.sign(SignedKey::ONE_TIME, *k))
            .collect();
        let upload = KeyUpload {
            identity: self.identity(),
            fallback,
            one_time_keys,
        };
        let stored = client.publish_keys(upload).await?;
        self.account.mark_keys_as_published();
        self.published_for = Some(device);
        self.save()?;
        Ok(stored)
    }

    /// Whether keys were published for `device`.
    pub fn published_for(&self, device: (u64, u32)) -> bool {
        self.published_for == Some(device)
    }

    /// Encrypts `content` for every device of `to` and sends it, fetching keys and
    /// starting sessions where needed. Returns the accepted id and whether `to`'s
    /// identity key changed since this device last knew it.
    pub async fn send(
        &mut self,
        client: &Client,
        to: &Number,
        content: &Content,
    ) -> Result<Sent, E2eError> {
        let plaintext = bincode::encode_to_vec(content, bincode::config::standard())
            .map_err(|e| E2eError::Keys(e.to_string()))?;
        let id = new_message_id();
        let mut identity_changed = false;
        if self.devices_of(to).is_empty() {
            identity_changed |= self.start_sessions(client, to).await?;
        }
        for attempt in 0..2 {
            let envelopes = self.encrypt_for(to, &plaintext)?;
            self.save()?;
            let outgoing = Outgoing {
                id,
                to: to.to_string(),
                envelopes,
            };
            match client.send(outgoing).await {
                Ok(accepted) => {
                    return Ok(Sent {
                        id: accepted.id,
                        accepted_at_ms: accepted.accepted_at_ms,
                        delivered: accepted.delivered,
                        identity_changed,
                    });
                }
                Err(ClientError::Node(e)) if attempt == 0 => match e.kind {
                    ErrorKind::StaleDevices { .. } => {
                        identity_changed |= self.start_sessions(client, to).await?;
                    }
                    _ => return Err(ClientError::Node(e).into()),
                },
                Err(e) => return Err(e.into()),
            }
        }
        Err(E2eError::Keys(format!(
            "{to}'s devices kept changing while sending; try again"
        )))
    }

    fn devices_of(&self, to: &Number) -> Vec<u32> {
        self.contacts
            .get(to.as_str())
            .map(|c| c.sessions.keys().copied().collect())
            .unwrap_or_default()
    }

    fn encrypt_for(
        &mut self,
        to: &Number,
        plaintext: &[u8],
    ) -> Result<Vec<DeviceEnvelope>, E2eError> {
        let contact = self
            .contacts
            .get_mut(to.as_str())
            .ok_or_else(|| E2eError::Keys(format!("no session with {to}")))?;
        let mut out = Vec::new();
        for (device_id, sessions) in contact.sessions.iter_mut() {
            let Some(newest) = sessions.first_mut() else {
                continue;
            };
            let mut session = Session::from_pickle(clone_pickle(newest));
            let message = session
                .encrypt(plaintext)
                .map_err(|e| E2eError::Keys(format!("encrypting: {e}")))?;
            *newest = session.pickle();
            out.push(DeviceEnvelope {
                device_id: *device_id,
                body: envelope_body(&message),
            });
        }
        Ok(out)
    }

    /// Fetches `to`'s bundles (claiming one-time keys) and starts a session with each
    /// device, replacing the device list. Returns whether the identity changed.
    async fn start_sessions(&mut self, client: &Client, to: &Number) -> Result<bool, E2eError> {
        let bundles = client.fetch_bundles(to, true).await?;
        let contact = self.contacts.entry(to.to_string()).or_default();
        let mut changed = false;
        let mut sessions = BTreeMap::new();
        for bundle in &bundles.devices {
            let key = checked_session_key(bundle)?;
            let session = self
                .account
                .create_outbound_session(
                    SessionConfig::version_1(),
                    Curve25519PublicKey::from_bytes(bundle.identity.curve25519),
                    key,
                )
                .map_err(|e| E2eError::Keys(format!("starting a session with {to}: {e}")))?;
            let seen = KnownIdentity {
                curve25519: bundle.identity.curve25519,
                ed25519: Some(bundle.identity.ed25519),
            };
            changed |= contact
                .identity
                .is_some_and(|known| known.curve25519 != seen.curve25519);
            contact.identity = Some(seen);
            let mut list = vec![session.pickle()];
            // Keep older sessions with the same device: messages under them may still
            // be in flight towards us.
            if let Some(old) = contact.sessions.remove(&bundle.device_id) {
                list.extend(old.into_iter().take(SESSIONS_MAX - 1));
            }
            sessions.insert(bundle.device_id, list);
        }
        contact.sessions = sessions;
        self.save()?;
        Ok(changed)
    }

    /// Decrypts one incoming envelope. The caller saves the vault before it
    /// acknowledges the envelope, so a crash in between redelivers it and the
    /// de-duplication by id drops it.
    pub fn open_envelope(&mut self, incoming: &Incoming) -> Opened {
        let seen_key = format!("{}/{}", incoming.from, hex::encode(incoming.id));
        if self.seen_set.contains(&seen_key) {
            return Opened::Duplicate;
        }
        let result = self.decrypt(incoming);
        self.remember(seen_key);
        match result {
            Ok((plaintext, identity_changed)) => {
                match bincode::decode_from_slice::<Content, _>(
                    &plaintext,
                    bincode::config::standard().with_limit::<{ 1 << 20 }>(),
                ) {
                    Ok((content, _)) => Opened::Message(Received {
                        from: incoming.from.clone(),
                        id: incoming.id,
                        content,
                        identity_changed,
                    }),
                    Err(e) => Opened::Unreadable(format!("unknown content: {e}")),
                }
            }
            Err(reason) => Opened::Unreadable(reason),
        }
    }

    fn remember(&mut self, key: String) {
        if self.seen_set.insert(key.clone()) {
            self.seen.push_back(key);
        }
        while self.seen.len() > SEEN_MAX {
            if let Some(old) = self.seen.pop_front() {
                self.seen_set.remove(&old);
            }
        }
    }

    fn decrypt(&mut self, incoming: &Incoming) -> Result<(Vec<u8>, bool), String> {
        let (&kind, body) = incoming
            .body
            .split_first()
            .ok_or_else(|| "empty envelope".to_string())?;
        let message = OlmMessage::from_parts(kind as usize, body)
            .map_err(|e| format!("not an Olm message: {e}"))?;
        let contact = self.contacts.entry(incoming.from.clone()).or_default();
        let sessions = contact.sessions.entry(incoming.from_device).or_default();
        for pickle in sessions.iter_mut() {
            let mut session = Session::from_pickle(clone_pickle(pickle));
            if let Ok(plaintext) = session.decrypt(&message) {
                *pickle = session.pickle();
                return Ok((plaintext, false));
            }
        }
        let OlmMessage::PreKey(pre_key) = &message else {
            return Err(
                "no session can decrypt it (sent before this device's keys changed?)".into(),
            );
        };
        let their_identity = pre_key.identity_key();
        let created = self
            .account
            .create_inbound_session(SessionConfig::version_1(), their_identity, pre_key)
            .map_err(|e| format!("cannot start a session from it: {e}"))?;
        let identity = their_identity.to_bytes();
        let changed = contact
            .identity
            .is_some_and(|known| known.curve25519 != identity);
        if contact.identity.is_none_or(|k| k.curve25519 != identity) {
            contact.identity = Some(KnownIdentity {
                curve25519: identity,
                ed25519: None,
            });
        }
        sessions.insert(0, created.session.pickle());
        sessions.truncate(SESSIONS_MAX);
        Ok((created.plaintext, changed))
    }

    /// The safety number of this device and `them` (their number and identity keys):
    /// 60 digits, the same on both sides.
    pub fn safety_number(&self, me: &Number, them: &Number, their: &IdentityKeys) -> String {
        safety_number(me, &self.identity(), them, their)
    }

    /// Records `their` identity keys as known for `them` (after a safety check);
    /// returns whether they differ from what was known.
    pub fn note_identity(&mut self, them: &Number, their: &IdentityKeys) -> bool {
        let contact = self.contacts.entry(them.to_string()).or_default();
        let changed = contact
            .identity
            .is_some_and(|known| known.curve25519 != their.curve25519);
        contact.identity = Some(KnownIdentity {
            curve25519: their.curve25519,
            ed25519: Some(their.ed25519),
        });
        changed
    }
}

/// A message the node accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub id: MessageId,
    pub accepted_at_ms: u64,
    /// The recipient's devices that had already received it (no receipt will follow
    /// for them).
    pub delivered: Vec<u32>,
    pub identity_changed: bool,
}

fn clone_pickle(p: &SessionPickle) -> SessionPickle {
    // SessionPickle is not Clone; a serde round trip is an exact copy.
    serde_json::from_value(serde_json::to_value(p).unwrap_or_default())
        .unwrap_or_else(|_| unreachable!("a session pickle round-trips through JSON"))
}

fn envelope_body(message: &OlmMessage) -> Vec<u8> {
    let (kind, bytes) = message.to_parts();
    let mut out = Vec::with_capacity(bytes.len() + 1);
    out.push(kind as u8);
    out.extend_from_slice(&bytes);
    out
}

/// The key to start a session with from `bundle`: its one-time key, else its fallback
/// key, each only if signed by the bundle's identity.
fn checked_session_key(bundle: &Bundle) -> Result<Curve25519PublicKey, E2eError> {
    let pick = bundle
        .one_time_key
        .filter(|k| k.verify(&bundle.identity, SignedKey::ONE_TIME))
        .or(bundle
            .fallback
            .filter(|k| k.verify(&bundle.identity, SignedKey::FALLBACK)));
    match pick {
        Some(k) => Ok(Curve25519PublicKey::from_bytes(k.key)),
        None => Err(E2eError::Keys(format!(
            "device {} offers no correctly signed key to start a session with",
            bundle.device_id
        ))),
    }
}

/// Signal-style numeric fingerprint: for each side, SHA-512 iterated 5200 times over
/// its identity keys and number, the first 30 bytes as six 5-digit groups; the two
/// halves in sorted order, so both sides compute the same 60 digits.
pub fn safety_number(
    a: &Number,
    a_keys: &IdentityKeys,
    b: &Number,
    b_keys: &IdentityKeys,
) -> String {
    fn half(number: &Number, keys: &IdentityKeys) -> String {
        let mut key = Vec::with_capacity(64);
        key.extend_from_slice(&keys.curve25519);
        key.extend_from_slice(&keys.ed25519);
        let mut hash = Sha512::new()
            .chain_update([0u8, 0])
            .chain_update(&key)
            .chain_update(number.as_str().as_bytes())
            .finalize();
        for _ in 1..5200 {
            hash = Sha512::new()
                .chain_update(hash)
                .chain_update(&key)
                .finalize();
        }
        hash[..30]
            .chunks(5)
            .map(|c| {
                let v = c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
                format!("{:05}", v % 100_000)
            })
            .collect()
    }
    let (x, y) = (half(a, a_keys), half(b, b_keys));
    if x <= y { x + &y } else { y + &x }
}

/// Formats 60 digits as 12 groups of 5.
pub fn format_safety_number(digits: &str) -> String {
    digits
        .as_bytes()
        .chunks(5)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn encrypt_state(key: &[u8; 32], plaintext: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(&(*key).into());
    let nonce_bytes = random::<24>();
    let nonce = XNonce::from(nonce_bytes);
    // Encryption of an in-memory buffer cannot fail for sizes below 256 GiB.
    let sealed = cipher
        .encrypt(&nonce, plaintext)
        .unwrap_or_else(|_| unreachable!("XChaCha20-Poly1305 encrypts any buffer this size"));
    let mut out = Vec::with_capacity(1 + 24 + sealed.len());
    out.push(STATE_VERSION);
    out.extend_from_slice(&nonce_bytes);
    out.extend_from_slice(&sealed);
    out
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
    let plain = cipher
        .decrypt(&XNonce::from(*nonce), sealed)
        .map_err(|_| "wrong key or damaged file (authentication failed)".to_string())?;
    serde_json::from_slice(&plain).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(s: &str) -> Number {
        Number::parse_e164(s).unwrap()
    }

    #[test]
    fn state_survives_a_round_trip_and_detects_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let identity = {
            let vault = Vault::open(dir.path()).unwrap();
            vault.identity()
        };
        assert_eq!(Vault::open(dir.path()).unwrap().identity(), identity);
        let path = dir.path().join(STATE_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(
            Vault::open(dir.path()),
            Err(E2eError::Damaged { .. })
        ));
    }

    #[test]
    fn the_state_file_holds_no_plaintext_key_material() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::open(dir.path()).unwrap();
        let pickle = serde_json::to_string(&vault.account.pickle()).unwrap();
        let bytes = std::fs::read(dir.path().join(STATE_FILE)).unwrap();
        assert!(
            !bytes
                .windows(16)
                .any(|w| pickle.as_bytes().windows(16).any(|p| p == w))
        );
    }

    #[test]
    fn safety_numbers_agree_and_change_with_keys() {
        let (a, b) = (number("+14155550100"), number("+14155550101"));
        let ka = IdentityKeys {
            curve25519: [1; 32],
            ed25519: [2; 32],
        };
        let kb = IdentityKeys {
            curve25519: [3; 32],
            ed25519: [4; 32],
        };
        let ab = safety_number(&a, &ka, &b, &kb);
        assert_eq!(ab, safety_number(&b, &kb, &a, &ka));
        assert_eq!(ab.len(), 60);
        assert!(ab.bytes().all(|c| c.is_ascii_digit()));
        let kb2 = IdentityKeys {
            curve25519: [5; 32],
            ..kb
        };
        assert_ne!(ab, safety_number(&a, &ka, &b, &kb2));
        assert_eq!(format_safety_number(&ab).split(' ').count(), 12);
    }
}
