//! Group messages on the queue stream: the body stored once, an item per recipient
//! device, and one count of delivery for the sender.
//!
//! - **Body.** Published once on `sbq.g.SENDER_ACCOUNT.SENDER_DEVICE.ID`
//!   (`Nats-Msg-Id` `b.SENDER_ACCOUNT.SENDER_DEVICE.ID`); each device's
//!   [`QueueItem::GroupMessage`] names its stream seq as `body_ref`. The body ages
//!   out with the stream's `max_age` at the latest (it is stored a moment before its
//!   items, so an item whose body is gone has aged out too), and goes as soon as the
//!   last device acknowledged it.
//! - **Count.** A row in the `sb_group_receipts` bucket (expiring with the message
//!   TTL), keyed `SENDER_ACCOUNT.SENDER_DEVICE.ID`, lists the devices the message
//!   went to (a repeated send adds those it did not go to before) and those that
//!   acknowledged it, so an ack repeated after a crash counts once. Each
//!   count is a [`QueueItem::GroupDelivered`] on the sender's receipt subject; the one
//!   it supersedes is deleted, so the sender's queue holds about one per message
//!   however many devices take it (a crash in between leaves one more, and the client
//!   keeps the highest count).
//! - **Quota.** Each item is refused by a full device queue on the cluster itself
//!   ("discard new per subject"): unlike the single node, which refuses the whole
//!   send, the items of other devices may have landed; the sender is told
//!   `QueueFull` and sends again with the same id, and those are deduplicated.

use bincode::{Decode, Encode};
use bytes::Bytes;

use super::{JetStreamQueues, STREAM, engine, receipts_subject, subject_full};
use crate::store::queue_store::GroupSend;
use crate::store::records::{self, QueueItem};
use crate::store::{DeviceRef, GroupAppend, StoreError};

/// The bucket of delivery counts.
pub const BUCKET: &str = "sb_group_receipts";

/// Who has a group message, and where its body and latest count are.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
struct ReceiptRow {
    group_id: u64,
    /// The devices it went to, as (account, device): those of every send of it (a
    /// send repeated after a member linked a device goes to one more).
    recipients: Vec<(u64, u32)>,
    /// The devices that acknowledged it.
    acked: Vec<(u64, u32)>,
    /// The stream seq of its body.
    body_seq: u64,
    /// The sender's item with the highest count so far (0: none yet), and that count.
    receipt_seq: u64,
    receipt_count: u32,
}

fn body_subject(sender: DeviceRef, id: &[u8; 16]) -> String {
    format!(
        "sbq.g.{}.{}.{}",
        sender.account_id,
        sender.device_id,
        hex::encode(id)
    )
}

fn row_key(sender: DeviceRef, id: &[u8; 16]) -> String {
    format!(
        "{}.{}.{}",
        sender.account_id,
        sender.device_id,
        hex::encode(id)
    )
}

impl JetStreamQueues {
    /// [`QueueStore::append_group`](crate::store::queue_store::QueueStore): returns
    /// once JetStream acknowledged the body and every item (on a quorum), or says
    /// which device's queue is full.
    pub(super) async fn append_group_items(&self, m: GroupSend) -> Result<GroupAppend, StoreError> {
        if m.recipients.is_empty() {
            return Ok(GroupAppend::Queued {
                accepted_at_ms: m.now_ms,
            });
        }
        let body_seq = self.store_body(m.sender, &m.id, m.body).await?;
        let devices: Vec<(u64, u32)> = m
            .recipients
            .iter()
            .map(|d| (d.account_id, d.device_id))
            .collect();
        // A send repeated (its answer lost) finds its row and adds the devices it did
        // not go to before, so the body stays until every one has it.
        self.receipts
            .modify(
                &row_key(m.sender, &m.id),
                |slot: &mut Option<ReceiptRow>| {
                    let Some(row) = slot.as_mut() else {
                        *slot = Some(ReceiptRow {
                            group_id: m.group_id,
                            recipients: devices.clone(),
                            acked: Vec::new(),
                            body_seq,
                            receipt_seq: 0,
                            receipt_count: 0,
                        });
                        return ((), true);
                    };
                    let before = row.recipients.len();
                    for d in &devices {
                        if !row.recipients.contains(d) {
                            row.recipients.push(*d);
                        }
                    }
                    ((), row.recipients.len() != before)
                },
            )
            .await?;
        let item = QueueItem::GroupMessage {
            from_account: m.sender.account_id,
            from_device: m.sender.device_id,
            from_number: m.sender_number,
            group_id: m.group_id,
            id: m.id,
            body_ref: body_seq,
        };
        let value = Bytes::from(records::encode_queued_until(
            m.now_ms,
            m.expires_at_ms,
            &item,
        )?);
        let items = m.recipients.iter().map(|&d| (d, value.clone())).collect();
        let fanned = self.fan_out(m.sender, m.id, items).await?;
        Ok(match fanned.full {
            Some(device) => GroupAppend::QueueFull { device },
            None => GroupAppend::Queued {
                accepted_at_ms: m.now_ms,
            },
        })
    }

