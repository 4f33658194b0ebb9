//! Wake-ups for delivery streams: "your queue changed" and "your keys were claimed",
//! and what is only for a device connected now (typing indicators), held here in
//! memory, never in the store.
//!
//! A subscribed device holds an `Arc<Mailbox>`; the registry keeps only weak
//! references, so a device that disconnects costs nothing once it is pruned.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

use crate::proto::Item;
use crate::store::DeviceRef;

/// Ephemeral items held per device until its pusher takes them; past this, the
/// oldest go (a typing indicator is stale by then anyway).
const MAX_EPHEMERAL: usize = 64;

/// The wake-up handle of one device.
#[derive(Default)]
pub struct Mailbox {
    /// Woken when an item is queued for the device.
    pub changed: Notify,
    /// Set when one of the device's one-time keys was claimed.
    keys_claimed: AtomicBool,
    /// Items for this device's delivery streams that are never stored.
    ephemeral: Mutex<VecDeque<Item>>,
}

impl Mailbox {
    /// Whether keys were claimed since the last call.
    pub fn take_keys_claimed(&self) -> bool {
        self.keys_claimed.swap(false, Ordering::AcqRel)
    }

    /// The ephemeral items waiting, oldest first.
    pub fn take_ephemeral(&self) -> Vec<Item> {
        let mut held = self.ephemeral.lock().unwrap_or_else(|p| p.into_inner());
        held.drain(..).collect()
    }
}

/// Every subscribed device's mailbox.
#[derive(Default)]
pub struct Mailboxes {
    map: Mutex<HashMap<DeviceRef, Weak<Mailbox>>>,
}

impl Mailboxes {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceRef, Weak<Mailbox>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mailbox of `device`, shared by all its subscriptions.
    pub fn open(&self, device: DeviceRef) -> Arc<Mailbox> {
        let mut map = self.map();
        if let Some(existing) = map.get(&device).and_then(Weak::upgrade) {
            return existing;
        }
        let mailbox = Arc::new(Mailbox::default());
        map.insert(device, Arc::downgrade(&mailbox));
        mailbox
    }

    fn get(&self, device: DeviceRef) -> Option<Arc<Mailbox>> {
        self.map().get(&device).and_then(Weak::upgrade)
    }

    /// Whether `device` has a delivery stream open now.
    pub fn is_open(&self, device: DeviceRef) -> bool {
        self.get(device).is_some()
    }

    /// Wakes the delivery streams of `device`, if it has any.
    pub fn wake(&self, device: DeviceRef) {
        if let Some(mailbox) = self.get(device) {
            mailbox.changed.notify_waiters();
        }
    }

    /// Tells the delivery streams of `device` that its one-time keys were claimed.
    pub fn keys_claimed(&self, device: DeviceRef) {
        if let Some(mailbox) = self.get(device) {
            mailbox.keys_claimed.store(true, Ordering::Release);
            mailbox.changed.notify_waiters();
        }
    }

    /// Hands `item` to the delivery streams of `device` if it has one open now (true),
    /// in memory only: a device that is not connected never gets it.
    pub fn push_ephemeral(&self, device: DeviceRef, item: Item) -> bool {
        let Some(mailbox) = self.get(device) else {
            return false;
        };
        {
            let mut held = mailbox.ephemeral.lock().unwrap_or_else(|p| p.into_inner());
            if held.len() >= MAX_EPHEMERAL {
                held.pop_front();
            }
            held.push_back(item);
        }
        mailbox.changed.notify_waiters();
        true
    }

    /// Forgets devices that have no subscription left.
    pub fn prune(&self) {
        self.map().retain(|_, weak| weak.strong_count() > 0);
    }
}
