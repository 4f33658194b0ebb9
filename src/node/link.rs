//! Link slots: where a primary device and a device joining its account meet.
//!
//! A slot lives for `accounts.link_code_ttl_secs`: in memory on one node (a restart
//! ends every link in progress: both sides are told `LinkUnavailable` and run the
//! link again), or in the cluster's `sb_links` bucket in cluster mode, so the two
//! devices may meet through different nodes (`s.NAMEPLATE` holds the slot, changed
//! by compare-and-set; `o.HEX(PRIMARY KEY)` the primary's open slot; entries expire
//! with the TTL). The rules are one set of functions on [`Slot`] for both. The
//! node relays the two SPAKE2 messages and the two sealed payloads; it never learns
//! the link code's secret part, so it cannot read or forge them. One device takes a
//! slot; once taken, nobody else can, so a wrong guess burns it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use bincode::{Decode, Encode};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::cluster::bucket::Bucket;
use crate::cluster::{Cluster, ClusterError};
use crate::proto::Registered;
use crate::store::layout::KeyId;
use crate::store::{NewDevice, StoreError};

/// Nameplates are six digits.
const NAMEPLATES: std::ops::Range<u32> = 100_000..1_000_000;

/// The cluster's bucket of link slots.
pub const BUCKET: &str = "sb_links";

/// The link slots of the node (or of the cluster), and the limit on joins per
/// address (counted by each node).
pub struct Links {
    slots: Mutex<HashMap<u32, Slot>>,
    cluster: Option<Bucket>,
    joins: DefaultKeyedRateLimiter<IpAddr>,
    ttl: Duration,
}

/// One link in progress.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Slot {
    account: u64,
    /// The key of the primary that opened it.
    primary: KeyId,
    /// Wall-clock ms.
    expires_ms: u64,
    primary_pake: Vec<u8>,
    joiner: Option<Joiner>,
    /// Set once the primary granted: what the joiner is handed.
    granted: Option<(Registered, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
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

/// What a rule does to a slot besides answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Keep,
    Write,
    Remove,
}

impl Slot {
    /// The device `device` takes the slot: the primary's SPAKE2 message, or `None`
    /// when another device has it.
    fn join(&mut self, device: NewDevice, pake: Vec<u8>) -> (Option<Vec<u8>>, Change) {
        match &self.joiner {
            None => {
                self.joiner = Some(Joiner {
                    device,
                    pake,
                    request: None,
                });
                (Some(self.primary_pake.clone()), Change::Write)
            }
            // The same device asking again (its answer was lost) with the same message.
            Some(j) if j.device.key_id == device.key_id && j.pake == pake => {
                (Some(self.primary_pake.clone()), Change::Keep)
            }
            Some(_) => (None, Change::Keep),
        }
    }

    /// The joiner's sealed request; `false` when the slot is not this device's.
    fn request(&mut self, key_id: &KeyId, sealed: Vec<u8>) -> (bool, Change) {
        match &mut self.joiner {
            Some(j) if j.device.key_id == *key_id => match &j.request {
                None => {
                    j.request = Some(sealed);
                    (true, Change::Write)
                }
                Some(sent) => (*sent == sealed, Change::Keep),
            },
            _ => (false, Change::Keep),
        }
    }

    /// What `key_id` (the primary or the joiner) finds.
    fn poll(&mut self, key_id: &KeyId) -> (Polled, Change) {
        if self.primary == *key_id {
            let polled = match &self.joiner {
                Some(Joiner {
                    pake,
                    request: Some(sealed),
                    ..
                }) if self.granted.is_none() => Polled::Requested {
                    pake: pake.clone(),
                    sealed: sealed.clone(),
                },
                _ => Polled::Waiting,
            };
            return (polled, Change::Keep);
        }
        if self
            .joiner
            .as_ref()
            .is_none_or(|j| j.device.key_id != *key_id)
        {
            return (Polled::Gone, Change::Keep);
        }
        match self.granted.take() {
            Some((registered, sealed)) => (Polled::Complete { registered, sealed }, Change::Remove),
            None => (Polled::Waiting, Change::Keep),
        }
    }

