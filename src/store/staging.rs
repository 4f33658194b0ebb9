//! Hand-off: queue items held in memory for a moment before they are written.
//!
//! An append for a device that is online (the node says which) is *staged*: kept in
//! memory, not written to sled. The device's delivery stream pushes it from memory,
//! and if the device acknowledges it within the hand-off window it leaves memory and
//! never touches the disk. Otherwise the write-behind ([`Store::write_staged`], run by
//! the node several times per window) writes it once it is older than the window.
//!
//! The sender's `Accepted` waits on the send's [`Ticket`]: every staged item settled,
//! by its device's acknowledgement or by its write (and then, like any write, a group
//! commit). So an `Accepted` still means what it always meant: the message is durable,
//! or it is in the hands of every recipient device, which acknowledged it.
//!
//! Order. Per device, the staged items are always its newest (a suffix by seq) and
//! sled holds the rest: an append for a device that has staged items is staged too;
//! a write that must go straight to sled (a receipt for an acknowledgement of a
//! written item) first writes the device's staged items; the write-behind writes
//! whole sends in the order they were staged, items before the sent-id record. So
//! after a crash sled holds a prefix of every queue in seq order, as before, and a
//! reader that looks at staging and sled under the queue writer lock sees each item
//! exactly once.
//!
//! Receipts for items acknowledged from memory are staged for their sender the same
//! way, and usually acknowledged from memory too. A crash within the window loses
//! such a receipt; the message it reports was delivered and acknowledged.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::Notify;

use super::keys::{self, DeviceKey};
use super::records::{self, QueueItem};
use super::{DeviceRef, QueueState, Queued, Store, StoreError};

/// The `sent_message` key of a staged send.
type SentKey = [u8; 28];

/// The state of one staged send, shared by the handlers waiting to answer it.
#[derive(Debug)]
pub struct Ticket {
    /// Staged items neither acknowledged nor written yet.
    pending: AtomicUsize,
    /// Whether any item of the send was written to sled.
    written: AtomicBool,
    settled: Notify,
}

impl Ticket {
    fn new(pending: usize, written: bool) -> Arc<Ticket> {
        Arc::new(Ticket {
            pending: AtomicUsize::new(pending),
            written: AtomicBool::new(written),
            settled: Notify::new(),
        })
    }

    /// Returns once every staged item of the send was acknowledged or written.
    pub async fn settled(&self) {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Whether any item of the send went to sled, so that the sender's answer must
    /// also wait for a group commit. Meaningful once [`Ticket::settled`] returned.
    pub fn written(&self) -> bool {
        self.written.load(Ordering::Acquire)
    }

    fn resolve(&self, written: bool) {
        if written {
            self.written.store(true, Ordering::Release);
        }
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.settled.notify_waiters();
        }
    }
}

/// Which devices of an append may be handed their item from memory.
#[derive(Debug, Clone, Default)]
pub struct HandOff {
    /// The recipient devices that are online now.
    pub online: Vec<DeviceRef>,
    /// Staged bytes beyond which the oldest sends are written at once.
    pub max_bytes: usize,
}

/// How an append treats the queues.
#[derive(Debug, Clone, Default)]
pub struct AppendPolicy {
    /// A device queue at this length refuses the append.
    pub max_queued: u64,
    /// Stage the items of online devices; `None` writes everything.
    pub handoff: Option<HandOff>,
}

impl From<u64> for AppendPolicy {
    fn from(max_queued: u64) -> Self {
        AppendPolicy {
            max_queued,
            handoff: None,
        }
    }
}

/// What a run of the write-behind wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteBehind {
    /// Sends and receipts whose window ran out.
    pub units: usize,
    /// Items among them still unacknowledged, now written to sled.
    pub items: usize,
}

/// Counters of where staged items went, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct HandOffStats {
    /// Items staged.
    pub staged: AtomicU64,
    /// Staged items acknowledged from memory (never written).
    pub acknowledged: AtomicU64,
    /// Staged items written to sled.
    pub written: AtomicU64,
}

