//! Device queues: append, page, acknowledge, drop, sweep.
//!
//! Queue writes (appends, acknowledgements with their receipts, drops, the sweep) hold
//! the store's queue writer lock: a seq is drawn and committed under it, so every
//! device queue grows strictly in seq order as readers see it. Reading a page takes
//! the lock only for the part that may still be in memory (see `staging`).

use std::sync::MutexGuard;

use super::layout::{self, DeviceKey};
use super::records::{self, QueueItem};
use super::staging::AppendPolicy;
use super::ticket::TicketWaiter;
use super::{DeviceRef, QueueState, Store, StoreError};

/// A queued item as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub seq: u64,
    pub queued_at_ms: u64,
    pub item: QueueItem,
    /// For a [`QueueItem::GroupMessage`]: its body, read from where it is stored once
    /// (`None` if it is gone: expired).
    pub group_body: Option<Vec<u8>>,
}

/// What an append did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    Queued {
        accepted_at_ms: u64,
    },
    /// This sender had already sent this id; nothing was queued.
    Duplicate {
        accepted_at_ms: u64,
    },
    /// This recipient device's queue is at its quota; nothing was queued.
    QueueFull {
        device_id: u32,
    },
}

/// What [`Store::append_in_memory`] did.
#[derive(Debug)]
// Returned once per send and matched at once: boxing would allocate per send.
#[allow(clippy::large_enum_variant)]
pub enum InMemory {
    /// Staged, or found a duplicate.
    Done(AppendOutcome, Option<TicketWaiter>),
    /// It needs the store thread ([`Store::append_with`]); nothing was done.
    NeedsStore(Vec<(DeviceRef, Vec<u8>)>),
}

/// What a sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepStats {
    pub items: u64,
    pub sent_ids: u64,
}

/// Keys scanned per lock hold in the sweep, so appends are never held up for long.
const SWEEP_CHUNK: usize = 1024;

