//! Linking a new device to an account, both sides of it.
//!
//! The link code `NNNNNN-PPPPPP` is the node's nameplate (six digits, naming the slot)
//! and a password (six digits the node never sees). Both devices run SPAKE2 (the
//! `spake2` crate, Ed25519 group) on the password through the node: an attacker who
//! sees or is the node learns nothing of the password from the exchange and can test
//! one guess per slot only, by taking the slot (the primary then finds the key wrong
//! and gives the slot up, so the code is dead). From the agreed key, HKDF-SHA256 makes
//! one XChaCha20-Poly1305 key per direction:
//! - the new device seals its **request**: its name and Olm identity keys;
//! - the primary seals its **grant**: the account's number, the account identity (the
//!   primary's Olm identity keys), its signature over the new device's keys, and the
//!   node certificate fingerprint the primary pinned (the new device refuses a node
//!   other than its account's).

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use spake2::{Ed25519Group, Identity, Password, Spake2};

use std::time::{Duration, Instant};

use super::db::DbError;
use super::e2e::{self, E2eError, LinkRecord, Olm};
use super::{Client, ClientError, Home, HomeError, Messenger, MessengerError, Registration};
use crate::phone::Number;
use crate::proto::{IdentityKeys, Response};
use crate::tls::{Credentials, Fingerprint};

/// How often a waiting side asks the node what happened to the link.
const POLL: Duration = Duration::from_millis(250);

const ID_PRIMARY: &[u8] = b"switchboard link primary";
const ID_JOINER: &[u8] = b"switchboard link new device";