#[derive(Debug)]
struct Staged {
    /// The value as sled would hold it (queue time ++ item).
    value: Vec<u8>,
    /// The send this item belongs to; `None` for a receipt.
    ticket: Option<Arc<Ticket>>,
    /// For a message: its sender and id, for the receipt.
    from: Option<(DeviceRef, [u8; 16])>,
}

/// One send (or one receipt), written as a whole when its window runs out.
#[derive(Debug)]
struct Unit {
    at: Instant,
    items: Vec<(DeviceKey, u64)>,
    sent: Option<SentKey>,
}

/// The staged items, under the queue writer lock.
#[derive(Debug, Default)]
pub(super) struct Staging {
    devices: HashMap<DeviceKey, BTreeMap<u64, Staged>>,
    units: VecDeque<Unit>,
    /// Sent ids of staged sends, with their accept time: checked before
    /// `sent_message`, written with their unit.
    sent: HashMap<SentKey, (u64, Arc<Ticket>)>,
    bytes: usize,
    /// Per device, the highest seq ever written to sled (`None`: nothing), loaded on
    /// first use. Only grows, so it may name an item since removed.
    written_max: HashMap<DeviceKey, Option<u64>>,
}

impl Staging {
    fn has(&self, dk: &DeviceKey) -> bool {
        self.devices.get(dk).is_some_and(|m| !m.is_empty())
    }

    fn take(&mut self, dk: &DeviceKey, seq: u64) -> Option<Staged> {
        let map = self.devices.get_mut(dk)?;
        let staged = map.remove(&seq)?;
        if map.is_empty() {
            self.devices.remove(dk);
        }
        self.bytes = self.bytes.saturating_sub(staged.value.len());
        Some(staged)
    }

    fn put(&mut self, dk: DeviceKey, seq: u64, staged: Staged) {
        self.bytes += staged.value.len();
        self.devices.entry(dk).or_default().insert(seq, staged);
    }

    /// The staged items of `dk` above `after`, within `max` items and `max_bytes`
    /// (at least one), decoded; and whether it stopped at a limit.
    fn page(
        &self,
        dk: &DeviceKey,
        after: Option<u64>,
        max: usize,
        mut max_bytes: usize,
        out: &mut Vec<Queued>,
    ) -> Result<bool, StoreError> {
        let Some(map) = self.devices.get(dk) else {
            return Ok(false);
        };
        let from = match after {
            Some(seq) => match seq.checked_add(1) {
                Some(next) => next,
                None => return Ok(false),
            },
            None => 0,
        };
        for (&seq, staged) in map.range(from..) {
            if out.len() >= max {
                return Ok(true);
            }
            if staged.value.len() > max_bytes && !out.is_empty() {
                return Ok(true);
            }
            max_bytes = max_bytes.saturating_sub(staged.value.len());
            let (queued_at_ms, item) = records::decode_queued(&staged.value)?;
            out.push(Queued {
                seq,
                queued_at_ms,
                item,
            });
        }
        Ok(false)
    }
}

impl Store {
    /// The highest seq written to sled for `dk`, loaded on first use. Caller holds
    /// the writer lock.
    pub(super) fn written_max(
        &self,
        q: &mut QueueState,
        dk: DeviceKey,
    ) -> Result<Option<u64>, StoreError> {
        if let Some(known) = q.staged.written_max.get(&dk) {
            return Ok(*known);
        }
        let last = match self.trees.queue.scan_prefix(dk).keys().next_back() {
            Some(key) => keys::parse_queue(&key?).map(|(_, seq)| seq),
            None => None,
        };
        q.staged.written_max.insert(dk, last);
        Ok(last)
    }

    /// Writes one queue item to sled. Caller holds the writer lock and has written
    /// `dk`'s staged items (or this is the oldest of them).
    pub(super) fn write_queue_item(
        &self,
        q: &mut QueueState,
        dk: DeviceKey,
        seq: u64,
        value: &[u8],
    ) -> Result<(), StoreError> {
        self.trees.queue.insert(&keys::queue(dk, seq)[..], value)?;
        q.staged.written_max.insert(dk, Some(seq));
        Ok(())
    }

