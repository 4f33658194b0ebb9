//! Profiles: a name, an about line and a photo, end-to-end encrypted as Signal does.
//!
//! Each account has a random 32-byte **profile key**. From it (HKDF-SHA256) come the
//! profile's **version**, which the node stores beside the profile and wants named
//! before it hands the profile out, and the key that seals it (XChaCha20-Poly1305,
//! with the account's number as associated data, so a node cannot pass one account's
//! profile off as another's). The profile key travels only inside end-to-end
//! messages, to the people the account writes to: only they can fetch the profile,
//! and only they can read it.
//!
//! Sealed profile: `0x01` · nonce (24) · ciphertext of `0x01` · bincode [`Profile`].
//! Sealed presence: `0x01` · nonce (24) · ciphertext of the last-seen hour (ms since
//! the epoch, u64 BE, rounded down to the hour).
//!
//! A photo is decoded, shrunk to fit [`PHOTO_SIDE`] pixels a side and re-encoded as
//! JPEG here before it is sealed: whatever metadata the file had (EXIF location, the
//! camera) is not carried over.

use bincode::{Decode, Encode};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use rand::RngExt;
use zeroize::Zeroizing;

/// The largest name and about line, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
pub const MAX_ABOUT_BYTES: usize = 512;
/// A photo is shrunk to fit this many pixels a side.
pub const PHOTO_SIDE: u32 = 512;
/// and re-encoded until it is at most this many bytes.
pub const MAX_PHOTO_BYTES: usize = 64 * 1024;
/// The largest photo file read (before it is shrunk).
pub const MAX_PHOTO_FILE_BYTES: u64 = 32 << 20;
/// Last seen is shared to the hour, never finer.
pub const PRESENCE_GRAIN_MS: u64 = 3_600_000;

const SEAL_VERSION: u8 = 1;
const PROFILE_FORMAT: u8 = 1;
const NONCE: usize = 24;

/// A profile as people see it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Profile {
    pub name: String,
    pub about: String,
    /// A JPEG, at most [`PHOTO_SIDE`] a side and [`MAX_PHOTO_BYTES`].
    pub photo: Option<Vec<u8>>,
}

/// Why a profile cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("a profile name is at most {MAX_NAME_BYTES} bytes")]
    NameTooLong,
    #[error("an about line is at most {MAX_ABOUT_BYTES} bytes")]
    AboutTooLong,
    #[error("a profile name must not be empty")]
    NoName,
    #[error("the photo cannot be used: {0}")]
    Photo(String),
    #[error("the profile does not open with the key its owner gave (damaged, or not theirs)")]
    Sealed,
    #[error("the profile is not readable: {0}")]
    Format(String),
}

/// The key material of one profile key.
pub struct ProfileKey {
    key: Zeroizing<[u8; 32]>,
}

fn derive(key: &[u8; 32], purpose: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    hkdf::Hkdf::<sha2::Sha256>::new(None, key)
        .expand(purpose, out.as_mut())
        .unwrap_or_else(|_| unreachable!("HKDF-SHA256 gives 32 bytes"));
    out
}

fn aad(what: &[u8], number: &str) -> Vec<u8> {
    let mut aad = what.to_vec();
    aad.push(0);
    aad.extend_from_slice(number.as_bytes());
    aad
}

impl ProfileKey {
    /// A new random profile key.
    pub fn generate() -> ProfileKey {
        ProfileKey::from_bytes(rand::rng().random())
    }

    pub fn from_bytes(key: [u8; 32]) -> ProfileKey {
        ProfileKey {
            key: Zeroizing::new(key),
        }
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        *self.key
    }

    /// The version the node keeps the profile under (and wants named to hand it out).
    pub fn version(&self) -> [u8; 32] {
        *derive(&self.key, b"switchboard profile version")
    }