    /// Stores the body of `sender`'s group message `id`; its seq. Stored before (a
    /// repeated send): the seq of that copy.
    async fn store_body(
        &self,
        sender: DeviceRef,
        id: &[u8; 16],
        body: Vec<u8>,
    ) -> Result<u64, StoreError> {
        let subject = body_subject(sender, id);
        let msg_id = format!("b.{}", row_key(sender, id));
        let value = Bytes::from(body);
        let ack = self.publish(&subject, &msg_id, &value).await?;
        match self.acked(ack, &subject, &msg_id, &value).await {
            Ok(ack) => Ok(ack.sequence),
            // The subject at the queue limit (a send repeated that often, past the
            // duplicate window): the copy there is the body.
            Err(e) if subject_full(&e) => self
                .stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .map(|m| m.sequence)
                .map_err(|e| engine(STREAM, e)),
            Err(e) => Err(engine(STREAM, e)),
        }
    }

    /// The group message body at `seq`, if the stream still holds it.
    pub(super) async fn group_body(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .at(seq)
            .await?
            .filter(|m| m.subject.starts_with("sbq.g."))
            .map(|m| m.payload.to_vec()))
    }

    /// `device` acknowledged the item `acked_seq`, `sender`'s group message `id`:
    /// counts it (once per device), queues the new count for the sender in place of
    /// the one before, and with the last device drops the body and the row. The seq
    /// of the sender's new count (to be woken); `None` when nothing was counted any
    /// more (every device had it, or it aged out).
    pub(super) async fn count_group(
        &self,
        device: DeviceRef,
        acked_seq: u64,
        sender: DeviceRef,
        id: [u8; 16],
        now_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let key = row_key(sender, &id);
        let me = (device.account_id, device.device_id);
        let counted = self
            .receipts
            .modify(&key, |slot: &mut Option<ReceiptRow>| {
                let Some(row) = slot.as_mut() else {
                    return (None, false);
                };
                let fresh = !row.acked.contains(&me);
                if fresh {
                    row.acked.push(me);
                }
                // It had an item, so it is one the message went to.
                if !row.recipients.contains(&me) {
                    row.recipients.push(me);
                }
                let of = u32::try_from(row.recipients.len()).unwrap_or(u32::MAX);
                let delivered = u32::try_from(row.acked.len()).unwrap_or(u32::MAX).min(of);
                (Some((row.group_id, delivered, of, row.body_seq)), fresh)
            })
            .await?;
        let Some((group_id, delivered, of, body_seq)) = counted else {
            return Ok(None);
        };
        let item = QueueItem::GroupDelivered {
            group_id,
            id,
            delivered,
            of,
        };
        let value = Bytes::from(records::encode_queued(now_ms, &item)?);
        let subject = receipts_subject(sender);
        let msg_id = format!("g.{STREAM}.{acked_seq}");
        let ack = self.publish(&subject, &msg_id, &value).await?;
        let published = match self.acked(ack, &subject, &msg_id, &value).await {
            // A repeat of an ack that published this count already: that one stands.
            Ok(ack) if ack.duplicate => None,
            Ok(ack) => Some(ack.sequence),
            Err(e) if subject_full(&e) => {
                tracing::warn!(
                    account = sender.account_id,
                    device = sender.device_id,
                    "group delivery count dropped: the sender's receipts are at the queue limit"
                );
                None
            }
            Err(e) => return Err(engine(STREAM, e)),
        };
        if let Some(seq) = published {
            // The highest count stays; the other of the two goes.
            let stale = self
                .receipts
                .modify(&key, |slot: &mut Option<ReceiptRow>| match slot.as_mut() {
                    Some(row) if delivered > row.receipt_count => {
                        let old = std::mem::replace(&mut row.receipt_seq, seq);
                        row.receipt_count = delivered;
                        (old, true)
                    }
                    // Superseded already, or the last device's count is queued and
                    // the row gone.
                    _ => (seq, false),
                })
                .await?;
            if stale != 0 {
                self.delete(stale).await?;
            }
        }
        if delivered >= of {
            self.delete(body_seq).await?;
            self.receipts.purge(&key).await?;
        }
        Ok(published)
    }
}

