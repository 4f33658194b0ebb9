//! Limits on claiming one-time keys: per pair of accounts (who claims, whose keys)
//! and per account whose keys are claimed, each a number per hour (GCRA, the
//! `governor` crate). Past a limit a bundle comes with the fallback key alone: the
//! session still starts, and no client can empty someone's one-time keys (which would
//! push every new session onto the fallback key) by fetching bundles again and again.
//!
//! The counts live in memory: a restart forgets them, which costs an attacker a
//! restart of the node per hour's worth of claims.

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

pub struct ClaimLimits {
    per_pair: DefaultKeyedRateLimiter<(u64, u64)>,
    per_account: DefaultKeyedRateLimiter<u64>,
}

fn hourly(n: u32) -> Quota {
    Quota::per_hour(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN))
}

impl ClaimLimits {
    pub fn new(per_pair_per_hour: u32, per_account_per_hour: u32) -> ClaimLimits {
        ClaimLimits {
            per_pair: RateLimiter::keyed(hourly(per_pair_per_hour)),
            per_account: RateLimiter::keyed(hourly(per_account_per_hour)),
        }
    }

    /// Whether `requester` may claim one-time keys of `target` now (counted when yes).
    pub fn allow(&self, requester: u64, target: u64) -> bool {
        self.per_pair.check_key(&(requester, target)).is_ok()
            && self.per_account.check_key(&target).is_ok()
    }

    /// Forgets the counts that have refilled, so memory follows active claimers only.
    pub fn forget_idle(&self) {
        self.per_pair.retain_recent();
        self.per_pair.shrink_to_fit();
        self.per_account.retain_recent();
        self.per_account.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_and_an_account_each_have_their_quota() {
        let limits = ClaimLimits::new(3, 5);
        assert!((0..3).all(|_| limits.allow(1, 9)));
        assert!(!limits.allow(1, 9), "the pair's quota");
        // Others may still claim of 9, until 9's own quota is spent.
        assert!(limits.allow(2, 9) && limits.allow(3, 9));
        assert!(!limits.allow(4, 9), "the account's quota");
        assert!(limits.allow(4, 8), "another account is not affected");
        limits.forget_idle();
    }
}