    fn seal(&self, what: &[u8], number: &str, plain: &[u8]) -> Vec<u8> {
        let cipher = XChaCha20Poly1305::new(&(*derive(&self.key, b"switchboard profile")).into());
        let nonce: [u8; NONCE] = rand::rng().random();
        let sealed = cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plain,
                    aad: &aad(what, number),
                },
            )
            .unwrap_or_else(|_| unreachable!("XChaCha20-Poly1305 encrypts any buffer this size"));
        let mut out = Vec::with_capacity(1 + NONCE + sealed.len());
        out.push(SEAL_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    fn open(&self, what: &[u8], number: &str, sealed: &[u8]) -> Result<Vec<u8>, ProfileError> {
        let (&version, rest) = sealed.split_first().ok_or(ProfileError::Sealed)?;
        if version != SEAL_VERSION {
            return Err(ProfileError::Format(format!("seal version {version}")));
        }
        let (nonce, body) = rest
            .split_first_chunk::<NONCE>()
            .ok_or(ProfileError::Sealed)?;
        let cipher = XChaCha20Poly1305::new(&(*derive(&self.key, b"switchboard profile")).into());
        cipher
            .decrypt(
                &XNonce::from(*nonce),
                Payload {
                    msg: body,
                    aad: &aad(what, number),
                },
            )
            .map_err(|_| ProfileError::Sealed)
    }

    /// `number`'s `profile`, sealed for the node.
    pub fn seal_profile(&self, number: &str, profile: &Profile) -> Vec<u8> {
        let mut plain = vec![PROFILE_FORMAT];
        plain.extend(
            bincode::encode_to_vec(profile, bincode::config::standard())
                .unwrap_or_else(|e| unreachable!("encoding to a Vec cannot fail: {e}")),
        );
        self.seal(b"profile", number, &plain)
    }

    /// Opens `number`'s sealed profile (bounded: a damaged one is an error).
    pub fn open_profile(&self, number: &str, sealed: &[u8]) -> Result<Profile, ProfileError> {
        decode_plain(&self.open(b"profile", number, sealed)?)
    }

    /// `number`'s last-seen time (`at_ms`, rounded down to the hour), sealed.
    pub fn seal_presence(&self, number: &str, at_ms: u64) -> Vec<u8> {
        let hour = at_ms - at_ms % PRESENCE_GRAIN_MS;
        self.seal(b"presence", number, &hour.to_be_bytes())
    }

    /// Opens `number`'s sealed presence: the hour they were last seen.
    pub fn open_presence(&self, number: &str, sealed: &[u8]) -> Result<u64, ProfileError> {
        let plain = self.open(b"presence", number, sealed)?;
        let hour: [u8; 8] = plain
            .as_slice()
            .try_into()
            .map_err(|_| ProfileError::Format("a presence of the wrong size".into()))?;
        Ok(u64::from_be_bytes(hour))
    }
}

/// Decodes an opened profile: what its owner sealed, so untrusted bytes, decoded
/// with a bound.
pub fn decode_plain(plain: &[u8]) -> Result<Profile, ProfileError> {
    let (&format, rest) = plain
        .split_first()
        .ok_or_else(|| ProfileError::Format("empty".into()))?;
    if format != PROFILE_FORMAT {
        return Err(ProfileError::Format(format!(
            "profile format {format} (from a newer app)"
        )));
    }
    let config = bincode::config::standard().with_limit::<{ 1 << 20 }>();
    let (profile, _): (Profile, usize) = bincode::decode_from_slice(rest, config)
        .map_err(|e| ProfileError::Format(e.to_string()))?;
    check(&profile)?;
    Ok(profile)
}