/// The devices, none real, that stand in an imported group message's count for
/// those that acknowledged it on the single node (which counts, not names, them).
fn stand_in(n: u32) -> (u64, u32) {
    (u64::MAX, n)
}

impl JetStreamQueues {
    /// Queues a group message moved from a single node (`switchboard admin
    /// export-to-cluster`) for `m.recipients`, the devices whose queues still held
    /// it, with `delivered` devices counted as having it already.
    pub async fn import_group(
        &self,
        m: GroupSend,
        delivered: u32,
    ) -> Result<GroupAppend, StoreError> {
        let key = row_key(m.sender, &m.id);
        let outcome = self.append_group_items(m).await?;
        if delivered > 0 {
            self.receipts
                .modify(&key, |slot: &mut Option<ReceiptRow>| {
                    let Some(row) = slot.as_mut() else {
                        return ((), false);
                    };
                    let mut changed = false;
                    for d in (0..delivered).map(stand_in) {
                        if !row.acked.contains(&d) {
                            row.acked.push(d);
                            row.recipients.push(d);
                            changed = true;
                        }
                    }
                    ((), changed)
                })
                .await?;
        }
        Ok(outcome)
    }

    /// Queues a receipt moved from a single node (`QueueItem::Delivered` or
    /// `GroupDelivered`, encoded as `value`) for `sender`, the device it reports
    /// to; `name` tells it from every other for deduplication. A group count
    /// becomes the message's latest. False when the sender's receipts are at the
    /// queue limit (dropped, as the node drops such a receipt).
    pub async fn import_receipt(
        &self,
        sender: DeviceRef,
        item: &QueueItem,
        value: Vec<u8>,
        name: &str,
    ) -> Result<bool, StoreError> {
        let subject = receipts_subject(sender);
        let msg_id = format!("x.{name}");
        let value = Bytes::from(value);
        let ack = self.publish(&subject, &msg_id, &value).await?;
        let seq = match self.acked(ack, &subject, &msg_id, &value).await {
            Ok(ack) => ack.sequence,
            Err(e) if subject_full(&e) => return Ok(false),
            Err(e) => return Err(engine(STREAM, e)),
        };
        if let QueueItem::GroupDelivered { id, delivered, .. } = *item {
            let stale = self
                .receipts
                .modify(
                    &row_key(sender, &id),
                    |slot: &mut Option<ReceiptRow>| match slot.as_mut() {
                        // A later count, or the same one stored later; a receipt
                        // published again (answered with its first seq) changes nothing.
                        Some(row) if delivered >= row.receipt_count && seq > row.receipt_seq => {
                            let old = std::mem::replace(&mut row.receipt_seq, seq);
                            row.receipt_count = delivered;
                            (old, true)
                        }
                        _ => (0, false),
                    },
                )
                .await?;
            if stale != 0 {
                self.delete(stale).await?;
            }
        }
        Ok(true)
    }
}
