//! Device queues in one replicated JetStream stream (`SB_QUEUES`,
//! [`REPLICAS`](super::REPLICAS) replicas, file storage).
//!
//! Each device has two subjects: `sbq.ACCOUNT.DEVICE.m` for the messages sent to it
//! and `sbq.ACCOUNT.DEVICE.r` for the delivery receipts of the messages it sent. A
//! queue item's seq is its stream sequence, so the items of both subjects read back
//! in the order they were queued (`sbq.ACCOUNT.DEVICE.*`).
//! The stored value is the single node's queue value (`records::encode_queued_until`).
//!
//! - **Durability.** An append returns `Queued` once JetStream acknowledged every
//!   envelope's publish: acknowledged by a quorum of the stream's replicas.
//! - **Duplicates.** Each envelope is published with `Nats-Msg-Id`
//!   `SENDER_ACCOUNT.SENDER_DEVICE.ID.ACCOUNT.DEVICE`: a send repeated within the
//!   stream's duplicate window (`duplicate_window`) is stored once. A resend after it
//!   is stored again and the recipient drops the copy by id, as on a single node
//!   after its sent-id record went.
//! - **Quota.** `max_messages_per_subject` with "discard new per subject": a device
//!   queue at `max_queued` refuses the publish on the cluster itself, whichever node
//!   sends. Unlike the single node, a send to several devices may land on some
//!   before one refuses (the sender is told `QueueFull` and sends again later with
//!   the same id; the ones that landed are deduplicated within the window).
//! - **Expiry.** `max_age` is the message TTL; a disappearing message past its own
//!   expiry is left out of pages and deleted when a page meets it.
//! - **Acknowledgement.** The receipt for the sender is published (and acknowledged
//!   by JetStream) before the item is removed, so a crash in between delivers the item
//!   again and never loses the receipt (its `Nats-Msg-Id` names the acknowledged
//!   item, so a repeated ack within the window stores it once). A device's receipt
//!   subject is bounded by `max_queued` too: a receipt for a sender whose receipts
//!   pile up that high is dropped, logged (the single node has no such bound).
//! - **Removal.** A delivery stream removes what its device acknowledged a moment
//!   later (`cluster.removal_delay_ms`), all together: one purge of the device's
//!   subjects below the lowest seq it pushed and has not seen acknowledged (every
//!   item below was pushed and acknowledged: [`Pushed::floor`]), a delete each for
//!   the rest. A purge is one replicated write for the items of many acks where a
//!   delete is one per item. A node killed in between delivers those items again
//!   (delivery is at least once; clients drop duplicates by id).
//! - **Reads.** The backlog is read from the stream leader; a read up to a woken seq
//!   is a direct get (`allow_direct`), answered by the nearest replica, usually the
//!   member the node is connected to: no hop to the leader. A replica without the
//!   item woken for yet is caught up by asking the leader.
//! - **Wake-ups.** After an append, a core NATS message (no payload) on
//!   `sbw.ACCOUNT.DEVICE` tells whichever node holds that device's delivery stream to
//!   read its queue now; its header `Sb-Seq` is the seq of the item stored, so the
//!   read stops there instead of asking once more for a next item that is not there
//!   (a page with a limit, [`JetStreamQueues::page_until`]). The stream stays the
//!   source of truth: a lost wake-up delays an item until the next wake-up for a
//!   later item or that node's next full read, never loses it. A wake-up without
//!   `Sb-Seq` asks for a full read. A message there with a payload is an ephemeral
//!   item for the device (a typing notice, one frame), pushed if it is connected and
//!   never stored.

use std::time::Duration;

use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self as js};
use bytes::Bytes;
use futures_util::TryStreamExt;

use super::bucket::{Bucket, engine};
use super::{Cluster, ClusterError};
use crate::store::queue_store::{GroupSend, Outgoing, QueueStore};
use crate::store::records::{self, QueueItem};
use crate::store::{AppendOutcome, DeviceRef, GroupAppend, Queued, StoreError};

mod group;

/// The stream's name.
pub const STREAM: &str = "SB_QUEUES";

/// What a queue stream keeps and refuses: from `[messages]` in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// A device queue at this length refuses appends.
    pub max_queued: u64,
    /// Items older than this are dropped (the message TTL).
    pub ttl: Duration,
    /// A repeated `Nats-Msg-Id` within this window is stored once.
    pub duplicate_window: Duration,
}

