//! End-to-end encryption in the client: the Olm account, the sessions with contacts'
//! devices, and what a device knows of each contact's identity. All crypto is
//! vodozemac's; the node only ever sees ciphertext.
//!
//! Everything lives in the home database ([`super::db`]), and all of it is read and
//! written inside one transaction: an [`Olm`] is the working set of one transaction,
//! loading the account and the sessions it needs once, keeping them as live objects
//! while it encrypts or decrypts a batch, and writing back what changed in
//! [`Olm::flush`]. Because the transaction holds the home's write lock, two processes
//! never advance one ratchet from the same state (which made messages undecryptable
//! when every process kept its own copy of the state in memory).
//!
//! Envelope body (client to client, opaque to the node): one byte of Olm message type
//! (0 pre-key, 1 normal) then the Olm message; or, for a pre-key message from a linked
//! device, type 2: its certificate (the account identity's Curve25519 and Ed25519
//! keys, the device's Ed25519 key, the account identity's signature over the device's
//! keys: 32 + 32 + 32 + 64 bytes) then the pre-key message. The Olm plaintext is a
//! [`super::content::Plaintext`].
//!
//! One identity per account: the primary's Olm identity is the account identity. A
//! linked device has its own Olm account, whose keys the primary signed when it linked
//! it ([`IdentityKeys::vouches_for`]); a contact accepts a linked device only with that
//! signature, and compares (and shows in the safety number) the account identity, so a
//! new device is news ("linked a new device"), never a changed identity.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};
use vodozemac::Curve25519PublicKey;
use vodozemac::olm::{Account, AccountPickle, OlmMessage, Session, SessionConfig, SessionPickle};

use super::db::{DbError, HomeDb, Table, Tx};
use super::{Client, ClientError};
use crate::phone::Number;
use crate::proto::{
    Bundle, Bundles, DeviceEnvelope, IdentityKeys, KeyUpload, MessageId, SignedKey,
};

/// One-time keys a device keeps published; it tops up when the node says it is low.
pub const ONE_TIME_KEY_TARGET: u32 = 50;
/// Sessions kept per contact device (newest first): messages under older ones may
/// still be on their way.
const SESSIONS_MAX: usize = 4;
const ACCOUNT_KEY: &[u8] = b"account";
const LINK_KEY: &[u8] = b"account_link";
/// Bytes of a linked device's certificate in a type-2 envelope.
const CERT_LEN: usize = 32 + 32 + 32 + 64;

/// What can go wrong with end-to-end encryption.
#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Keys(String),
    #[error(transparent)]
    Client(#[from] ClientError),
}

#[derive(Serialize, Deserialize)]
struct AccountRecord {
    account: AccountPickle,
    /// The (account, device) the keys were last published for.
    published_for: Option<(u64, u32)>,
}

/// What this device knows of one contact.
#[derive(Serialize, Deserialize, Default, Clone)]
struct PeerRecord {
    number: String,
    /// The contact's account identity keys (its primary's) as last seen.
    identity: Option<KnownIdentity>,
    /// The contact's devices seen so far: id → Curve25519 identity key.
    #[serde(default)]
    devices: std::collections::BTreeMap<u32, [u8; 32]>,
}

/// How a linked device belongs to its account: the account identity and its
/// signature over this device's keys, from the primary when it linked this device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LinkRecord {
    /// The account's number (E.164).
    pub number: String,
    pub account_curve25519: [u8; 32],
    pub account_ed25519: [u8; 32],
    /// 64 bytes.
    pub signature: Vec<u8>,
}

impl LinkRecord {
    pub fn account_identity(&self) -> IdentityKeys {
        IdentityKeys {
            curve25519: self.account_curve25519,
            ed25519: self.account_ed25519,
        }
    }

