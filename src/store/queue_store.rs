//! Device queues as a storage concern: what the node needs of them, whatever engine
//! keeps them. [`SledQueues`] (one node) and `cluster::queues::JetStreamQueues` (a
//! replicated JetStream stream, several nodes) both implement [`QueueStore`], and
//! `tests/it/cluster.rs` runs one set of tests against each.
//!
//! The promises every implementation keeps: an append that returns `Queued` is
//! durable (sled: flushed; JetStream: acknowledged by a quorum of the stream's
//! replicas); each device's items are read back in the order they were queued; an
//! id sent again by the same device queues nothing new; an acknowledged message
//! leaves its queue only after the receipt for its sender was queued; a device reads
//! and acknowledges only its own queue.
//!
//! The single node's hand-off (staging items for online devices in memory) and
//! group commit stay on the sled side, above this trait: [`SledQueues`] is the plain
//! durable path, what the node does for a device that is not online.

use std::future::Future;

use super::queues::{AppendOutcome, Queued};
use super::{DeviceRef, GroupAppend, Store, StoreError};

/// One message to queue: from `sender`, its `id`, a body per recipient device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub sender: DeviceRef,
    pub sender_number: String,
    pub id: [u8; 16],
    pub envelopes: Vec<(DeviceRef, Vec<u8>)>,
    pub now_ms: u64,
    /// A disappearing message: dropped at this time (ms) if not read by then.
    pub expires_at_ms: Option<u64>,
}

/// One message to group `group_id`, one body for each of `recipients`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSend {
    pub sender: DeviceRef,
    pub sender_number: String,
    pub group_id: u64,
    pub id: [u8; 16],
    pub body: Vec<u8>,
    pub recipients: Vec<DeviceRef>,
    pub now_ms: u64,
    /// A disappearing message: dropped at this time (ms) if not read by then.
    pub expires_at_ms: Option<u64>,
}

/// Per-device queues of messages and delivery receipts.
pub trait QueueStore: Send + Sync {
    /// Queues `message` for each of its recipient devices, durably, or says why not
    /// (a duplicate id, a full queue).
    fn append(
        &self,
        message: Outgoing,
    ) -> impl Future<Output = Result<AppendOutcome, StoreError>> + Send;

    /// Queues group message `message` for each of its recipient devices, durably,
    /// or says which device's queue is full. Acknowledged by a device, it counts
    /// towards one [`QueueItem::GroupDelivered`](super::records::QueueItem) for the
    /// sender (the latest count replacing the one before), not a receipt each.
    fn append_group(
        &self,
        message: GroupSend,
    ) -> impl Future<Output = Result<GroupAppend, StoreError>> + Send;

    /// Up to `max` items of `device`'s queue with a seq above `after`, oldest first,
    /// stopping before they pass `max_bytes` (one item at least); true when it
    /// stopped at a limit, so more may follow.
    fn page(
        &self,
        device: DeviceRef,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<(Vec<Queued>, bool), StoreError>> + Send;

    /// Removes the items `seqs` of `device`'s queue (seqs it does not hold are
    /// ignored) and queues a delivery receipt for the sender of each message among
    /// them first. The devices that got a receipt.
    fn ack(
        &self,
        device: DeviceRef,
        device_number: String,
        seqs: Vec<u64>,
        now_ms: u64,
    ) -> impl Future<Output = Result<Vec<DeviceRef>, StoreError>> + Send;

    /// Items in `device`'s queue.
    fn queue_len(&self, device: DeviceRef) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Empties `device`'s queue and forgets the ids it sent (it was signed out or
    /// unlinked); how many items went.
    fn drop_queue(&self, device: DeviceRef)
    -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// [`QueueStore`] on the sled [`Store`], each append flushed before it returns.
#[derive(Clone)]
pub struct SledQueues {
    pub store: Store,
    /// A device queue at this length refuses appends (`messages.max_queued`).
    pub max_queued: u64,
}

impl QueueStore for SledQueues {
    async fn append(&self, m: Outgoing) -> Result<AppendOutcome, StoreError> {
        let policy = super::AppendPolicy {
            max_queued: self.max_queued,
            handoff: None,
            expires_at_ms: m.expires_at_ms,
        };
        let outcome = super::blocking(&self.store, move |s| {
            s.append_with(
                m.sender,
                &m.sender_number,
                m.id,
                m.envelopes,
                m.now_ms,
                policy,
            )
            .map(|(outcome, _)| outcome)
        })
        .await?;
        if matches!(outcome, AppendOutcome::Queued { .. }) {
            self.store.flush().await?;
        }
        Ok(outcome)
    }

    async fn append_group(&self, m: GroupSend) -> Result<GroupAppend, StoreError> {
        let max_queued = self.max_queued;
        let outcome = super::blocking(&self.store, move |s| s.append_group(&m, max_queued)).await?;
        if matches!(outcome, GroupAppend::Queued { .. }) {
            self.store.flush().await?;
        }
        Ok(outcome)
    }

    async fn page(
        &self,
        device: DeviceRef,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Queued>, bool), StoreError> {
        super::blocking(&self.store, move |s| {
            s.queue_page_within(device, after, max, max_bytes)
        })
        .await
    }

    async fn ack(
        &self,
        device: DeviceRef,
        device_number: String,
        seqs: Vec<u64>,
        now_ms: u64,
    ) -> Result<Vec<DeviceRef>, StoreError> {
        let receipts = super::blocking(&self.store, move |s| {
            s.ack(device, &device_number, &seqs, now_ms)
        })
        .await?;
        self.store.flush().await?;
        Ok(receipts)
    }

    async fn queue_len(&self, device: DeviceRef) -> Result<u64, StoreError> {
        super::blocking(&self.store, move |s| s.queue_len(device)).await
    }

    async fn drop_queue(&self, device: DeviceRef) -> Result<u64, StoreError> {
        super::blocking(&self.store, move |s| s.drop_queue(device)).await
    }
}