/// [`QueueStore`] on a JetStream cluster.
#[derive(Clone)]
pub struct JetStreamQueues {
    client: async_nats::Client,
    jetstream: js::Context,
    stream: stream::Stream<()>,
    /// How many devices have each group message (`group`).
    receipts: Bucket,
    /// Messages (one-to-one, as the single node counts them) acknowledged by their
    /// device through this handle (this node's `messages_delivered_total`).
    delivered: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for JetStreamQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamQueues").finish_non_exhaustive()
    }
}

fn filter(device: DeviceRef) -> String {
    format!("sbq.{}.{}.*", device.account_id, device.device_id)
}

fn messages_subject(device: DeviceRef) -> String {
    format!("sbq.{}.{}.m", device.account_id, device.device_id)
}

fn receipts_subject(device: DeviceRef) -> String {
    format!("sbq.{}.{}.r", device.account_id, device.device_id)
}

/// The core NATS subject that wakes `device`'s delivery stream, wherever it is.
pub fn wake_subject(device: DeviceRef) -> String {
    format!("sbw.{}.{}", device.account_id, device.device_id)
}

/// The header of a wake-up that names the seq of the item it is for.
const WAKE_SEQ: &str = "Sb-Seq";

/// The seq a wake-up names (`None`: it names none, so the whole queue is read).
pub fn woken_seq(wake_up: &async_nats::Message) -> Option<u64> {
    wake_up
        .headers
        .as_ref()?
        .get(WAKE_SEQ)?
        .as_str()
        .parse()
        .ok()
}

/// Whether `subject` is one of `device`'s queue subjects.
fn holds(device: DeviceRef, subject: &str) -> bool {
    subject == messages_subject(device) || subject == receipts_subject(device)
}

