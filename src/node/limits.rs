//! Connection admission: a cap on connections in all and per source address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts live connections. The per-address map only holds addresses with a live
/// connection, so it never grows past the total cap, whatever addresses attackers use.
pub struct Admission {
    inner: Arc<Mutex<Counts>>,
    max_total: u32,
    max_per_address: u32,
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
    pub fn new(max_total: u32, max_per_address: u32) -> Admission {
        Admission {
            inner: Arc::default(),
            max_total,
            max_per_address,
        }
    }

    /// A ticket for a connection from `ip`, or `None` when a cap is reached.
    pub fn admit(&self, ip: IpAddr) -> Option<Ticket> {
        let ip = ip.to_canonical();
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
        let a = Admission::new(3, 2);
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
}
