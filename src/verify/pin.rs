//! Registration-lock PINs: hashed with Argon2id (a PHC string with its own salt and
//! parameters), checked in constant time by the argon2 crate.

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};

/// The shortest PIN accepted.
pub const MIN_PIN_LEN: usize = 4;
/// The longest PIN accepted (bounds the hashing work one request can ask for).
pub const MAX_PIN_LEN: usize = 64;

/// Why a PIN is not acceptable as a new PIN.
pub fn check_new(pin: &str) -> Result<(), String> {
    let len = pin.chars().count();
    if !(MIN_PIN_LEN..=MAX_PIN_LEN).contains(&len) {
        return Err(format!(
            "a PIN has {MIN_PIN_LEN} to {MAX_PIN_LEN} characters, not {len}"
        ));
    }
    Ok(())
}

/// The PIN's Argon2id hash, as a PHC string.
pub fn hash(pin: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(pin.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing the PIN failed: {e}"))
}

/// Whether `pin` matches `phc` (false for a damaged hash, too).
pub fn verify(pin: &str, phc: &str) -> bool {
    pin.chars().count() <= MAX_PIN_LEN
        && Argon2::default()
            .verify_password(pin.as_bytes(), phc)
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_verifies_against_its_hash_only() {
        let h = hash("1234").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(!h.contains("1234"));
        assert!(verify("1234", &h));
        assert!(!verify("1235", &h));
        assert!(!verify("1234", "not a hash"));
        assert!(check_new("12").is_err());
        assert!(check_new(&"9".repeat(65)).is_err());
        assert!(check_new("2468").is_ok());
    }
}
