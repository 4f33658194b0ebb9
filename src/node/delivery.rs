//! The delivery stream: a device's queue, pushed to it as it fills.
//!
//! After `Subscribe` the node answers `Subscribed`, then a pusher writes `Push` frames
//! (pages of up to `delivery_batch` items after a cursor, from memory for items the
//! hand-off holds, else from sled) while an acker reads the client's `Ack` frames and
//! removes those items. The two run apart, so a
//! push blocked on QUIC flow control never stops acknowledgements (which would
//! deadlock a client waiting to write its acks). Items leave the queue only when
//! acknowledged; a device that reconnects gets everything unacknowledged again, so
//! delivery is at least once and clients drop duplicates by message id.
//!
//! When the client finishes its half of the stream, the acker applies the acks it
//! read, waits for them to be durable, and the pusher finishes the node's half: a
//! client that reads to the end knows its acknowledgements are kept.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::clock::now_ms;
use super::engine;
use super::session::{self, Session};
use super::worker::{self, blocking, read};
use crate::cluster::queues::Pushed;
use crate::proto::{
    Ack, Delivery, EPHEMERAL_SEQ, FrameError, Incoming, Item, MAX_ACKS_PER_FRAME, Push, Receipt,
    Reply, Response, codes, frame,
};
use crate::store::records::QueueItem;
use crate::store::{DeviceIdentity, Queued};

/// The stored bytes one push may carry. Half the largest frame a client accepts: an
/// envelope is at most half a frame too (config enforces it), and a page always
/// holds at least one item, so every push fits in a frame with room for its framing.
const MAX_PAGE_BYTES: usize = crate::proto::HARD_MAX_FRAME_BYTES / 2;

/// How the client's half of the stream ended.
enum AckEnd {
    /// Finished cleanly; every ack it sent is applied and durable.
    Finished,
    /// It sent something that is not an ack.
    Broken,
}

/// Serves a delivery stream until the client finishes it, it breaks, or the node stops.
pub async fn serve(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    shared: Arc<Shared>,
    session: Arc<Session>,
    stop: CancellationToken,
) {
    let me = match session::authenticated(&shared, &session).await {
        Ok(me) => me,
        Err(e) => {
            let _ = frame::write(&mut send, &Reply::Err(e)).await;
            let _ = send.finish();
            return;
        }
    };
    let device = me.device;
    let mailbox = shared.mailboxes.open(device);
    // Joined before `Subscribed` goes out: a typing notice sent once the client
    // has it reaches this stream.
    let stream = mailbox.join();
    // In cluster mode a send through another node wakes this stream through a core
    // NATS subject, subscribed before the first page is read.
    let wake_ups = match &shared.cluster {
        Some(c) => match c.queues.wake_ups(device).await {
            Ok(subscriber) => {
                // The server has the subscription once it answers a ping.
                let _ = c.cluster.client.flush().await;
                Some(subscriber)
            }
            Err(e) => {
                let _ = frame::write(&mut send, &Reply::Err(worker::internal(e))).await;
                let _ = send.finish();
                return;
            }
        },
        None => None,
    };
    let queued = match engine::queue_len(&shared, device).await {
        Ok(n) => n,
        Err(e) => {
            let _ = frame::write(&mut send, &Reply::Err(e)).await;
            let _ = send.finish();
            return;
        }
    };
    if frame::write(&mut send, &Reply::Ok(Response::Subscribed { queued }))
        .await
        .is_err()
    {
        return;
    }
    tracing::debug!(
        account = device.account_id,
        device = device.device_id,
        queued,
        "subscribed"
    );

    // The acker and the pusher run side by side in this task (a task of the node's
    // tracker, so shutdown waits for both and nothing holds the store afterwards).
    let (done_tx, done) = oneshot::channel();
    // In cluster mode, what was pushed and not yet acknowledged (so an ack needs no
    // second read of its items).
    let pushed = std::sync::Mutex::new(Pushed::default());
    let woken = Woken::default();
    let at = Cursor {
        device,
        pushed: &pushed,
        woken: &woken,
    };
    let removals = Removals::default();
    let acks_over = CancellationToken::new();
    let acker = async {
        read_acks(
            recv,
            shared.clone(),
            me,
            done_tx,
            stop.clone(),
            at,
            &removals,
        )
        .await;
        acks_over.cancel();
    };
    let remover = remove_later(&removals, &shared, at, &acks_over);
    let ended = CancellationToken::new();
    let pusher = async {
        push(send, &shared, &mailbox, &stream, at, done, &stop).await;
        ended.cancel();
    };
    let forward = forward_wake_ups(wake_ups, &shared, device, &mailbox, &woken, &ended);
    tokio::join!(acker, pusher, forward, remover);
}