    fn signature(&self) -> Result<[u8; 64], E2eError> {
        <[u8; 64]>::try_from(self.signature.as_slice())
            .map_err(|_| E2eError::Keys("the stored account signature is damaged".into()))
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct KnownIdentity {
    pub(crate) curve25519: [u8; 32],
    /// Known once a bundle was fetched (pre-key messages carry only the Curve25519 key).
    pub(crate) ed25519: Option<[u8; 32]>,
}

struct AccountSlot {
    account: Account,
    published_for: Option<(u64, u32)>,
    dirty: bool,
}

#[derive(Default)]
struct SessionSlot {
    /// Newest first.
    list: Vec<Session>,
    dirty: bool,
}

struct PeerSlot {
    record: PeerRecord,
    dirty: bool,
}

/// A contact of a home of the old format: number, identity, sessions per device.
pub(crate) type LegacyContact = (
    String,
    Option<KnownIdentity>,
    Vec<(u32, Vec<SessionPickle>)>,
);

/// A decrypted envelope.
#[derive(Debug)]
pub struct Decrypted {
    pub plaintext: Vec<u8>,
    /// The sender's account identity differs from the one this device knew.
    pub identity_changed: bool,
    /// The sender's device is new to this device (the account was known): they
    /// linked a new device.
    pub new_device: bool,
}

/// Why an envelope could not be decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecryptFailure {
    /// Not an Olm message at all: no session would ever decrypt it.
    Malformed(String),
    /// An Olm message no session of this device decrypts (a lost or stale session,
    /// an unknown one-time key): its sender can send it again over a new one.
    NoSession(String),
}

impl DecryptFailure {
    /// Why, for people.
    pub fn reason(&self) -> &str {
        match self {
            DecryptFailure::Malformed(r) | DecryptFailure::NoSession(r) => r,
        }
    }

    /// Whether asking the sender to send it again may help.
    pub fn worth_asking(&self) -> bool {
        matches!(self, DecryptFailure::NoSession(_))
    }
}

/// The Olm state one transaction works on.
pub struct Olm<'t> {
    tx: &'t Tx<'t>,
    account: Option<AccountSlot>,
    /// By number, then device (looked up by `&str`, so a hit allocates nothing).
    sessions: HashMap<String, HashMap<u32, SessionSlot>>,
    peers: HashMap<String, PeerSlot>,
    /// This device's link to its account (a linked device), once read.
    link: Option<Option<LinkRecord>>,
    /// Devices [`Olm::start_sessions`] found new to an account this device knew.
    new_devices: Vec<u32>,
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, E2eError> {
    serde_json::to_vec(value).map_err(|e| E2eError::Keys(format!("encoding the Olm state: {e}")))
}

fn unjson<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, E2eError> {
    serde_json::from_slice(bytes).map_err(|e| E2eError::Keys(format!("{what} is damaged: {e}")))
}

/// The row key of `number`'s device `device` in `session`.
fn session_key(tx: &Tx<'_>, number: &str, device: u32) -> Vec<u8> {
    let mut key = tx.hash(b"peer", &[number.as_bytes()]).to_vec();
    key.extend_from_slice(&device.to_be_bytes());
    key
}

impl<'t> Olm<'t> {
    pub fn new(tx: &'t Tx<'t>) -> Olm<'t> {
        Olm {
            tx,
            account: None,
            sessions: HashMap::new(),
            peers: HashMap::new(),
            link: None,
            new_devices: Vec::new(),
        }
    }

    /// The devices [`Olm::start_sessions`] found new (their account linked them since
    /// this device last looked).
    pub fn new_devices(&self) -> &[u32] {
        &self.new_devices
    }

    /// How this device belongs to its account, if it is a linked device.
    pub fn link(&mut self) -> Result<Option<LinkRecord>, E2eError> {
        if self.link.is_none() {
            let record = match self.tx.get(Table::Kv, LINK_KEY)? {
                Some(bytes) => Some(unjson::<LinkRecord>(&bytes, "the account link")?),
                None => None,
            };
            self.link = Some(record);
        }
        Ok(self.link.clone().flatten())
    }

    /// Records that this device is linked to the account of `record` (written at
    /// once, in this transaction).
    pub fn set_link(&mut self, record: LinkRecord) -> Result<(), E2eError> {
        self.tx.put(Table::Kv, LINK_KEY, &json(&record)?)?;
        self.link = Some(Some(record));
        Ok(())
    }

