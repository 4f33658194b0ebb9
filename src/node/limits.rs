//! Connection admission: a cap on connections in all and per source address, where an
//! IPv6 address counts as its network (a /64 by default: one subscriber's).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts live connections. The per-address map only holds addresses with a live
/// connection, so it never grows past the total cap, whatever addresses attackers use.
pub struct Admission {
    inner: Arc<Mutex<Counts>>,
    max_total: u32,
    max_per_address: u32,
    /// IPv6 addresses are counted per network of this many leading bits.
    ipv6_prefix_len: u8,
}

#[derive(Default)]
struct Counts {
    total: u32,
    per_address: HashMap<IpAddr, u32>,
}

/// A live connection's place; dropping it frees the place.
pub struct Ticket {
    inner: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl Admission {
    pub fn new(max_total: u32, max_per_address: u32, ipv6_prefix_len: u8) -> Admission {
        Admission {
            inner: Arc::default(),
            max_total,
            max_per_address,
            ipv6_prefix_len: ipv6_prefix_len.min(128),
        }
    }

    /// What `ip` counts as: an IPv4 address itself (an IPv4-mapped IPv6 address as
    /// its IPv4 address), an IPv6 address its network.
    fn counted_as(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let keep = u32::from(self.ipv6_prefix_len);
                let mask = u128::MAX.checked_shl(128 - keep).unwrap_or(0);
                IpAddr::V6((bits & mask).into())
            }
            v4 => v4,
        }
    }

    /// A ticket for a connection from `ip`, or `None` when a cap is reached.
    pub fn admit(&self, ip: IpAddr) -> Option<Ticket> {
        let ip = self.counted_as(ip);
        let mut counts = self.inner.lock().ok()?;
        if counts.total >= self.max_total {
            return None;
        }
        let n = counts.per_address.entry(ip).or_insert(0);
        if *n >= self.max_per_address {
            return None;
        }
        *n += 1;
        counts.total += 1;
        Some(Ticket {
            inner: self.inner.clone(),
            ip,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.inner.lock() {
            counts.total = counts.total.saturating_sub(1);
            if let Some(n) = counts.per_address.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    counts.per_address.remove(&self.ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_places_come_back() {
        let a = Admission::new(3, 2, 64);
        let x: IpAddr = "10.0.0.1".parse().unwrap();
        let y: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        let t1 = a.admit(x).unwrap();
        let _t2 = a.admit(x).unwrap();
        assert!(a.admit(x).is_none(), "per-address cap");
        let _t3 = a.admit(y).unwrap();
        assert!(a.admit("10.0.0.3".parse().unwrap()).is_none(), "total cap");
        drop(t1);
        assert!(a.admit(x).is_some());
        assert!(a.inner.lock().unwrap().per_address.len() <= 3);
    }

    #[test]
    fn an_ipv6_network_counts_as_one_address() {
        let a = Admission::new(100, 2, 64);
        let one = |s: &str| a.admit(s.parse().unwrap());
        let _t1 = one("2001:db8:1:2::1").unwrap();
        let _t2 = one("2001:db8:1:2:ffff:ffff:ffff:ffff").unwrap();
        assert!(one("2001:db8:1:2::3").is_none(), "the same /64");
        let _t3 = one("2001:db8:1:3::1").unwrap();
        // A /48 setting groups wider.
        let b = Admission::new(100, 1, 48);
        let _u = b.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(b.admit("2001:db8:1:ffff::1".parse().unwrap()).is_none());
        assert!(b.admit("2001:db8:2::1".parse().unwrap()).is_some());
        // /128 counts single addresses.
        let c = Admission::new(100, 1, 128);
        let _v = c.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert!(c.admit("2001:db8::2".parse().unwrap()).is_some());
    }
}