    /// Writes a staged item and settles its share of its send's ticket.
    fn write_staged_item(
        &self,
        q: &mut QueueState,
        dk: DeviceKey,
        seq: u64,
        staged: Staged,
    ) -> Result<(), StoreError> {
        let written = self.write_queue_item(q, dk, seq, &staged.value);
        // Settled either way: on an error the waiter's group commit fails too.
        if let Some(ticket) = &staged.ticket {
            ticket.resolve(true);
        }
        self.handoff_stats.written.fetch_add(1, Ordering::Relaxed);
        written
    }

    /// Writes every staged item of `dk`, oldest first, so that a write straight to
    /// sled can follow. Caller holds the writer lock.
    pub(super) fn write_device_staged(
        &self,
        q: &mut QueueState,
        dk: DeviceKey,
    ) -> Result<(), StoreError> {
        let Some(map) = q.staged.devices.remove(&dk) else {
            return Ok(());
        };
        for (seq, staged) in map {
            q.staged.bytes = q.staged.bytes.saturating_sub(staged.value.len());
            self.write_staged_item(q, dk, seq, staged)?;
        }
        Ok(())
    }

    /// Writes what is left of the oldest unit. Caller holds the writer lock.
    fn write_oldest_unit(&self, q: &mut QueueState) -> Result<Option<usize>, StoreError> {
        let Some(unit) = q.staged.units.pop_front() else {
            return Ok(None);
        };
        let mut items = 0;
        for (dk, seq) in unit.items {
            if let Some(staged) = q.staged.take(&dk, seq) {
                self.write_staged_item(q, dk, seq, staged)?;
                items += 1;
            }
        }
        // After its items: a sent-id on disk means the items are there (or were
        // acknowledged). A send that every device acknowledged from memory leaves
        // no record: the sender was answered, and a resend after a lost answer is
        // delivered again and dropped by id, like one after a crash.
        if let Some(sent) = unit.sent
            && let Some((at, ticket)) = q.staged.sent.remove(&sent)
            && ticket.written()
        {
            self.trees
                .sent_message
                .insert(&sent[..], &at.to_be_bytes()[..])?;
        }
        Ok(Some(items))
    }

    /// Stages the items of a send. `rows` are (device, seq, value); the caller holds
    /// the writer lock, has counted the queues and written nothing of the send.
    pub(super) fn stage_send(
        &self,
        q: &mut QueueState,
        rows: Vec<(DeviceKey, u64, Vec<u8>)>,
        from: (DeviceRef, [u8; 16]),
        sent: SentKey,
        accepted_at_ms: u64,
        written: bool,
    ) -> Arc<Ticket> {
        let ticket = Ticket::new(rows.len(), written);
        let mut items = Vec::with_capacity(rows.len());
        for (dk, seq, value) in rows {
            self.queue_totals.add(value.len());
            *q.lens.entry(dk).or_default() += 1;
            q.staged.put(
                dk,
                seq,
                Staged {
                    value,
                    ticket: Some(ticket.clone()),
                    from: Some(from),
                },
            );
            items.push((dk, seq));
        }
        self.handoff_stats
            .staged
            .fetch_add(items.len() as u64, Ordering::Relaxed);
        q.staged.sent.insert(sent, (accepted_at_ms, ticket.clone()));
        q.staged.units.push_back(Unit {
            at: Instant::now(),
            items,
            sent: Some(sent),
        });
        ticket
    }

