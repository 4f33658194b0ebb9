//! `Send`: envelopes into the recipient devices' queues, and the answer's wait.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{charge_lookup, check_space, parse_number};
use crate::node::Shared;
use crate::node::clock::now_ms;
use crate::node::engine;
use crate::node::session::{Session, authenticated};
use crate::node::worker::{blocking, internal};
use crate::proto::{Accepted, ErrorKind, NodeError, Outgoing, Response};
use crate::store::queue_store::QueueStore;
use crate::store::{AppendOutcome, AppendPolicy, DeviceRef, HandOff, InMemory, TicketWaiter};

/// Counts `n` envelopes sent by `account` against its budget per minute
/// (`messages.envelopes_per_account_minute`); past it, the send is refused.
pub(super) fn charge_envelopes(shared: &Shared, account: u64, n: usize) -> Result<(), NodeError> {
    let Some(n) = std::num::NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)) else {
        return Ok(());
    };
    match shared.sends.check_key_n(&account, n) {
        Ok(Ok(())) => Ok(()),
        _ => {
            let limit = shared.config.messages.envelopes_per_account_minute;
            Err(NodeError::new(
                ErrorKind::RateLimited {
                    retry_after_secs: 60,
                },
                format!(
                    "this account may send {limit} envelopes a minute (a group message \
                     counts once per device it goes to); try again later"
                ),
            ))
        }
    }
}

/// When the items of a message that disappears after `expires_in_secs` (0: it does
/// not) go, if that is before the node's TTL takes them anyway.
pub(super) fn expiry(shared: &Shared, now_ms: u64, expires_in_secs: u32) -> Option<u64> {
    let ttl_ms = u64::try_from(shared.config.messages.ttl.as_millis()).unwrap_or(u64::MAX);
    let within_ms = u64::from(expires_in_secs) * 1000;
    (expires_in_secs > 0 && within_ms < ttl_ms).then(|| now_ms.saturating_add(within_ms))
}

/// For a number `recipient` found no account for (it is valid E.164 by then).
pub(super) fn unknown_recipient(number: &str) -> NodeError {
    NodeError::new(
        ErrorKind::UnknownRecipient,
        format!("{number} is not registered on this node"),
    )
}

/// The account of `number` (as sent on the wire) and its device ids (sorted), from
/// the directory cache when it is current. Only registered numbers, which were valid
/// E.164 when they registered, are ever cached, so a hit needs no parsing; a miss is
/// validated (`InvalidNumber`) before the store is asked.
pub(super) async fn recipient(
    shared: &Arc<Shared>,
    number: &str,
) -> Result<Option<(u64, Vec<u32>)>, NodeError> {
    const MAX_CACHED: usize = 100_000;
    let epoch = shared.directory_epoch.load(Ordering::Acquire);
    // (In cluster mode other nodes register devices too: cached only while this
    // node hears of every change.)
    let cache_ok = engine::directory_cacheable(shared);
    if cache_ok
        && let Ok(cache) = shared.directory.lock()
        && cache.0 == epoch
        && let Some(hit) = cache.1.get(number)
    {
        return Ok(Some(hit.clone()));
    }
    let n = parse_number(number)?;
    let found = engine::account_by_number(shared, n.to_string()).await?;
    let Some((account_id, account)) = found else {
        return Ok(None);
    };
    let mut devices: Vec<u32> = account.devices.iter().map(|d| d.device_id).collect();
    devices.sort_unstable();
    if cache_ok && let Ok(mut cache) = shared.directory.lock() {
        if cache.0 != epoch || cache.1.len() >= MAX_CACHED {
            *cache = (epoch, std::collections::HashMap::new());
        }
        cache
            .1
            .insert(number.to_string(), (account_id, devices.clone()));
    }
    Ok(Some((account_id, devices)))
}

