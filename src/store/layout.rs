//! The layout of sled keys (not crypto keys): how every tree's keys are encoded, in
//! one place.
//!
//! Integers are big-endian so that byte order is numeric order and range scans walk
//! keys in sequence. Bincode is for values only: its varints do not sort.

/// A 32-byte device key id: SHA-256 of the device's SubjectPublicKeyInfo.
pub type KeyId = [u8; 32];

/// `account` tree key: the account id.
pub fn account(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// Reads an `account` key.
pub fn parse_account(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(*bytes.first_chunk::<8>()?)).filter(|_| bytes.len() == 8)
}

/// A device address: account id then device id. Used as the value of `device_key`
/// and, from the messaging issue on, as the prefix of per-device queue keys.
pub fn device(account: u64, device: u32) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&account.to_be_bytes());
    out[8..].copy_from_slice(&device.to_be_bytes());
    out
}

/// Reads a device address.
pub fn parse_device(bytes: &[u8]) -> Option<(u64, u32)> {
    if bytes.len() != 12 {
        return None;
    }
    let account = u64::from_be_bytes(*bytes.first_chunk::<8>()?);
    let device = u32::from_be_bytes(*bytes[8..].first_chunk::<4>()?);
    Some((account, device))
}

/// A device address as a fixed array, for maps and prefixes.
pub type DeviceKey = [u8; 12];

/// `queue` tree key: device address, then the item's sequence number.
pub fn queue(device: DeviceKey, seq: u64) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..12].copy_from_slice(&device);
    out[12..].copy_from_slice(&seq.to_be_bytes());
    out
}

/// Reads a `queue` (or `one_time_key`) key: device address and sequence number.
pub fn parse_queue(bytes: &[u8]) -> Option<(DeviceKey, u64)> {
    if bytes.len() != 20 {
        return None;
    }
    let device = *bytes.first_chunk::<12>()?;
    let seq = u64::from_be_bytes(*bytes[12..].first_chunk::<8>()?);
    Some((device, seq))
}

/// `one_time_key` tree key: device address, then an upload sequence number (so the
/// oldest key is claimed first).
pub fn one_time_key(device: DeviceKey, id: u64) -> [u8; 20] {
    queue(device, id)
}

/// `sent_message` tree key: the sending device's address, then the client's message id.
pub fn sent(device: DeviceKey, id: &[u8; 16]) -> [u8; 28] {
    let mut out = [0u8; 28];
    out[..12].copy_from_slice(&device);
    out[12..].copy_from_slice(id);
    out
}

/// `number_account` and `number_code` key: the E.164 number as UTF-8.
pub fn number(e164: &str) -> &[u8] {
    e164.as_bytes()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn account_order_is_numeric_order(a in any::<u64>(), b in any::<u64>()) {
            prop_assert_eq!(account(a).cmp(&account(b)), a.cmp(&b));
            prop_assert_eq!(parse_account(&account(a)), Some(a));
        }

        #[test]
        fn device_order_is_tuple_order(a in any::<(u64, u32)>(), b in any::<(u64, u32)>()) {
            prop_assert_eq!(device(a.0, a.1).cmp(&device(b.0, b.1)), a.cmp(&b));
            prop_assert_eq!(parse_device(&device(a.0, a.1)), Some(a));
        }

        #[test]
        fn queue_order_is_device_then_seq(a in any::<(u64, u32, u64)>(), b in any::<(u64, u32, u64)>()) {
            let ka = queue(device(a.0, a.1), a.2);
            let kb = queue(device(b.0, b.1), b.2);
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(parse_queue(&ka), Some((device(a.0, a.1), a.2)));
            // A device's keys share its address as prefix, and no other device's do.
            prop_assert_eq!(ka.starts_with(&device(b.0, b.1)), (a.0, a.1) == (b.0, b.1));
        }

        #[test]
        fn sent_keys_group_by_device(d in any::<(u64, u32)>(), id in any::<[u8; 16]>()) {
            let k = sent(device(d.0, d.1), &id);
            prop_assert!(k.starts_with(&device(d.0, d.1)));
            prop_assert_eq!(&k[12..], &id[..]);
        }

        #[test]
        fn parsers_reject_wrong_lengths(bytes in proptest::collection::vec(any::<u8>(), 0..20)) {
            prop_assert_eq!(parse_account(&bytes).is_some(), bytes.len() == 8);
            prop_assert_eq!(parse_device(&bytes).is_some(), bytes.len() == 12);
            prop_assert_eq!(parse_queue(&bytes).is_some(), bytes.len() == 20);
        }
    }
}