    /// The account identity: the primary's identity keys (this device's own, unless
    /// it is a linked device).
    pub fn account_identity(&mut self) -> Result<IdentityKeys, E2eError> {
        match self.link()? {
            Some(link) => Ok(link.account_identity()),
            None => self.identity(),
        }
    }

    /// On the primary: the account identity's signature vouching for `device` as a
    /// device of `number`.
    pub fn vouch(&mut self, number: &str, device: &IdentityKeys) -> Result<[u8; 64], E2eError> {
        if self.link()?.is_some() {
            return Err(E2eError::Keys(
                "only the primary device holds the account identity".into(),
            ));
        }
        let bytes = IdentityKeys::device_signed_bytes(number, device);
        Ok(self.account()?.account.sign(bytes).to_bytes())
    }

    /// The transaction this works in.
    pub fn tx(&self) -> &'t Tx<'t> {
        self.tx
    }

    fn account(&mut self) -> Result<&mut AccountSlot, E2eError> {
        if self.account.is_none() {
            let slot = match self.tx.get(Table::Kv, ACCOUNT_KEY)? {
                Some(bytes) => {
                    let record: AccountRecord = unjson(&bytes, "the Olm account")?;
                    AccountSlot {
                        account: Account::from_pickle(record.account),
                        published_for: record.published_for,
                        dirty: false,
                    }
                }
                // A new home: its Olm account is made in the transaction that first
                // needs it, so racing processes agree on one.
                None => AccountSlot {
                    account: Account::new(),
                    published_for: None,
                    dirty: true,
                },
            };
            self.account = Some(slot);
        }
        match self.account.as_mut() {
            Some(slot) => Ok(slot),
            None => unreachable!("loaded just above"),
        }
    }

    /// This device's identity keys.
    pub fn identity(&mut self) -> Result<IdentityKeys, E2eError> {
        let keys = self.account()?.account.identity_keys();
        Ok(IdentityKeys {
            curve25519: keys.curve25519.to_bytes(),
            ed25519: *keys.ed25519.as_bytes(),
        })
    }

    /// Whether keys were published for `device`.
    pub fn published_for(&mut self, device: (u64, u32)) -> Result<bool, E2eError> {
        Ok(self.account()?.published_for == Some(device))
    }

    fn sign(account: &Account, label: &[u8], key: Curve25519PublicKey) -> SignedKey {
        let key = key.to_bytes();
        SignedKey {
            key,
            signature: account
                .sign(SignedKey::signed_bytes(label, &key))
                .to_bytes(),
        }
    }

    /// The keys to upload for `device`: a fresh fallback key and a full stock of
    /// one-time keys when the device is new to this account, else `top_up` more
    /// one-time keys; and whatever is not yet published. The private halves are
    /// saved (by [`Olm::flush`]) before anyone can see the public ones.
    pub fn prepare_upload(
        &mut self,
        device: (u64, u32),
        top_up: u32,
    ) -> Result<KeyUpload, E2eError> {
        let identity = self.identity()?;
        let slot = self.account()?;
        // Keys another process made and has not published yet are published again
        // rather than joined by new ones: of racing publishers, the one whose upload
        // lands last must not replace the node's fallback key with one the account
        // already dropped (vodozemac keeps the current and the previous only).
        let unpublished = slot.account.one_time_keys().len() as u32;
        if slot.published_for != Some(device) {
            if slot.account.fallback_key().is_empty() {
                slot.account.generate_fallback_key();
            }
            let want = ONE_TIME_KEY_TARGET.saturating_sub(unpublished);
            slot.account.generate_one_time_keys(want as usize);
        } else if top_up > unpublished {
            slot.account
                .generate_one_time_keys((top_up - unpublished) as usize);
        }
        slot.dirty = true;
        let account = &slot.account;
        let fallback = account
            .fallback_key()
            .values()
            .next()
            .map(|k| Self::sign(account, SignedKey::FALLBACK, *k));
        let one_time_keys = account
            .one_time_keys()
            .values()
            .map(|k| Self::sign(account, SignedKey::ONE_TIME, *k))
            .collect();
        let account_signature = match self.link()? {
            Some(link) => Some(link.signature()?),
            None => None,
        };
        Ok(KeyUpload {
            identity,
            fallback,
            one_time_keys,
            account_signature,
        })
    }

