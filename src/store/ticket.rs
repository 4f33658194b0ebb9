//! The sender's side of a staged send: a [`Ticket`] settles once every staged item of
//! the send was acknowledged or written, and a [`TicketWaiter`] is a handler's place
//! in it, which also carries the receipts of devices that acknowledged meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::{DeviceRef, Store};

/// The state of one staged send, shared by the handlers waiting to answer it.
#[derive(Debug)]
pub struct Ticket {
    /// Staged items neither acknowledged nor written yet.
    pub(super) pending: AtomicUsize,
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
    pub(super) fn new(
        pending: usize,
        written: bool,
        sender: DeviceRef,
        id: [u8; 16],
    ) -> Arc<Ticket> {
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
    pub(super) fn carry(&self, device_id: u32, number: &str) -> bool {
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

    pub(super) fn resolve(&self, written: bool) {
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
    pub(super) ticket: Arc<Ticket>,
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
    pub(super) fn join(ticket: Arc<Ticket>, store: &Store) -> TicketWaiter {
        ticket.carried().waiters += 1;
        TicketWaiter::first(ticket, store)
    }

    pub(super) fn first(ticket: Arc<Ticket>, store: &Store) -> TicketWaiter {
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

    /// Leaves without answering. If nobody else will answer, returns the receipts the
    /// answer would have carried, for the caller to queue for the sender
    /// ([`Store::try_stage_carried`], else [`Store::stage_carried`] on the store
    /// thread): they must not be dropped.
    pub fn leave(mut self) -> Option<CarriedReceipts> {
        self.done = true;
        self.take_carried()
    }

    fn take_carried(&self) -> Option<CarriedReceipts> {
        let (number, devices) = {
            let mut carried = self.ticket.carried();
            carried.waiters = carried.waiters.saturating_sub(1);
            if carried.waiters > 0 || carried.closed {
                return None;
            }
            carried.closed = true;
            (carried.number.take(), std::mem::take(&mut carried.devices))
        };
        Some(CarriedReceipts {
            sender: self.ticket.sender,
            number: number?,
            id: self.ticket.id,
            devices,
        })
    }
}

/// Receipts a send's answer carried, left to queue for its sender when the answer
/// never reached it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedReceipts {
    pub sender: DeviceRef,
    /// The recipient's number.
    pub number: String,
    pub id: [u8; 16],
    /// The recipient devices that acknowledged.
    pub devices: Vec<u32>,
}

impl Drop for TicketWaiter {
    /// A waiter dropped without [`TicketWaiter::leave`] or [`TicketWaiter::answered`]
    /// (only the store's own tests do) queues the receipts here and now.
    fn drop(&mut self) {
        if !self.done
            && let Some(c) = self.take_carried()
            && let Err(e) = self.store.stage_carried(&c)
        {
            tracing::error!(error = %e, "queueing carried receipts failed");
        }
    }
}
