//! Link slots: where a primary device and a device joining its account meet.
//!
//! A slot lives in memory only, for `accounts.link_code_ttl_secs`: a restart of the
//! node ends every link in progress (both sides are told `LinkUnavailable` and run the
//! link again). The node relays the two SPAKE2 messages and the two sealed payloads;
//! it never learns the link code's secret part, so it cannot read or forge them. One
//! device takes a slot; once taken, nobody else can, so a wrong guess burns it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::proto::Registered;
use crate::store::NewDevice;
use crate::store::layout::KeyId;

/// Nameplates are six digits.
const NAMEPLATES: std::ops::Range<u32> = 100_000..1_000_000;

/// The link slots of the node, and the limit on joins per address.
pub struct Links {
    slots: Mutex<HashMap<u32, Slot>>,
    joins: DefaultKeyedRateLimiter<IpAddr>,
    ttl: Duration,
}

struct Slot {
    account: u64,
    /// The key of the primary that opened it.
    primary: KeyId,
    expires: Instant,
    primary_pake: Vec<u8>,
    joiner: Option<Joiner>,
    /// Set once the primary granted: what the joiner is handed.
    granted: Option<(Registered, Vec<u8>)>,
}

struct Joiner {
    device: NewDevice,
    pake: Vec<u8>,
    request: Option<Vec<u8>>,
}

/// What a poll finds.
#[derive(Debug, PartialEq, Eq)]
pub enum Polled {
    Waiting,
    /// For the primary.
    Requested {
        pake: Vec<u8>,
        sealed: Vec<u8>,
    },
    /// For the joiner (the slot is gone after).
    Complete {
        registered: Registered,
        sealed: Vec<u8>,
    },
    /// No such slot for this device (expired, given up, never there).
    Gone,
}

/// A slot ready for the primary's grant.
pub struct ToGrant {
    pub account: u64,
    pub device: NewDevice,
}