    /// Records that the node stored the keys for `device`.
    pub fn mark_published(&mut self, device: (u64, u32)) -> Result<(), E2eError> {
        let slot = self.account()?;
        slot.account.mark_keys_as_published();
        slot.published_for = Some(device);
        slot.dirty = true;
        Ok(())
    }

    fn slot(&mut self, number: &str, device: u32) -> Result<&mut SessionSlot, E2eError> {
        if !self.sessions.contains_key(number) {
            self.sessions.insert(number.to_string(), HashMap::new());
        }
        let Some(devices) = self.sessions.get_mut(number) else {
            unreachable!("inserted just above");
        };
        match devices.entry(device) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                let key = session_key(self.tx, number, device);
                let list = match self.tx.get(Table::Session, &key)? {
                    Some(bytes) => unjson::<Vec<SessionPickle>>(&bytes, "an Olm session")?
                        .into_iter()
                        .map(Session::from_pickle)
                        .collect(),
                    None => Vec::new(),
                };
                Ok(e.insert(SessionSlot { list, dirty: false }))
            }
        }
    }

    fn peer(&mut self, number: &str) -> Result<&mut PeerSlot, E2eError> {
        match self.peers.entry(number.to_string()) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                let key = self.tx.hash(b"peer", &[number.as_bytes()]);
                let record = match self.tx.get(Table::Peer, &key)? {
                    Some(bytes) => unjson(&bytes, "a contact's identity")?,
                    None => PeerRecord {
                        number: number.to_string(),
                        identity: None,
                        devices: Default::default(),
                    },
                };
                Ok(e.insert(PeerSlot {
                    record,
                    dirty: false,
                }))
            }
        }
    }

    /// The devices of `number` this device has a session with.
    pub fn devices(&mut self, number: &str) -> Result<Vec<u32>, E2eError> {
        let prefix = self.tx.hash(b"peer", &[number.as_bytes()]);
        let mut devices: Vec<u32> = self
            .tx
            .scan(Table::Session, &prefix)?
            .into_iter()
            .filter_map(|(key, _)| key.get(16..20).and_then(|d| d.try_into().ok()))
            .map(u32::from_be_bytes)
            .collect();
        // What this transaction changed and has not written yet.
        for (device, slot) in self.sessions.get(number).into_iter().flatten() {
            devices.retain(|d| d != device);
            if !slot.list.is_empty() {
                devices.push(*device);
            }
        }
        devices.sort_unstable();
        Ok(devices)
    }

    /// Encrypts `plaintext` for every device of `to` this device has a session with.
    pub fn encrypt(&mut self, to: &str, plaintext: &[u8]) -> Result<Vec<DeviceEnvelope>, E2eError> {
        let devices = self.devices(to)?;
        if devices.is_empty() {
            return Err(E2eError::Keys(format!("no session with {to}")));
        }
        devices
            .into_iter()
            .map(|device| {
                Ok(DeviceEnvelope {
                    device_id: device,
                    body: self.encrypt_for(to, device, plaintext)?,
                })
            })
            .collect()
    }

    /// Encrypts `plaintext` for one device, with the newest session.
    pub fn encrypt_for(
        &mut self,
        to: &str,
        device: u32,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, E2eError> {
        let slot = self.slot(to, device)?;
        let session = slot
            .list
            .first_mut()
            .ok_or_else(|| E2eError::Keys(format!("no session with {to}'s device {device}")))?;
        let message = session
            .encrypt(plaintext)
            .map_err(|e| E2eError::Keys(format!("encrypting: {e}")))?;
        slot.dirty = true;
        if let OlmMessage::PreKey(pre_key) = &message
            && let Some(link) = self.link()?
        {
            let own = self.identity()?;
            let mut out = Vec::with_capacity(1 + CERT_LEN + 256);
            out.push(2);
            out.extend_from_slice(&link.account_curve25519);
            out.extend_from_slice(&link.account_ed25519);
            out.extend_from_slice(&own.ed25519);
            out.extend_from_slice(&link.signature()?);
            out.extend_from_slice(&pre_key.to_bytes());
            return Ok(out);
        }
        Ok(envelope_body(&message))
    }

    /// Starts a new session with each device in `bundles` (newest first; older
    /// sessions with the device are kept, since messages under them may still come).
    /// With `only`, just with that device; otherwise the sessions with devices not in
    /// `bundles` go (the account no longer has them). Returns whether the identity
    /// key changed.
    pub fn start_sessions(
        &mut self,
        bundles: &Bundles,
        only: Option<u32>,
    ) -> Result<bool, E2eError> {
        let to = bundles.number.as_str();
        let mut changed = false;
        let mut started = Vec::new();
        // The account identity is the primary's; every other device must carry its
        // signature. For this device's own account, the identity is known for sure.
        let account = bundles
            .devices
            .iter()
            .find(|b| b.primary)
            .map(|b| b.identity)
            .ok_or_else(|| {
                E2eError::Keys(format!(
                    "{to}'s primary device has not published its keys: no device of theirs \
                     can be trusted yet"
                ))
            })?;
        let me = self.identity()?;
        let own = self.link()?.is_some_and(|l| l.number == to)
            || bundles.devices.iter().any(|b| b.identity == me);
        if own && account != self.account_identity()? {
            return Err(E2eError::Keys(
                "the node hands out another identity for this device's own account: refusing"
                    .into(),
            ));
        }
        changed |= self.note_identity(to, &account)?;
        for bundle in &bundles.devices {
            if only.is_some_and(|d| d != bundle.device_id) {
                continue;
            }
            let vouched = bundle.primary
                || bundle
                    .account_signature
                    .is_some_and(|sig| account.vouches_for(to, &bundle.identity, &sig));
            if !vouched {
                return Err(E2eError::Keys(format!(
                    "{to}'s device {} is not signed by their account identity: refusing it",
                    bundle.device_id
                )));
            }
            if bundle.identity == me {
                continue;
            }
            if self.note_device(to, bundle.device_id, bundle.identity.curve25519)? && !changed {
                self.new_devices.push(bundle.device_id);
            }
            let key = checked_session_key(bundle)?;
            let session = self
                .account()?
                .account
                .create_outbound_session(
                    SessionConfig::version_1(),
                    Curve25519PublicKey::from_bytes(bundle.identity.curve25519),
                    key,
                )
                .map_err(|e| E2eError::Keys(format!("starting a session with {to}: {e}")))?;
            let slot = self.slot(to, bundle.device_id)?;
            slot.list.insert(0, session);
            slot.list.truncate(SESSIONS_MAX);
            slot.dirty = true;
            started.push(bundle.device_id);
        }
        if only.is_none() {
            for device in self.devices(to)? {
                if !started.contains(&device) {
                    let slot = self.slot(to, device)?;
                    slot.list.clear();
                    slot.dirty = true;
                }
            }
        }
        Ok(changed)
    }

    /// Decrypts an envelope from `from`'s device `device`: with a session this device
    /// has, else (a pre-key message) with a new inbound session. `Ok(Err(_))` when
    /// it cannot be decrypted.
    pub fn decrypt(
        &mut self,
        from: &str,
        device: u32,
        body: &[u8],
    ) -> Result<Result<Decrypted, DecryptFailure>, E2eError> {
        // A linked device's pre-key message comes with its certificate.
        let mut cert: Option<(IdentityKeys, [u8; 32], [u8; 64])> = None;
        let body = match body.split_first() {
            Some((&2, rest)) => {
                let Some((head, message)) = rest.split_at_checked(CERT_LEN) else {
                    return Ok(Err(DecryptFailure::Malformed(
                        "a linked device's envelope too short for its certificate".into(),
                    )));
                };
                let take = |at: usize| -> [u8; 32] {
                    let mut out = [0u8; 32];
                    out.copy_from_slice(&head[at..at + 32]);
                    out
                };
                let mut sig = [0u8; 64];
                sig.copy_from_slice(&head[96..160]);
                cert = Some((
                    IdentityKeys {
                        curve25519: take(0),
                        ed25519: take(32),
                    },
                    take(64),
                    sig,
                ));
                [&[0u8][..], message].concat()
            }
            _ => body.to_vec(),
        };
        let message = match body.split_first() {
            None => return Ok(Err(DecryptFailure::Malformed("an empty envelope".into()))),
            Some((&kind, rest)) => match OlmMessage::from_parts(kind as usize, rest) {
                Ok(m) => m,
                Err(e) => {
                    return Ok(Err(DecryptFailure::Malformed(format!(
                        "not an Olm message: {e}"
                    ))));
                }
            },
        };
        let slot = self.slot(from, device)?;
        for (i, session) in slot.list.iter_mut().enumerate() {
            if let Ok(plaintext) = session.decrypt(&message) {
                slot.dirty = true;
                // A session that works moves to the front: the sender uses it now.
                if i > 0 {
                    let s = slot.list.remove(i);
                    slot.list.insert(0, s);
                }
                return Ok(Ok(Decrypted {
                    plaintext,
                    identity_changed: false,
                    new_device: false,
                }));
            }
        }
        let OlmMessage::PreKey(pre_key) = &message else {
            return Ok(Err(DecryptFailure::NoSession(
                "no session can decrypt it (a session this device lost, or one it never had)"
                    .into(),
            )));
        };
        let their_identity = pre_key.identity_key();
        // Whose account it is: the sender's own identity (a primary), or the account
        // identity of its certificate, which must vouch for the sender's device keys.
        let account = match cert {
            None => KnownIdentity {
                curve25519: their_identity.to_bytes(),
                ed25519: None,
            },
            Some((account, device_ed25519, sig)) => {
                let device = IdentityKeys {
                    curve25519: their_identity.to_bytes(),
                    ed25519: device_ed25519,
                };
                if !account.vouches_for(from, &device, &sig) {
                    return Ok(Err(DecryptFailure::Malformed(
                        "a linked device's message whose certificate is not signed by its \
                         account identity"
                            .into(),
                    )));
                }
                KnownIdentity {
                    curve25519: account.curve25519,
                    ed25519: Some(account.ed25519),
                }
            }
        };
        // From this device's own account, the identity is known for sure.
        let mine = self.account_identity()?;
        let own_account =
            self.link()?.is_some_and(|l| l.number == from) || account.curve25519 == mine.curve25519;
        if own_account && account.curve25519 != mine.curve25519 {
            return Ok(Err(DecryptFailure::Malformed(
                "a message from this account's number under another account identity".into(),
            )));
        }
        let created = match self.account()?.account.create_inbound_session(
            SessionConfig::version_1(),
            their_identity,
            pre_key,
        ) {
            Ok(c) => c,
            Err(e) => {
                return Ok(Err(DecryptFailure::NoSession(format!(
                    "cannot start a session from it: {e}"
                ))));
            }
        };
        if let Some(slot) = self.account.as_mut() {
            slot.dirty = true;
        }
        let peer = self.peer(from)?;
        let changed = peer
            .record
            .identity
            .is_some_and(|known| known.curve25519 != account.curve25519);
        if peer
            .record
            .identity
            .is_none_or(|k| k.curve25519 != account.curve25519 || k.ed25519.is_none())
        {
            let ed25519 = account.ed25519.or(peer
                .record
                .identity
                .and_then(|k| k.ed25519)
                .filter(|_| !changed));
            peer.record.identity = Some(KnownIdentity {
                curve25519: account.curve25519,
                ed25519,
            });
            peer.dirty = true;
        }
        let new_device = self.note_device(from, device, their_identity.to_bytes())?;
        let slot = self.slot(from, device)?;
        slot.list.insert(0, created.session);
        slot.list.truncate(SESSIONS_MAX);
        slot.dirty = true;
        Ok(Ok(Decrypted {
            plaintext: created.plaintext,
            identity_changed: changed,
            new_device: new_device && !changed,
        }))
    }

    /// Records `number`'s device `device` with its Curve25519 key; returns whether it
    /// is new (the account had other devices known, and not this one with this key).
    fn note_device(
        &mut self,
        number: &str,
        device: u32,
        curve: [u8; 32],
    ) -> Result<bool, E2eError> {
        let peer = self.peer(number)?;
        let known = peer.record.devices.get(&device) == Some(&curve);
        if known {
            return Ok(false);
        }
        let news = !peer.record.devices.is_empty();
        peer.record.devices.insert(device, curve);
        peer.dirty = true;
        Ok(news)
    }

    /// The Curve25519 identity key this device knows for `number`.
    pub fn known_identity(&mut self, number: &str) -> Result<Option<[u8; 32]>, E2eError> {
        Ok(self.peer(number)?.record.identity.map(|k| k.curve25519))
    }

    /// Records `their` identity keys as known for `them`; returns whether they
    /// differ from what was known.
    pub fn note_identity(&mut self, them: &str, their: &IdentityKeys) -> Result<bool, E2eError> {
        let peer = self.peer(them)?;
        let changed = peer
            .record
            .identity
            .is_some_and(|known| known.curve25519 != their.curve25519);
        let seen = Some(KnownIdentity {
            curve25519: their.curve25519,
            ed25519: Some(their.ed25519),
        });
        if peer.record.identity != seen {
            peer.record.identity = seen;
            peer.dirty = true;
        }
        Ok(changed)
    }

    /// Writes back everything this transaction changed.
    pub fn flush(self) -> Result<(), E2eError> {
        let tx = self.tx;
        if let Some(slot) = self.account
            && slot.dirty
        {
            let record = AccountRecord {
                account: slot.account.pickle(),
                published_for: slot.published_for,
            };
            tx.put(Table::Kv, ACCOUNT_KEY, &json(&record)?)?;
        }
        let sessions = self.sessions.into_iter().flat_map(|(number, devices)| {
            devices
                .into_iter()
                .map(move |(d, s)| (number.clone(), d, s))
        });
        for (number, device, slot) in sessions {
            if !slot.dirty {
                continue;
            }
            let key = session_key(tx, &number, device);
            if slot.list.is_empty() {
                tx.delete(Table::Session, &key)?;
            } else {
                let pickles: Vec<SessionPickle> = slot.list.iter().map(Session::pickle).collect();
                tx.put(Table::Session, &key, &json(&pickles)?)?;
            }
        }
        for (number, slot) in self.peers {
            if slot.dirty {
                let key = tx.hash(b"peer", &[number.as_bytes()]);
                tx.put(Table::Peer, &key, &json(&slot.record)?)?;
            }
        }
        Ok(())
    }

    /// Stores sessions and identities read from a home of the old format.
    pub(crate) fn import_legacy(
        &mut self,
        account: AccountPickle,
        published_for: Option<(u64, u32)>,
        contacts: Vec<LegacyContact>,
    ) -> Result<(), E2eError> {
        self.account = Some(AccountSlot {
            account: Account::from_pickle(account),
            published_for,
            dirty: true,
        });
        for (number, identity, devices) in contacts {
            self.peers.insert(
                number.clone(),
                PeerSlot {
                    record: PeerRecord {
                        number: number.clone(),
                        identity,
                        devices: Default::default(),
                    },
                    dirty: true,
                },
            );
            for (device, pickles) in devices {
                let list = pickles.into_iter().map(Session::from_pickle).collect();
                self.sessions
                    .entry(number.clone())
                    .or_default()
                    .insert(device, SessionSlot { list, dirty: true });
            }
        }
        Ok(())
    }
}