pub(super) async fn send(
    shared: &Arc<Shared>,
    session: &Session,
    outgoing: Outgoing,
    answer: &mut Option<Waiting>,
) -> Result<Response, NodeError> {
    let me = authenticated(shared, session).await?;
    let to = outgoing.to.as_str();
    let limits = &shared.config.messages;
    let max = limits.max_envelope_bytes;
    if outgoing
        .envelopes
        .iter()
        .any(|e| e.body.len() > max as usize)
    {
        return Err(NodeError::new(
            ErrorKind::EnvelopeTooLarge { max },
            format!("a message may be at most {max} bytes once encrypted"),
        ));
    }
    charge_lookup(shared, &me, to).await?;
    let Some((account_id, devices)) = recipient(shared, to).await? else {
        return Err(unknown_recipient(to));
    };
    check_space(shared)?;
    let mut given: Vec<u32> = outgoing.envelopes.iter().map(|e| e.device_id).collect();
    given.sort_unstable();
    if account_id == me.device.account_id {
        // To the sender's own account (a copy of what it sent, history for a new
        // device): its other devices, never itself.
        let others: Vec<u32> = devices
            .iter()
            .copied()
            .filter(|&d| d != me.device.device_id)
            .collect();
        if given.is_empty() || given != others {
            return Err(NodeError::new(
                ErrorKind::StaleOwnDevices { devices: others },
                "this account's other devices have changed; fetch their keys and send again",
            ));
        }
    } else if given != devices {
        return Err(NodeError::new(
            ErrorKind::StaleDevices { devices },
            format!("{to}'s devices have changed; fetch their keys and send again"),
        ));
    }
    charge_envelopes(shared, me.device.account_id, outgoing.envelopes.len())?;
    let recipients: Vec<DeviceRef> = outgoing
        .envelopes
        .iter()
        .map(|e| DeviceRef {
            account_id,
            device_id: e.device_id,
        })
        .collect();
    let envelopes: Vec<(DeviceRef, Vec<u8>)> = recipients
        .iter()
        .copied()
        .zip(outgoing.envelopes.into_iter().map(|e| e.body))
        .collect();
    let (id, now) = (outgoing.id, now_ms());
    let sender = me.device;
    let sender_number = me.number;
    let policy = AppendPolicy {
        max_queued: limits.max_queued_per_device.into(),
        handoff: (!limits.handoff_window.is_zero()).then(|| HandOff {
            online: recipients
                .iter()
                .copied()
                .filter(|d| shared.mailboxes.is_open(*d))
                .collect(),
            max_bytes: usize::try_from(limits.handoff_max_bytes).unwrap_or(usize::MAX),
        }),
        expires_at_ms: expiry(shared, now, outgoing.expires_in_secs),
    };
    let (outcome, waiter) = match &shared.cluster {
        // On the cluster the queue stream is the only path: the append returns once
        // a quorum holds it, and wakes the recipients' streams on whichever node.
        Some(c) => {
            let message = crate::store::queue_store::Outgoing {
                sender,
                sender_number,
                id,
                envelopes,
                now_ms: now,
                expires_at_ms: policy.expires_at_ms,
            };
            (c.queues.append(message).await.map_err(internal)?, None)
        }
        // To online devices that keep up, the send is staged right here; anything
        // that needs a write goes through the store thread.
        None => match shared
            .store
            .append_in_memory(sender, &sender_number, id, envelopes, now, &policy)
            .map_err(internal)?
        {
            InMemory::Done(outcome, waiter) => (outcome, waiter),
            InMemory::NeedsStore(envelopes) => {
                blocking(shared, move |store| {
                    store.append_with(sender, &sender_number, id, envelopes, now, policy)
                })
                .await?
            }
        },
    };
    let mut waiting = Waiting {
        shared: shared.clone(),
        waiter,
        sent: None,
    };
    let (accepted_at_ms, duplicate) = match outcome {
        AppendOutcome::Queued { accepted_at_ms } => {
            // Online recipients get it now; the sender hears back once it is durable
            // or acknowledged by every recipient device.
            for device in &recipients {
                shared.mailboxes.wake(*device);
            }
            (accepted_at_ms, false)
        }
        AppendOutcome::Duplicate { accepted_at_ms } => (accepted_at_ms, true),
        AppendOutcome::QueueFull { device_id } => {
            return Err(NodeError::new(
                ErrorKind::QueueFull { device_id },
                format!(
                    "{to}'s queue is full; it must receive its messages before more can be sent"
                ),
            ));
        }
    };
    // Also for a duplicate: the first copy may not be durable yet. Items handed over
    // in memory settle first: acknowledged by their device (then no disk is needed)
    // or written.
    let written = match &waiting.waiter {
        Some(waiter) => {
            waiter.settled().await;
            waiter.written()
        }
        None => true,
    };
    if written {
        engine::durable(shared).await?;
    }
    if !duplicate {
        shared.metrics.messages_accepted.inc();
    }
    let delivered = waiting
        .waiter
        .as_ref()
        .map(TicketWaiter::delivered)
        .unwrap_or_default();
    // A written send left a sent-id record on sled (a send acknowledged from memory
    // left none), which can go once the client has this answer. (The cluster's
    // stream finds duplicates by the message id itself.)
    waiting.sent = (written && shared.cluster.is_none()).then_some((sender, id, accepted_at_ms));
    if !delivered.is_empty() || waiting.sent.is_some() {
        *answer = Some(waiting);
    }
    Ok(Response::Accepted(Accepted {
        id,
        accepted_at_ms,
        duplicate,
        delivered,
    }))
}

/// What a send leaves waiting on its answer: its place in a staged send's ticket
/// (the receipts the answer carries) and its sent-id record. Kept until the answer
/// reached the sender ([`Waiting::answered`]). Dropped before that (the request was
/// cancelled or failed, or the reply was lost), it leaves the ticket: the receipts
/// are queued for the sender instead, whose delivery stream is woken; and the
/// record stays, so that the sender's resend queues nothing.
pub struct Waiting {
    shared: Arc<Shared>,
    waiter: Option<TicketWaiter>,
    /// The sender, id and accept time of a send whose sent-id record was written.
    sent: Option<(DeviceRef, [u8; 16], u64)>,
}

impl Waiting {
    /// The reply reached the sender: its receipts are delivered, and its sent-id
    /// record is removed (on the store thread; nobody waits for it).
    pub fn answered(mut self) {
        if let Some(waiter) = self.waiter.take() {
            waiter.answered();
        }
        if let Some((sender, id, at)) = self.sent.take() {
            self.shared
                .worker
                .detach("removing an answered sent-id", move |store| {
                    store.forget_sent(sender, id, at)
                });
        }
    }
}

impl Drop for Waiting {
    /// Queues the receipts the answer carried, right here if that costs no wait,
    /// else on the store thread: a drop runs on an async worker, which must not park
    /// on the queue writer lock nor scan a queue.
    fn drop(&mut self) {
        let Some(carried) = self.waiter.take().and_then(TicketWaiter::leave) else {
            return;
        };
        match self.shared.store.try_stage_carried(&carried) {
            Ok(true) => self.shared.mailboxes.wake(carried.sender),
            Ok(false) => {
                let shared = self.shared.clone();
                self.shared
                    .worker
                    .detach("queueing carried receipts", move |store| {
                        store.stage_carried(&carried)?;
                        shared.mailboxes.wake(carried.sender);
                        Ok(())
                    });
            }
            Err(e) => tracing::error!(error = %e, "queueing carried receipts failed"),
        }
    }
}