/// A delivery stream's acknowledged items waiting to be removed, together, a moment
/// after their acks (`cluster.removal_delay_ms`; cluster mode).
#[derive(Default)]
struct Removals {
    seqs: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    added: tokio::sync::Notify,
    /// Held by the flush under way: a flush returns once every seq handed over
    /// before it was removed, including those another flush was removing.
    flushing: tokio::sync::Mutex<()>,
}

impl Removals {
    /// At most this many wait: past it (removals failing all along) they are let go,
    /// and delivered again on the next subscription.
    const MAX: usize = 16 * 1024;

    /// `seqs` without those acknowledged already and waiting here.
    fn not_waiting(&self, mut seqs: Vec<u64>) -> Vec<u64> {
        let waiting = self.seqs.lock().unwrap_or_else(PoisonError::into_inner);
        seqs.retain(|seq| !waiting.contains(seq));
        seqs
    }

    fn add(&self, seqs: Vec<u64>) {
        if seqs.is_empty() {
            return;
        }
        self.seqs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(seqs);
        self.added.notify_one();
    }

    /// Removes what waits: below the stream's floor in one purge. What could not be
    /// removed waits for the next time (soon: the remover is woken again).
    async fn flush(
        &self,
        c: &engine::ClusterEngine,
        at: Cursor<'_>,
    ) -> Result<(), crate::store::StoreError> {
        let _flushing = self.flushing.lock().await;
        let seqs: Vec<u64> =
            std::mem::take(&mut *self.seqs.lock().unwrap_or_else(PoisonError::into_inner))
                .into_iter()
                .collect();
        if seqs.is_empty() {
            return Ok(());
        }
        let floor = at
            .pushed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .floor();
        let removed = c.queues.remove(at.device, &seqs, floor).await;
        if removed.is_err() {
            let mut waiting = self.seqs.lock().unwrap_or_else(PoisonError::into_inner);
            waiting.extend(seqs);
            if waiting.len() > Self::MAX {
                tracing::warn!(
                    items = waiting.len(),
                    "acknowledged items could not be removed; they are delivered again"
                );
                waiting.clear();
            }
            drop(waiting);
            self.added.notify_one();
        }
        removed
    }
}

