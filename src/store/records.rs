//! Values kept in the trees, encoded with bincode. These are storage types: the wire
//! has its own in `proto`, so either can change without dragging the other along.

use bincode::{Decode, Encode};

use super::StoreError;
use super::keys::KeyId;

/// `account` tree value.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct AccountRecord {
    /// The account's number, E.164.
    pub number: String,
    pub created_at_ms: u64,
    /// The id the next linked device gets; ids are never reused within an account.
    pub next_device_id: u32,
    /// The account's devices. Kept inline (an account has a handful) so that a
    /// transaction can rewrite them without a range scan, which sled transactions lack.
    pub devices: Vec<DeviceRecord>,
}

/// One device of an account.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DeviceRecord {
    pub device_id: u32,
    /// SHA-256 of `public_key`; the key of `device_key`.
    pub key_id: KeyId,
    /// The device's SubjectPublicKeyInfo (DER). Public: the node keeps no device secret.
    pub public_key: Vec<u8>,
    pub created_at_ms: u64,
}

/// `number_code` tree value: a pending verification code.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct CodeRecord {
    /// Keyed hash of the code; the code itself is never stored.
    pub hash: [u8; 32],
    pub sent_at_ms: u64,
    pub expires_at_ms: u64,
    /// Wrong guesses still allowed; zero means the code is dead.
    pub tries_left: u32,
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a value for storage.
pub fn encode<T: Encode>(value: &T) -> Result<Vec<u8>, StoreError> {
    bincode::encode_to_vec(value, config()).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Decodes a stored value; `what` names it in the error.
pub fn decode<T: Decode<()>>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    // Stored values were written by us, but a damaged disk is untrusted input too:
    // bound the decode so a flipped length byte cannot ask for terabytes.
    let limited = config().with_limit::<{ 16 << 20 }>();
    bincode::decode_from_slice(bytes, limited)
        .map(|(v, _)| v)
        .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}