/// This device's identity keys (the Olm account is made if the home has none).
pub fn identity(db: &HomeDb) -> Result<IdentityKeys, E2eError> {
    db.write(|tx| {
        let mut olm = Olm::new(tx);
        let keys = olm.identity()?;
        olm.flush()?;
        Ok(keys)
    })
}

/// Publishes keys for the device `(account_id, device_id)`: everything not yet
/// published, plus a fresh fallback key and a full stock of one-time keys when the
/// device is new to this home's account, or `top_up` more one-time keys. Returns how
/// many one-time keys the node holds.
pub async fn publish(
    db: &HomeDb,
    client: &Client,
    device: (u64, u32),
    top_up: u32,
) -> Result<u32, E2eError> {
    let upload = db
        .write_async(move |tx| {
            let mut olm = Olm::new(tx);
            let upload = olm.prepare_upload(device, top_up)?;
            olm.flush()?;
            Ok::<_, E2eError>(upload)
        })
        .await?;
    let stored = client.publish_keys(upload).await?;
    db.write_async(move |tx| {
        let mut olm = Olm::new(tx);
        olm.mark_published(device)?;
        olm.flush()
    })
    .await?;
    Ok(stored)
}

/// A copy of this home's Olm account, for tools and benchmarks that run vodozemac
/// on it directly (the bare decrypt loop of `cargo bench --bench load -- drain`).
pub fn account_pickle(db: &HomeDb) -> Result<AccountPickle, E2eError> {
    db.read(|tx| match tx.get(Table::Kv, ACCOUNT_KEY)? {
        Some(bytes) => Ok(unjson::<AccountRecord>(&bytes, "the Olm account")?.account),
        None => Err(E2eError::Keys("this home has no Olm account yet".into())),
    })
}

