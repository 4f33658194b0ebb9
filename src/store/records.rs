//! Values kept in the trees, encoded with bincode. These are storage types: the wire
//! has its own in `proto`, so either can change without dragging the other along.

use bincode::{Decode, Encode};

use super::StoreError;
use super::layout::KeyId;

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

/// `device_keys` tree value: a device's published identity and fallback keys.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DeviceKeysRecord {
    pub curve25519: [u8; 32],
    pub ed25519: [u8; 32],
    /// The fallback key and its signature.
    pub fallback: Option<StoredKey>,
    pub updated_at_ms: u64,
}

/// A signed public key: 32 key bytes and a 64-byte signature. `one_time_key` values
/// are these, as 96 raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct StoredKey {
    pub key: [u8; 32],
    pub signature: [u8; 64],
}

impl StoredKey {
    pub fn to_bytes(self) -> [u8; 96] {
        let mut out = [0u8; 96];
        out[..32].copy_from_slice(&self.key);
        out[32..].copy_from_slice(&self.signature);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<StoredKey> {
        if bytes.len() != 96 {
            return None;
        }
        Some(StoredKey {
            key: *bytes.first_chunk::<32>()?,
            signature: *bytes[32..].first_chunk::<64>()?,
        })
    }
}

/// What a `queue` entry holds. The stored value is the queue time (u64 BE, 8 bytes,
/// so the sweep reads it without decoding) followed by this, in bincode.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum QueueItem {
    /// A message from a device; `body` is opaque ciphertext.
    Message {
        from_account: u64,
        from_device: u32,
        from_number: String,
        id: [u8; 16],
        body: Vec<u8>,
    },
    /// The device `to_number`/`device_id` acknowledged the message `id` this device sent.
    Delivered {
        to_number: String,
        device_id: u32,
        id: [u8; 16],
    },
    /// A message to group `group_id`: its body is stored once, in `group_body` under
    /// `body_ref`, for every recipient device.
    GroupMessage {
        from_account: u64,
        from_device: u32,
        from_number: String,
        group_id: u64,
        id: [u8; 16],
        body_ref: u64,
    },
    /// `delivered` of the `of` devices that group message `id` (of this device) went
    /// to have it: the latest count, replacing the one before.
    GroupDelivered {
        group_id: u64,
        id: [u8; 16],
        delivered: u32,
        of: u32,
    },
}

/// Why a device (its key) was removed from its account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum Removal {
    /// Its number was registered on another device (a new primary).
    SignedOut,
    /// The primary, or the device itself, unlinked it.
    Unlinked,
    /// A linked device that stayed away too long.
    Lapsed,
    /// The node's operator deleted the account.
    AccountDeleted,
}

/// `removed_key` tree value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct RemovedKeyRecord {
    pub why: Removal,
    pub at_ms: u64,
}

/// `group` tree value: a group's members (in the order they joined) and its
/// end-to-end encrypted name, description and picture (opaque to the node).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct GroupRecord {
    /// Bumped by every change.
    pub version: u64,
    pub created_at_ms: u64,
    pub members: Vec<GroupMemberRecord>,
    pub meta: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct GroupMemberRecord {
    pub account_id: u64,
    pub admin: bool,
    pub joined_at_ms: u64,
}

/// `profile` tree value: an account's end-to-end encrypted profile and presence.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ProfileRecord {
    /// Derived from the profile key by the client; a fetch must name it.
    pub version: [u8; 32],
    pub blob: Vec<u8>,
    /// Empty: none.
    pub presence: Vec<u8>,
    pub updated_at_ms: u64,
}

/// `blob` tree value: an attachment's record (its bytes are a file).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct BlobRecord {
    /// The account that uploaded it.
    pub owner: u64,
    /// Bytes promised.
    pub size: u64,
    /// Bytes durable in its file so far (an upload resumes here).
    pub received: u64,
    /// Whole, and in its place: it may be downloaded.
    pub complete: bool,
    pub created_at_ms: u64,
    /// Downloads it still waits for (0 from the start: unknown, kept until the TTL).
    pub downloads_left: u32,
    /// The devices (account, device) that downloaded it whole, each counted once.
    pub downloaded_by: Vec<(u64, u32)>,
}