/// How long a delivery stream waits after a failed removal before it tries again.
const REMOVAL_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Removes acknowledged items `cluster.removal_delay_ms` after the first ack of each
/// batch (after a failure, [`REMOVAL_RETRY`] later), until the acker ends; then what is
/// left, at once (bounded by the shutdown grace: what is not removed by then is
/// delivered again).
async fn remove_later(
    removals: &Removals,
    shared: &Shared,
    at: Cursor<'_>,
    acks_over: &CancellationToken,
) {
    let Some(c) = &shared.cluster else {
        return;
    };
    let delay = shared.config.cluster.removal_delay;
    loop {
        tokio::select! {
            () = acks_over.cancelled() => break,
            () = removals.added.notified() => {}
        }
        tokio::select! {
            () = acks_over.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
        if let Err(e) = removals.flush(c, at).await {
            tracing::warn!(error = %e, "removing acknowledged items failed; tried again");
            tokio::select! {
                () = acks_over.cancelled() => break,
                () = tokio::time::sleep(REMOVAL_RETRY) => {}
            }
        }
    }
    let limits = &shared.config.limits;
    let limit = limits.request_timeout.min(limits.shutdown_grace);
    match tokio::time::timeout(limit, removals.flush(c, at)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(
            error = %e,
            "removing acknowledged items failed; they are delivered again"
        ),
        Err(_) => tracing::warn!("removing acknowledged items timed out; they are delivered again"),
    }
}

/// In cluster mode a wake-up can be missed (published on another member before this
/// subscription reached it, or lost with a member): the queue is looked at this often
/// without one.
const CLUSTER_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// How far a delivery stream's next cluster read goes: to the highest seq a
/// wake-up named, or (`scan`) to the end of the queue.
struct Woken {
    /// A wake-up named no seq, or none came for a while: read to the end.
    scan: AtomicBool,
    /// The highest seq a wake-up named.
    to: AtomicU64,
}

impl Default for Woken {
    fn default() -> Woken {
        Woken {
            scan: AtomicBool::new(true),
            to: AtomicU64::new(0),
        }
    }
}

impl Woken {
    /// The limit of the next read ([`engine::cluster_page`]'s `until`); a full
    /// read is asked for once.
    fn until(&self) -> Option<u64> {
        (!self.scan.swap(false, Ordering::AcqRel)).then(|| self.to.load(Ordering::Acquire))
    }

    fn note(&self, seq: Option<u64>) {
        match seq {
            Some(seq) => {
                self.to.fetch_max(seq, Ordering::AcqRel);
            }
            None => self.scan.store(true, Ordering::Release),
        }
    }
}

/// Turns the cluster's wake-ups for this device (and, without one for a while,
/// the clock) into wake-ups of its mailbox, noting in `woken` how far they reach,
/// and the typing notices among them into its ephemeral items, until `ended`.
async fn forward_wake_ups(
    wake_ups: Option<async_nats::Subscriber>,
    shared: &Shared,
    device: crate::store::DeviceRef,
    mailbox: &super::mailbox::Mailbox,
    woken: &Woken,
    ended: &CancellationToken,
) {
    use futures_util::StreamExt;
    let Some(mut wake_ups) = wake_ups else {
        return;
    };
    loop {
        tokio::select! {
            () = ended.cancelled() => break,
            next = tokio::time::timeout(CLUSTER_RECHECK, wake_ups.next()) => match next {
                Ok(None) => break,
                Ok(Some(m)) if !m.payload.is_empty() => {
                    // From another node: only a typing notice is taken.
                    match frame::decode::<Item>(&m.payload, m.payload.len()) {
                        Ok(Some((item @ Item::Typing(_), _))) => {
                            shared.mailboxes.push_ephemeral(device, item);
                        }
                        _ => tracing::debug!("an ephemeral item from the cluster dropped"),
                    }
                }
                Ok(Some(m)) => {
                    woken.note(crate::cluster::queues::woken_seq(&m));
                    mailbox.changed.notify_waiters();
                }
                Err(_) => {
                    woken.note(None);
                    mailbox.changed.notify_waiters();
                }
            },
        }
    }
    let _ = wake_ups.unsubscribe().await;
}

/// Whose queue a delivery stream pushes, and what it pushed (cluster mode).
#[derive(Clone, Copy)]
struct Cursor<'a> {
    device: crate::store::DeviceRef,
    pushed: &'a std::sync::Mutex<Pushed>,
    woken: &'a Woken,
}

