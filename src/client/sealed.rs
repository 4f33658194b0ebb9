//! Client secrets at rest under a passphrase.
//!
//! The device's TLS key (`device.key`) and the vault key (`e2e.key`) are sealed when
//! the user gives a passphrase: Argon2id (RFC 9106) turns the passphrase and a random
//! salt into a 32-byte key, and XChaCha20-Poly1305 encrypts the secret under it. The
//! header (format, Argon2 parameters, salt) is authenticated too.
//!
//! Layout: `SBSEAL1\n` · m_cost KiB (u32 BE) · t_cost (u32 BE) · lanes (u32 BE) ·
//! salt (16) · nonce (24) · ciphertext with its 16-byte tag.

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use rand::TryRng;
use zeroize::Zeroizing;

/// The first bytes of a sealed file.
pub const MAGIC: &[u8; 8] = b"SBSEAL1\n";
const HEADER: usize = 8 + 12 + 16;
const NONCE: usize = 24;

/// Argon2id cost for new seals: 19 MiB, 2 passes, 1 lane (OWASP's minimum for
/// Argon2id; about 50 ms on a laptop, once per command).
const M_COST_KIB: u32 = 19 * 1024;
const T_COST: u32 = 2;
const LANES: u32 = 1;

/// A passphrase, wiped from memory when dropped and never printed.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    pub fn new(text: String) -> Passphrase {
        Passphrase(Zeroizing::new(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

/// Why a sealed secret could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("wrong passphrase (or the file was altered)")]
    WrongPassphrase,
    #[error("not a sealed file of a format this build knows: {0}")]
    Damaged(String),
    #[error("the system random generator failed: {0}")]
    Random(String),
}

/// True when `bytes` look like a sealed secret (as opposed to a plain one).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

fn key(
    passphrase: &str,
    salt: &[u8],
    m: u32,
    t: u32,
    p: u32,
) -> Result<Zeroizing<[u8; 32]>, SealError> {
    let params = Params::new(m, t, p, Some(32))
        .map_err(|e| SealError::Damaged(format!("Argon2 parameters: {e}")))?;
    let mut out = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase.as_bytes(), salt, out.as_mut())
        .map_err(|e| SealError::Damaged(format!("Argon2: {e}")))?;
    Ok(out)
}

/// Seals `secret` under `passphrase`.
pub fn seal(passphrase: &str, secret: &[u8]) -> Result<Vec<u8>, SealError> {
    let mut salt_nonce = [0u8; 16 + NONCE];
    rand::rngs::SysRng
        .try_fill_bytes(&mut salt_nonce)
        .map_err(|e| SealError::Random(e.to_string()))?;
    let (salt, nonce) = salt_nonce.split_at(16);
    let mut out = Vec::with_capacity(HEADER + NONCE + secret.len() + 16);
    out.extend_from_slice(MAGIC);
    for v in [M_COST_KIB, T_COST, LANES] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(salt);
    let key = key(passphrase, salt, M_COST_KIB, T_COST, LANES)?;
    let cipher = XChaCha20Poly1305::new(&(*key).into());
    let sealed = cipher
        .encrypt(
            &XNonce::from(<[u8; NONCE]>::try_from(nonce).unwrap_or([0; NONCE])),
            Payload {
                msg: secret,
                aad: &out[..HEADER],
            },
        )
        .map_err(|_| SealError::Damaged("the secret is too large to seal".into()))?;
    out.extend_from_slice(nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens a sealed secret with `passphrase`.
pub fn open(passphrase: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
    if !is_sealed(sealed) {
        return Err(SealError::Damaged("no SBSEAL1 header".into()));
    }
    if sealed.len() < HEADER + NONCE + 16 {
        return Err(SealError::Damaged("shorter than its header".into()));
    }
    let word = |i: usize| {
        let at = 8 + 4 * i;
        u32::from_be_bytes([sealed[at], sealed[at + 1], sealed[at + 2], sealed[at + 3]])
    };
    let (m, t, p) = (word(0), word(1), word(2));
    // A damaged or hostile header must not make opening take gigabytes or hours.
    if m > 1 << 20 || t > 64 || p > 16 {
        return Err(SealError::Damaged(format!(
            "Argon2 parameters out of range (m={m} KiB, t={t}, p={p})"
        )));
    }
    let salt = &sealed[20..HEADER];
    let nonce = &sealed[HEADER..HEADER + NONCE];
    let key = key(passphrase, salt, m, t, p)?;
    let cipher = XChaCha20Poly1305::new(&(*key).into());
    let nonce = <[u8; NONCE]>::try_from(nonce).map_err(|_| SealError::Damaged("nonce".into()))?;
    cipher
        .decrypt(
            &XNonce::from(nonce),
            Payload {
                msg: &sealed[HEADER + NONCE..],
                aad: &sealed[..HEADER],
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| SealError::WrongPassphrase)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_sealed_secret_opens_with_its_passphrase_only() {
        let sealed = seal("correct horse", b"the device key").unwrap();
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(14).any(|w| w == b"the device key"));
        assert_eq!(&*open("correct horse", &sealed).unwrap(), b"the device key");
        assert!(matches!(
            open("battery staple", &sealed),
            Err(SealError::WrongPassphrase)
        ));
    }

    #[test]
    fn an_altered_header_or_body_is_refused() {
        let sealed = seal("pw", b"secret").unwrap();
        for at in [20, HEADER, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(
                open("pw", &bad).is_err(),
                "flipping byte {at} went unnoticed"
            );
        }
        let mut costly = sealed.clone();
        costly[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(open("pw", &costly), Err(SealError::Damaged(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Opening arbitrary bytes (a damaged file) errs; it never panics.
        #[test]
        fn opening_garbage_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if bytes.len() >= 20 {
                // Keep the cost small so each case is quick.
                bytes[..8].copy_from_slice(MAGIC);
                bytes[8..20].copy_from_slice(&[0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 1]);
            }
            prop_assert!(open("pw", &bytes).is_err());
        }
    }
}
