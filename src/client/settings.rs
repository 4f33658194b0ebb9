//! A home's own settings: `settings.toml` in the home, every key optional.
//!
//! ```toml
//! # Days this device honours a contact's retry request for a message it sent
//! # (re-encrypting it for them); older messages are answered "cannot resend".
//! resend_window_days = 3
//! # Days a message that could not be decrypted waits for the sender to send it
//! # again before it is shown as "could not be decrypted".
//! undecryptable_after_days = 7
//! # On the primary: days of history sent to a newly linked device.
//! link_history_days = 30
//! # Send read receipts when a message is shown; off, none are sent and none of
//! # others' are shown (as on WhatsApp).
//! read_receipts = true
//! # Share "last seen" (to the hour) with the people who have this account's
//! # profile key; off, others' are not shown either.
//! share_last_seen = false
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

const FILE: &str = "settings.toml";

/// The settings of a home, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub resend_window_days: u32,
    pub undecryptable_after_days: u32,
    pub link_history_days: u32,
    pub read_receipts: bool,
    pub share_last_seen: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            resend_window_days: 3,
            undecryptable_after_days: 7,
            link_history_days: 30,
            read_receipts: true,
            share_last_seen: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    resend_window_days: Option<u32>,
    undecryptable_after_days: Option<u32>,
    link_history_days: Option<u32>,
    read_receipts: Option<bool>,
    share_last_seen: Option<bool>,
}

/// A settings file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct SettingsError {
    pub path: PathBuf,
    pub reason: String,
}

impl Settings {
    /// The settings of the home `dir` (the defaults when it has no settings file).
    pub fn load(dir: &Path) -> Result<Settings, SettingsError> {
        let path = dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Settings::default()),
            Err(e) => {
                return Err(SettingsError {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        Settings::parse(&text).map_err(|reason| SettingsError { path, reason })
    }

    /// Parses the text of a settings file.
    pub fn parse(text: &str) -> Result<Settings, String> {
        let raw: Raw = toml::from_str(text).map_err(|e| e.to_string())?;
        let defaults = Settings::default();
        let days = |name: &str, v: Option<u32>, default: u32| match v {
            Some(0) => Err(format!("{name} must be at least 1")),
            Some(d) if d > 3650 => Err(format!("{name} is at most 3650 days")),
            Some(d) => Ok(d),
            None => Ok(default),
        };
        Ok(Settings {
            resend_window_days: days(
                "resend_window_days",
                raw.resend_window_days,
                defaults.resend_window_days,
            )?,
            undecryptable_after_days: days(
                "undecryptable_after_days",
                raw.undecryptable_after_days,
                defaults.undecryptable_after_days,
            )?,
            link_history_days: days(
                "link_history_days",
                raw.link_history_days,
                defaults.link_history_days,
            )?,
            read_receipts: raw.read_receipts.unwrap_or(defaults.read_receipts),
            share_last_seen: raw.share_last_seen.unwrap_or(defaults.share_last_seen),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_overrides_and_clear_errors() {
        assert_eq!(Settings::parse("").unwrap(), Settings::default());
        assert_eq!(
            Settings::parse("resend_window_days = 5")
                .unwrap()
                .resend_window_days,
            5
        );
        assert!(
            Settings::parse("resend_window_dayz = 5")
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(
            Settings::parse("undecryptable_after_days = 0")
                .unwrap_err()
                .contains("at least 1")
        );
    }
}
