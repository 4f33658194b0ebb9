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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::layout::{self, DeviceKey};
use super::records;
use super::ticket::{CarriedReceipts, Ticket, TicketWaiter};
use super::{DeviceRef, QueueState, Queued, Store, StoreError};

/// The `sent_message` key of a staged send.
type SentKey = [u8; 28];

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
    /// A disappearing message: the sweep drops its items at this time (ms), or at
    /// the TTL if sooner.
    pub expires_at_ms: Option<u64>,
}

impl From<u64> for AppendPolicy {
    fn from(max_queued: u64) -> Self {
        AppendPolicy {
            max_queued,
            handoff: None,
            expires_at_ms: None,
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
    /// A send's sent-id and ticket: the unit writes the staged entry for this key
    /// only while it is still its own (once answered, the key may be a resend's).
    sent: Option<(SentKey, Arc<Ticket>)>,
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

    /// Drops the staged sent-id `sent` accepted at `accepted_at_ms`, so its unit is
    /// written without it; false when it is not staged.
    pub(super) fn forget_sent(&mut self, sent: &SentKey, accepted_at_ms: u64) -> bool {
        match self.sent.get(sent) {
            Some((at, _)) if *at == accepted_at_ms => self.sent.remove(sent).is_some(),
            _ => false,
        }
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
                group_body: None,
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
            Some(key) => layout::parse_queue(&key?).map(|(_, seq)| seq),
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
        self.trees
            .queue
            .insert(&layout::queue(dk, seq)[..], value)?;
        q.staged.written_max.insert(dk, Some(seq));
        Ok(())
    }

    /// [`Store::write_queue_item`] of a new item, counted in the queue totals and in
    /// `dk`'s length (if it is loaded).
    pub(super) fn write_new_queue_item(
        &self,
        q: &mut QueueState,
        dk: DeviceKey,
        seq: u64,
        value: &[u8],
    ) -> Result<(), StoreError> {
        self.write_queue_item(q, dk, seq, value)?;
        self.queue_totals.add(value.len());
        if let Some(len) = q.lens.get_mut(&dk) {
            *len += 1;
        }
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
        let Some(staged) = q.staged.devices.get(&dk).and_then(|m| m.get(&seq)) else {
            return Ok(false);
        };
        self.trees
            .queue
            .insert(&layout::queue(dk, seq)[..], staged.value.as_slice())?;
        q.staged.written_max.insert(dk, Some(seq));
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
        let (items, sent) = (unit.items.clone(), unit.sent.clone());
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
        // An entry that is not this unit's (its sender was answered, the record
        // forgotten, and the id sent again) belongs to the resend's unit.
        if let Some((sent, ours)) = &sent
            && let Some((at, ticket)) = q.staged.sent.get(sent)
            && Arc::ptr_eq(ticket, ours)
        {
            if ticket.written() {
                self.trees
                    .sent_message
                    .insert(&sent[..], &at.to_be_bytes()[..])?;
            }
            q.staged.sent.remove(sent);
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
            sent: Some((sent, ticket.clone())),
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

    /// `dk` acknowledged `removed` items, the newest `newest`: its queue is shorter,
    /// and past the item that made it slow, it is not slow any more.
    pub(super) fn acked(q: &mut QueueState, dk: DeviceKey, removed: u64, newest: Option<u64>) {
        if let Some(len) = q.lens.get_mut(&dk) {
            *len = len.saturating_sub(removed);
        }
        if let Some(seq) = newest
            && q.staged.slow.get(&dk).is_some_and(|&slow| seq >= slow)
        {
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
            Some((_, id)) => Some(self.receipt_row(device_number, device.device_id, id, now_ms)?),
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
        Store::acked(&mut q, dk, removed, newest);
        Ok(Some(receipts))
    }

    /// Queues receipts for `sender`'s message `id` from `devices` of `number`: those
    /// a waiter carried and then could not hand over.
    /// Queues (stages) the receipts an unanswered send carried. It may wait for the
    /// queue writer lock and count the sender's queue: the store thread's work.
    pub fn stage_carried(&self, c: &CarriedReceipts) -> Result<(), StoreError> {
        let mut q = self.queue_writer();
        self.len_of(&mut q, c.sender.key());
        self.stage_carried_in(&mut q, c)
    }

    /// [`Store::stage_carried`] for a caller on an async worker: done only if the
    /// queue writer lock comes within a short spin and the sender's queue length is
    /// known (no sled scan); `false` otherwise, and the caller hands it to the store
    /// thread.
    pub fn try_stage_carried(&self, c: &CarriedReceipts) -> Result<bool, StoreError> {
        let Some(mut q) = self.queue_writer_now() else {
            return Ok(false);
        };
        if !q.lens.contains_key(&c.sender.key()) {
            return Ok(false);
        }
        self.stage_carried_in(&mut q, c)?;
        Ok(true)
    }

    fn stage_carried_in(&self, q: &mut QueueState, c: &CarriedReceipts) -> Result<(), StoreError> {
        let now_ms = super::wall_ms();
        for &device_id in &c.devices {
            let (seq, value) = self.receipt_row(&c.number, device_id, c.id, now_ms)?;
            self.stage_receipt(q, c.sender.key(), seq, value);
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
mod tests;