    /// Writes the oldest staged sends until at most `max_bytes` stay in memory.
    pub(super) fn trim_staged(
        &self,
        q: &mut QueueState,
        max_bytes: usize,
    ) -> Result<(), StoreError> {
        while q.staged.bytes > max_bytes {
            if self.write_oldest_unit(q)?.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// Whether `dk` has staged items (then appends for it are staged too).
    pub(super) fn has_staged(q: &QueueState, dk: &DeviceKey) -> bool {
        q.staged.has(dk)
    }

    /// A staged send with this sent-id, if there is one.
    pub(super) fn staged_send(q: &QueueState, sent: &SentKey) -> Option<(u64, Arc<Ticket>)> {
        q.staged
            .sent
            .get(sent)
            .map(|(at, ticket)| (*at, ticket.clone()))
    }

    /// Acknowledges the item `seq` of `device` from memory if it is staged: takes it
    /// out, settles its ticket and stages a receipt for its sender (pushed to
    /// `receipts`). False when it is not staged. Caller holds the writer lock; the
    /// caller's count of `device`'s queue is its to lower.
    pub(super) fn ack_staged(
        &self,
        q: &mut QueueState,
        device: DeviceRef,
        device_number: &str,
        seq: u64,
        now_ms: u64,
        receipts: &mut Vec<DeviceRef>,
    ) -> Result<bool, StoreError> {
        let Some(staged) = q.staged.take(&device.key(), seq) else {
            return Ok(false);
        };
        self.queue_totals.remove(staged.value.len());
        if let Some(ticket) = &staged.ticket {
            ticket.resolve(false);
        }
        self.handoff_stats
            .acknowledged
            .fetch_add(1, Ordering::Relaxed);
        if let Some((sender, id)) = staged.from {
            let receipt = QueueItem::Delivered {
                to_number: device_number.to_string(),
                device_id: device.device_id,
                id,
            };
            let seq = self.next_id()?;
            let value = records::encode_queued(now_ms, &receipt)?;
            self.len_of(q, sender.key());
            self.stage_receipt(q, sender.key(), seq, value);
            receipts.push(sender);
        }
        Ok(true)
    }

    /// [`Store::ack`] for acknowledgements of staged items only, without the store
    /// thread: memory only, so an async task may call it. `None` (and nothing done)
    /// when one of `seqs` is not staged or a receipt would go to a queue whose length
    /// is not loaded yet; then [`Store::ack`] must do it.
    pub fn ack_from_memory(
        &self,
        device: DeviceRef,
        device_number: &str,
        seqs: &[u64],
        now_ms: u64,
    ) -> Result<Option<Vec<DeviceRef>>, StoreError> {
        let dk = device.key();
        let mut q = self.queue_writer();
        let ready = seqs.iter().all(|seq| {
            q.staged
                .devices
                .get(&dk)
                .and_then(|m| m.get(seq))
                .is_some_and(|staged| {
                    staged
                        .from
                        .is_none_or(|(sender, _)| q.lens.contains_key(&sender.key()))
                })
        });
        if !ready {
            return Ok(None);
        }
        let mut receipts = Vec::new();
        let mut removed = 0;
        for &seq in seqs {
            if self.ack_staged(&mut q, device, device_number, seq, now_ms, &mut receipts)? {
                removed += 1;
            }
        }
        if let Some(len) = q.lens.get_mut(&dk) {
            *len = len.saturating_sub(removed);
        }
        Ok(Some(receipts))
    }

    /// Stages a receipt for `to` (its queue length already counted).
    pub(super) fn stage_receipt(
        &self,
        q: &mut QueueState,
        to: DeviceKey,
        seq: u64,
        value: Vec<u8>,
    ) {
        self.queue_totals.add(value.len());
        if let Some(len) = q.lens.get_mut(&to) {
            *len += 1;
        }
        q.staged.put(
            to,
            seq,
            Staged {
                value,
                ticket: None,
                from: None,
            },
        );
        self.handoff_stats.staged.fetch_add(1, Ordering::Relaxed);
        q.staged.units.push_back(Unit {
            at: Instant::now(),
            items: vec![(to, seq)],
            sent: None,
        });
    }

    /// Forgets the staged items of a device that is being removed, and the staged
    /// sent-ids it sent. Their tickets settle (as acknowledged: the items are gone,
    /// as a dropped queue's are). Returns how many items. Caller holds the lock.
    pub(super) fn drop_staged(&self, q: &mut QueueState, dk: DeviceKey) -> u64 {
        let mut dropped = 0;
        if let Some(map) = q.staged.devices.remove(&dk) {
            for staged in map.into_values() {
                q.staged.bytes = q.staged.bytes.saturating_sub(staged.value.len());
                self.queue_totals.remove(staged.value.len());
                if let Some(ticket) = &staged.ticket {
                    ticket.resolve(false);
                }
                dropped += 1;
            }
        }
        q.staged.sent.retain(|key, _| !key.starts_with(&dk));
        q.staged.written_max.remove(&dk);
        dropped
    }

    /// Adds `dk`'s staged items above `after` to a page read from sled. Caller holds
    /// the writer lock.
    pub(super) fn staged_page_into(
        q: &QueueState,
        dk: &DeviceKey,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
        out: &mut Vec<Queued>,
    ) -> Result<bool, StoreError> {
        q.staged.page(dk, after, max, max_bytes, out)
    }

    /// The next page of `device`'s queue after `after` when all of it is in memory
    /// (nothing written to sled lies above `after`): no disk, no store thread, so the
    /// delivery stream may call it from an async task. `None` when sled must be read
    /// ([`Store::queue_page_within`]).
    pub fn staged_page(
        &self,
        device: DeviceRef,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
    ) -> Option<(Vec<Queued>, bool)> {
        let dk = device.key();
        let q = self.queue_writer();
        match (q.staged.written_max.get(&dk)?, after) {
            (None, _) => {}
            (Some(written), Some(after)) if after >= *written => {}
            _ => return None,
        }
        let mut out = Vec::new();
        let full = q.staged.page(&dk, after, max, max_bytes, &mut out).ok()?;
        Some((out, full))
    }

    /// Writes the staged sends and receipts staged before `cutoff` (all of them with
    /// `None`), oldest first. The caller then needs a group commit for them.
    pub fn write_staged(&self, cutoff: Option<Instant>) -> Result<WriteBehind, StoreError> {
        let _gate = self.writing();
        self.write_staged_ungated(cutoff)
    }

    /// [`Store::write_staged`] for a caller that holds the gate already.
    pub(super) fn write_staged_ungated(
        &self,
        cutoff: Option<Instant>,
    ) -> Result<WriteBehind, StoreError> {
        /// Units per hold of the writer lock, so appends never wait long.
        const CHUNK: usize = 64;
        let mut done = WriteBehind::default();
        loop {
            let mut q = self.queue_writer();
            for _ in 0..CHUNK {
                let due = q
                    .staged
                    .units
                    .front()
                    .is_some_and(|u| cutoff.is_none_or(|c| u.at <= c));
                if !due {
                    return Ok(done);
                }
                if let Some(items) = self.write_oldest_unit(&mut q)? {
                    done.units += 1;
                    done.items += items;
                }
            }
        }
    }

    /// When the oldest staged unit was staged, if any.
    pub fn oldest_staged(&self) -> Option<Instant> {
        self.queue_writer().staged.units.front().map(|u| u.at)
    }

    /// Where staged items went since the store was opened.
    pub fn handoff_stats(&self) -> &HandOffStats {
        &self.handoff_stats
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::store::AppendOutcome;
    use crate::store::messages::tests::{alice_and_bob, registered};
    use crate::store::records::QueueItem;

    const ALICE: &str = "+14155550100";
    const BOB: &str = "+14155550101";

    fn online(devices: &[DeviceRef], max_bytes: usize) -> AppendPolicy {
        AppendPolicy {
            max_queued: 1000,
            handoff: Some(HandOff {
                online: devices.to_vec(),
                max_bytes,
            }),
        }
    }

    fn send(
        store: &Store,
        from: DeviceRef,
        to: DeviceRef,
        id: u8,
        policy: AppendPolicy,
    ) -> (AppendOutcome, Option<Arc<Ticket>>) {
        store
            .append_with(from, ALICE, [id; 16], vec![(to, vec![id])], 1, policy)
            .expect("append")
    }

    fn sled_seqs(store: &Store, device: DeviceRef) -> Vec<u64> {
        store
            .trees
            .queue
            .scan_prefix(device.key())
            .keys()
            .map(|k| keys::parse_queue(&k.expect("key")).expect("queue key").1)
            .collect()
    }

    fn staged_seqs(store: &Store, device: DeviceRef) -> Vec<u64> {
        let q = store.queue_writer();
        q.staged
            .devices
            .get(&device.key())
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    fn ids(page: &[Queued]) -> Vec<u8> {
        page.iter()
            .map(|q| match &q.item {
                QueueItem::Message { body, .. } => body[0],
                QueueItem::Delivered { id, .. } => 100 + id[0],
            })
            .collect()
    }

    fn settled(ticket: &Ticket) -> bool {
        ticket.pending.load(Ordering::Acquire) == 0
    }

    #[test]
    fn a_message_acknowledged_from_memory_never_reaches_sled() {
        let (_dir, store, alice, bob) = alice_and_bob();
        store.queue_len(bob).expect("len");
        store.queue_len(alice).expect("len");
        let (outcome, ticket) = send(&store, alice, bob, 1, online(&[bob], usize::MAX));
        assert_eq!(outcome, AppendOutcome::Queued { accepted_at_ms: 1 });
        let ticket = ticket.expect("staged for an online device");
        assert!(sled_seqs(&store, bob).is_empty());
        assert_eq!(store.queue_len(bob).expect("len"), 1);
        assert_eq!(store.queue_totals().0, 1);

        let (page, full) = store
            .staged_page(bob, None, 10, usize::MAX)
            .expect("all of it in memory");
        assert!(!full);
        assert_eq!(ids(&page), [1]);
        assert_eq!(store.queue_page(bob, None, 10).expect("page"), page);
        assert!(!settled(&ticket));

        let receipts = store.ack(bob, BOB, &[page[0].seq], 2).expect("ack");
        assert_eq!(receipts, [alice]);
        assert!(settled(&ticket));
        assert!(!ticket.written(), "acknowledged, not written");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(ticket.settled());

        let (receipt, _) = store
            .staged_page(alice, None, 10, usize::MAX)
            .expect("the receipt is in memory too");
        assert_eq!(ids(&receipt), [101]);
        store.ack(alice, ALICE, &[receipt[0].seq], 3).expect("ack");

        assert_eq!(
            store.write_staged(None).expect("write"),
            WriteBehind { units: 2, items: 0 }
        );
        assert_eq!(store.trees.queue.len(), 0, "nothing was written");
        assert_eq!(store.trees.sent_message.len(), 0, "no sent-id either");
        assert_eq!(store.queue_totals(), (0, 0));
        assert_eq!(store.queue_len(bob).expect("len"), 0);
        let stats = store.handoff_stats();
        assert_eq!(stats.staged.load(Ordering::Relaxed), 2);
        assert_eq!(stats.acknowledged.load(Ordering::Relaxed), 2);
        assert_eq!(stats.written.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn unacknowledged_items_are_written_after_the_sled_part_in_order() {
        let (_dir, store, alice, bob) = alice_and_bob();
        let before = Instant::now();
        // Bob offline: straight to sled.
        for id in 0..2 {
            assert!(send(&store, alice, bob, id, 1000.into()).1.is_none());
        }
        // Online: staged. Offline again but with items in memory: staged too.
        let t2 = send(&store, alice, bob, 2, online(&[bob], usize::MAX)).1;
        let t3 = send(&store, alice, bob, 3, online(&[bob], usize::MAX)).1;
        let t4 = send(&store, alice, bob, 4, 1000.into()).1;
        let tickets: Vec<Arc<Ticket>> = [t2, t3, t4].into_iter().flatten().collect();
        assert_eq!(tickets.len(), 3);
        assert_eq!(sled_seqs(&store, bob).len(), 2);
        assert_eq!(staged_seqs(&store, bob).len(), 3);
        assert!(
            store.staged_page(bob, None, 10, usize::MAX).is_none(),
            "sled has items above the cursor"
        );

        let page = store.queue_page(bob, None, 10).expect("page");
        assert_eq!(ids(&page), [0, 1, 2, 3, 4]);
        assert!(page.windows(2).all(|w| w[0].seq < w[1].seq));
        let (first, full) = store
            .queue_page_within(bob, None, 3, usize::MAX)
            .expect("page");
        assert_eq!((ids(&first), full), (vec![0, 1, 2], true));
        let (rest, full) = store
            .queue_page_within(bob, first.last().map(|q| q.seq), 3, usize::MAX)
            .expect("page");
        assert_eq!((ids(&rest), full), (vec![3, 4], false));
        let (memory, _) = store
            .staged_page(bob, Some(page[1].seq), 10, usize::MAX)
            .expect("past the sled part");
        assert_eq!(ids(&memory), [2, 3, 4]);

        assert_eq!(
            store.write_staged(Some(before)).expect("write"),
            WriteBehind::default(),
            "nothing is due before its window ran out"
        );
        assert_eq!(
            store.write_staged(None).expect("write"),
            WriteBehind { units: 3, items: 3 }
        );
        assert!(tickets.iter().all(|t| settled(t) && t.written()));
        assert_eq!(
            sled_seqs(&store, bob),
            page.iter().map(|q| q.seq).collect::<Vec<_>>()
        );
        assert_eq!(store.trees.sent_message.len(), 5);
        assert_eq!(store.queue_page(bob, None, 10).expect("page"), page);
        assert_eq!(store.queue_len(bob).expect("len"), 5);
    }

    #[test]
    fn a_resend_while_staged_is_a_duplicate_with_the_same_ticket() {
        let (_dir, store, alice, bob) = alice_and_bob();
        let (_, first) = send(&store, alice, bob, 7, online(&[bob], usize::MAX));
        let (outcome, again) = send(&store, alice, bob, 7, online(&[bob], usize::MAX));
        assert_eq!(outcome, AppendOutcome::Duplicate { accepted_at_ms: 1 });
        let (first, again) = (first.expect("ticket"), again.expect("ticket"));
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(store.queue_len(bob).expect("len"), 1);

        store.write_staged(None).expect("write");
        let (outcome, ticket) = send(&store, alice, bob, 7, online(&[bob], usize::MAX));
        assert_eq!(outcome, AppendOutcome::Duplicate { accepted_at_ms: 1 });
        assert!(ticket.is_none(), "written: the sent-id is in sled");
    }

    #[test]
    fn a_receipt_written_straight_to_sled_follows_the_senders_staged_items() {
        let (_dir, store, alice, bob) = alice_and_bob();
        // Alice to an offline Bob: in sled. Bob to an online Alice: in memory.
        send(&store, alice, bob, 1, 1000.into());
        let (_, ticket) = send(&store, bob, alice, 2, online(&[alice], usize::MAX));
        let ticket = ticket.expect("staged");
        let written = store.queue_page(bob, None, 10).expect("page");
        store.ack(bob, BOB, &[written[0].seq], 5).expect("ack");

        assert!(staged_seqs(&store, alice).is_empty());
        assert!(settled(&ticket) && ticket.written());
        let page = store.queue_page(alice, None, 10).expect("page");
        assert_eq!(ids(&page), [2, 101], "the message, then the receipt");
        assert_eq!(
            sled_seqs(&store, alice),
            page.iter().map(|q| q.seq).collect::<Vec<_>>()
        );
    }

    #[test]
    fn beyond_the_byte_limit_the_oldest_sends_are_written() {
        let (_dir, store, alice, bob) = alice_and_bob();
        let tickets: Vec<Arc<Ticket>> = (0..3)
            .filter_map(|id| send(&store, alice, bob, id, online(&[bob], 1)).1)
            .collect();
        assert_eq!(tickets.len(), 3);
        assert!(tickets.iter().all(|t| settled(t) && t.written()));
        assert_eq!(sled_seqs(&store, bob).len(), 3);
        assert!(staged_seqs(&store, bob).is_empty());
        assert_eq!(store.queue_writer().staged.bytes, 0);
    }

    #[test]
    fn dropping_a_device_forgets_its_staged_items_and_a_backup_keeps_them() {
        let (dir, store, alice, bob) = alice_and_bob();
        let (_, ticket) = send(&store, alice, bob, 1, online(&[bob], usize::MAX));
        send(&store, bob, alice, 2, online(&[alice], usize::MAX));

        let mut backup = Vec::new();
        store
            .write_backup(&mut backup, &[], |_| {})
            .expect("backup");
        let target = dir.path().join("restored");
        crate::store::backup::restore(&backup[..], &target, |_| {}).expect("restore");
        let restored = Store::open(&target.join("db")).expect("open");
        assert_eq!(ids(&restored.queue_page(bob, None, 10).expect("page")), [1]);
        drop(restored);

        send(&store, alice, bob, 3, online(&[bob], usize::MAX));
        let dropped = store.drop_device(bob).expect("drop");
        assert_eq!(dropped, 2, "one written by the backup, one in memory");
        assert!(ticket.is_some_and(|t| settled(&t)));
        assert!(staged_seqs(&store, bob).is_empty());
        assert_eq!(store.queue_len(bob).expect("len"), 0);
        assert_eq!(store.queue_totals().0, 1, "Alice's message from Bob");
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// From device `from` (0 or 1) to the other, with the recipient online or not.
        Send { from: usize, online: bool },
        /// Device `who` acknowledges the item at `index` (modulo its queue) of its queue.
        Ack { who: usize, index: usize },
        /// The write-behind, with everything due.
        WriteAll,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..2usize, any::<bool>()).prop_map(|(from, online)| Op::Send { from, online }),
            3 => (0..2usize, 0..8usize).prop_map(|(who, index)| Op::Ack { who, index }),
            1 => Just(Op::WriteAll),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whatever mix of staged and written items, acknowledgements from memory
        /// and from sled, and write-behind runs: every queue reads back as the model
        /// says, in seq order, with sled holding only items older than any staged.
        #[test]
        fn queues_read_back_as_the_model_says(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(dir.path()).expect("open");
            let devices = [registered(&store, ALICE, 1), registered(&store, BOB, 2)];
            let numbers = [ALICE, BOB];
            // Per device: what its queue holds, as `ids` renders it.
            let mut model: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Send { from, online: is_online } => {
                        let to = 1 - from;
                        let id = n as u8;
                        let policy = if is_online {
                            online(&[devices[to]], 4096)
                        } else {
                            1000.into()
                        };
                        store
                            .append_with(devices[from], numbers[from], [id; 16], vec![(devices[to], vec![id])], 1, policy)
                            .expect("append");
                        model[to].push(id);
                    }
                    Op::Ack { who, index } => {
                        let page = store.queue_page(devices[who], None, 100).expect("page");
                        if page.is_empty() {
                            continue;
                        }
                        let item = &page[index % page.len()];
                        store.ack(devices[who], numbers[who], &[item.seq], 2).expect("ack");
                        let position = index % model[who].len();
                        let acked = model[who].remove(position);
                        if acked < 100 {
                            model[1 - who].push(100 + acked);
                        }
                    }
                    Op::WriteAll => {
                        store.write_staged(None).expect("write");
                    }
                }
                for (d, device) in devices.iter().enumerate() {
                    let page = store.queue_page(*device, None, 100).expect("page");
                    prop_assert_eq!(ids(&page), model[d].clone());
                    prop_assert!(page.windows(2).all(|w| w[0].seq < w[1].seq));
                    prop_assert_eq!(store.queue_len(*device).expect("len"), model[d].len() as u64);
                    let (sled, staged) = (sled_seqs(&store, *device), staged_seqs(&store, *device));
                    if let (Some(newest_written), Some(oldest_staged)) = (sled.last(), staged.first()) {
                        prop_assert!(newest_written < oldest_staged, "sled {:?} staged {:?}", sled, staged);
                    }
                }
                prop_assert_eq!(
                    store.queue_totals().0,
                    (model[0].len() + model[1].len()) as u64
                );
            }
        }
    }
}