impl Links {
    pub fn new(ttl: Duration, joins_per_address_hour: u32) -> Links {
        let quota =
            Quota::per_hour(NonZeroU32::new(joins_per_address_hour).unwrap_or(NonZeroU32::MIN));
        Links {
            slots: Mutex::new(HashMap::new()),
            joins: RateLimiter::keyed(quota),
            ttl,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Slot>> {
        // A panic while holding the lock leaves the map whole (every change is one
        // insert or remove), so a poisoned lock is used as it is.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a slot for the primary `primary` of `account` (closing one it had
    /// open); returns its nameplate.
    pub fn open(&self, account: u64, primary: KeyId, pake: Vec<u8>) -> u32 {
        use rand::RngExt;
        let now = Instant::now();
        let mut slots = self.slots();
        slots.retain(|_, s| s.expires > now && s.primary != primary);
        let mut rng = rand::rng();
        let nameplate = loop {
            let n = rng.random_range(NAMEPLATES);
            if !slots.contains_key(&n) {
                break n;
            }
        };
        slots.insert(
            nameplate,
            Slot {
                account,
                primary,
                expires: now + self.ttl,
                primary_pake: pake,
                joiner: None,
                granted: None,
            },
        );
        nameplate
    }

    /// Whether `ip` may try another join now (counted when yes).
    pub fn allow_join(&self, ip: IpAddr) -> bool {
        self.joins.check_key(&ip).is_ok()
    }

    /// The device `device` takes the slot `nameplate`: the primary's SPAKE2 message,
    /// or `None` when the slot is gone or another device has it.
    pub fn join(&self, nameplate: u32, device: NewDevice, pake: Vec<u8>) -> Option<Vec<u8>> {
        let mut slots = self.slots();
        let slot = live(&mut slots, nameplate)?;
        match &slot.joiner {
            None => {
                slot.joiner = Some(Joiner {
                    device,
                    pake,
                    request: None,
                });
            }
            // The same device asking again (its answer was lost) with the same message.
            Some(j) if j.device.key_id == device.key_id && j.pake == pake => {}
            Some(_) => return None,
        }
        Some(slot.primary_pake.clone())
    }

    /// The joiner's sealed request; `false` when the slot is not this device's.
    pub fn request(&self, nameplate: u32, key_id: &KeyId, sealed: Vec<u8>) -> bool {
        let mut slots = self.slots();
        let Some(slot) = live(&mut slots, nameplate) else {
            return false;
        };
        match &mut slot.joiner {
            Some(j) if j.device.key_id == *key_id => match &j.request {
                None => {
                    j.request = Some(sealed);
                    true
                }
                Some(sent) => *sent == sealed,
            },
            _ => false,
        }
    }

    /// What `key_id` (the slot's primary or its joiner) finds on the slot.
    pub fn poll(&self, nameplate: u32, key_id: &KeyId) -> Polled {
        let mut slots = self.slots();
        let Some(slot) = live(&mut slots, nameplate) else {
            return Polled::Gone;
        };
        if slot.primary == *key_id {
            return match &slot.joiner {
                Some(Joiner {
                    pake,
                    request: Some(sealed),
                    ..
                }) if slot.granted.is_none() => Polled::Requested {
                    pake: pake.clone(),
                    sealed: sealed.clone(),
                },
                _ => Polled::Waiting,
            };
        }
        if slot
            .joiner
            .as_ref()
            .is_none_or(|j| j.device.key_id != *key_id)
        {
            return Polled::Gone;
        }
        match slot.granted.take() {
            Some((registered, sealed)) => {
                slots.remove(&nameplate);
                Polled::Complete { registered, sealed }
            }
            None => Polled::Waiting,
        }
    }

    /// The slot's account and joining device, when `primary` opened it and the
    /// joiner's request is in.
    pub fn to_grant(&self, nameplate: u32, primary: &KeyId) -> Option<ToGrant> {
        let mut slots = self.slots();
        let slot = live(&mut slots, nameplate)?;
        if slot.primary != *primary || slot.granted.is_some() {
            return None;
        }
        let joiner = slot.joiner.as_ref().filter(|j| j.request.is_some())?;
        Some(ToGrant {
            account: slot.account,
            device: joiner.device.clone(),
        })
    }

    /// Records the grant for the joiner to collect.
    pub fn granted(&self, nameplate: u32, registered: Registered, sealed: Vec<u8>) {
        if let Some(slot) = self.slots().get_mut(&nameplate) {
            slot.granted = Some((registered, sealed));
        }
    }

    /// `key_id` (the slot's primary or joiner) gives the slot up.
    pub fn abort(&self, nameplate: u32, key_id: &KeyId) {
        let mut slots = self.slots();
        let theirs = slots.get(&nameplate).is_some_and(|s| {
            s.primary == *key_id
                || s.joiner
                    .as_ref()
                    .is_some_and(|j| j.device.key_id == *key_id)
        });
        if theirs {
            slots.remove(&nameplate);
        }
    }

    /// Forgets expired slots and idle join counts.
    pub fn prune(&self) {
        let now = Instant::now();
        self.slots().retain(|_, s| s.expires > now);
        self.joins.retain_recent();
        self.joins.shrink_to_fit();
    }
}

/// The slot `nameplate` unless it expired (then it goes).
fn live(slots: &mut HashMap<u32, Slot>, nameplate: u32) -> Option<&mut Slot> {
    if slots
        .get(&nameplate)
        .is_some_and(|s| s.expires <= Instant::now())
    {
        slots.remove(&nameplate);
    }
    slots.get_mut(&nameplate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(n: u8) -> NewDevice {
        NewDevice {
            key_id: [n; 32],
            public_key: vec![n],
        }
    }

    #[test]
    fn one_device_takes_a_slot_and_only_the_two_sides_see_it() {
        let links = Links::new(Duration::from_secs(60), 5);
        let plate = links.open(7, [1; 32], b"A".to_vec());
        assert!(NAMEPLATES.contains(&plate));
        assert_eq!(
            links.join(plate, device(2), b"B".to_vec()),
            Some(b"A".to_vec())
        );
        // The same device again is answered again; anyone else is not.
        assert_eq!(
            links.join(plate, device(2), b"B".to_vec()),
            Some(b"A".to_vec())
        );
        assert_eq!(links.join(plate, device(3), b"C".to_vec()), None);
        assert!(!links.request(plate, &[3; 32], b"forged".to_vec()));
        assert_eq!(links.poll(plate, &[1; 32]), Polled::Waiting);
        assert!(links.to_grant(plate, &[1; 32]).is_none(), "no request yet");
        assert!(links.request(plate, &[2; 32], b"sealed".to_vec()));
        assert_eq!(
            links.poll(plate, &[1; 32]),
            Polled::Requested {
                pake: b"B".to_vec(),
                sealed: b"sealed".to_vec()
            }
        );
        assert_eq!(links.poll(plate, &[3; 32]), Polled::Gone);
        assert!(
            links.to_grant(plate, &[2; 32]).is_none(),
            "only the primary grants"
        );
        let grant = links.to_grant(plate, &[1; 32]).expect("ready");
        assert_eq!((grant.account, grant.device.key_id), (7, [2; 32]));
        let registered = Registered {
            number: "+14155550100".into(),
            account_id: 7,
            device_id: 2,
            took_over: false,
        };
        links.granted(plate, registered.clone(), b"grant".to_vec());
        assert_eq!(links.poll(plate, &[1; 32]), Polled::Waiting);
        assert_eq!(
            links.poll(plate, &[2; 32]),
            Polled::Complete {
                registered,
                sealed: b"grant".to_vec()
            }
        );
        assert_eq!(links.poll(plate, &[2; 32]), Polled::Gone, "collected once");
    }

    #[test]
    fn slots_expire_and_a_primary_has_one() {
        let links = Links::new(Duration::from_millis(1), 5);
        let plate = links.open(7, [1; 32], b"A".to_vec());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(links.join(plate, device(2), b"B".to_vec()), None);
        let links = Links::new(Duration::from_secs(60), 2);
        let first = links.open(7, [1; 32], b"A".to_vec());
        let second = links.open(7, [1; 32], b"A2".to_vec());
        assert_eq!(links.poll(first, &[1; 32]), Polled::Gone);
        assert_eq!(links.poll(second, &[1; 32]), Polled::Waiting);
        links.abort(second, &[9; 32]);
        assert_eq!(links.poll(second, &[1; 32]), Polled::Waiting, "not theirs");
        links.abort(second, &[1; 32]);
        assert_eq!(links.poll(second, &[1; 32]), Polled::Gone);
        let ip: IpAddr = [127, 0, 0, 1].into();
        assert!(links.allow_join(ip) && links.allow_join(ip));
        assert!(!links.allow_join(ip));
    }
}
