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

use crate::proto::IdentityKeys;

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

/// One side of the key agreement, until the other side's message comes.
pub struct Pake {
    state: Spake2<Ed25519Group>,
    nameplate: u32,
}

impl Pake {
    /// The primary's side: its state and its message.
    pub fn primary(code: &LinkCode) -> (Pake, Vec<u8>) {
        let (state, msg) = Spake2::<Ed25519Group>::start_a(
            &code.password(),
            &Identity::new(ID_PRIMARY),
            &Identity::new(ID_JOINER),
        );
        (
            Pake {
                state,
                nameplate: code.nameplate,
            },
            msg,
        )
    }

    /// The new device's side.
    pub fn joiner(code: &LinkCode) -> (Pake, Vec<u8>) {
        let (state, msg) = Spake2::<Ed25519Group>::start_b(
            &code.password(),
            &Identity::new(ID_PRIMARY),
            &Identity::new(ID_JOINER),
        );
        (
            Pake {
                state,
                nameplate: code.nameplate,
            },
            msg,
        )
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
