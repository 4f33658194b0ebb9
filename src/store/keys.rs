//! Key encodings of every tree, in one place.
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
        fn parsers_reject_wrong_lengths(bytes in proptest::collection::vec(any::<u8>(), 0..20)) {
            prop_assert_eq!(parse_account(&bytes).is_some(), bytes.len() == 8);
            prop_assert_eq!(parse_device(&bytes).is_some(), bytes.len() == 12);
        }
    }
}