impl BlobRecord {
    /// A new upload of `owner`, `size` bytes for `downloads` devices, begun at `now_ms`.
    pub fn new(owner: u64, size: u64, downloads: u32, now_ms: u64) -> BlobRecord {
        BlobRecord {
            owner,
            size,
            received: 0,
            complete: false,
            created_at_ms: now_ms,
            downloads_left: downloads,
            downloaded_by: Vec::new(),
        }
    }
}

/// A registration lock: re-registering the number needs the PIN.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct LockRecord {
    /// The PIN's Argon2id hash, as a PHC string (with its salt and parameters).
    pub pin_hash: String,
    pub set_at_ms: u64,
    /// Wrong PINs given since the last right one.
    pub wrong_tries: u32,
}

/// The flag, in the top bit of a `queue` value's first 8 bytes, of an item with an
/// expiry of its own (a disappearing message): its 8-byte expiry time (ms, BE)
/// follows, then the item. Queue times are far below 2^63, so older values never
/// have it.
const EXPIRES_FLAG: u64 = 1 << 63;

/// Encodes a `queue` value.
pub fn encode_queued(queued_at_ms: u64, item: &QueueItem) -> Result<Vec<u8>, StoreError> {
    encode_queued_until(queued_at_ms, None, item)
}

/// Encodes a `queue` value that the sweep drops at `expires_at_ms` (when set) or at
/// the node's TTL, whichever comes first.
pub fn encode_queued_until(
    queued_at_ms: u64,
    expires_at_ms: Option<u64>,
    item: &QueueItem,
) -> Result<Vec<u8>, StoreError> {
    let mut out = match expires_at_ms {
        Some(until) => {
            let mut out = (queued_at_ms | EXPIRES_FLAG).to_be_bytes().to_vec();
            out.extend_from_slice(&until.to_be_bytes());
            out
        }
        None => queued_at_ms.to_be_bytes().to_vec(),
    };
    bincode::encode_into_std_write(item, &mut out, config())
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(out)
}

/// The queue time of a `queue` value, without decoding the item.
pub fn queued_at(bytes: &[u8]) -> Option<u64> {
    bytes
        .first_chunk::<8>()
        .map(|b| u64::from_be_bytes(*b) & !EXPIRES_FLAG)
}

/// The item's own expiry time, if it has one, without decoding the item.
pub fn expires_at(bytes: &[u8]) -> Option<u64> {
    let head = u64::from_be_bytes(*bytes.first_chunk::<8>()?);
    if head & EXPIRES_FLAG == 0 {
        return None;
    }
    bytes
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

/// Whether the sweep drops this `queue` value: queued before `cutoff_ms` (the TTL),
/// or past its own expiry at `now_ms`.
pub fn expired(bytes: &[u8], cutoff_ms: u64, now_ms: u64) -> bool {
    queued_at(bytes).is_some_and(|at| at < cutoff_ms)
        || expires_at(bytes).is_some_and(|until| until <= now_ms)
}

/// Decodes a `queue` value.
pub fn decode_queued(bytes: &[u8]) -> Result<(u64, QueueItem), StoreError> {
    let short = || StoreError::Corrupt("queue value too short".into());
    let head = u64::from_be_bytes(*bytes.first_chunk::<8>().ok_or_else(short)?);
    let start = if head & EXPIRES_FLAG == 0 { 8 } else { 16 };
    let item = bytes.get(start..).ok_or_else(short)?;
    Ok((head & !EXPIRES_FLAG, decode(item, "queue")?))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_value_with_an_expiry_reads_as_one_without_and_expires_on_time() {
        let item = QueueItem::Delivered {
            to_number: "+14155550101".into(),
            device_id: 1,
            id: [3; 16],
        };
        let plain = encode_queued(100, &item).unwrap();
        let timed = encode_queued_until(100, Some(500), &item).unwrap();
        assert_eq!(timed.len(), plain.len() + 8);
        for v in [&plain, &timed] {
            assert_eq!(queued_at(v), Some(100));
            assert_eq!(decode_queued(v).unwrap(), (100, item.clone()));
        }
        assert_eq!((expires_at(&plain), expires_at(&timed)), (None, Some(500)));
        // The TTL takes both; the expiry only the timed one, and only from its time.
        assert!(expired(&plain, 101, 0) && expired(&timed, 101, 0));
        assert!(!expired(&plain, 50, 1_000) && expired(&timed, 50, 500));
        assert!(!expired(&timed, 50, 499));
        // A flagged value cut short is damage, not a panic.
        assert!(decode_queued(&timed[..12]).is_err());
    }
}
