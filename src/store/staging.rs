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
    /// The sender device and the message id, for receipts.
    sender: DeviceRef,
    id: [u8; 16],
    carried: std::sync::Mutex<Carried>,
}

/// Receipts that ride on the sender's answer instead of being queued.
#[derive(Debug, Default)]
struct Carried {
    /// Handlers waiting to answer the send.
    waiters: u32,
    /// Answered (or abandoned): later acknowledgements queue receipts.
    closed: bool,
    /// The recipient's number and the devices that acknowledged from memory.
    number: Option<String>,
    devices: Vec<u32>,
}

impl Ticket {
    fn new(pending: usize, written: bool, sender: DeviceRef, id: [u8; 16]) -> Arc<Ticket> {
        Arc::new(Ticket {
            pending: AtomicUsize::new(pending),
            written: AtomicBool::new(written),
            settled: Notify::new(),
            sender,
            id,
            carried: std::sync::Mutex::new(Carried {
                waiters: 1,
                ..Carried::default()
            }),
        })
    }

    fn carried(&self) -> std::sync::MutexGuard<'_, Carried> {
        // Plain data, left consistent by every holder: a poisoned lock is usable.
        self.carried.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the receipt of `device_id`'s acknowledgement onto the answer, if a
    /// handler is still waiting to give one. Called before the item settles.
    fn carry(&self, device_id: u32, number: &str) -> bool {
        let mut carried = self.carried();
        if carried.waiters == 0 || carried.closed {
            return false;
        }
        carried.devices.push(device_id);
        if carried.number.is_none() {
            carried.number = Some(number.to_string());
        }
        true
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

/// A handler's place in a staged send's [`Ticket`]: it waits for the send to settle,
/// puts [`TicketWaiter::delivered`] (the devices that acknowledged meanwhile) in its
/// answer, and calls [`TicketWaiter::answered`] once the answer reached the sender.
/// Dropped before that (the request was cancelled, the reply lost), the last waiter
/// queues those receipts instead, so none is lost.
pub struct TicketWaiter {
    ticket: Arc<Ticket>,
    store: Store,
    done: bool,
}

impl std::fmt::Debug for TicketWaiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketWaiter")
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for TicketWaiter {
    type Target = Ticket;

    fn deref(&self) -> &Ticket {
        &self.ticket
    }
}

impl TicketWaiter {
    fn join(ticket: Arc<Ticket>, store: &Store) -> TicketWaiter {
        ticket.carried().waiters += 1;
        TicketWaiter::first(ticket, store)
    }

    fn first(ticket: Arc<Ticket>, store: &Store) -> TicketWaiter {
        TicketWaiter {
            ticket,
            store: store.clone(),
            done: false,
        }
    }

    /// The recipient devices that acknowledged the send from memory so far: their
    /// receipts go with the answer. Once the send settled, no more are added.
    pub fn delivered(&self) -> Vec<u32> {
        self.ticket.carried().devices.clone()
    }

    /// The answer reached the sender: the carried receipts are delivered, and none
    /// will be queued for them.
    pub fn answered(mut self) {
        self.done = true;
        let mut carried = self.ticket.carried();
        carried.waiters = carried.waiters.saturating_sub(1);
        carried.closed = true;
    }

    /// Leaves without answering. If nobody else will answer, the carried receipts
    /// are queued for the sender, which is returned so its delivery stream can be
    /// woken.
    pub fn leave(mut self) -> Option<DeviceRef> {
        self.done = true;
        self.leave_inner()
    }

    fn leave_inner(&self) -> Option<DeviceRef> {
        let (number, devices) = {
            let mut carried = self.ticket.carried();
            carried.waiters = carried.waiters.saturating_sub(1);
            if carried.waiters > 0 || carried.closed {
                return None;
            }
            carried.closed = true;
            (carried.number.take(), std::mem::take(&mut carried.devices))
        };
        let number = number?;
        let sender = self.ticket.sender;
        match self
            .store
            .stage_receipts(sender, &number, self.ticket.id, &devices)
        {
            Ok(()) => Some(sender),
            Err(e) => {
                tracing::error!(error = %e, "queueing carried receipts failed");
                None
            }
        }
    }
}

impl Drop for TicketWaiter {
    fn drop(&mut self) {
        if !self.done {
            self.leave_inner();
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
    /// Items for online devices written at once, not staged: the device was slow.
    pub bypassed: AtomicU64,
    /// Messages (not receipts) acknowledged by their device, from memory or sled.
    pub delivered: AtomicU64,
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
    /// Devices that let an item's window run out, with the newest such seq: online
    /// but not keeping up (stalled, or reading a backlog). Their appends are written
    /// at once, so that a sender waits for a group commit, not a window, until the
    /// device acknowledges that seq.
    slow: HashMap<DeviceKey, u64>,
}

impl Staging {
    pub(super) fn is_slow(&self, dk: &DeviceKey) -> bool {
        self.slow.contains_key(dk)
    }

    pub(super) fn bytes_held(&self) -> usize {
        self.bytes
    }

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

    /// Writes the staged item `seq` of `dk`, if it is still staged, and only then
    /// takes it out of memory and settles its share of its ticket: a failed write
    /// leaves it staged, to be written again. Returns whether it was staged.
    fn write_staged_item(
        &self,
        q: &mut QueueState,
        dk: DeviceKey,
        seq: u64,
    ) -> Result<bool, StoreError> {
        let Some(value) = q
            .staged
            .devices
            .get(&dk)
            .and_then(|m| m.get(&seq))
            .map(|s| s.value.clone())
        else {
            return Ok(false);
        };
        self.write_queue_item(q, dk, seq, &value)?;
        if let Some(staged) = q.staged.take(&dk, seq)
            && let Some(ticket) = &staged.ticket
        {
            ticket.resolve(true);
        }
        self.handoff_stats.written.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Writes every staged item of `dk`, oldest first, so that a write straight to
    /// sled can follow. Caller holds the writer lock.
    pub(super) fn write_device_staged(
        &self,
        q: &mut QueueState,
        dk: DeviceKey,
    ) -> Result<(), StoreError> {
        let seqs: Vec<u64> = match q.staged.devices.get(&dk) {
            Some(map) => map.keys().copied().collect(),
            None => return Ok(()),
        };
        for seq in seqs {
            self.write_staged_item(q, dk, seq)?;
        }
        Ok(())
    }

    /// Writes what is left of the oldest unit; `expired` when its window ran out
    /// (its unacknowledged devices are then slow). The unit leaves the queue of
    /// units only once all of it is written: after an error it is tried again.
    /// Caller holds the writer lock.
    fn write_oldest_unit(
        &self,
        q: &mut QueueState,
        expired: bool,
    ) -> Result<Option<usize>, StoreError> {
        let Some(unit) = q.staged.units.front() else {
            return Ok(None);
        };
        let (items, sent) = (unit.items.clone(), unit.sent);
        let mut written = 0;
        for (dk, seq) in items {
            if self.write_staged_item(q, dk, seq)? {
                written += 1;
                if expired {
                    let slow = q.staged.slow.entry(dk).or_default();
                    *slow = (*slow).max(seq);
                }
            }
        }
        // After its items: a sent-id on disk means the items are there (or were
        // acknowledged). A send that every device acknowledged from memory leaves
        // no record: the sender was answered, and a resend after a lost answer is
        // delivered again and dropped by id, like one after a crash.
        if let Some(sent) = sent
            && let Some((at, ticket)) = q.staged.sent.get(&sent)
            && ticket.written()
        {
            self.trees
                .sent_message
                .insert(&sent[..], &at.to_be_bytes()[..])?;
        }
        if let Some(sent) = sent {
            q.staged.sent.remove(&sent);
        }
        q.staged.units.pop_front();
        Ok(Some(written))
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
    ) -> TicketWaiter {
        let ticket = Ticket::new(rows.len(), written, from.0, from.1);
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
        TicketWaiter::first(ticket, self)
    }

    /// Writes the oldest staged sends until at most `max_bytes` stay in memory.
    pub(super) fn trim_staged(
        &self,
        q: &mut QueueState,
        max_bytes: usize,
    ) -> Result<(), StoreError> {
        while q.staged.bytes > max_bytes {
            if self.write_oldest_unit(q, false)?.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// Whether an append for `dk` is staged: when it has staged items already (so
    /// they stay the newest) or it is online, unless it is slow or the append has no
    /// hand-off at all. Otherwise the device's staged items are written first, so
    /// that the append can follow them to sled.
    pub(super) fn stage_for(
        &self,
        q: &mut QueueState,
        dk: DeviceKey,
        online: bool,
        handoff: bool,
    ) -> Result<bool, StoreError> {
        if !handoff || q.staged.slow.contains_key(&dk) {
            self.write_device_staged(q, dk)?;
            return Ok(false);
        }
        Ok(online || q.staged.has(&dk))
    }

    /// `dk` acknowledged up to `seq`: past the item that made it slow, it is not.
    pub(super) fn caught_up(q: &mut QueueState, dk: DeviceKey, seq: u64) {
        if q.staged.slow.get(&dk).is_some_and(|&slow| seq >= slow) {
            q.staged.slow.remove(&dk);
        }
    }

    /// A staged send with this sent-id, if there is one, with a place to wait on it.
    pub(super) fn staged_send(
        &self,
        q: &QueueState,
        sent: &SentKey,
    ) -> Option<(u64, TicketWaiter)> {
        q.staged
            .sent
            .get(sent)
            .map(|(at, ticket)| (*at, TicketWaiter::join(ticket.clone(), self)))
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
        let Some(from) = q
            .staged
            .devices
            .get(&device.key())
            .and_then(|m| m.get(&seq))
            .map(|s| s.from)
        else {
            return Ok(false);
        };
        // Everything that can fail comes before anything changes.
        let receipt = match from {
            Some((_, id)) => {
                let receipt = QueueItem::Delivered {
                    to_number: device_number.to_string(),
                    device_id: device.device_id,
                    id,
                };
                Some((self.next_id()?, records::encode_queued(now_ms, &receipt)?))
            }
            None => None,
        };
        let Some(staged) = q.staged.take(&device.key(), seq) else {
            return Ok(false);
        };
        self.queue_totals.remove(staged.value.len());
        if from.is_some() {
            self.handoff_stats.delivered.fetch_add(1, Ordering::Relaxed);
        }
        // The receipt rides on the sender's answer if a handler still waits to give
        // one (decided before the item settles and wakes it).
        let carried = staged
            .ticket
            .as_ref()
            .is_some_and(|t| t.carry(device.device_id, device_number));
        if let Some(ticket) = &staged.ticket {
            ticket.resolve(false);
        }
        self.handoff_stats
            .acknowledged
            .fetch_add(1, Ordering::Relaxed);
        if let (Some((sender, _)), Some((seq, value))) = (staged.from, receipt)
            && !carried
        {
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
        let Some(mut q) = self.queue_writer_now() else {
            return Ok(None);
        };
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
        let mut newest = None;
        for &seq in seqs {
            if self.ack_staged(&mut q, device, device_number, seq, now_ms, &mut receipts)? {
                removed += 1;
                newest = newest.max(Some(seq));
            }
        }
        if let Some(len) = q.lens.get_mut(&dk) {
            *len = len.saturating_sub(removed);
        }
        if let Some(seq) = newest {
            Store::caught_up(&mut q, dk, seq);
        }
        Ok(Some(receipts))
    }

    /// Queues receipts for `sender`'s message `id` from `devices` of `number`: those
    /// a waiter carried and then could not hand over.
    pub(super) fn stage_receipts(
        &self,
        sender: DeviceRef,
        number: &str,
        id: [u8; 16],
        devices: &[u32],
    ) -> Result<(), StoreError> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut q = self.queue_writer();
        self.len_of(&mut q, sender.key());
        for &device_id in devices {
            let receipt = QueueItem::Delivered {
                to_number: number.to_string(),
                device_id,
                id,
            };
            let seq = self.next_id()?;
            let value = records::encode_queued(now_ms, &receipt)?;
            self.stage_receipt(&mut q, sender.key(), seq, value);
        }
        Ok(())
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
    /// sent-ids it sent. Their tickets settle as written: the removal is a write, so
    /// their senders are answered only after a group commit covers it (a crash
    /// before it would bring the device, and its queue, back). Returns how many
    /// items. Caller holds the lock.
    pub(super) fn drop_staged(&self, q: &mut QueueState, dk: DeviceKey) -> u64 {
        let mut dropped = 0;
        if let Some(map) = q.staged.devices.remove(&dk) {
            for staged in map.into_values() {
                q.staged.bytes = q.staged.bytes.saturating_sub(staged.value.len());
                self.queue_totals.remove(staged.value.len());
                if let Some(ticket) = &staged.ticket {
                    ticket.resolve(true);
                }
                dropped += 1;
            }
        }
        q.staged.sent.retain(|key, _| !key.starts_with(&dk));
        q.staged.written_max.remove(&dk);
        q.staged.slow.remove(&dk);
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
        let q = self.queue_writer_now()?;
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
                if let Some(items) = self.write_oldest_unit(&mut q, cutoff.is_some())? {
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
    ) -> (AppendOutcome, Option<TicketWaiter>) {
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

        // The sender's handler still waits: the receipt rides on its answer.
        let receipts = store.ack(bob, BOB, &[page[0].seq], 2).expect("ack");
        assert!(receipts.is_empty(), "no receipt queued: {receipts:?}");
        assert!(settled(&ticket));
        assert!(!ticket.written(), "acknowledged, not written");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(ticket.settled());
        assert_eq!(ticket.delivered(), [bob.device_id]);
        ticket.answered();
        assert!(
            store
                .staged_page(alice, None, 10, usize::MAX)
                .is_some_and(|(p, _)| p.is_empty())
        );

        assert_eq!(
            store.write_staged(None).expect("write"),
            WriteBehind { units: 1, items: 0 }
        );
        assert_eq!(store.trees.queue.len(), 0, "nothing was written");
        assert_eq!(store.trees.sent_message.len(), 0, "no sent-id either");
        assert_eq!(store.queue_totals(), (0, 0));
        assert_eq!(store.queue_len(bob).expect("len"), 0);
        let stats = store.handoff_stats();
        assert_eq!(stats.staged.load(Ordering::Relaxed), 1);
        assert_eq!(stats.acknowledged.load(Ordering::Relaxed), 1);
        assert_eq!(stats.written.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_receipt_nobody_can_carry_is_queued_and_acknowledged_from_memory() {
        let (_dir, store, alice, bob) = alice_and_bob();
        store.queue_len(alice).expect("len");
        // Nobody waits (the handler is gone before the ack): the receipt is queued.
        let (_, gone) = send(&store, alice, bob, 1, online(&[bob], usize::MAX));
        drop(gone);
        // A handler that leaves after the ack, without answering: queued as well.
        let (_, leaving) = send(&store, alice, bob, 2, online(&[bob], usize::MAX));
        let page = store.queue_page(bob, None, 10).expect("page");
        assert_eq!(ids(&page), [1, 2]);
        let seqs: Vec<u64> = page.iter().map(|q| q.seq).collect();
        let receipts = store
            .ack_from_memory(bob, BOB, &seqs, 2)
            .expect("ack")
            .expect("all in memory");
        assert_eq!(receipts, [alice], "the first receipt, queued at once");
        assert_eq!(leaving.expect("waiter").leave(), Some(alice));

        let (receipts, _) = store
            .staged_page(alice, None, 10, usize::MAX)
            .expect("receipts in memory");
        assert_eq!(ids(&receipts), [101, 102]);
        let seqs: Vec<u64> = receipts.iter().map(|q| q.seq).collect();
        assert_eq!(
            store.ack_from_memory(alice, ALICE, &seqs, 3).expect("ack"),
            Some(Vec::new())
        );
        assert_eq!(
            store.ack_from_memory(alice, ALICE, &seqs, 3).expect("ack"),
            None,
            "gone from memory: the store thread must look in sled"
        );
        store.write_staged(None).expect("write");
        assert_eq!(store.trees.queue.len(), 0);
        assert_eq!(store.queue_totals(), (0, 0));
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
        let t4 = send(&store, alice, bob, 4, online(&[], usize::MAX)).1;
        let tickets: Vec<TicketWaiter> = [t2, t3, t4].into_iter().flatten().collect();
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
        assert!(Arc::ptr_eq(&first.ticket, &again.ticket));
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
    fn a_device_that_lets_a_window_run_out_is_written_to_until_it_catches_up() {
        let (_dir, store, alice, bob) = alice_and_bob();
        let first = send(&store, alice, bob, 1, online(&[bob], usize::MAX)).1;
        let second = send(&store, alice, bob, 2, online(&[bob], usize::MAX)).1;
        assert!(first.is_some() && second.is_some());
        // The write-behind finds both unacknowledged when their window ran out.
        let later = Instant::now();
        store.write_staged(Some(later)).expect("write");
        // Bob is slow now: a send to him is written at once, although he is online.
        let third = send(&store, alice, bob, 3, online(&[bob], usize::MAX)).1;
        assert!(third.is_none(), "written, no window to wait for");
        assert!(staged_seqs(&store, bob).is_empty());
        // He acknowledges the first only: still behind.
        let page = store.queue_page(bob, None, 10).expect("page");
        assert_eq!(ids(&page), [1, 2, 3]);
        store.ack(bob, BOB, &[page[0].seq], 2).expect("ack");
        assert!(
            send(&store, alice, bob, 4, online(&[bob], usize::MAX))
                .1
                .is_none()
        );
        // Past the item that made him slow: staged again.
        store.ack(bob, BOB, &[page[1].seq], 2).expect("ack");
        assert!(
            send(&store, alice, bob, 5, online(&[bob], usize::MAX))
                .1
                .is_some()
        );
        assert_eq!(
            ids(&store.queue_page(bob, None, 10).expect("page")),
            [3, 4, 5]
        );
    }

    #[test]
    fn an_append_runs_in_memory_only_when_it_needs_no_write() {
        use crate::store::InMemory;
        let (_dir, store, alice, bob) = alice_and_bob();
        let try_send = |id: u8, policy: &AppendPolicy| {
            store
                .append_in_memory(alice, ALICE, [id; 16], vec![(bob, vec![id])], 1, policy)
                .expect("append in memory")
        };
        // Bob's queue length is not loaded yet (he never subscribed): the store thread.
        assert!(matches!(
            try_send(1, &online(&[bob], usize::MAX)),
            InMemory::NeedsStore(e) if e == [(bob, vec![1])]
        ));
        store.queue_len(bob).expect("len");
        // Offline, or beyond the byte limit: the store thread.
        assert!(matches!(try_send(1, &1000.into()), InMemory::NeedsStore(_)));
        assert!(matches!(
            try_send(1, &online(&[bob], 16)),
            InMemory::NeedsStore(_)
        ));
        // Online and keeping up: staged right here, and a resend finds it.
        let InMemory::Done(outcome, Some(ticket)) = try_send(1, &online(&[bob], usize::MAX)) else {
            panic!("staged in memory");
        };
        assert_eq!(outcome, AppendOutcome::Queued { accepted_at_ms: 1 });
        assert_eq!(staged_seqs(&store, bob).len(), 1);
        let InMemory::Done(again, Some(same)) = try_send(1, &online(&[bob], usize::MAX)) else {
            panic!("a duplicate of the staged send");
        };
        assert_eq!(again, AppendOutcome::Duplicate { accepted_at_ms: 1 });
        assert!(Arc::ptr_eq(&ticket.ticket, &same.ticket));
        // Its window runs out: written, and Bob is slow, so the next needs the thread.
        store.write_staged(Some(Instant::now())).expect("write");
        assert!(matches!(
            try_send(2, &online(&[bob], usize::MAX)),
            InMemory::NeedsStore(_)
        ));
        // A resend of the written one is a duplicate found in sled, without a ticket.
        store
            .ack(bob, BOB, &staged_or_sled(&store, bob), 2)
            .expect("ack");
        let InMemory::Done(outcome, None) = try_send(1, &online(&[bob], usize::MAX)) else {
            panic!("a duplicate from sled");
        };
        assert_eq!(outcome, AppendOutcome::Duplicate { accepted_at_ms: 1 });
    }

    fn staged_or_sled(store: &Store, device: DeviceRef) -> Vec<u64> {
        store
            .queue_page(device, None, 100)
            .expect("page")
            .iter()
            .map(|q| q.seq)
            .collect()
    }

    #[test]
    fn an_append_without_a_hand_off_writes_the_staged_items_first() {
        let (_dir, store, alice, bob) = alice_and_bob();
        let staged = send(&store, alice, bob, 1, online(&[bob], usize::MAX)).1;
        store
            .append(alice, ALICE, [2; 16], vec![(bob, vec![2])], 1, 1000)
            .expect("append");
        assert!(staged.is_some_and(|t| settled(&t) && t.written()));
        assert!(staged_seqs(&store, bob).is_empty());
        let page = store.queue_page(bob, None, 10).expect("page");
        assert_eq!(ids(&page), [1, 2]);
        assert_eq!(
            sled_seqs(&store, bob),
            page.iter().map(|q| q.seq).collect::<Vec<_>>()
        );
    }

    #[test]
    fn beyond_the_byte_limit_the_oldest_sends_are_written() {
        let (_dir, store, alice, bob) = alice_and_bob();
        let tickets: Vec<TicketWaiter> = (0..3)
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
        assert!(
            ticket.is_some_and(|t| settled(&t) && t.written()),
            "settled as a write: the sender waits for the commit that covers the drop"
        );
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
        /// The write-behind at shutdown or for a backup: everything.
        WriteAll,
        /// The write-behind with every window run out (devices become slow).
        Expire,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..2usize, any::<bool>()).prop_map(|(from, online)| Op::Send { from, online }),
            3 => (0..2usize, 0..8usize).prop_map(|(who, index)| Op::Ack { who, index }),
            1 => Just(Op::WriteAll),
            1 => Just(Op::Expire),
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
                        // As the node does: in memory if it can, else the full append.
                        let envelopes = vec![(devices[to], vec![id])];
                        match store
                            .append_in_memory(devices[from], numbers[from], [id; 16], envelopes, 1, &policy)
                            .expect("append in memory")
                        {
                            crate::store::InMemory::Done(..) => {}
                            crate::store::InMemory::NeedsStore(envelopes) => {
                                store
                                    .append_with(devices[from], numbers[from], [id; 16], envelopes, 1, policy)
                                    .expect("append");
                            }
                        }
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
                    Op::Expire => {
                        store.write_staged(Some(Instant::now())).expect("write");
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