/// Whether this home published keys for `device`.
pub fn published_for(db: &HomeDb, device: (u64, u32)) -> Result<bool, E2eError> {
    db.write(|tx| {
        let mut olm = Olm::new(tx);
        let published = olm.published_for(device)?;
        olm.flush()?;
        Ok(published)
    })
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

/// A fresh random message id.
pub fn new_message_id() -> MessageId {
    use rand::RngExt;
    rand::rng().random()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn number(s: &str) -> Number {
        Number::parse_e164(s).unwrap()
    }

    #[test]
    fn the_account_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let db = HomeDb::open(dir.path(), None).unwrap();
        let keys = identity(&db).unwrap();
        drop(db);
        let db = HomeDb::open(dir.path(), None).unwrap();
        assert_eq!(identity(&db).unwrap(), keys);
    }

    #[test]
    fn two_homes_talk_and_a_replayed_envelope_does_not_decrypt_twice() {
        let (da, db_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (alice, bob) = (
            HomeDb::open(da.path(), None).unwrap(),
            HomeDb::open(db_dir.path(), None).unwrap(),
        );
        // Bob's keys, as the node would hand them out.
        let upload = bob
            .write(|tx| {
                let mut olm = Olm::new(tx);
                let u = olm.prepare_upload((2, 1), 0)?;
                olm.mark_published((2, 1))?;
                olm.flush()?;
                Ok::<_, E2eError>(u)
            })
            .unwrap();
        let bundles = Bundles {
            number: "+14155550101".into(),
            devices: vec![Bundle {
                device_id: 1,
                identity: upload.identity,
                one_time_key: upload.one_time_keys.first().copied(),
                fallback: upload.fallback,
                primary: true,
                account_signature: None,
            }],
        };
        let bodies: Vec<Vec<u8>> = alice
            .write(|tx| {
                let mut olm = Olm::new(tx);
                olm.start_sessions(&bundles, None)?;
                let out = (0..3)
                    .map(|i| olm.encrypt_for("+14155550101", 1, format!("m{i}").as_bytes()))
                    .collect::<Result<Vec<_>, _>>()?;
                olm.flush()?;
                Ok::<_, E2eError>(out)
            })
            .unwrap();
        for (i, body) in bodies.iter().enumerate().rev() {
            let got = bob
                .write(|tx| {
                    let mut olm = Olm::new(tx);
                    let d = olm.decrypt("+14155550100", 1, body)?;
                    olm.flush()?;
                    Ok::<_, E2eError>(d)
                })
                .unwrap()
                .unwrap();
            assert_eq!(got.plaintext, format!("m{i}").into_bytes());
        }
        // The ratchet moved on: the same envelope again does not decrypt.
        let again = bob
            .write(|tx| Olm::new(tx).decrypt("+14155550100", 1, &bodies[2]))
            .unwrap();
        assert!(again.is_err());
        let _ = number("+14155550100");
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