    /// The account and joining device, when `primary` opened it and the joiner's
    /// request is in.
    fn to_grant(&self, primary: &KeyId) -> Option<ToGrant> {
        if self.primary != *primary || self.granted.is_some() {
            return None;
        }
        let joiner = self.joiner.as_ref().filter(|j| j.request.is_some())?;
        Some(ToGrant {
            account: self.account,
            device: joiner.device.clone(),
        })
    }

    /// Whether `key_id` is one of the slot's two sides.
    fn theirs(&self, key_id: &KeyId) -> bool {
        self.primary == *key_id
            || self
                .joiner
                .as_ref()
                .is_some_and(|j| j.device.key_id == *key_id)
    }
}

fn slot_key(nameplate: u32) -> String {
    format!("s.{nameplate}")
}

fn open_key(primary: &KeyId) -> String {
    format!("o.{}", hex::encode(primary))
}

impl Links {
    /// Slots in memory (one node), or in `cluster`'s bucket when given.
    pub fn new(ttl: Duration, joins_per_address_hour: u32, cluster: Option<Bucket>) -> Links {
        let quota =
            Quota::per_hour(NonZeroU32::new(joins_per_address_hour).unwrap_or(NonZeroU32::MIN));
        Links {
            slots: Mutex::new(HashMap::new()),
            cluster,
            joins: RateLimiter::keyed(quota),
            ttl,
        }
    }