/// Writes pushes until the acker reports the client's half finished, or the node stops.
async fn push(
    mut send: quinn::SendStream,
    shared: &Arc<Shared>,
    mailbox: &super::mailbox::Mailbox,
    stream: &super::mailbox::Stream<'_>,
    at: Cursor<'_>,
    mut done: oneshot::Receiver<AckEnd>,
    stop: &CancellationToken,
) {
    let device = at.device;
    let batch = shared.config.messages.delivery_batch as usize;
    let low = shared.config.messages.one_time_keys_low;
    let mut cursor: Option<u64> = None;
    let mut backlog_sent = false;
    let mut first = true;
    loop {
        let notified = mailbox.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        // What is only for a connected device goes first, in a push of its own,
        // under seq EPHEMERAL_SEQ (never acknowledged, never stored).
        let ephemeral = stream.take_ephemeral();
        if !ephemeral.is_empty() {
            let at = now_ms();
            let push = Push {
                items: ephemeral
                    .into_iter()
                    .map(|item| Delivery {
                        seq: EPHEMERAL_SEQ,
                        queued_at_ms: at,
                        item,
                    })
                    .collect(),
                backlog_end: false,
                one_time_keys_left: None,
            };
            let written = tokio::select! {
                () = stop.cancelled() => return,
                written = frame::write(&mut send, &push) => written,
            };
            if written.is_err() {
                return;
            }
        }
        let keys_changed = std::mem::take(&mut first) | mailbox.take_keys_claimed();
        let mut keys_left = if keys_changed {
            match engine::count_one_time_keys(shared, device, low.max(1)).await {
                Ok(n) if n < low => Some(n),
                Ok(_) => None,
                Err(_) => None,
            }
        } else {
            None
        };
        // How far this round's cluster reads go: what the wake-ups so far named.
        let until = at.woken.until();
        loop {
            let after = cursor;
            // The backlog is read on the reader thread, so a big drain does not queue
            // behind its own acks; live pages go through the writer thread, right
            // behind the append that woke us (two threads trading one page each
            // cost more in wake-ups than they save: p99 grew tenfold in the relay).
            // Items held in memory for the hand-off need neither: when nothing
            // written lies past the cursor, the page comes straight from memory.
            let op = move |store: &crate::store::Store| {
                store.queue_page_within(device, after, batch, MAX_PAGE_BYTES)
            };
            let in_memory = if backlog_sent && shared.cluster.is_none() {
                shared
                    .store
                    .staged_page(device, after, batch, MAX_PAGE_BYTES)
            } else {
                None
            };
            let page = match (&shared.cluster, in_memory) {
                (Some(c), _) => {
                    // The backlog is read to its end (so its end is known).
                    let until = if backlog_sent { until } else { None };
                    engine::cluster_page(c, device, after, batch, MAX_PAGE_BYTES, until).await
                }
                (None, Some(page)) => Ok(page),
                (None, None) if backlog_sent => blocking(shared, op).await,
                (None, None) => read(shared, op).await,
            };
            let (page, full) = match page {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "reading a queue failed; its delivery stream ends");
                    let _ = send.reset(codes::SHUTDOWN.into());
                    return;
                }
            };
            let backlog_end = !backlog_sent && !full;
            if page.is_empty() && !backlog_end && keys_left.is_none() {
                break;
            }
            cursor = page.last().map(|q| q.seq).or(cursor);
            if shared.cluster.is_some() {
                let mut pushed = at.pushed.lock().unwrap_or_else(PoisonError::into_inner);
                for q in &page {
                    pushed.insert(q.seq, &q.item);
                }
            }
            let push = Push {
                items: page.into_iter().map(delivery).collect(),
                backlog_end,
                one_time_keys_left: keys_left.take(),
            };
            let written = tokio::select! {
                () = stop.cancelled() => return,
                written = frame::write(&mut send, &push) => written,
            };
            if written.is_err() {
                return;
            }
            backlog_sent |= backlog_end;
            if !full {
                break;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            end = &mut done => {
                match end {
                    Ok(AckEnd::Finished) => {
                        let _ = send.finish();
                        let limit = shared.config.limits.request_timeout;
                        let _ = tokio::time::timeout(limit, send.stopped()).await;
                    }
                    Ok(AckEnd::Broken) => {
                        let _ = send.reset(codes::MALFORMED.into());
                    }
                    // The acker ended without a word: the stream or connection is gone.
                    Err(_) => {}
                }
                return;
            }
            () = &mut notified => {}
        }
    }
}

/// The wire form of a queued item.
fn delivery(q: Queued) -> Delivery {
    let item = match q.item {
        QueueItem::Message {
            from_device,
            from_number,
            id,
            body,
            ..
        } => Item::Message(Incoming {
            from: from_number,
            from_device,
            id,
            body,
        }),
        QueueItem::Delivered {
            to_number,
            device_id,
            id,
        } => Item::Delivered(Receipt {
            to: to_number,
            device_id,
            id,
        }),
        QueueItem::GroupMessage {
            from_device,
            from_number,
            group_id,
            id,
            ..
        } => Item::GroupMessage(crate::proto::GroupIncoming {
            group_id,
            from: from_number,
            from_device,
            id,
            body: q.group_body.unwrap_or_default(),
        }),
        QueueItem::GroupDelivered {
            group_id,
            id,
            delivered,
            of,
        } => Item::GroupDelivered(crate::proto::GroupReceipt {
            group_id,
            id,
            delivered,
            of,
        }),
    };
    Delivery {
        seq: q.seq,
        queued_at_ms: q.queued_at_ms,
        item,
    }
}

