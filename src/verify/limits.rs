//! Limits on code requests: per number, per source address, per country calling code
//! and in all, over sliding windows, plus growing waits between codes to one number.
//!
//! This module decides; the store keeps the send times (`Store::record_code_send`),
//! so a restart does not reset the counts. The keys it counts under are bounded by what
//! it lets through: nothing is recorded for a refused request, and the global daily
//! budget caps how many keys a day can create. The sweep drops keys idle for a day.

use std::net::IpAddr;
use std::time::Duration;

use crate::config::CodeLimits;
use crate::phone::Number;

const MINUTE: u64 = 60_000;
const HOUR: u64 = 60 * MINUTE;
/// Send times older than this are of no use to any window.
pub const KEEP_MS: u64 = 24 * HOUR;

/// A refused code request: which limit, and when to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// For metrics: `global_day`, `country_day`, `number_10min`, `number_hour`,
    /// `number_wait`, `address_hour`.
    pub name: &'static str,
    /// For people: "at most 3 codes per number in 10 minutes".
    pub limit: String,
    pub retry_after: Duration,
}

/// The keys a code request for `number` from `source` counts under, in the order
/// [`judge`] expects their send times.
pub fn keys(number: &Number, source: IpAddr) -> [String; 4] {
    [
        "global".to_string(),
        format!("cc:{}", number.calling_code()),
        format!("n:{number}"),
        format!("ip:{}", address_key(source)),
    ]
}

/// An IPv4 address as it is; an IPv6 address as its /64 (one subscriber's network).
fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// Whether the country of `number` may get codes at all.
pub fn country_allowed(limits: &CodeLimits, number: &Number) -> Result<(), String> {
    let cc = number.calling_code();
    if limits.denied_countries.contains(&cc)
        || (!limits.allowed_countries.is_empty() && !limits.allowed_countries.contains(&cc))
    {
        return Err(format!("this node does not send codes to +{cc} numbers"));
    }
    Ok(())
}

/// The wait left before `count` more may be sent within `window`: zero when fewer
/// than `max` sends fall in the window ending now.
fn window_wait(times: &[u64], now: u64, window: u64, max: u32) -> Option<Duration> {
    let recent: Vec<u64> = times.iter().copied().filter(|t| now < t + window).collect();
    if recent.len() < max as usize {
        return None;
    }
    // The oldest send that must leave the window before there is room.
    let mut sorted = recent;
    sorted.sort_unstable();
    let must_leave = sorted[sorted.len() - max as usize];
    Some(Duration::from_millis(must_leave + window - now))
}

/// Judges a request against the send times of its [`keys`] (in that order).
pub fn judge(
    limits: &CodeLimits,
    cooldown: Duration,
    times: &[Vec<u64>],
    now: u64,
) -> Result<(), Limited> {
    let limited = |name: &'static str, limit: String, retry_after: Duration| {
        Err(Limited {
            name,
            limit,
            retry_after,
        })
    };
    let none = Vec::new();
    let at = |i: usize| times.get(i).unwrap_or(&none);
    if let Some(wait) = window_wait(at(0), now, 24 * HOUR, limits.global_day) {
        return limited(
            "global_day",
            format!(
                "the node's budget of {} codes a day is spent",
                limits.global_day
            ),
            wait,
        );
    }
    if let Some(wait) = window_wait(at(1), now, 24 * HOUR, limits.per_country_day) {
        return limited(
            "country_day",
            format!(
                "at most {} codes a day go to this country",
                limits.per_country_day
            ),
            wait,
        );
    }
    let number = at(2);
    if let Some(wait) = window_wait(number, now, 10 * MINUTE, limits.per_number_10min) {
        return limited(
            "number_10min",
            format!(
                "at most {} codes per number in 10 minutes",
                limits.per_number_10min
            ),
            wait,
        );
    }
    if let Some(wait) = window_wait(number, now, HOUR, limits.per_number_hour) {
        return limited(
            "number_hour",
            format!(
                "at most {} codes per number in an hour",
                limits.per_number_hour
            ),
            wait,
        );
    }
    // Growing waits: after the k-th code of the hour, the next waits cooldown·2^(k-1).
    let in_hour: Vec<u64> = number.iter().copied().filter(|t| now < t + HOUR).collect();
    if let Some(&last) = in_hour.iter().max() {
        let factor = 1u64 << (in_hour.len() - 1).min(16);
        let wait = (cooldown.as_millis() as u64).saturating_mul(factor);
        if now < last + wait {
            return limited(
                "number_wait",
                format!(
                    "codes to one number wait longer each time ({} after the last one)",
                    humantime::format_duration(Duration::from_secs(wait / 1000))
                ),
                Duration::from_millis(last + wait - now),
            );
        }
    }
    if let Some(wait) = window_wait(at(3), now, HOUR, limits.per_address_hour) {
        return limited(
            "address_hour",
            format!(
                "at most {} code requests per hour from one address",
                limits.per_address_hour
            ),
            wait,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> CodeLimits {
        crate::config::Config::default().verification.limits
    }

    #[test]
    fn the_fourth_code_in_ten_minutes_waits_for_the_first_to_age() {
        let now = 100 * HOUR;
        let sent = vec![now - 9 * MINUTE, now - 5 * MINUTE, now - MINUTE];
        let refused = judge(
            &limits(),
            Duration::ZERO,
            &[vec![], vec![], sent, vec![]],
            now,
        )
        .unwrap_err();
        assert_eq!(refused.limit, "at most 3 codes per number in 10 minutes");
        assert_eq!(refused.retry_after, Duration::from_secs(60));
    }

    #[test]
    fn waits_grow_and_every_scope_counts() {
        let now = 100 * HOUR;
        let l = limits();
        let cooldown = Duration::from_secs(60);
        // Two codes this hour, the last 90 s ago: the next waits 120 s.
        let two = vec![now - 30 * MINUTE, now - 90_000];
        let r = judge(&l, cooldown, &[vec![], vec![], two, vec![]], now).unwrap_err();
        assert_eq!(r.retry_after, Duration::from_secs(30));
        // Ten requests from one address this hour.
        let ten: Vec<u64> = (1..=10).map(|i| now - i * MINUTE).collect();
        let r = judge(&l, cooldown, &[vec![], vec![], vec![], ten], now).unwrap_err();
        assert!(r.limit.contains("from one address"));
        assert_eq!(r.retry_after, Duration::from_secs(50 * 60));
        let full = vec![now - HOUR; l.global_day as usize];
        let r = judge(&l, cooldown, &[full, vec![], vec![], vec![]], now).unwrap_err();
        assert!(r.limit.contains("budget"));
        assert!(judge(&l, cooldown, &[vec![], vec![], vec![], vec![]], now).is_ok());
    }

    #[test]
    fn addresses_and_countries() {
        let n = Number::parse("+442079460958", None).unwrap();
        let counted = keys(&n, "2001:db8:1:2:3:4:5:6".parse().unwrap());
        assert_eq!(counted[1], "cc:44");
        assert_eq!(counted[3], "ip:2001:db8:1:2::/64");
        assert_eq!(keys(&n, "::ffff:1.2.3.4".parse().unwrap())[3], "ip:1.2.3.4");
        let mut l = limits();
        assert!(country_allowed(&l, &n).is_ok());
        l.denied_countries = vec![44];
        assert!(country_allowed(&l, &n).unwrap_err().contains("+44"));
        l.denied_countries.clear();
        l.allowed_countries = vec![1];
        assert!(country_allowed(&l, &n).is_err());
    }
}