/// Whether `e` is the stream refusing a publish because that subject is at
/// `max_messages_per_subject` (JetStream error 10077, "maximum messages per subject
/// exceeded").
fn subject_full(e: &(dyn std::error::Error + 'static)) -> bool {
    super::jetstream_error(e, &[10077]).is_some_and(|js| js.to_string().contains("per subject"))
}

/// A raw get's message, `None` when the stream holds none there.
fn found(
    got: Result<StreamMessage, stream::RawMessageError>,
) -> Result<Option<StreamMessage>, StoreError> {
    match got {
        Ok(m) => Ok(Some(m)),
        Err(e) if matches!(e.kind(), stream::RawMessageErrorKind::NoMessageFound) => Ok(None),
        Err(e) => Err(engine(STREAM, e)),
    }
}

impl JetStreamQueues {
    /// The stream on `cluster`, created with `replicas` replicas (at most
    /// [`super::REPLICAS`]) if it is not there, and its limits set to `limits`.
    pub async fn open(
        cluster: &Cluster,
        replicas: usize,
        limits: QueueLimits,
    ) -> Result<JetStreamQueues, ClusterError> {
        let config = stream::Config {
            name: STREAM.into(),
            description: Some("switchboard: device queues (messages, delivery receipts)".into()),
            subjects: vec!["sbq.>".into()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: replicas.clamp(1, super::REPLICAS),
            max_age: limits.ttl,
            max_messages_per_subject: i64::try_from(limits.max_queued).unwrap_or(i64::MAX),
            discard: DiscardPolicy::New,
            discard_new_per_subject: true,
            duplicate_window: limits.duplicate_window,
            // Woken reads go to the nearest replica (`next_from`).
            allow_direct: true,
            ..Default::default()
        };
        let js = &cluster.jetstream;
        js.create_or_update_stream(config)
            .await
            .map_err(|e| ClusterError::JetStream(format!("stream {STREAM}: {e}")))?;
        let stream = js
            .get_stream_no_info(STREAM)
            .await
            .map_err(|e| ClusterError::JetStream(format!("stream {STREAM}: {e}")))?;
        let receipts = Bucket::open_expiring(
            cluster,
            group::BUCKET,
            "switchboard: how many devices have each group message",
            replicas,
            limits.ttl,
        )
        .await?;
        Ok(JetStreamQueues {
            client: cluster.client.clone(),
            jetstream: js.clone(),
            stream,
            receipts,
            delivered: std::sync::Arc::default(),
        })
    }

    /// Messages (one-to-one) acknowledged by their device through this handle (its
    /// clones share the count). Two delivery streams of one device acknowledging the
    /// same item both count it.
    pub fn delivered_total(&self) -> u64 {
        self.delivered.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The items the stream holds for the whole cluster (messages, receipts and
    /// group message bodies, whichever node queued them) and their stored bytes.
    pub async fn totals(&self) -> Result<(u64, u64), StoreError> {
        let stream = self
            .jetstream
            .get_stream(STREAM)
            .await
            .map_err(|e| engine(STREAM, e))?;
        let state = &stream.cached_info().state;
        Ok((state.messages, state.bytes))
    }

    /// What the stream holds for an operator (`admin stats`): messages and receipts
    /// queued for devices (a group message counting once per device), the stream's
    /// bytes (group message bodies too) and when its oldest item was stored (ms).
    pub async fn census(&self) -> Result<(u64, u64, u64, Option<u64>), StoreError> {
        let stream = self
            .jetstream
            .get_stream(STREAM)
            .await
            .map_err(|e| engine(STREAM, e))?;
        let mut kinds = [0u64; 2];
        for (total, kind) in kinds.iter_mut().zip(["m", "r"]) {
            let mut subjects = stream
                .info_with_subjects(format!("sbq.*.*.{kind}"))
                .await
                .map_err(|e| engine(STREAM, e))?;
            while let Some((_, count)) = subjects.try_next().await.map_err(|e| engine(STREAM, e))? {
                *total = total.saturating_add(count as u64);
            }
        }
        let state = &stream.cached_info().state;
        let oldest = (state.messages > 0).then(|| {
            u64::try_from(state.first_timestamp.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
        });
        Ok((kinds[0], kinds[1], state.bytes, oldest))
    }

    /// Wake-ups for `device`: a message arrives on it whenever something was queued
    /// for the device, through any node.
    pub async fn wake_ups(&self, device: DeviceRef) -> Result<async_nats::Subscriber, StoreError> {
        self.client
            .subscribe(wake_subject(device))
            .await
            .map_err(|e| engine("wake-ups", e))
    }

    /// Hands `payload` (an encoded ephemeral item, such as a typing notice) to the
    /// delivery stream of each of `devices`, wherever it is: on its wake-up subject,
    /// best effort (nothing is stored; a device not connected gets nothing).
    pub async fn tell(&self, devices: &[DeviceRef], payload: Bytes) {
        for &device in devices {
            if let Err(e) = self
                .client
                .publish(wake_subject(device), payload.clone())
                .await
            {
                tracing::debug!(error = %e, "an ephemeral item not sent");
            }
        }
        if let Err(e) = self.client.flush().await {
            tracing::debug!(error = %e, "ephemeral items not flushed");
        }
    }

    /// Wakes each device's delivery stream for the item stored for it at seq.
    async fn wake(&self, devices: impl IntoIterator<Item = (DeviceRef, u64)>) {
        for (device, seq) in devices {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(WAKE_SEQ, seq.to_string().as_str());
            // Best effort: the stream is the truth, a lost wake-up only delays.
            if let Err(e) = self
                .client
                .publish_with_headers(wake_subject(device), headers, Bytes::new())
                .await
            {
                tracing::debug!(error = %e, "wake-up not sent");
            }
        }
        if let Err(e) = self.client.flush().await {
            tracing::debug!(error = %e, "wake-ups not flushed");
        }
    }

    /// The message at `seq`, if the stream still holds it.
    async fn at(&self, seq: u64) -> Result<Option<StreamMessage>, StoreError> {
        found(self.stream.get_raw_message(seq).await)
    }

    /// The first message of `device`'s queue at or after `seq`: from the stream
    /// leader, or (`direct`) from whichever replica answers first, usually the
    /// member this node is connected to (a direct get: no hop to the leader, no
    /// JSON). A replica may not have applied the newest items yet; it never skips
    /// one (it applies them in order), so what it answers is the next item.
    async fn next_from(
        &self,
        device: DeviceRef,
        seq: u64,
        direct: bool,
    ) -> Result<Option<StreamMessage>, StoreError> {
        if direct {
            return match self
                .stream
                .direct_get_next_for_subject(filter(device), Some(seq))
                .await
            {
                Ok(m) => Ok(Some(m)),
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
                Err(e) => Err(engine(STREAM, e)),
            };
        }
        found(
            self.stream
                .raw_message_builder()
                .sequence(seq)
                .next_by_subject(filter(device))
                .send()
                .await,
        )
    }

    /// Publishes `value` on `subject` with JetStream's duplicate id `msg_id`; the
    /// acknowledgement is awaited by the caller (several may be in flight).
    async fn publish(
        &self,
        subject: &str,
        msg_id: &str,
        value: &Bytes,
    ) -> Result<js::context::PublishAckFuture, StoreError> {
        let publish = PublishMessage::build()
            .message_id(msg_id)
            .payload(value.clone());
        self.jetstream
            .send_publish(subject.to_owned(), publish)
            .await
            .map_err(|e| engine(STREAM, e))
    }

    /// Waits for `ack`, the acknowledgement of publishing `value` on `subject` as
    /// `msg_id`. A publish no stream answered stored nothing (the stream is new to
    /// this member, or its leader is being elected), and one refused because the
    /// same id is being stored by another node at this moment will be a duplicate:
    /// either is published again, with the same duplicate id, until answered (for up
    /// to about ten seconds).
    async fn acked(
        &self,
        ack: js::context::PublishAckFuture,
        subject: &str,
        msg_id: &str,
        value: &Bytes,
    ) -> Result<js::publish::PublishAck, js::context::PublishError> {
        let again = |e: &js::context::PublishError| super::unanswered(e) || super::in_process(e);
        match ack.await {
            Err(e) if again(&e) => {
                super::sent_again(again, || async {
                    let publish = PublishMessage::build()
                        .message_id(msg_id)
                        .payload(value.clone());
                    self.jetstream
                        .send_publish(subject.to_owned(), publish)
                        .await?
                        .await
                })
                .await
            }
            outcome => outcome,
        }
    }

    /// Deletes `seq` (already gone is fine). Marked deleted, not erased: async-nats's
    /// `delete_message` asks the server to overwrite the message's bytes, which cost
    /// 34–168 deletes/s on a 3-member cluster on loopback against about 4,600/s
    /// without (`no_erase`). The bytes (ciphertext and its sender) stay in the
    /// member's block file until the block is compacted or removed, as sled keeps
    /// them in its log until a segment is reused.
    async fn delete(&self, seq: u64) -> Result<(), StoreError> {
        let request = serde_json::json!({ "seq": seq, "no_erase": true });
        let answer: Result<js::response::Response<stream::DeleteStatus>, _> = self
            .jetstream
            .request(format!("STREAM.MSG.DELETE.{STREAM}"), &request)
            .await;
        match answer {
            Ok(js::response::Response::Ok(_)) => Ok(()),
            // 10043, "sequence N not found": deleted already (by the same ack through
            // another node at once) or aged out.
            Ok(js::response::Response::Err { error })
                if error.error_code() == js::ErrorCode(10043) =>
            {
                Ok(())
            }
            Ok(js::response::Response::Err { error }) => Err(engine(STREAM, error)),
            Err(e) => Err(engine(STREAM, e)),
        }
    }
}

/// What publishing one send's items found ([`JetStreamQueues::fan_out`]).
struct FannedOut {
    /// The devices whose item was stored now, and its seq.
    queued: Vec<(DeviceRef, u64)>,
    /// The seq of an item stored before (a repeated send), if any.
    duplicate_at: Option<u64>,
    /// A device whose queue refused its item (full), if any.
    full: Option<DeviceRef>,
}

impl JetStreamQueues {
    /// Publishes `items` (a queue value per recipient device) of `sender`'s send
    /// `id`, every one before any acknowledgement is awaited (one round trip for the
    /// send, not one per device), and wakes the devices that got theirs. Each item's
    /// `Nats-Msg-Id` is `SENDER_ACCOUNT.SENDER_DEVICE.ID.ACCOUNT.DEVICE`. An error:
    /// some item may not be stored, and the sender, not told `Queued`, sends again
    /// (the ones that landed are deduplicated).
    async fn fan_out(
        &self,
        sender: DeviceRef,
        id: [u8; 16],
        items: Vec<(DeviceRef, Bytes)>,
    ) -> Result<FannedOut, StoreError> {
        let mut pending = Vec::with_capacity(items.len());
        for (device, value) in items {
            let msg_id = format!(
                "{}.{}.{}.{}.{}",
                sender.account_id,
                sender.device_id,
                hex::encode(id),
                device.account_id,
                device.device_id
            );
            let subject = messages_subject(device);
            let ack = self.publish(&subject, &msg_id, &value).await?;
            pending.push((device, ack, subject, msg_id, value));
        }
        let mut out = FannedOut {
            queued: Vec::new(),
            duplicate_at: None,
            full: None,
        };
        let mut failed = None;
        for (device, ack, subject, msg_id, value) in pending {
            match self.acked(ack, &subject, &msg_id, &value).await {
                Ok(ack) if ack.duplicate => {
                    out.duplicate_at.get_or_insert(ack.sequence);
                }
                Ok(ack) => out.queued.push((device, ack.sequence)),
                Err(e) if subject_full(&e) => {
                    out.full.get_or_insert(device);
                }
                Err(e) => {
                    failed.get_or_insert(engine(STREAM, e));
                }
            }
        }
        self.wake(out.queued.iter().copied()).await;
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

/// What a delivery stream pushed and its device has not acknowledged yet: for each
/// seq, the sender and message id of a message or group message (`None` for any
/// other item). An ack of a seq found here is applied without reading the item
/// again. A delivery stream reads its queue from the start, in order, so every item
/// below the lowest seq here (or below the last one pushed, when none is left) was
/// pushed and acknowledged: [`Pushed::floor`].
#[derive(Debug, Default)]
pub struct Pushed {
    items: std::collections::BTreeMap<u64, Option<Taken>>,
    /// The highest seq pushed.
    through: u64,
    /// Some unacknowledged items were forgotten ([`Pushed::MAX`]): no floor is known.
    forgot: bool,
}

/// What [`JetStreamQueues::ack_pushed`] did.
#[derive(Debug, Default)]
pub struct Acked {
    /// The senders that got a delivery receipt (or a group message count) queued.
    pub receipts: Vec<DeviceRef>,
    /// The device's own items acknowledged, which are yet to be removed
    /// ([`JetStreamQueues::remove`]).
    pub taken: Vec<u64>,
}

/// A message's sender and id: what its delivery receipt needs.
type Sent = (DeviceRef, [u8; 16]);

/// What the ack of a queue item must do besides deleting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// Queue a delivery receipt for the sender.
    Message(Sent),
    /// Count this device as having the sender's group message (and release its
    /// body with the last device).
    Group(Sent),
}

/// What acknowledging `item` takes, if more than its deletion.
fn taken(item: &QueueItem) -> Option<Taken> {
    let sender = |account_id, device_id| DeviceRef {
        account_id,
        device_id,
    };
    match item {
        QueueItem::Message {
            from_account,
            from_device,
            id,
            ..
        } => Some(Taken::Message((sender(*from_account, *from_device), *id))),
        QueueItem::GroupMessage {
            from_account,
            from_device,
            id,
            ..
        } => Some(Taken::Group((sender(*from_account, *from_device), *id))),
        _ => None,
    }
}

impl Pushed {
    /// At most this many remembered; past it the oldest are forgotten (an ack of one
    /// reads it again), and the stream's removals are a delete per item from then on
    /// (no floor is known).
    const MAX: usize = 16 * 1024;

    /// Remembers the pushed `item` at `seq` (pushed in increasing order of seq).
    pub fn insert(&mut self, seq: u64, item: &QueueItem) {
        self.items.insert(seq, taken(item));
        self.through = self.through.max(seq);
        while self.items.len() > Self::MAX {
            self.items.pop_first();
            self.forgot = true;
        }
    }

    /// What is remembered of `seqs` (being acknowledged).
    pub fn known(&self, seqs: &[u64]) -> Pushed {
        let items = seqs
            .iter()
            .filter_map(|seq| Some((*seq, *self.items.get(seq)?)))
            .collect();
        Pushed {
            items,
            ..Pushed::default()
        }
    }

    /// Forgets `seqs`, acknowledged now (their receipts are queued).
    pub fn acknowledged(&mut self, seqs: &[u64]) {
        for seq in seqs {
            self.items.remove(seq);
        }
    }

    /// The seq below which every item of the device's queue was pushed and
    /// acknowledged on this stream (or is gone): the stream read the queue from its
    /// first item, in order, and later items only ever get higher seqs. `None` when
    /// some unacknowledged items were forgotten.
    pub fn floor(&self) -> Option<u64> {
        if self.forgot {
            return None;
        }
        Some(
            self.items
                .first_key_value()
                .map_or(self.through.saturating_add(1), |(seq, _)| *seq),
        )
    }
}

impl JetStreamQueues {
    /// [`QueueStore::ack`] but for the removal, for a delivery stream that remembers
    /// what it `pushed`: those items are not read again. The others are read
    /// (concurrently), and only this device's own are taken. Every receipt is
    /// acknowledged by JetStream before this returns the items to remove
    /// ([`JetStreamQueues::remove`], called by the caller when it likes), so a crash
    /// between the two repeats a receipt and never loses one.
    pub async fn ack_pushed(
        &self,
        device: DeviceRef,
        device_number: String,
        seqs: Vec<u64>,
        pushed: &Pushed,
        now_ms: u64,
    ) -> Result<Acked, StoreError> {
        // A seq named twice in one ack is one item (one receipt, counted once).
        let mut seqs = seqs;
        seqs.sort_unstable();
        seqs.dedup();
        let (known, unknown): (Vec<u64>, Vec<u64>) = seqs
            .into_iter()
            .partition(|seq| pushed.items.contains_key(seq));
        let mut mine: Vec<(u64, Option<Taken>)> = known
            .into_iter()
            .map(|seq| (seq, pushed.items.get(&seq).copied().flatten()))
            .collect();
        let read = futures_util::future::join_all(unknown.iter().map(|&seq| self.at(seq))).await;
        for (seq, m) in unknown.into_iter().zip(read) {
            // Only this device's own items: a seq is a stream sequence, shared by all.
            let Some(m) = m? else {
                continue;
            };
            if !holds(device, &m.subject) {
                continue;
            }
            mine.push((seq, taken(&records::decode_queued(&m.payload)?.1)));
        }
        let mut receipts = Vec::new();
        let mut groups = Vec::new();
        for &(seq, taken) in &mine {
            let (sender, id) = match taken {
                Some(Taken::Message(sent)) => sent,
                Some(Taken::Group(sent)) => {
                    groups.push((seq, sent));
                    continue;
                }
                None => continue,
            };
            let receipt = QueueItem::Delivered {
                to_number: device_number.clone(),
                device_id: device.device_id,
                id,
            };
            let value = Bytes::from(records::encode_queued(now_ms, &receipt)?);
            let msg_id = format!("r.{STREAM}.{seq}");
            let subject = receipts_subject(sender);
            let ack = self.publish(&subject, &msg_id, &value).await?;
            receipts.push((sender, ack, subject, msg_id, value));
        }
        // Receipts acknowledged by JetStream before any item goes.
        let mut delivered = Vec::with_capacity(receipts.len());
        for (sender, ack, subject, msg_id, value) in receipts {
            match self.acked(ack, &subject, &msg_id, &value).await {
                Ok(ack) => delivered.push((sender, ack.sequence)),
                Err(e) if subject_full(&e) => {
                    tracing::warn!(
                        account = sender.account_id,
                        device = sender.device_id,
                        "delivery receipt dropped: the sender's receipts are at the queue limit"
                    );
                }
                Err(e) => return Err(engine(STREAM, e)),
            }
        }
        // Group messages counted before they go too (a repeated ack counts once).
        for (seq, (sender, id)) in groups {
            if let Some(count_seq) = self.count_group(device, seq, sender, id, now_ms).await? {
                delivered.push((sender, count_seq));
            }
        }
        // Counted as the single node counts: one-to-one messages.
        let messages = mine
            .iter()
            .filter(|(_, taken)| matches!(taken, Some(Taken::Message(_))))
            .count();
        self.delivered.fetch_add(
            u64::try_from(messages).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.wake(delivered.iter().copied()).await;
        Ok(Acked {
            receipts: delivered.into_iter().map(|(sender, _)| sender).collect(),
            taken: mine.into_iter().map(|(seq, _)| seq).collect(),
        })
    }

    /// Removes `device`'s acknowledged items `seqs`. Those below `floor` (below which
    /// every item of the queue is acknowledged: [`Pushed::floor`]) go in one purge of
    /// the device's subjects when there are several, the others by a delete each.
    pub async fn remove(
        &self,
        device: DeviceRef,
        seqs: &[u64],
        floor: Option<u64>,
    ) -> Result<(), StoreError> {
        let (below, mut each): (Vec<u64>, Vec<u64>) = seqs
            .iter()
            .partition(|&&seq| floor.is_some_and(|floor| seq < floor));
        // No further than the items named: everything up to the floor is
        // acknowledged, but nothing beyond them needs the purge.
        let purge = match (floor, below.iter().max()) {
            (Some(floor), Some(&last)) if below.len() > 1 => Some(floor.min(last + 1)),
            _ => {
                each.extend(below);
                None
            }
        };
        let purged = async {
            let Some(floor) = purge else {
                return Ok(());
            };
            self.stream
                .purge()
                .filter(filter(device))
                .sequence(floor)
                .await
                .map(drop)
                .map_err(|e| engine(STREAM, e))
        };
        let deleted = futures_util::future::join_all(each.iter().map(|&seq| self.delete(seq)));
        let (purged, deleted) = futures_util::join!(purged, deleted);
        purged?;
        deleted.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }

    /// [`QueueStore::page`], read no further than the first item at or past `until`
    /// (the seq the latest wake-up named) when one is given: the items stored later
    /// each wake the device again. `None` reads to the end of the queue (the backlog,
    /// a wake-up that named no seq, the periodic look without one).
    pub async fn page_until(
        &self,
        device: DeviceRef,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
        until: Option<u64>,
    ) -> Result<(Vec<Queued>, bool), StoreError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut next = after.map_or(1, |seq| seq.saturating_add(1));
        let now = crate::store::wall_ms();
        // Reads up to a woken seq ask a replica; one that has nothing yet where the
        // item woken for should be is caught up by asking the leader.
        let mut direct = until.is_some();
        loop {
            if out.len() >= max {
                return Ok((out, true));
            }
            let m = match self.next_from(device, next, direct).await {
                Ok(None) if direct && until.is_some_and(|until| next <= until) => {
                    direct = false;
                    self.next_from(device, next, false).await?
                }
                // No replica answered (or refused the direct get): the leader does.
                Err(e) if direct => {
                    tracing::debug!(error = %e, "a direct get failed; asking the leader");
                    direct = false;
                    self.next_from(device, next, false).await?
                }
                m => m?,
            };
            let Some(m) = m else {
                return Ok((out, false));
            };
            next = m.sequence.saturating_add(1);
            // The item a wake-up named, or one past it: what lies beyond has a
            // wake-up of its own coming.
            let last = until.is_some_and(|until| m.sequence >= until);
            if !holds(device, &m.subject) {
                return Err(StoreError::Corrupt(format!(
                    "{STREAM}: {} answered for {}",
                    m.subject,
                    filter(device)
                )));
            }
            if records::expires_at(&m.payload).is_some_and(|until| until <= now) {
                self.delete(m.sequence).await?;
                if last {
                    return Ok((out, false));
                }
                continue;
            }
            let (queued_at_ms, item) = records::decode_queued(&m.payload)?;
            let group_body = match &item {
                QueueItem::GroupMessage { body_ref, .. } => match self.group_body(*body_ref).await?
                {
                    Some(body) => Some(body),
                    // Its body aged out (it is stored a moment before its items):
                    // the item has too.
                    None => {
                        self.delete(m.sequence).await?;
                        if last {
                            return Ok((out, false));
                        }
                        continue;
                    }
                },
                _ => None,
            };
            let size = m.payload.len() + group_body.as_ref().map_or(0, Vec::len);
            if bytes.saturating_add(size) > max_bytes && !out.is_empty() {
                return Ok((out, true));
            }
            bytes = bytes.saturating_add(size);
            out.push(Queued {
                seq: m.sequence,
                queued_at_ms,
                item,
                group_body,
            });
            if last {
                return Ok((out, false));
            }
        }
    }
}

impl QueueStore for JetStreamQueues {
    async fn append(&self, m: Outgoing) -> Result<AppendOutcome, StoreError> {
        let mut items = Vec::with_capacity(m.envelopes.len());
        for (device, body) in m.envelopes {
            let item = QueueItem::Message {
                from_account: m.sender.account_id,
                from_device: m.sender.device_id,
                from_number: m.sender_number.clone(),
                id: m.id,
                body,
            };
            let value = records::encode_queued_until(m.now_ms, m.expires_at_ms, &item)?;
            items.push((device, Bytes::from(value)));
        }
        let fanned = self.fan_out(m.sender, m.id, items).await?;
        if let Some(device) = fanned.full {
            return Ok(AppendOutcome::QueueFull {
                device_id: device.device_id,
            });
        }
        if fanned.queued.is_empty()
            && let Some(seq) = fanned.duplicate_at
        {
            // Every envelope was already stored: answer with when it was accepted
            // (now, if it has been read and acknowledged since).
            let accepted_at_ms = match self.at(seq).await? {
                Some(stored) => records::queued_at(&stored.payload).unwrap_or(m.now_ms),
                None => m.now_ms,
            };
            return Ok(AppendOutcome::Duplicate { accepted_at_ms });
        }
        Ok(AppendOutcome::Queued {
            accepted_at_ms: m.now_ms,
        })
    }

    async fn append_group(&self, m: GroupSend) -> Result<GroupAppend, StoreError> {
        self.append_group_items(m).await
    }

    async fn page(
        &self,
        device: DeviceRef,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Queued>, bool), StoreError> {
        self.page_until(device, after, max, max_bytes, None).await
    }

    async fn ack(
        &self,
        device: DeviceRef,
        device_number: String,
        seqs: Vec<u64>,
        now_ms: u64,
    ) -> Result<Vec<DeviceRef>, StoreError> {
        let acked = self
            .ack_pushed(device, device_number, seqs, &Pushed::default(), now_ms)
            .await?;
        self.remove(device, &acked.taken, None).await?;
        Ok(acked.receipts)
    }

    async fn queue_len(&self, device: DeviceRef) -> Result<u64, StoreError> {
        let mut subjects = self
            .stream
            .info_with_subjects(filter(device))
            .await
            .map_err(|e| engine(STREAM, e))?;
        let mut total = 0u64;
        while let Some((_, count)) = subjects.try_next().await.map_err(|e| engine(STREAM, e))? {
            total = total.saturating_add(count as u64);
        }
        Ok(total)
    }

    async fn drop_queue(&self, device: DeviceRef) -> Result<u64, StoreError> {
        let purged = self
            .stream
            .purge()
            .filter(filter(device))
            .await
            .map_err(|e| engine(STREAM, e))?;
        Ok(purged.purged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt() -> QueueItem {
        QueueItem::Delivered {
            to_number: "+14155550101".into(),
            device_id: 1,
            id: [3; 16],
        }
    }

    #[test]
    fn the_floor_stops_at_the_lowest_item_not_acknowledged() {
        let mut pushed = Pushed::default();
        assert_eq!(pushed.floor(), Some(1), "nothing pushed: nothing below");
        for seq in [3, 7, 9] {
            pushed.insert(seq, &receipt());
        }
        assert_eq!(pushed.floor(), Some(3));
        pushed.acknowledged(&[7, 9]);
        assert_eq!(pushed.floor(), Some(3), "3 is not acknowledged");
        pushed.acknowledged(&[3]);
        assert_eq!(pushed.floor(), Some(10), "all pushed are acknowledged");
        pushed.insert(12, &receipt());
        assert_eq!(pushed.floor(), Some(12));
        assert_eq!(
            pushed.known(&[12, 13]).items.len(),
            1,
            "only what was pushed"
        );
    }

    #[test]
    fn a_forgotten_item_leaves_no_floor() {
        let mut pushed = Pushed::default();
        for seq in 1..=(Pushed::MAX as u64 + 1) {
            pushed.insert(seq, &receipt());
        }
        assert_eq!(
            pushed.floor(),
            None,
            "item 1 was forgotten, not acknowledged"
        );
    }
}
