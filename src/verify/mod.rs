//! Verification codes: making them, judging guesses, and handing them to a provider.
//!
//! A code is six digits from the OS CSPRNG. The node keeps only a keyed hash of it
//! (HMAC-SHA256 under a secret in the data dir, over the number and the code), so a
//! copy of the database does not reveal pending codes, and compares hashes in
//! constant time. This module decides; the store persists; the node answers.

pub mod gateway;
pub mod limits;
pub mod pin;
pub mod provider;

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::Verification;
use crate::phone::Number;
use crate::store::Judgement;
use crate::store::records::CodeRecord;

pub use provider::{Delivery, DeliveryError, LogProvider, Provider};

/// Why a code request or a guess was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Another code was sent too recently.
    Cooldown { retry_after: Duration },
    /// The guess was wrong; `tries_left` guesses remain.
    Wrong { tries_left: u32 },
    /// The code expired.
    Expired,
    /// The code is dead after too many wrong guesses; a new one may be asked for
    /// after `retry_after`.
    Exhausted { retry_after: Duration },
    /// The code is right, but the number's registration lock wants its PIN: none was
    /// given, or `wrong_pin`. `tries_left` wrong PINs remain; the lock lapses in
    /// `lapses_in` if the account's devices stay away.
    Locked {
        tries_left: u32,
        lapses_in: Duration,
        wrong_pin: bool,
    },
}

/// Makes and judges codes under one node secret and one configuration.
pub struct Codes {
    key: [u8; 32],
    config: Verification,
}

impl Codes {
    pub fn new(key: [u8; 32], config: Verification) -> Codes {
        Codes { key, config }
    }

    /// The code to send to `number`: its fixed code for a configured test number,
    /// else six fresh random digits.
    pub fn generate(&self, number: &Number) -> String {
        match self.config.test_numbers.get(number) {
            Some(code) => code.clone(),
            None => format!("{:06}", rand::rng().random_range(0..1_000_000u32)),
        }
    }

    /// Whether `number` is a configured test number (its code is never delivered).
    pub fn is_test_number(&self, number: &Number) -> bool {
        self.config.test_numbers.contains_key(number)
    }

    fn hash(&self, number: &Number, code: &str) -> [u8; 32] {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(number.as_str().as_bytes());
        mac.update(&[0]);
        mac.update(code.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The record of a new `code` for `number`, or a refusal when the previous code
    /// was sent less than the cooldown ago.
    pub fn issue(
        &self,
        number: &Number,
        code: &str,
        current: Option<&CodeRecord>,
        now_ms: u64,
    ) -> Result<CodeRecord, Refusal> {
        if let Some(current) = current {
            let ready_at = current
                .sent_at_ms
                .saturating_add(millis(self.config.resend_cooldown));
            if now_ms < ready_at {
                return Err(Refusal::Cooldown {
                    retry_after: Duration::from_millis(ready_at - now_ms),
                });
            }
        }
        Ok(CodeRecord {
            hash: self.hash(number, code),
            sent_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(millis(self.config.code_ttl)),
            tries_left: self.config.max_attempts,
        })
    }

    /// Judges `guess` against the pending `record` of `number`.
    pub fn judge(
        &self,
        number: &Number,
        guess: &str,
        record: &CodeRecord,
        now_ms: u64,
    ) -> Judgement<Refusal> {
        if now_ms >= record.expires_at_ms {
            return Judgement::Reject {
                update: None,
                error: Refusal::Expired,
            };
        }
        let retry_after = Duration::from_millis(
            record
                .sent_at_ms
                .saturating_add(millis(self.config.resend_cooldown))
                .saturating_sub(now_ms),
        );
        if record.tries_left == 0 {
            // Kept until it expires so the cooldown still holds for this number.
            return Judgement::Reject {
                update: Some(record.clone()),
                error: Refusal::Exhausted { retry_after },
            };
        }
        let candidate = self.hash(number, guess);
        if bool::from(candidate.ct_eq(&record.hash)) {
            return Judgement::Accept;
        }
        let mut update = record.clone();
        update.tries_left -= 1;
        Judgement::Reject {
            update: Some(update),
            error: Refusal::Wrong {
                tries_left: record.tries_left - 1,
            },
        }
    }

    /// The configured lifetime of a code.
    pub fn ttl(&self) -> Duration {
        self.config.code_ttl
    }

    /// The configured resend cooldown.
    pub fn cooldown(&self) -> Duration {
        self.config.resend_cooldown
    }

    /// The configured number of wrong guesses a code allows.
    pub fn max_attempts(&self) -> u32 {
        self.config.max_attempts
    }
}

/// Whether `code` has the form of a code: six ASCII digits.
pub fn well_formed(code: &str) -> bool {
    code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn codes() -> Codes {
        Codes::new([9; 32], Config::default().verification)
    }

    fn number() -> Number {
        Number::parse("+14155550100", None).unwrap()
    }

    #[test]
    fn five_wrong_guesses_kill_the_code_even_for_the_right_one() {
        let c = codes();
        let n = number();
        let mut record = c.issue(&n, "123456", None, 0).unwrap();
        for expected_left in (0..5).rev() {
            match c.judge(&n, "000000", &record, 1) {
                Judgement::Reject {
                    update: Some(u),
                    error: Refusal::Wrong { tries_left },
                } => {
                    assert_eq!(tries_left, expected_left);
                    record = u;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            c.judge(&n, "123456", &record, 2),
            Judgement::Reject {
                error: Refusal::Exhausted { .. },
                ..
            }
        ));
    }

    #[test]
    fn right_code_accepted_until_it_expires() {
        let c = codes();
        let n = number();
        let record = c.issue(&n, "123456", None, 0).unwrap();
        assert!(matches!(
            c.judge(&n, "123456", &record, 599_999),
            Judgement::Accept
        ));
        assert!(matches!(
            c.judge(&n, "123456", &record, 600_000),
            Judgement::Reject {
                update: None,
                error: Refusal::Expired
            }
        ));
    }

    #[test]
    fn code_is_bound_to_its_number_and_never_stored() {
        let c = codes();
        let n = number();
        let other = Number::parse("+14155550101", None).unwrap();
        let record = c.issue(&n, "123456", None, 0).unwrap();
        assert!(!record.hash.windows(6).any(|w| w == b"123456"));
        assert!(matches!(
            c.judge(&other, "123456", &record, 1),
            Judgement::Reject { .. }
        ));
    }

    #[test]
    fn resend_waits_for_the_cooldown() {
        let c = codes();
        let n = number();
        let record = c.issue(&n, "123456", None, 0).unwrap();
        assert_eq!(
            c.issue(&n, "654321", Some(&record), 10_000),
            Err(Refusal::Cooldown {
                retry_after: Duration::from_secs(50)
            })
        );
        assert!(c.issue(&n, "654321", Some(&record), 60_000).is_ok());
    }

    #[test]
    fn generated_codes_are_six_digits() {
        let c = codes();
        for _ in 0..100 {
            assert!(well_formed(&c.generate(&number())));
        }
    }
}
