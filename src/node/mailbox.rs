//! Wake-ups for delivery streams: "your queue changed" and "your keys were claimed",
//! and what is only for a device connected now (typing indicators), held here in
//! memory, never in the store.
//!
//! A subscribed device holds an `Arc<Mailbox>`; the registry keeps only weak
//! references, so a device that disconnects costs nothing once it is pruned.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

use crate::proto::Item;
use crate::store::DeviceRef;

/// Ephemeral items held per delivery stream until its pusher takes them; past this,
/// the oldest go (a typing indicator is stale by then anyway).
const MAX_EPHEMERAL: usize = 64;

/// The wake-up handle of one device.
#[derive(Default)]
pub struct Mailbox {
    /// Woken when an item is queued for the device.
    pub changed: Notify,
    /// Set when one of the device's one-time keys was claimed.
    keys_claimed: AtomicBool,
    /// Items that are never stored, one queue per delivery stream of the device
    /// (by stream number), so each stream gets its own copy: a stream that is
    /// closing, or a `recv` beside the chat app, takes nothing from another.
    ephemeral: Mutex<HashMap<u64, VecDeque<Item>>>,
    /// The number of the next stream to join.
    next_stream: AtomicU64,
}

/// One delivery stream's place in its device's mailbox; leaving drops its queue.
pub struct Stream<'a> {
    mailbox: &'a Mailbox,
    id: u64,
}

impl Stream<'_> {
    /// The ephemeral items waiting for this stream, oldest first.
    pub fn take_ephemeral(&self) -> Vec<Item> {
        let mut held = self.mailbox.queues();
        held.get_mut(&self.id)
            .map(|q| q.drain(..).collect())
            .unwrap_or_default()
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        self.mailbox.queues().remove(&self.id);
    }
}

impl Mailbox {
    /// Whether keys were claimed since the last call.
    pub fn take_keys_claimed(&self) -> bool {
        self.keys_claimed.swap(false, Ordering::AcqRel)
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<u64, VecDeque<Item>>> {
        self.ephemeral.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new delivery stream of this device: ephemeral items pushed from now on
    /// are kept for it until it takes them or is dropped.
    pub fn join(&self) -> Stream<'_> {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.queues().insert(id, VecDeque::new());
        Stream { mailbox: self, id }
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

    /// Hands `item` to every delivery stream `device` has open now (true if it has
    /// one), in memory only: a device that is not connected never gets it.
    pub fn push_ephemeral(&self, device: DeviceRef, item: Item) -> bool {
        let Some(mailbox) = self.get(device) else {
            return false;
        };
        {
            let mut queues = mailbox.queues();
            if queues.is_empty() {
                return false;
            }
            for held in queues.values_mut() {
                if held.len() >= MAX_EPHEMERAL {
                    held.pop_front();
                }
                held.push_back(item.clone());
            }
        }
        mailbox.changed.notify_waiters();
        true
    }

    /// Forgets devices that have no subscription left.
    pub fn prune(&self) {
        self.map().retain(|_, weak| weak.strong_count() > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TypingNotice;

    fn notice(typing: bool) -> Item {
        Item::Typing(TypingNotice {
            from: "+15550000001".into(),
            from_device: 1,
            group_id: None,
            typing,
        })
    }

    #[test]
    fn each_stream_of_a_device_gets_its_own_copy() {
        let boxes = Mailboxes::default();
        let device = DeviceRef {
            account_id: 1,
            device_id: 1,
        };
        assert!(!boxes.push_ephemeral(device, notice(true)), "not connected");
        let mailbox = boxes.open(device);
        let closing = mailbox.join();
        let chat = mailbox.join();
        assert!(boxes.push_ephemeral(device, notice(true)));
        assert_eq!(closing.take_ephemeral(), vec![notice(true)]);
        drop(closing);
        assert!(boxes.push_ephemeral(device, notice(false)));
        assert_eq!(chat.take_ephemeral(), vec![notice(true), notice(false)]);
        assert!(chat.take_ephemeral().is_empty());
        for _ in 0..MAX_EPHEMERAL + 5 {
            boxes.push_ephemeral(device, notice(true));
        }
        assert_eq!(chat.take_ephemeral().len(), MAX_EPHEMERAL, "bounded");
        drop(chat);
        assert!(
            !boxes.push_ephemeral(device, notice(true)),
            "no stream left"
        );
    }
}