/// What can go wrong in a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(
        "{0:?} is not a link code: it is two groups of six digits, NNNNNN-PPPPPP, as \
         `switchboard devices link` prints it"
    )]
    BadCode(String),
    #[error(
        "the link code's secret part did not match: someone else tried this code (or it was \
         mistyped). Nothing was linked; run `devices link` again"
    )]
    WrongSecret,
    #[error("the other side sent something that is not a link message: {0}")]
    Garbled(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    E2e(#[from] E2eError),
    #[error(transparent)]
    Messenger(#[from] MessengerError),
}

/// A device the primary linked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDevice {
    pub device_id: u32,
    pub name: String,
}

/// On the primary of `home`: opens a link, hands the code to `on_code` (with the
/// seconds it stays valid), waits for a device to join with it, and authorises it.
/// A wrong secret (someone else tried the code) gives the slot up: nothing is linked.
pub async fn link_device(
    home: &Home,
    on_code: impl FnOnce(&LinkCode, u32),
) -> Result<NewDevice, LinkError> {
    let reg = home.load()?;
    let db = home.db()?;
    let client = reg.connect().await?;
    let result = link_on(&reg, &db, &client, on_code).await;
    client.close().await;
    result
}

async fn link_on(
    reg: &Registration,
    db: &super::db::HomeDb,
    client: &Client,
    on_code: impl FnOnce(&LinkCode, u32),
) -> Result<NewDevice, LinkError> {
    let mut code = LinkCode::new(100_000);
    let (mut pake, msg) = Pake::primary(&code);
    let (nameplate, expires_in) = client.link_open(msg).await?;
    code.nameplate = nameplate;
    pake.set_nameplate(nameplate);
    on_code(&code, expires_in);
    let deadline = Instant::now() + Duration::from_secs(expires_in.into());
    let (pake_b, sealed) = loop {
        match client.link_poll(nameplate).await? {
            Response::LinkRequested { pake, sealed } => break (pake, sealed),
            Response::LinkAborted => {
                return Err(LinkError::Failed(
                    "the link code expired or was given up; nothing was linked".into(),
                ));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            let _ = client.link_abort(nameplate).await;
            return Err(LinkError::Failed(
                "the link code expired: no device joined; nothing was linked".into(),
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    let opened = pake
        .finish(&pake_b)
        .and_then(|keys| keys.open_request(&sealed).map(|r| (keys, r)));
    let (keys, request) = match opened {
        Ok(x) => x,
        Err(e) => {
            let _ = client.link_abort(nameplate).await;
            if matches!(e, LinkError::WrongSecret) {
                return Err(LinkError::Failed(
                    "someone joined with this code's nameplate but not its secret (a guess, or \
                     a typo): nothing was linked and the code is dead; run `devices link` again"
                        .into(),
                ));
            }
            return Err(e);
        }
    };
    let number = reg.number.to_string();
    let identity = request.identity();
    let (account, signature) = db.write(|tx| {
        let mut olm = Olm::new(tx);
        let account = olm.identity()?;
        let signature = olm.vouch(&number, &identity)?;
        olm.flush()?;
        Ok::<_, E2eError>((account, signature))
    })?;
    let grant = LinkGrant {
        number,
        account_curve25519: account.curve25519,
        account_ed25519: account.ed25519,
        signature: signature.to_vec(),
        fingerprint: reg.fingerprint.to_string(),
        primary_device: reg.device_id,
    };
    let device_id = client
        .link_grant(nameplate, &request.name, keys.seal_grant(&grant))
        .await?;
    Ok(NewDevice {
        device_id,
        name: request.name,
    })
}

/// After [`link_device`]: sends the new device the recent history (see
/// [`Messenger::welcome_device`]); returns how many messages.
pub async fn welcome(home: &Home, device_id: u32) -> Result<usize, LinkError> {
    let messenger = Messenger::open(home)?;
    let sent = messenger.welcome_device(device_id).await;
    messenger.close().await;
    Ok(sent?)
}

/// On a new device: joins the account whose primary printed `code`, from the new,
/// empty `home`, on `server` (checking its certificate against `pin` if given, and
/// against the primary's pin in any case). Saves the device and publishes its keys.
pub async fn join_account(
    home: &Home,
    code: LinkCode,
    server: &str,
    name: &str,
    pin: Option<Fingerprint>,
) -> Result<Registration, LinkError> {
    if let Ok(reg) = home.load() {
        return Err(LinkError::Failed(format!(
            "this home ({}) is device {} of {} already: a new device joins with a new home",
            home.dir().display(),
            reg.device_id,
            reg.number
        )));
    }
    let (credentials, pem) =
        Credentials::generate_device().map_err(|e| LinkError::Failed(e.to_string()))?;
    let client = Client::connect(server, &credentials, pin).await?;
    let result = join_on(home, server, name, code, credentials, &pem, &client).await;
    client.close().await;
    result
}

async fn join_on(
    home: &Home,
    server: &str,
    name: &str,
    code: LinkCode,
    credentials: Credentials,
    pem: &crate::tls::PemPair,
    client: &Client,
) -> Result<Registration, LinkError> {
    let db = home.db()?;
    let identity = e2e::identity(&db)?;
    let (pake, msg) = Pake::joiner(&code);
    let offer = client.link_join(code.nameplate, msg).await?;
    let keys = pake.finish(&offer)?;
    let request = LinkRequest {
        name: name.to_string(),
        curve25519: identity.curve25519,
        ed25519: identity.ed25519,
    };
    client
        .link_request(code.nameplate, keys.seal_request(&request))
        .await?;
    // The primary's side waits at most the code's lifetime; so does this one.
    let deadline = Instant::now() + Duration::from_secs(15 * 60);
    let (registered, sealed) = loop {
        match client.link_poll(code.nameplate).await? {
            Response::LinkComplete { registered, sealed } => break (registered, sealed),
            Response::LinkAborted => {
                return Err(LinkError::Failed(
                    "the primary gave the link up (the code's secret part did not match, or it \
                     expired): nothing was linked; run `devices link` on the primary again"
                        .into(),
                ));
            }
            _ if Instant::now() > deadline => {
                return Err(LinkError::Failed("the primary never answered".into()));
            }
            _ => tokio::time::sleep(POLL).await,
        }
    };
    let grant = keys.open_grant(&sealed)?;
    let account = IdentityKeys {
        curve25519: grant.account_curve25519,
        ed25519: grant.account_ed25519,
    };
    let signature: [u8; 64] = grant
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| LinkError::Garbled("the grant's signature is not 64 bytes".into()))?;
    if grant.number != registered.number
        || !account.vouches_for(&grant.number, &identity, &signature)
    {
        return Err(LinkError::Failed(
            "the primary's grant does not vouch for this device: refusing to link".into(),
        ));
    }
    if grant.fingerprint != client.fingerprint().to_string() {
        return Err(LinkError::Failed(format!(
            "this node's certificate ({}) is not the one your primary device pinned ({}): \
             someone may be in between; nothing was saved",
            client.fingerprint(),
            grant.fingerprint
        )));
    }
    let number = Number::parse_e164(&registered.number)
        .map_err(|e| LinkError::Garbled(format!("the account's number: {e}")))?;
    let reg = Registration {
        server: server.to_string(),
        fingerprint: client.fingerprint(),
        number,
        account_id: registered.account_id,
        device_id: registered.device_id,
        credentials,
    };
    let link = LinkRecord {
        number: grant.number.clone(),
        account_curve25519: account.curve25519,
        account_ed25519: account.ed25519,
        signature: signature.to_vec(),
    };
    db.write(|tx| {
        let mut olm = Olm::new(tx);
        olm.set_link(link.clone())?;
        olm.note_identity(&grant.number, &account)?;
        olm.flush()
    })?;
    home.save(&reg, pem)?;
    e2e::publish(&db, client, (reg.account_id, reg.device_id), 0).await?;
    // Sessions with the account's other devices now, so that what this device sends
    // first is copied to them (the node names any device linked later).
    let bundles = client.fetch_bundles(&reg.number, true).await?;
    db.write(|tx| {
        let mut olm = Olm::new(tx);
        olm.start_sessions(&bundles, None)?;
        olm.flush()
    })?;
    Ok(reg)
}

/// A parsed link code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkCode {
    pub nameplate: u32,
    pub password: u32,
}

impl LinkCode {
    /// A new code for `nameplate`, with a fresh random password.
    pub fn new(nameplate: u32) -> LinkCode {
        LinkCode {
            nameplate,
            password: rand::rng().random_range(0..1_000_000),
        }
    }

    /// Reads `NNNNNN-PPPPPP` (spaces and dashes anywhere are ignored).
    pub fn parse(text: &str) -> Result<LinkCode, LinkError> {
        let digits: String = text
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .collect();
        if digits.len() != 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(LinkError::BadCode(text.to_string()));
        }
        let (a, b) = digits.split_at(6);
        let bad = |_| LinkError::BadCode(text.to_string());
        let nameplate: u32 = a.parse().map_err(bad)?;
        let password: u32 = b.parse().map_err(bad)?;
        if nameplate < 100_000 {
            return Err(LinkError::BadCode(text.to_string()));
        }
        Ok(LinkCode {
            nameplate,
            password,
        })
    }

    fn password(&self) -> Password {
        Password::new(format!("{:06}", self.password))
    }
}

impl std::fmt::Display for LinkCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:06}-{:06}", self.nameplate, self.password)
    }
}