/// Checks a profile's sizes.
pub fn check(p: &Profile) -> Result<(), ProfileError> {
    if p.name.trim().is_empty() {
        return Err(ProfileError::NoName);
    }
    if p.name.len() > MAX_NAME_BYTES {
        return Err(ProfileError::NameTooLong);
    }
    if p.about.len() > MAX_ABOUT_BYTES {
        return Err(ProfileError::AboutTooLong);
    }
    if p.photo.as_ref().is_some_and(|b| b.len() > MAX_PHOTO_BYTES) {
        return Err(ProfileError::Photo(format!(
            "more than {MAX_PHOTO_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Turns an image file's bytes (JPEG, PNG or WebP) into a profile photo: shrunk to
/// fit [`PHOTO_SIDE`] a side, re-encoded as JPEG (no metadata survives) and made
/// smaller until it fits [`MAX_PHOTO_BYTES`].
pub fn prepare_photo(file: &[u8]) -> Result<Vec<u8>, ProfileError> {
    let image = image::load_from_memory(file)
        .map_err(|e| ProfileError::Photo(format!("not an image this app reads ({e})")))?;
    let mut side = PHOTO_SIDE;
    let mut quality = 85;
    loop {
        let small = image.thumbnail(side, side).into_rgb8();
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
            .encode_image(&small)
            .map_err(|e| ProfileError::Photo(e.to_string()))?;
        if out.len() <= MAX_PHOTO_BYTES {
            return Ok(out);
        }
        if quality > 50 {
            quality -= 15;
        } else if side > 64 {
            side /= 2;
        } else {
            return Err(ProfileError::Photo("it does not shrink enough".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn alice() -> Profile {
        Profile {
            name: "Alice A.".into(),
            about: "at the allotment".into(),
            photo: Some(vec![0xff, 0xd8, 1, 2]),
        }
    }

    #[test]
    fn a_profile_opens_with_its_key_and_number_only() {
        let key = ProfileKey::generate();
        let sealed = key.seal_profile("+14155550100", &alice());
        assert_eq!(key.open_profile("+14155550100", &sealed), Ok(alice()));
        // Another key, or the same bytes passed off as another number's: refused.
        let other = ProfileKey::generate();
        assert_eq!(
            other.open_profile("+14155550100", &sealed),
            Err(ProfileError::Sealed)
        );
        assert_eq!(
            key.open_profile("+14155550101", &sealed),
            Err(ProfileError::Sealed)
        );
        assert_ne!(key.version(), other.version());
        // The name is not in the sealed bytes.
        assert!(!sealed.windows(5).any(|w| w == b"Alice"));
    }

    #[test]
    fn presence_is_rounded_down_to_the_hour() {
        let key = ProfileKey::generate();
        let at = 1_700_000_123_456;
        let sealed = key.seal_presence("+14155550100", at);
        let hour = key.open_presence("+14155550100", &sealed).unwrap();
        assert_eq!(hour % PRESENCE_GRAIN_MS, 0);
        assert!(hour <= at && at - hour < PRESENCE_GRAIN_MS);
        // A presence is not a profile.
        assert!(key.open_profile("+14155550100", &sealed).is_err());
    }

    #[test]
    fn a_photo_is_shrunk_and_loses_its_metadata() {
        // A 1200×900 PNG with a text chunk standing in for metadata.
        let img = image::RgbImage::from_fn(1200, 900, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 256) as u8])
        });
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let photo = prepare_photo(&png).unwrap();
        assert!(photo.len() <= MAX_PHOTO_BYTES);
        let back = image::load_from_memory(&photo).unwrap();
        assert!(back.width() <= PHOTO_SIDE && back.height() <= PHOTO_SIDE);
        assert_eq!(back.width(), PHOTO_SIDE);
        // A JPEG of our own making: no EXIF (APP1) segment.
        assert_eq!(&photo[..2], &[0xff, 0xd8]);
        assert!(!photo.windows(4).any(|w| w == b"Exif"));
        assert!(prepare_photo(b"not an image").is_err());
    }

    #[test]
    fn sizes_are_checked() {
        let mut p = alice();
        p.name = "x".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(check(&p), Err(ProfileError::NameTooLong));
        p.name = " ".into();
        assert_eq!(check(&p), Err(ProfileError::NoName));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Whatever a node hands back, opening it errs or succeeds; it never panics.
        #[test]
        fn opening_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let key = ProfileKey::from_bytes([7; 32]);
            let _ = key.open_profile("+14155550100", &bytes);
            let _ = key.open_presence("+14155550100", &bytes);
        }
    }
}