/// Reads `Ack` frames and applies them until the client finishes its half.
async fn read_acks(
    mut recv: quinn::RecvStream,
    shared: Arc<Shared>,
    me: DeviceIdentity,
    done: oneshot::Sender<AckEnd>,
    stop: CancellationToken,
    at: Cursor<'_>,
    removals: &Removals,
) {
    let max = shared.config.limits.max_frame_bytes as usize;
    let end = loop {
        let read = tokio::select! {
            () = stop.cancelled() => return,
            read = frame::read::<Ack, _>(&mut recv, max) => read,
        };
        match read {
            Ok(Some(ack)) if ack.seqs.len() <= MAX_ACKS_PER_FRAME => {
                let (device, number) = (me.device, me.number.clone());
                let now = now_ms();
                // Items still held in memory are acknowledged right here; anything
                // written goes through the store thread.
                let from_memory = match &shared.cluster {
                    Some(_) => Ok(None),
                    None => shared
                        .store
                        .ack_from_memory(device, &number, &ack.seqs, now),
                };
                let applied = match from_memory {
                    Ok(None) if let Some(c) = &shared.cluster => {
                        acknowledge(c, &shared, at, removals, number, ack.seqs, now).await
                    }
                    Ok(Some(receipts)) => Ok(receipts),
                    Ok(None) => {
                        blocking(&shared, move |store| {
                            store.ack(device, &number, &ack.seqs, now)
                        })
                        .await
                    }
                    Err(e) => Err(worker::internal(e)),
                };
                match applied {
                    Ok(receipts) => {
                        // (`messages_delivered_total` is counted by the store.)
                        for sender in receipts {
                            shared.mailboxes.wake(sender);
                        }
                    }
                    Err(_) => break AckEnd::Broken,
                }
            }
            Ok(Some(ack)) => {
                tracing::debug!(seqs = ack.seqs.len(), "ack frame over the limit");
                let _ = recv.stop(codes::MALFORMED.into());
                break AckEnd::Broken;
            }
            Ok(None) => {
                // Every ack read is applied and its items removed before the end.
                if let Some(c) = &shared.cluster
                    && let Err(e) = removals.flush(c, at).await
                {
                    tracing::warn!(error = %e, "removing acknowledged items failed");
                    break AckEnd::Broken;
                }
                if engine::durable(&shared).await.is_err() {
                    break AckEnd::Broken;
                }
                break AckEnd::Finished;
            }
            Err(FrameError::TooLarge { .. }) => {
                let _ = recv.stop(codes::FRAME_TOO_LARGE.into());
                break AckEnd::Broken;
            }
            Err(FrameError::Malformed(reason)) => {
                tracing::debug!(%reason, "malformed ack frame");
                let _ = recv.stop(codes::MALFORMED.into());
                break AckEnd::Broken;
            }
            Err(FrameError::Truncated) => break AckEnd::Broken,
            Err(FrameError::Io(_)) => return,
        }
    };
    let _ = done.send(end);
}

/// Applies an ack on the cluster: the receipts queued, the items acknowledged handed
/// to `removals` (or removed now, without a removal delay). Returns the senders to
/// wake.
async fn acknowledge(
    c: &engine::ClusterEngine,
    shared: &Shared,
    at: Cursor<'_>,
    removals: &Removals,
    number: String,
    seqs: Vec<u64>,
    now: u64,
) -> Result<Vec<crate::store::DeviceRef>, crate::proto::NodeError> {
    // An item acknowledged again before it is removed is not taken twice (one
    // receipt, one delivery counted).
    let seqs = removals.not_waiting(seqs);
    let known = at
        .pushed
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .known(&seqs);
    let acked = c
        .queues
        .ack_pushed(at.device, number, seqs, &known, now)
        .await
        .map_err(worker::internal)?;
    // Only now, with their receipts queued, may the floor pass these items (those
    // taken: every pushed one named is).
    at.pushed
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .acknowledged(&acked.taken);
    removals.add(acked.taken);
    if shared.config.cluster.removal_delay.is_zero()
        && let Err(e) = removals.flush(c, at).await
    {
        // The ack stands; its items wait for the next removal.
        tracing::warn!(error = %e, "removing acknowledged items failed; tried again");
    }
    Ok(acked.receipts)
}