/// `Spake2::start_a` or `start_b`: a side's state and its message.
type SpakeStart = fn(&Password, &Identity, &Identity) -> (Spake2<Ed25519Group>, Vec<u8>);

/// One side of the key agreement, until the other side's message comes.
pub struct Pake {
    state: Spake2<Ed25519Group>,
    nameplate: u32,
}

impl Pake {
    /// The primary's side: its state and its message.
    pub fn primary(code: &LinkCode) -> (Pake, Vec<u8>) {
        Self::start(code, Spake2::<Ed25519Group>::start_a)
    }

    /// The new device's side.
    pub fn joiner(code: &LinkCode) -> (Pake, Vec<u8>) {
        Self::start(code, Spake2::<Ed25519Group>::start_b)
    }

    fn start(code: &LinkCode, side: SpakeStart) -> (Pake, Vec<u8>) {
        let (state, msg) = side(
            &code.password(),
            &Identity::new(ID_PRIMARY),
            &Identity::new(ID_JOINER),
        );
        let pake = Pake {
            state,
            nameplate: code.nameplate,
        };
        (pake, msg)
    }

    /// Sets the nameplate the node gave (the primary starts before it has one).
    pub fn set_nameplate(&mut self, nameplate: u32) {
        self.nameplate = nameplate;
    }

    /// The keys, given the other side's message. (A wrong password gives keys that
    /// open nothing: it shows when the sealed payload does not open.)
    pub fn finish(self, theirs: &[u8]) -> Result<LinkKeys, LinkError> {
        let shared = self
            .state
            .finish(theirs)
            .map_err(|e| LinkError::Garbled(format!("SPAKE2: {e:?}")))?;
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(&self.nameplate.to_be_bytes()), &shared);
        let mut request = [0u8; 32];
        let mut grant = [0u8; 32];
        hk.expand(b"switchboard link v1 request", &mut request)
            .map_err(|_| LinkError::Garbled("HKDF".into()))?;
        hk.expand(b"switchboard link v1 grant", &mut grant)
            .map_err(|_| LinkError::Garbled("HKDF".into()))?;
        Ok(LinkKeys { request, grant })
    }
}

/// The two payload keys of one link.
pub struct LinkKeys {
    request: [u8; 32],
    grant: [u8; 32],
}