impl Store {
    pub(super) fn queue_writer(&self) -> MutexGuard<'_, QueueState> {
        // A panic while holding the lock cannot leave a queue half-written (sled
        // writes are atomic); at worst a length is off, so carry on.
        self.queue_writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The queue writer lock for a caller on an async worker: spins briefly, and
    /// gives up (`None`) rather than park while the store thread holds the lock
    /// across a sled write, so that a stall of sled never stalls the async workers.
    /// The caller then takes the store-thread path.
    pub(super) fn queue_writer_now(&self) -> Option<MutexGuard<'_, QueueState>> {
        for _ in 0..200 {
            match self.queue_writer.try_lock() {
                Ok(guard) => return Some(guard),
                Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                    return Some(poisoned.into_inner());
                }
                Err(std::sync::TryLockError::WouldBlock) => std::hint::spin_loop(),
            }
        }
        None
    }

    /// The length of `device`'s queue, counted on first use. Caller holds the lock.
    pub(super) fn len_of(&self, q: &mut QueueState, device: DeviceKey) -> u64 {
        *q.lens.entry(device).or_insert_with(|| {
            self.trees
                .queue
                .scan_prefix(device)
                .keys()
                .filter(Result::is_ok)
                .count() as u64
        })
    }

    /// Items in `device`'s queue. Also loads what the hand-off needs to know of it,
    /// so that its delivery stream can read staged pages without the store thread.
    pub fn queue_len(&self, device: DeviceRef) -> Result<u64, StoreError> {
        let mut q = self.queue_writer();
        self.written_max(&mut q, device.key())?;
        Ok(self.len_of(&mut q, device.key()))
    }

    /// Appends one message from `sender` to each recipient device's queue, and records
    /// `id` as sent by `sender`. Not durable until a flush.
    pub fn append(
        &self,
        sender: DeviceRef,
        sender_number: &str,
        id: [u8; 16],
        envelopes: Vec<(DeviceRef, Vec<u8>)>,
        now_ms: u64,
        max_queued: u64,
    ) -> Result<AppendOutcome, StoreError> {
        self.append_with(
            sender,
            sender_number,
            id,
            envelopes,
            now_ms,
            max_queued.into(),
        )
        .map(|(outcome, _)| outcome)
    }

    /// The earlier acceptance of `sent_key`, staged or in sled, if there is one.
    fn earlier_send(
        &self,
        q: &QueueState,
        sent_key: &[u8; 28],
    ) -> Result<Option<(AppendOutcome, Option<TicketWaiter>)>, StoreError> {
        if let Some((at, ticket)) = self.staged_send(q, sent_key) {
            let outcome = AppendOutcome::Duplicate { accepted_at_ms: at };
            return Ok(Some((outcome, Some(ticket))));
        }
        Ok(self.trees.sent_message.get(sent_key)?.map(|at| {
            let accepted_at_ms = records::queued_at(&at).unwrap_or(0);
            (AppendOutcome::Duplicate { accepted_at_ms }, None)
        }))
    }

    /// One queue row of a message: (device, seq, stored value).
    fn message_row(
        &self,
        (sender, sender_number, id): (DeviceRef, &str, [u8; 16]),
        device: DeviceRef,
        body: Vec<u8>,
        (now_ms, expires_at_ms): (u64, Option<u64>),
    ) -> Result<(DeviceKey, u64, Vec<u8>), StoreError> {
        let item = QueueItem::Message {
            from_account: sender.account_id,
            from_device: sender.device_id,
            from_number: sender_number.to_string(),
            id,
            body,
        };
        Ok((
            device.key(),
            self.next_id()?,
            records::encode_queued_until(now_ms, expires_at_ms, &item)?,
        ))
    }

    /// A delivery receipt for `id`, acknowledged by `device_id` of `to_number`, as a
    /// queue row: (seq, stored value).
    pub(super) fn receipt_row(
        &self,
        to_number: &str,
        device_id: u32,
        id: [u8; 16],
        now_ms: u64,
    ) -> Result<(u64, Vec<u8>), StoreError> {
        let receipt = QueueItem::Delivered {
            to_number: to_number.to_string(),
            device_id,
            id,
        };
        Ok((self.next_id()?, records::encode_queued(now_ms, &receipt)?))
    }

    /// [`Store::append_with`] when it needs no write: every recipient device online,
    /// keeping up and with its queue length loaded, within the staging limit. Then
    /// it stages the send (or finds it a duplicate) touching sled only to read the
    /// sent-id, so an async task may call it, and the store thread is spared a trip.
    /// Otherwise it does nothing and hands the envelopes back.
    pub fn append_in_memory(
        &self,
        sender: DeviceRef,
        sender_number: &str,
        id: [u8; 16],
        envelopes: Vec<(DeviceRef, Vec<u8>)>,
        now_ms: u64,
        policy: &AppendPolicy,
    ) -> Result<InMemory, StoreError> {
        let Some(handoff) = &policy.handoff else {
            return Ok(InMemory::NeedsStore(envelopes));
        };
        if !envelopes
            .iter()
            .all(|(device, _)| handoff.online.contains(device))
        {
            return Ok(InMemory::NeedsStore(envelopes));
        }
        let sent_key = layout::sent(sender.key(), &id);
        let Some(mut q) = self.queue_writer_now() else {
            return Ok(InMemory::NeedsStore(envelopes));
        };
        let fits = envelopes.iter().all(|(device, _)| {
            let dk = device.key();
            !q.staged.is_slow(&dk) && q.lens.get(&dk).is_some_and(|&len| len < policy.max_queued)
        }) && q.staged.bytes_held()
            + envelopes.iter().map(|(_, b)| b.len() + 64).sum::<usize>()
            <= handoff.max_bytes;
        if !fits {
            return Ok(InMemory::NeedsStore(envelopes));
        }
        if let Some((outcome, ticket)) = self.earlier_send(&q, &sent_key)? {
            return Ok(InMemory::Done(outcome, ticket));
        }
        let mut rows = Vec::with_capacity(envelopes.len());
        for (device, body) in envelopes {
            rows.push(self.message_row(
                (sender, sender_number, id),
                device,
                body,
                (now_ms, policy.expires_at_ms),
            )?);
        }
        let ticket = self.stage_send(&mut q, rows, (sender, id), sent_key, now_ms, false);
        let outcome = AppendOutcome::Queued {
            accepted_at_ms: now_ms,
        };
        Ok(InMemory::Done(outcome, Some(ticket)))
    }

    /// [`Store::append`] with a hand-off: the items of online devices are staged in
    /// memory (see the `staging` module). The ticket, when there is one, settles once
    /// every staged item of the send was acknowledged or written; the sender may be
    /// answered then (after a group commit if [`super::Ticket::written`]).
    pub fn append_with(
        &self,
        sender: DeviceRef,
        sender_number: &str,
        id: [u8; 16],
        envelopes: Vec<(DeviceRef, Vec<u8>)>,
        now_ms: u64,
        policy: AppendPolicy,
    ) -> Result<(AppendOutcome, Option<TicketWaiter>), StoreError> {
        let _gate = self.writing();
        let sent_key = layout::sent(sender.key(), &id);
        let mut q = self.queue_writer();
        if let Some(earlier) = self.earlier_send(&q, &sent_key)? {
            return Ok(earlier);
        }
        for (device, _) in &envelopes {
            if self.len_of(&mut q, device.key()) >= policy.max_queued {
                let device_id = device.device_id;
                return Ok((AppendOutcome::QueueFull { device_id }, None));
            }
        }
        let mut direct = Vec::with_capacity(envelopes.len());
        let mut staged = Vec::new();
        for (device, body) in envelopes {
            let row = self.message_row(
                (sender, sender_number, id),
                device,
                body,
                (now_ms, policy.expires_at_ms),
            )?;
            let online = policy
                .handoff
                .as_ref()
                .is_some_and(|h| h.online.contains(&device));
            if self.stage_for(&mut q, row.0, online, policy.handoff.is_some())? {
                staged.push(row);
            } else {
                if online {
                    self.handoff_stats
                        .bypassed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                direct.push(row);
            }
        }
        // Plain inserts, not a sled transaction or batch: sled rolls its log buffer
        // twice for every batch (two log writes, each with a sync_file_range), which
        // made each message cost two disk writes. Under the writer lock nobody else
        // writes the queue meanwhile, and sled recovers a prefix of its log, so after
        // a crash the sent-id record (written last) implies its items survived. A
        // crash in between can leave items without the record: the sender, never
        // told `Accepted`, sends again, and the recipient drops the copy by id.
        let any_direct = !direct.is_empty();
        for (dk, seq, value) in direct {
            self.write_queue_item(&mut q, dk, seq, &value)?;
            self.queue_totals.add(value.len());
            *q.lens.entry(dk).or_default() += 1;
        }
        let accepted = AppendOutcome::Queued {
            accepted_at_ms: now_ms,
        };
        if staged.is_empty() {
            self.trees
                .sent_message
                .insert(&sent_key[..], &now_ms.to_be_bytes()[..])?;
            return Ok((accepted, None));
        }
        // The sent-id is written with the staged items, after them.
        let ticket = self.stage_send(&mut q, staged, (sender, id), sent_key, now_ms, any_direct);
        if let Some(handoff) = &policy.handoff {
            self.trim_staged(&mut q, handoff.max_bytes)?;
        }
        Ok((accepted, Some(ticket)))
    }

    /// Up to `max` items of `device`'s queue with a seq above `after`, oldest first.
    pub fn queue_page(
        &self,
        device: DeviceRef,
        after: Option<u64>,
        max: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        Ok(self.queue_page_within(device, after, max, usize::MAX)?.0)
    }

    /// Like [`Store::queue_page`], but stops before the stored items would pass
    /// `max_bytes` in all (always returning at least one item if there is one), so that
    /// a page of large envelopes still fits in one frame. The flag is true when the
    /// page stopped at a limit, so more items may follow.
    pub fn queue_page_within(
        &self,
        device: DeviceRef,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Queued>, bool), StoreError> {
        let dk = device.key();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        // sled holds the older part of the queue, staging the newer. Every item up to
        // the highest seq written is in sled for good (nothing older is ever staged
        // again), so that part is read without the writer lock: a long backlog read
        // never holds up appends and acks.
        let written = {
            let mut q = self.queue_writer();
            self.written_max(&mut q, dk)?
        };
        if let Some(upto) = written
            && self.sled_range(dk, after, upto, max, max_bytes, &mut out, &mut bytes)?
        {
            return Ok((out, true));
        }
        // Then, under the lock (no item moves meanwhile): what was written since, and
        // the staged part.
        let mut q = self.queue_writer();
        let now_written = self.written_max(&mut q, dk)?;
        if let Some(upto) = now_written
            && now_written > written
            && self.sled_range(
                dk,
                after.max(written),
                upto,
                max,
                max_bytes,
                &mut out,
                &mut bytes,
            )?
        {
            return Ok((out, true));
        }
        let after = out.last().map(|last| last.seq).or(after);
        let full = Store::staged_page_into(
            &q,
            &dk,
            after,
            max,
            max_bytes.saturating_sub(bytes),
            &mut out,
        )?;
        Ok((out, full))
    }

    /// Appends to `out` the items of `dk`'s queue in sled with a seq above `after` and
    /// at most `upto`, until `out` holds `max` items or `bytes` would pass `max_bytes`
    /// (true then: the page is full).
    #[allow(clippy::too_many_arguments)]
    fn sled_range(
        &self,
        dk: DeviceKey,
        after: Option<u64>,
        upto: u64,
        max: usize,
        max_bytes: usize,
        out: &mut Vec<Queued>,
        bytes: &mut usize,
    ) -> Result<bool, StoreError> {
        let start = match after {
            Some(seq) if seq >= upto => return Ok(false),
            Some(seq) => seq + 1,
            None => 0,
        };
        let range = layout::queue(dk, start)..=layout::queue(dk, upto);
        for entry in self.trees.queue.range(range) {
            if out.len() >= max {
                return Ok(true);
            }
            let (key, value) = entry?;
            let (_, seq) = layout::parse_queue(&key)
                .ok_or_else(|| StoreError::Corrupt("queue key length".into()))?;
            let (queued_at_ms, item) = records::decode_queued(&value)?;
            let group_body = match &item {
                QueueItem::GroupMessage { body_ref, .. } => self.group_body(*body_ref)?,
                _ => None,
            };
            let size = value.len() + group_body.as_ref().map_or(0, Vec::len);
            if bytes.saturating_add(size) > max_bytes && !out.is_empty() {
                return Ok(true);
            }
            *bytes = bytes.saturating_add(size);
            out.push(Queued {
                seq,
                queued_at_ms,
                item,
                group_body,
            });
        }
        Ok(false)
    }

    /// Removes the acknowledged items `seqs` from `device`'s queue (seqs it does not
    /// hold are ignored: a device can only ever touch its own queue) and queues a
    /// delivery receipt for the sender of each message among them, atomically.
    /// Returns the devices that got a receipt.
    pub fn ack(
        &self,
        device: DeviceRef,
        device_number: &str,
        seqs: &[u64],
        now_ms: u64,
    ) -> Result<Vec<DeviceRef>, StoreError> {
        let _gate = self.writing();
        let dk = device.key();
        let mut q = self.queue_writer();
        let mut removed = 0u64;
        let mut receipts: Vec<DeviceRef> = Vec::new();
        // Item by item, receipt before removal (no sled batch: see `append`). A crash
        // in between leaves the item and its receipt: the item is delivered again and
        // the sender may see a second receipt, but a receipt is never lost. An item
        // still in memory leaves memory, and its receipt is staged in turn.
        let mut newest = None;
        for &seq in seqs {
            if self.ack_staged(&mut q, device, device_number, seq, now_ms, &mut receipts)? {
                removed += 1;
                newest = newest.max(Some(seq));
                continue;
            }
            let key = layout::queue(dk, seq);
            let Some(value) = self.trees.queue.get(key)? else {
                continue;
            };
            let (_, item) = records::decode_queued(&value)?;
            if let QueueItem::GroupMessage {
                body_ref,
                from_account,
                from_device,
                id,
                ..
            } = &item
            {
                // Counted for the sender (one item per message, not a receipt per
                // device); the body goes with the last device to take it.
                let sender = DeviceRef {
                    account_id: *from_account,
                    device_id: *from_device,
                };
                if let Some(s) = self.count_group_delivery(&mut q, sender, *id, now_ms)? {
                    receipts.push(s);
                }
                self.release_group_body(*body_ref)?;
            }
            if let QueueItem::Message {
                from_account,
                from_device,
                id,
                ..
            } = item
            {
                let sender = DeviceRef {
                    account_id: from_account,
                    device_id: from_device,
                };
                let (seq, receipt) =
                    self.receipt_row(device_number, device.device_id, id, now_ms)?;
                // Straight to sled, before the removal; the sender's staged items
                // go first, so that its queue stays in seq order on disk.
                self.write_device_staged(&mut q, sender.key())?;
                self.write_new_queue_item(&mut q, sender.key(), seq, &receipt)?;
                receipts.push(sender);
                self.handoff_stats
                    .delivered
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            self.trees.queue.remove(&key[..])?;
            self.queue_totals.remove(value.len());
            removed += 1;
            newest = newest.max(Some(seq));
        }
        Store::acked(&mut q, dk, removed, newest);
        Ok(receipts)
    }

    /// Removes `dk`'s queue (in sled and in memory), its one-time keys and the ids it
    /// sent; returns how many queue items. Caller holds the writer lock; the device's
    /// identity keys are the caller's to remove.
    pub(super) fn forget_device(
        &self,
        q: &mut QueueState,
        dk: DeviceKey,
    ) -> Result<u64, StoreError> {
        let mut dropped = 0;
        for entry in self.trees.queue.scan_prefix(dk) {
            let (key, value) = entry?;
            self.trees.queue.remove(key)?;
            self.queue_totals.remove(value.len());
            dropped += 1;
        }
        dropped += self.drop_staged(q, dk);
        q.lens.remove(&dk);
        for key in self.trees.one_time_key.scan_prefix(dk).keys() {
            self.trees.one_time_key.remove(key?)?;
        }
        for key in self.trees.sent_message.scan_prefix(dk).keys() {
            self.trees.sent_message.remove(key?)?;
        }
        Ok(dropped)
    }

    /// `sender` holds the answer to its send `id`, accepted at `accepted_at_ms` (QUIC
    /// confirmed the reply): the sent-id record, kept so that a resend after a lost
    /// answer queues nothing, has done its job, and goes. Kept until the TTL, one
    /// record per send grew the data dir under steady churn (BENCHMARKS.md). A client
    /// that resends anyway (it crashed before saving the answer) queues a second
    /// copy, which the recipient drops by id. Only the record of that acceptance goes,
    /// never a later send's of the same id. Not flushed: a removal lost in a crash
    /// leaves the record to the sweep. Caller: the store thread.
    pub fn forget_sent(
        &self,
        sender: DeviceRef,
        id: [u8; 16],
        accepted_at_ms: u64,
    ) -> Result<(), StoreError> {
        let _gate = self.writing();
        let sent_key = layout::sent(sender.key(), &id);
        // Under the writer lock, so a write-behind that is writing the send's unit
        // finishes first; a record still staged is dropped and never written.
        let mut q = self.queue_writer();
        if q.staged.forget_sent(&sent_key, accepted_at_ms) {
            return Ok(());
        }
        let at = accepted_at_ms.to_be_bytes();
        // Fails (harmlessly) when the record is gone or is another acceptance's.
        let _ = self.trees.sent_message.compare_and_swap(
            &sent_key[..],
            Some(&at[..]),
            None::<&[u8]>,
        )?;
        Ok(())
    }

    /// Deletes `device`'s queue, its one-time keys and the ids it sent, leaving its
    /// identity keys (see [`Store::drop_device`]).
    pub fn drop_queue(&self, device: DeviceRef) -> Result<u64, StoreError> {
        let _gate = self.writing();
        self.forget_device(&mut self.queue_writer(), device.key())
    }

    /// Deletes everything the node holds for `device`: its queue and its keys. For a
    /// device that was signed out.
    pub fn drop_device(&self, device: DeviceRef) -> Result<u64, StoreError> {
        let _gate = self.writing();
        let dk = device.key();
        let dropped = self.forget_device(&mut self.queue_writer(), dk)?;
        self.trees.device_keys.remove(dk)?;
        self.trees.device_name.remove(dk)?;
        self.trees.device_seen.remove(dk)?;
        self.trees.device_vouch.remove(dk)?;
        Ok(dropped)
    }

    /// Removes queue items queued before `cutoff_ms` and sent-id records older than it.
    pub fn sweep(&self, cutoff_ms: u64, now_ms: u64) -> Result<SweepStats, StoreError> {
        let mut stats = SweepStats::default();
        let mut from: Vec<u8> = Vec::new();
        loop {
            // Gate per chunk, like the writer lock: a backup waits for one chunk at most.
            let _gate = self.writing();
            let mut q = self.queue_writer();
            let mut last = None;
            let mut seen = 0;
            for entry in self.trees.queue.range(from.clone()..).take(SWEEP_CHUNK) {
                let (key, value) = entry?;
                seen += 1;
                if records::expired(&value, cutoff_ms, now_ms) {
                    self.trees.queue.remove(&key)?;
                    self.queue_totals.remove(value.len());
                    stats.items += 1;
                    if let Some((device, _)) = layout::parse_queue(&key)
                        && let Some(len) = q.lens.get_mut(&device)
                    {
                        *len = len.saturating_sub(1);
                    }
                }
                last = Some(key);
            }
            drop(q);
            match last {
                Some(key) if seen == SWEEP_CHUNK => {
                    from = key.to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        {
            let _gate = self.writing();
            // Bodies whose queue items expired (or went with a removed device).
            self.sweep_group_bodies(cutoff_ms, now_ms)?;
        }
        for entry in self.trees.sent_message.iter() {
            let (key, value) = entry?;
            if records::queued_at(&value).is_some_and(|at| at < cutoff_ms) {
                // Per removal: a backup waits for one at most.
                let _gate = self.writing();
                self.trees.sent_message.remove(key)?;
                stats.sent_ids += 1;
            }
        }
        Ok(stats)
    }
}

#[cfg(test)]
pub(in crate::store) mod tests {
    use super::*;
    use crate::store::{Judgement, NewDevice};

    pub(in crate::store) fn registered(store: &Store, number: &str, key: u8) -> DeviceRef {
        let code = records::CodeRecord {
            hash: [0; 32],
            sent_at_ms: 0,
            expires_at_ms: u64::MAX,
            tries_left: 5,
        };
        store
            .replace_code::<()>(number, |_| Ok(code.clone()))
            .unwrap()
            .unwrap();
        let device = NewDevice {
            key_id: [key; 32],
            public_key: vec![key],
        };
        match store
            .verify_and_register::<()>(number, &device, 0, |_| Judgement::Accept)
            .unwrap()
        {
            super::super::VerifyOutcome::Registered { device, .. } => device,
            other => panic!("{other:?}"),
        }
    }

    fn bodies(page: &[Queued]) -> Vec<Vec<u8>> {
        page.iter()
            .filter_map(|q| match &q.item {
                QueueItem::Message { body, .. } => Some(body.clone()),
                QueueItem::Delivered { .. }
                | QueueItem::GroupMessage { .. }
                | QueueItem::GroupDelivered { .. } => None,
            })
            .collect()
    }

    /// A fresh store with Alice and Bob registered (keep the dir alive).
    pub(in crate::store) fn alice_and_bob() -> (tempfile::TempDir, Store, DeviceRef, DeviceRef) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let alice = registered(&store, "+14155550100", 1);
        let bob = registered(&store, "+14155550101", 2);
        (dir, store, alice, bob)
    }

    #[test]
    fn pages_stop_at_their_byte_budget_but_never_come_back_empty() {
        let (_dir, store, alice, bob) = alice_and_bob();
        for i in 0..10u8 {
            let out = store
                .append(
                    alice,
                    "+14155550100",
                    [i; 16],
                    vec![(bob, vec![i; 1000])],
                    1,
                    100,
                )
                .unwrap();
            assert!(matches!(out, AppendOutcome::Queued { .. }));
        }
        let (page, more) = store.queue_page_within(bob, None, 100, 3500).unwrap();
        assert_eq!((page.len(), more), (3, true));
        let (page, more) = store.queue_page_within(bob, None, 100, 1).unwrap();
        assert_eq!((page.len(), more), (1, true), "one item even over budget");
        let (page, more) = store.queue_page_within(bob, None, 4, usize::MAX).unwrap();
        assert_eq!((page.len(), more), (4, true));
        let last = Some(page[3].seq);
        let (page, more) = store.queue_page_within(bob, last, 100, usize::MAX).unwrap();
        assert_eq!((page.len(), more), (6, false));
    }

    #[test]
    fn append_is_ordered_idempotent_and_acks_make_receipts() {
        let (_dir, store, alice, bob) = alice_and_bob();
        for (i, id) in [[1u8; 16], [2; 16], [3; 16]].into_iter().enumerate() {
            let out = store
                .append(
                    alice,
                    "+14155550100",
                    id,
                    vec![(bob, vec![i as u8])],
                    10,
                    100,
                )
                .unwrap();
            assert_eq!(out, AppendOutcome::Queued { accepted_at_ms: 10 });
        }
        let again = store
            .append(
                alice,
                "+14155550100",
                [2; 16],
                vec![(bob, vec![9])],
                20,
                100,
            )
            .unwrap();
        assert_eq!(again, AppendOutcome::Duplicate { accepted_at_ms: 10 });
        let page = store.queue_page(bob, None, 10).unwrap();
        assert_eq!(bodies(&page), vec![vec![0], vec![1], vec![2]]);
        assert_eq!(store.queue_len(bob).unwrap(), 3);
        // Paging continues after the cursor.
        let rest = store.queue_page(bob, Some(page[0].seq), 10).unwrap();
        assert_eq!(bodies(&rest), vec![vec![1], vec![2]]);

        // Alice cannot remove Bob's items by naming their seqs.
        let seqs: Vec<u64> = page.iter().map(|q| q.seq).collect();
        assert!(
            store
                .ack(alice, "+14155550100", &seqs, 30)
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.queue_len(bob).unwrap(), 3);

        let notified = store.ack(bob, "+14155550101", &seqs[..2], 30).unwrap();
        assert_eq!(notified, vec![alice, alice]);
        assert_eq!(store.queue_len(bob).unwrap(), 1);
        let receipts = store.queue_page(alice, None, 10).unwrap();
        assert_eq!(receipts.len(), 2);
        assert!(matches!(&receipts[0].item, QueueItem::Delivered { id, .. } if *id == [1; 16]));
    }

    #[test]
    fn quota_refuses_and_nothing_is_queued() {
        let (_dir, store, alice, bob) = alice_and_bob();
        for i in 0..2u8 {
            store
                .append(alice, "a", [i; 16], vec![(bob, vec![i])], 1, 2)
                .unwrap();
        }
        let full = store
            .append(alice, "a", [7; 16], vec![(bob, vec![7])], 1, 2)
            .unwrap();
        assert_eq!(
            full,
            AppendOutcome::QueueFull {
                device_id: bob.device_id
            }
        );
        assert_eq!(store.queue_len(bob).unwrap(), 2);
        // A refused id was not recorded: it may be sent again once there is room.
        let seqs: Vec<u64> = store
            .queue_page(bob, None, 10)
            .unwrap()
            .iter()
            .map(|q| q.seq)
            .collect();
        store.ack(bob, "b", &seqs, 2).unwrap();
        let retry = store
            .append(alice, "a", [7; 16], vec![(bob, vec![7])], 3, 2)
            .unwrap();
        assert_eq!(retry, AppendOutcome::Queued { accepted_at_ms: 3 });
    }

    #[test]
    fn sweep_drops_only_old_items_and_lengths_follow() {
        let (_dir, store, alice, bob) = alice_and_bob();
        for i in 0..3000u32 {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            let at = if i < 2000 { 100 } else { 200 };
            store
                .append(alice, "a", id, vec![(bob, vec![1])], at, 10_000)
                .unwrap();
        }
        let stats = store.sweep(150, 150).unwrap();
        assert_eq!(
            stats,
            SweepStats {
                items: 2000,
                sent_ids: 2000
            }
        );
        assert_eq!(store.queue_len(bob).unwrap(), 1000);
        assert_eq!(store.queue_page(bob, None, 5000).unwrap().len(), 1000);
    }
}
