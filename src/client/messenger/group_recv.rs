//! Group messages as a member device receives them: decrypted with the sender's
//! Megolm session (`client::senderkeys`), or kept until the sender's key comes (it
//! travels over Olm, and usually arrives first: a queue is in order), and the counts
//! of deliveries of this device's own group messages.

use bincode::{Decode, Encode};

use super::super::senderkeys::{self, Failure};
use super::{Event, Me, MessengerError, Outcome, decode, encode, seen_key, sent_id};
use crate::client::content::{Body, Content, Plaintext};
use crate::client::db::{Table, Tx};
use crate::client::history;
use crate::proto::{GroupIncoming, GroupReceipt, MessageId};

/// The most group messages kept per sender device while its key has not come.
const MAX_WAITING_PER_SENDER: usize = 1024;

/// A group message waiting for its sender's key.
#[derive(Encode, Decode)]
pub(super) struct WaitingRecord {
    group_id: u64,
    from: String,
    device: u32,
    id: MessageId,
    queued_at_ms: u64,
    first_failed_ms: u64,
    body: Vec<u8>,
}

/// The prefix of every waiting group message.
fn waiting_prefix(tx: &Tx<'_>) -> Vec<u8> {
    tx.hash(b"group-waiting", &[]).to_vec()
}

/// The prefix of those of one sender device in one group.
fn sender_prefix(tx: &Tx<'_>, group_id: u64, from: &str, device: u32) -> Vec<u8> {
    let mut key = waiting_prefix(tx);
    key.extend_from_slice(&tx.hash(
        b"group-waiting-sender",
        &[
            &group_id.to_be_bytes(),
            from.as_bytes(),
            &device.to_be_bytes(),
        ],
    ));
    key
}

/// Group message `g` (queued at `queued_at_ms`): into the history, or kept for its
/// sender's key. A redelivery is dropped unread.
pub(super) fn take(
    tx: &Tx<'_>,
    me: &Me,
    g: &GroupIncoming,
    queued_at_ms: u64,
    now: u64,
    out: &mut Outcome,
) -> Result<(), MessengerError> {
    if !tx.see(&seen_key(tx, &g.from, &g.id), now)? {
        return Ok(());
    }
    let waiting = WaitingRecord {
        group_id: g.group_id,
        from: g.from.clone(),
        device: g.from_device,
        id: g.id,
        queued_at_ms,
        first_failed_ms: now,
        body: g.body.clone(),
    };
    if g.body.is_empty() {
        return show_undecryptable(tx, me, waiting, "the node no longer held it", out);
    }
    open(tx, me, waiting, out)
}

/// Decrypts `w` and stores it, or keeps it for its key.
fn open(tx: &Tx<'_>, me: &Me, w: WaitingRecord, out: &mut Outcome) -> Result<(), MessengerError> {
    let plain = match senderkeys::decrypt(tx, w.group_id, &w.from, w.device, &w.body)? {
        Ok(plain) => plain,
        Err(Failure::NoSession) => {
            let prefix = sender_prefix(tx, w.group_id, &w.from, w.device);
            if tx.scan(Table::Peer, &prefix)?.len() >= MAX_WAITING_PER_SENDER {
                return show_undecryptable(tx, me, w, "its sender's key never came", out);
            }
            out.events.push(Event::Warning(format!(
                "a message from {} to group {} (id {}) waits for their group key",
                w.from,
                w.group_id,
                hex::encode(w.id)
            )));
            let mut key = prefix;
            key.extend_from_slice(&w.id);
            tx.put(Table::Peer, &key, &encode(&w))?;
            return Ok(());
        }
        Err(Failure::Bad(why)) => return show_undecryptable(tx, me, w, &why, out),
    };
    match Plaintext::decode(&plain, w.id, w.queued_at_ms) {
        Ok(Plaintext {
            id,
            body: Body::Content(content),
            expires_in_secs,
            ..
        }) => {
            if let Some(e) = into_history(tx, me, &w, &id, Some(content), None)? {
                super::acts::took(tx, me.number.as_str(), e, expires_in_secs, out)?;
            }
            Ok(())
        }
        // Only content travels to a whole group; anything else is not shown.
        Ok(_) => Ok(()),
        Err(why) => show_undecryptable(tx, me, w, &format!("decrypted, but {why}"), out),
    }
}

fn show_undecryptable(
    tx: &Tx<'_>,
    me: &Me,
    w: WaitingRecord,
    why: &str,
    out: &mut Outcome,
) -> Result<(), MessengerError> {
    if let Some(e) = into_history(tx, me, &w, &w.id, None, Some(why.to_string()))? {
        out.events.push(Event::Undecryptable(e));
    }
    Ok(())
}

/// Group message `w` (its id `id`) in the history: with its content, or why it has
/// none. `None` when it is there already.
fn into_history(
    tx: &Tx<'_>,
    me: &Me,
    w: &WaitingRecord,
    id: &MessageId,
    content: Option<Content>,
    problem: Option<String>,
) -> Result<Option<history::Entry>, MessengerError> {
    let own = w.from == me.number.as_str();
    Ok(history::add_received_group(
        tx,
        w.group_id,
        &w.from,
        own,
        w.device,
        id,
        w.queued_at_ms,
        content,
        problem,
    )?)
}

/// `from`'s device `device` sent its key for group `group_id` (over Olm): stored, and
/// what waited for it is opened.
pub(super) fn sender_key(
    tx: &Tx<'_>,
    me: &Me,
    (group_id, from, device): (u64, &str, u32),
    key: &[u8],
    out: &mut Outcome,
) -> Result<(), MessengerError> {
    if let Err(why) = senderkeys::add_inbound(tx, group_id, from, device, key)? {
        out.events.push(Event::Warning(format!(
            "{from} sent a group key that cannot be used: {why}"
        )));
        return Ok(());
    }
    for (row, value) in tx.scan(Table::Peer, &sender_prefix(tx, group_id, from, device))? {
        tx.delete(Table::Peer, &row)?;
        let w: WaitingRecord = decode(&value, "a waiting group message")?;
        open(tx, me, w, out)?;
    }
    Ok(())
}

/// Shows as undecryptable the group messages that waited `after_ms` or more.
pub(super) fn give_up_waiting(
    tx: &Tx<'_>,
    me: &Me,
    now: u64,
    after_ms: u64,
) -> Result<Vec<Event>, MessengerError> {
    let mut out = Outcome::default();
    for (row, value) in tx.scan(Table::Peer, &waiting_prefix(tx))? {
        let w: WaitingRecord = decode(&value, "a waiting group message")?;
        if now.saturating_sub(w.first_failed_ms) >= after_ms {
            tx.delete(Table::Peer, &row)?;
            show_undecryptable(tx, me, w, "its sender's key never came", &mut out)?;
        }
    }
    Ok(out.events)
}

/// The count of deliveries of a group message of this device.
pub(super) fn delivered(tx: &Tx<'_>, r: &GroupReceipt) -> Result<Option<Event>, MessengerError> {
    let Some(seq) = sent_id(tx, &r.id)? else {
        return Ok(None);
    };
    Ok(
        history::mark_group_delivered(tx, seq, r.delivered, r.of)?.map(|_| Event::GroupDelivered {
            group_id: r.group_id,
            id: r.id,
            delivered: r.delivered,
            of: r.of,
        }),
    )
}