impl Drop for LinkKeys {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.request.zeroize();
        self.grant.zeroize();
    }
}

/// The new device's request, for the primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRequest {
    pub name: String,
    pub curve25519: [u8; 32],
    pub ed25519: [u8; 32],
}

impl LinkRequest {
    pub fn identity(&self) -> IdentityKeys {
        IdentityKeys {
            curve25519: self.curve25519,
            ed25519: self.ed25519,
        }
    }
}

/// The primary's grant, for the new device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkGrant {
    pub number: String,
    pub account_curve25519: [u8; 32],
    pub account_ed25519: [u8; 32],
    /// The account identity's signature over the new device's keys (64 bytes).
    pub signature: Vec<u8>,
    /// The node certificate fingerprint the primary pinned.
    pub fingerprint: String,
    pub primary_device: u32,
}

impl LinkKeys {
    pub fn seal_request(&self, request: &LinkRequest) -> Vec<u8> {
        seal(&self.request, b"request", request)
    }

    pub fn open_request(&self, sealed: &[u8]) -> Result<LinkRequest, LinkError> {
        open(&self.request, b"request", sealed)
    }

    pub fn seal_grant(&self, grant: &LinkGrant) -> Vec<u8> {
        seal(&self.grant, b"grant", grant)
    }

    pub fn open_grant(&self, sealed: &[u8]) -> Result<LinkGrant, LinkError> {
        open(&self.grant, b"grant", sealed)
    }
}

fn seal<T: Serialize>(key: &[u8; 32], what: &[u8], value: &T) -> Vec<u8> {
    let plain = serde_json::to_vec(value)
        .unwrap_or_else(|e| unreachable!("a link payload always serialises: {e}"));
    let nonce: [u8; 24] = rand::rng().random();
    let cipher = XChaCha20Poly1305::new(&(*key).into());
    let sealed = cipher
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: &plain,
                aad: what,
            },
        )
        .unwrap_or_else(|_| unreachable!("XChaCha20-Poly1305 encrypts any buffer this size"));
    [&nonce[..], &sealed].concat()
}

fn open<T: for<'a> Deserialize<'a>>(
    key: &[u8; 32],
    what: &[u8],
    sealed: &[u8],
) -> Result<T, LinkError> {
    let (nonce, body) = sealed
        .split_first_chunk::<24>()
        .ok_or(LinkError::WrongSecret)?;
    let cipher = XChaCha20Poly1305::new(&(*key).into());
    let plain = cipher
        .decrypt(
            &XNonce::from(*nonce),
            Payload {
                msg: body,
                aad: what,
            },
        )
        .map_err(|_| LinkError::WrongSecret)?;
    serde_json::from_slice(&plain).map_err(|e| LinkError::Garbled(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> LinkRequest {
        LinkRequest {
            name: "laptop".into(),
            curve25519: [1; 32],
            ed25519: [2; 32],
        }
    }

    #[test]
    fn both_sides_agree_on_the_right_code_only() {
        let code = LinkCode::new(123_456);
        assert_eq!(LinkCode::parse(&code.to_string()).unwrap(), code);
        let (primary, a) = Pake::primary(&code);
        let (joiner, b) = Pake::joiner(&code);
        let (pk, jk) = (primary.finish(&b).unwrap(), joiner.finish(&a).unwrap());
        assert_eq!(
            pk.open_request(&jk.seal_request(&request())).unwrap(),
            request()
        );

        // A guess of the password makes keys that open nothing.
        let wrong = LinkCode {
            nameplate: code.nameplate,
            password: (code.password + 1) % 1_000_000,
        };
        let (primary, a) = Pake::primary(&code);
        let (guesser, b) = Pake::joiner(&wrong);
        let (pk, gk) = (primary.finish(&b).unwrap(), guesser.finish(&a).unwrap());
        assert!(matches!(
            pk.open_request(&gk.seal_request(&request())),
            Err(LinkError::WrongSecret)
        ));
        assert!(matches!(
            pk.open_request(b"short"),
            Err(LinkError::WrongSecret)
        ));
    }

    #[test]
    fn codes_are_two_groups_of_six_digits() {
        assert_eq!(
            LinkCode::parse(" 123456 - 000042 ").unwrap(),
            LinkCode {
                nameplate: 123_456,
                password: 42
            }
        );
        for bad in [
            "",
            "123456",
            "123456-12345",
            "12345a-123456",
            "012345-123456",
        ] {
            assert!(LinkCode::parse(bad).is_err(), "{bad}");
        }
    }
}