    /// The cluster's bucket of slots, created with `replicas` replicas, entries
    /// expiring after `ttl`.
    pub async fn open_bucket(
        cluster: &Cluster,
        replicas: usize,
        ttl: Duration,
    ) -> Result<Bucket, ClusterError> {
        Bucket::open_expiring(
            cluster,
            BUCKET,
            "switchboard: devices being linked (relayed SPAKE2 messages, sealed payloads)",
            replicas,
            ttl,
        )
        .await
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Slot>> {
        // A panic while holding the lock leaves the map whole (every change is one
        // insert or remove), so a poisoned lock is used as it is.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `rule` to the live slot `nameplate` (`None` when there is none, or it
    /// expired).
    async fn with_slot<A>(
        &self,
        nameplate: u32,
        rule: impl Fn(&mut Slot) -> (A, Change),
    ) -> Result<Option<A>, StoreError> {
        let now = crate::store::wall_ms();
        let Some(bucket) = &self.cluster else {
            let mut slots = self.slots();
            if slots.get(&nameplate).is_some_and(|s| s.expires_ms <= now) {
                slots.remove(&nameplate);
            }
            let Some(slot) = slots.get_mut(&nameplate) else {
                return Ok(None);
            };
            let (answer, change) = rule(slot);
            if change == Change::Remove {
                slots.remove(&nameplate);
            }
            return Ok(Some(answer));
        };
        bucket
            .modify(&slot_key(nameplate), |entry: &mut Option<Slot>| {
                let Some(slot) = entry.as_mut().filter(|s| s.expires_ms > now) else {
                    return (None, false);
                };
                let (answer, change) = rule(slot);
                match change {
                    Change::Keep => (Some(answer), false),
                    Change::Write => (Some(answer), true),
                    Change::Remove => {
                        *entry = None;
                        (Some(answer), true)
                    }
                }
            })
            .await
    }

    /// Opens a slot for the primary `primary` of `account` (closing one it had
    /// open); returns its nameplate.
    pub async fn open(
        &self,
        account: u64,
        primary: KeyId,
        pake: Vec<u8>,
    ) -> Result<u32, StoreError> {
        use rand::RngExt;
        let now = crate::store::wall_ms();
        let slot = |_| Slot {
            account,
            primary,
            expires_ms: now.saturating_add(self.ttl.as_millis() as u64),
            primary_pake: pake.clone(),
            joiner: None,
            granted: None,
        };
        let Some(bucket) = &self.cluster else {
            let mut slots = self.slots();
            slots.retain(|_, s| s.expires_ms > now && s.primary != primary);
            let nameplate = loop {
                let n = rand::rng().random_range(NAMEPLATES);
                if !slots.contains_key(&n) {
                    break n;
                }
            };
            slots.insert(nameplate, slot(nameplate));
            return Ok(nameplate);
        };
        // A nameplate drawn again while a live slot holds it (bounded: a million
        // nameplates, a few slots).
        let mut opened = None;
        for _ in 0..16 {
            let n = rand::rng().random_range(NAMEPLATES);
            let free = bucket
                .modify(&slot_key(n), |entry: &mut Option<Slot>| {
                    if entry.as_ref().is_some_and(|s| s.expires_ms > now) {
                        return (false, false);
                    }
                    *entry = Some(slot(n));
                    (true, true)
                })
                .await?;
            if free {
                opened = Some(n);
                break;
            }
        }
        let nameplate =
            opened.ok_or_else(|| StoreError::Engine("no free link nameplate".into()))?;
        // The primary's slot before this one goes.
        let before = bucket
            .modify(&open_key(&primary), |entry: &mut Option<u32>| {
                (entry.replace(nameplate), true)
            })
            .await?;
        if let Some(old) = before.filter(|&old| old != nameplate) {
            bucket
                .modify(&slot_key(old), |entry: &mut Option<Slot>| {
                    if entry.as_ref().is_some_and(|s| s.primary == primary) {
                        *entry = None;
                        return ((), true);
                    }
                    ((), false)
                })
                .await?;
        }
        Ok(nameplate)
    }

    /// Whether `ip` may try another join now (counted when yes).
    pub fn allow_join(&self, ip: IpAddr) -> bool {
        self.joins.check_key(&ip).is_ok()
    }

    /// The device `device` takes the slot `nameplate`: the primary's SPAKE2 message,
    /// or `None` when the slot is gone or another device has it.
    pub async fn join(
        &self,
        nameplate: u32,
        device: NewDevice,
        pake: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .with_slot(nameplate, |s| s.join(device.clone(), pake.clone()))
            .await?
            .flatten())
    }

    /// The joiner's sealed request; `false` when the slot is not this device's.
    pub async fn request(
        &self,
        nameplate: u32,
        key_id: &KeyId,
        sealed: Vec<u8>,
    ) -> Result<bool, StoreError> {
        Ok(self
            .with_slot(nameplate, |s| s.request(key_id, sealed.clone()))
            .await?
            .unwrap_or(false))
    }

    /// What `key_id` (the slot's primary or its joiner) finds on the slot.
    pub async fn poll(&self, nameplate: u32, key_id: &KeyId) -> Result<Polled, StoreError> {
        Ok(self
            .with_slot(nameplate, |s| s.poll(key_id))
            .await?
            .unwrap_or(Polled::Gone))
    }

    /// The slot's account and joining device, when `primary` opened it and the
    /// joiner's request is in.
    pub async fn to_grant(
        &self,
        nameplate: u32,
        primary: &KeyId,
    ) -> Result<Option<ToGrant>, StoreError> {
        Ok(self
            .with_slot(nameplate, |s| (s.to_grant(primary), Change::Keep))
            .await?
            .flatten())
    }

    /// Records the grant for the joiner to collect.
    pub async fn granted(
        &self,
        nameplate: u32,
        registered: Registered,
        sealed: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.with_slot(nameplate, |s| {
            s.granted = Some((registered.clone(), sealed.clone()));
            ((), Change::Write)
        })
        .await
        .map(drop)
    }

    /// `key_id` (the slot's primary or joiner) gives the slot up.
    pub async fn abort(&self, nameplate: u32, key_id: &KeyId) -> Result<(), StoreError> {
        self.with_slot(nameplate, |s| {
            let change = if s.theirs(key_id) {
                Change::Remove
            } else {
                Change::Keep
            };
            ((), change)
        })
        .await
        .map(drop)
    }

    /// Forgets expired slots (in memory: the cluster's expire by themselves) and
    /// idle join counts.
    pub fn prune(&self) {
        let now = crate::store::wall_ms();
        self.slots().retain(|_, s| s.expires_ms > now);
        self.joins.retain_recent();
        self.joins.shrink_to_fit();
    }
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

    #[tokio::test]
    async fn one_device_takes_a_slot_and_only_the_two_sides_see_it() -> Result<(), StoreError> {
        let links = Links::new(Duration::from_secs(60), 5, None);
        let plate = links.open(7, [1; 32], b"A".to_vec()).await?;
        assert!(NAMEPLATES.contains(&plate));
        let join = |n: u8, pake: &'static [u8]| links.join(plate, device(n), pake.to_vec());
        assert_eq!(join(2, b"B").await?, Some(b"A".to_vec()));
        // The same device again is answered again; anyone else is not.
        assert_eq!(join(2, b"B").await?, Some(b"A".to_vec()));
        assert_eq!(join(3, b"C").await?, None);
        assert!(!links.request(plate, &[3; 32], b"forged".to_vec()).await?);
        assert_eq!(links.poll(plate, &[1; 32]).await?, Polled::Waiting);
        assert!(
            links.to_grant(plate, &[1; 32]).await?.is_none(),
            "no request yet"
        );
        assert!(links.request(plate, &[2; 32], b"sealed".to_vec()).await?);
        assert_eq!(
            links.poll(plate, &[1; 32]).await?,
            Polled::Requested {
                pake: b"B".to_vec(),
                sealed: b"sealed".to_vec()
            }
        );
        assert_eq!(links.poll(plate, &[3; 32]).await?, Polled::Gone);
        assert!(
            links.to_grant(plate, &[2; 32]).await?.is_none(),
            "only the primary grants"
        );
        let grant = links.to_grant(plate, &[1; 32]).await?.expect("ready");
        assert_eq!((grant.account, grant.device.key_id), (7, [2; 32]));
        let registered = Registered {
            number: "+14155550100".into(),
            account_id: 7,
            device_id: 2,
            took_over: false,
        };
        links
            .granted(plate, registered.clone(), b"grant".to_vec())
            .await?;
        assert_eq!(links.poll(plate, &[1; 32]).await?, Polled::Waiting);
        assert_eq!(
            links.poll(plate, &[2; 32]).await?,
            Polled::Complete {
                registered,
                sealed: b"grant".to_vec()
            }
        );
        assert_eq!(
            links.poll(plate, &[2; 32]).await?,
            Polled::Gone,
            "collected once"
        );
        Ok(())
    }

    #[tokio::test]
    async fn slots_expire_and_a_primary_has_one() -> Result<(), StoreError> {
        let links = Links::new(Duration::from_millis(1), 5, None);
        let plate = links.open(7, [1; 32], b"A".to_vec()).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(links.join(plate, device(2), b"B".to_vec()).await?, None);
        let links = Links::new(Duration::from_secs(60), 2, None);
        let first = links.open(7, [1; 32], b"A".to_vec()).await?;
        let second = links.open(7, [1; 32], b"A2".to_vec()).await?;
        assert_eq!(links.poll(first, &[1; 32]).await?, Polled::Gone);
        assert_eq!(links.poll(second, &[1; 32]).await?, Polled::Waiting);
        links.abort(second, &[9; 32]).await?;
        assert_eq!(
            links.poll(second, &[1; 32]).await?,
            Polled::Waiting,
            "not theirs"
        );
        links.abort(second, &[1; 32]).await?;
        assert_eq!(links.poll(second, &[1; 32]).await?, Polled::Gone);
        let ip: IpAddr = [127, 0, 0, 1].into();
        assert!(links.allow_join(ip) && links.allow_join(ip));
        assert!(!links.allow_join(ip));
        Ok(())
    }
}
