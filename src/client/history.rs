//! The local history: every message sent and received, with its delivery state.
//!
//! One row per message in the home database's `message` table, in the order this
//! device learned of them (its local `seq`), indexed by conversation, so a page of a
//! conversation is one index range. The row's value is a [`Record`] (a format byte,
//! then bincode), sealed like every value of the home; its plain `state` column is a
//! [`State`] number. A record is never decoded without a bound.
//!
//! A sent message is recorded as `Sending` before it leaves, `Sent` once the node
//! holds it, `Delivered` once a recipient device has it; a received one as
//! `Received`, or as `Undecryptable` once every retry failed.

use bincode::{Decode, Encode};

use super::content::Content;
use super::db::{DbError, Hashed, MessageRow, Table, Tx};
use crate::proto::MessageId;

/// The first byte of a stored record: 3 since reactions, edits, read receipts and
/// disappearing messages (a record of format 2 has none, one of format 1 no group
/// part either, and each is read as such).
const RECORD_FORMAT: u8 = 3;
const RECORD_FORMAT_2: u8 = 2;
const RECORD_FORMAT_1: u8 = 1;
const MAX_RECORD: usize = 2 << 20;

/// Where a message stands, as the `state` column holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Written here, not yet accepted by the node (kept in the outbox).
    Sending,
    /// The node holds it.
    Sent,
    /// At least one recipient device has it.
    Delivered,
    /// The node refused it; it will not be sent.
    Failed,
    /// Received and decrypted.
    Received,
    /// Received, and could not be decrypted even after asking the sender again.
    Undecryptable,
}

impl State {
    fn number(self) -> i64 {
        match self {
            State::Sending => 0,
            State::Sent => 1,
            State::Delivered => 2,
            State::Failed => 3,
            State::Received => 10,
            State::Undecryptable => 11,
        }
    }

    fn from_number(n: i64) -> Option<State> {
        Some(match n {
            0 => State::Sending,
            1 => State::Sent,
            2 => State::Delivered,
            3 => State::Failed,
            10 => State::Received,
            11 => State::Undecryptable,
            _ => return None,
        })
    }

    /// The state's name, for `--json` and people.
    pub fn name(self) -> &'static str {
        match self {
            State::Sending => "sending",
            State::Sent => "sent",
            State::Delivered => "delivered",
            State::Failed => "failed",
            State::Received => "received",
            State::Undecryptable => "undecryptable",
        }
    }
}

/// One message of the history, as apps see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Local order: higher is later. Page backwards with it.
    pub seq: i64,
    /// The other side of the conversation (E.164).
    pub peer: String,
    /// Whether this device's account wrote it.
    pub outgoing: bool,
    /// The author's device.
    pub device: u32,
    /// The message's own id.
    pub id: MessageId,
    /// When the node accepted it (sent) or queued it (received), ms since the epoch;
    /// for a message not yet accepted, when it was written.
    pub at_ms: u64,
    /// `None` for a message that could not be decrypted.
    pub content: Option<Content>,
    pub state: State,
    /// Recipient devices that have it, with when the receipt came (ms).
    pub delivered: Vec<(u32, u64)>,
    /// Why it failed (sending) or could not be decrypted (receiving).
    pub problem: Option<String>,
    /// Sent: the recipient's identity key when it was encrypted.
    pub to_identity: Option<[u8; 32]>,
    /// A message of a group conversation (`peer` is then [`group_peer`]).
    pub group: Option<GroupPart>,
    /// Reactions: who (E.164) put which emoji on it, one each.
    pub reactions: Vec<(String, String)>,
    /// When its author last edited it (ms).
    pub edited_at_ms: Option<u64>,
    /// Sent: who (E.164) was shown it, and when (ms), from their read receipts.
    pub read: Vec<(String, u64)>,
    /// The disappearing-message timer it was sent under (0: none), and when every
    /// device removes it.
    pub expires_in_secs: u32,
    pub expires_at_ms: Option<u64>,
}

/// What a message of a group conversation has beyond a 1:1 one.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct GroupPart {
    pub group_id: u64,
    /// Who wrote it (E.164).
    pub author: String,
    /// Sent: how many of the devices it went to have it, and how many it went to.
    pub delivered: u32,
    pub of: u32,
}

/// The conversation (`peer`) of group `group_id`.
pub fn group_peer(group_id: u64) -> String {
    format!("group:{group_id}")
}

#[derive(Encode, Decode)]
struct Record {
    peer: String,
    outgoing: bool,
    device: u32,
    id: MessageId,
    at_ms: u64,
    content: Option<Content>,
    delivered: Vec<(u32, u64)>,
    problem: Option<String>,
    /// Resends made for retry requests, per recipient device (sender side).
    resends: Vec<(u32, u32)>,
    /// Sent: the recipient's identity key (Curve25519) when it was encrypted. A retry
    /// request is answered only over a session with that same identity.
    to_identity: Option<[u8; 32]>,
    group: Option<GroupPart>,
    reactions: Vec<(String, String)>,
    edited_at_ms: Option<u64>,
    read: Vec<(String, u64)>,
    expires_in_secs: u32,
    expires_at_ms: Option<u64>,
}

/// A record as format 2 stored it (before reactions and the rest).
#[derive(Decode)]
struct RecordV2 {
    peer: String,
    outgoing: bool,
    device: u32,
    id: MessageId,
    at_ms: u64,
    content: Option<Content>,
    delivered: Vec<(u32, u64)>,
    problem: Option<String>,
    resends: Vec<(u32, u32)>,
    to_identity: Option<[u8; 32]>,
    group: Option<GroupPart>,
}

/// A record as format 1 stored it (before groups).
#[derive(Decode)]
struct RecordV1 {
    peer: String,
    outgoing: bool,
    device: u32,
    id: MessageId,
    at_ms: u64,
    content: Option<Content>,
    delivered: Vec<(u32, u64)>,
    problem: Option<String>,
    resends: Vec<(u32, u32)>,
    to_identity: Option<[u8; 32]>,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_RECORD>()
}

fn encode(record: &Record) -> Vec<u8> {
    let mut out = vec![RECORD_FORMAT];
    out.extend(
        bincode::encode_to_vec(record, config())
            .unwrap_or_else(|e| unreachable!("encoding to a Vec cannot fail: {e}")),
    );
    out
}

/// Decodes a stored record (bounded; a damaged one is an error, never a panic).
fn decode(bytes: &[u8]) -> Result<Record, String> {
    match bytes.split_first() {
        Some((&RECORD_FORMAT, rest)) => bincode::decode_from_slice(rest, config())
            .map(|(r, _)| r)
            .map_err(|e| e.to_string()),
        Some((&RECORD_FORMAT_2, rest)) => bincode::decode_from_slice(rest, config())
            .map(|(r, _): (RecordV2, _)| Record {
                group: r.group,
                ..Record {
                    resends: r.resends,
                    to_identity: r.to_identity,
                    delivered: r.delivered,
                    problem: r.problem,
                    ..Record::new(&r.peer, r.outgoing, r.device, &r.id, r.at_ms, r.content)
                }
            })
            .map_err(|e| e.to_string()),
        Some((&RECORD_FORMAT_1, rest)) => bincode::decode_from_slice(rest, config())
            .map(|(r, _): (RecordV1, _)| Record {
                peer: r.peer,
                outgoing: r.outgoing,
                device: r.device,
                id: r.id,
                at_ms: r.at_ms,
                content: r.content,
                delivered: r.delivered,
                problem: r.problem,
                resends: r.resends,
                to_identity: r.to_identity,
                group: None,
                reactions: Vec::new(),
                edited_at_ms: None,
                read: Vec::new(),
                expires_in_secs: 0,
                expires_at_ms: None,
            })
            .map_err(|e| e.to_string()),
        Some((format, _)) => Err(format!("unknown record format {format}")),
        None => Err("an empty record".into()),
    }
}

/// Checks that `bytes` decode as a stored record (for the fuzz target).
pub fn decode_stored(bytes: &[u8]) -> Result<(), String> {
    decode(bytes).map(|_| ())
}

/// The conversation key of `peer`.
pub fn conv(tx: &Tx<'_>, peer: &str) -> Hashed {
    tx.hash(b"conv", &[peer.as_bytes()])
}

/// The row key of a message: who wrote it, in which conversation, and its id.
fn message_key(tx: &Tx<'_>, peer: &str, outgoing: bool, id: &MessageId) -> Hashed {
    let direction: &[u8] = if outgoing { b"out" } else { b"in" };
    tx.hash(b"msg", &[direction, peer.as_bytes(), id])
}

fn entry(tx: &Tx<'_>, row: &MessageRow) -> Result<Entry, DbError> {
    let record =
        decode(&row.value).map_err(|r| tx.damaged(format!("history row {}: {r}", row.seq)))?;
    let state = State::from_number(row.state)
        .ok_or_else(|| tx.damaged(format!("history row {}: state {}", row.seq, row.state)))?;
    Ok(from_record(row.seq, state, record))
}

fn from_record(seq: i64, state: State, record: Record) -> Entry {
    Entry {
        seq,
        peer: record.peer,
        outgoing: record.outgoing,
        device: record.device,
        id: record.id,
        at_ms: record.at_ms,
        content: record.content,
        state,
        delivered: record.delivered,
        problem: record.problem,
        to_identity: record.to_identity,
        group: record.group,
        reactions: record.reactions,
        edited_at_ms: record.edited_at_ms,
        read: record.read,
        expires_in_secs: record.expires_in_secs,
        expires_at_ms: record.expires_at_ms,
    }
}

impl Record {
    /// A message with nothing delivered, resent or wrong about it yet.
    fn new(
        peer: &str,
        outgoing: bool,
        device: u32,
        id: &MessageId,
        at_ms: u64,
        content: Option<Content>,
    ) -> Record {
        Record {
            peer: peer.to_string(),
            outgoing,
            device,
            id: *id,
            at_ms,
            content,
            delivered: Vec::new(),
            problem: None,
            resends: Vec::new(),
            to_identity: None,
            group: None,
            reactions: Vec::new(),
            edited_at_ms: None,
            read: Vec::new(),
            expires_in_secs: 0,
            expires_at_ms: None,
        }
    }

    /// Whether this is an act on another message (a reaction, an edit, a delete):
    /// kept in its own conversation key, so that pages of the conversation and the
    /// news `recv` shows hold only messages.
    fn is_act(&self) -> bool {
        self.content.as_ref().and_then(Content::act_on).is_some()
    }
}

/// Stores `record` in its conversation in `state` (`shown` or not yet); `None` when
/// a message of its direction and id is there already.
fn insert(tx: &Tx<'_>, record: &Record, state: State, shown: bool) -> Result<Option<i64>, DbError> {
    let key = message_key(tx, &record.peer, record.outgoing, &record.id);
    let (conv_key, shown) = if record.is_act() {
        (acts(tx, &record.peer), true)
    } else {
        (conv(tx, &record.peer), shown)
    };
    let seq = tx.insert_message(&conv_key, &key, state.number(), shown, &encode(record))?;
    if let Some(seq) = seq {
        tx.put(Table::Peer, &by_id_key(tx, &record.id), &seq.to_be_bytes())?;
    }
    Ok(seq)
}

/// The conversation key of the acts on `peer`'s conversation's messages.
fn acts(tx: &Tx<'_>, peer: &str) -> Hashed {
    tx.hash(b"acts", &[peer.as_bytes()])
}

/// The `peer` row that finds a message by its id alone.
fn by_id_key(tx: &Tx<'_>, id: &MessageId) -> Hashed {
    tx.hash(b"msg-by-id", &[id])
}

/// The message whose id is `id`, in any conversation, if it is in the history.
pub fn by_id(tx: &Tx<'_>, id: &MessageId) -> Result<Option<Entry>, DbError> {
    let Some(v) = tx.get(Table::Peer, &by_id_key(tx, id))? else {
        return Ok(None);
    };
    let Some(seq) = v.get(..8).and_then(|b| b.try_into().ok()) else {
        return Ok(None);
    };
    Ok(get(tx, i64::from_be_bytes(seq))?.filter(|e| e.id == *id))
}

/// The messages of the last `within` in the history (any conversation) whose id in
/// hex starts with `prefix` (as people type a short id), newest first.
pub fn by_id_prefix(tx: &Tx<'_>, prefix: &str, within: usize) -> Result<Vec<Entry>, DbError> {
    let last = tx.last_message_seq()?.unwrap_or(0);
    let after = last.saturating_sub(i64::try_from(within).unwrap_or(i64::MAX));
    let mut out = Vec::new();
    for row in tx.messages_after(after, within)? {
        let e = entry(tx, &row)?;
        if hex::encode(e.id).starts_with(prefix) && !e.content.as_ref().is_some_and(is_act) {
            out.push(e);
        }
    }
    out.reverse();
    Ok(out)
}

fn is_act(c: &Content) -> bool {
    c.act_on().is_some()
}

/// The message `to` of conversation `peer` (sent or received), if it is there.
pub fn find(tx: &Tx<'_>, peer: &str, to: &MessageId) -> Result<Option<Entry>, DbError> {
    for outgoing in [true, false] {
        if let Some(row) = tx.message_by_key(&message_key(tx, peer, outgoing, to))? {
            return entry(tx, &row).map(Some);
        }
    }
    Ok(None)
}

/// Who wrote `e` (E.164), given this account's number.
pub fn author<'a>(e: &'a Entry, me: &'a str) -> &'a str {
    match &e.group {
        Some(g) => &g.author,
        None if e.outgoing => me,
        None => &e.peer,
    }
}

/// Why an act on a message is not taken.
pub fn act_refusal(
    target: &Entry,
    actor: &str,
    me: &str,
    act: &Content,
    at_ms: u64,
) -> Option<String> {
    if matches!(target.content, Some(Content::Deleted) | None) {
        return Some("that message was deleted (or never opened)".into());
    }
    if matches!(act, Content::Edit { .. } | Content::Delete { .. }) {
        if author(target, me) != actor {
            return Some("only its author can edit or delete a message".into());
        }
        if at_ms.saturating_sub(target.at_ms) > super::content::EDIT_WINDOW_MS + ACT_GRACE_MS {
            return Some(
                "a message can be edited or deleted for everyone only within 15 minutes of sending it"
                    .into(),
            );
        }
        if let (Content::Edit { .. }, Some(c)) = (act, &target.content)
            && c.text().is_none()
        {
            return Some("only a text can be edited".into());
        }
    }
    None
}

/// Clock skew allowed between an edit's author and the node that dated the message.
const ACT_GRACE_MS: u64 = 60_000;

/// Applies an act of `actor` (`me` is this account) at `at_ms` to its message in
/// conversation `peer`; the message as it is now, unless the act changes nothing (its
/// message is not here, or the act is not allowed: an edit by someone else, or late).
pub fn apply_act(
    tx: &Tx<'_>,
    peer: &str,
    actor: &str,
    me: &str,
    act: &Content,
    at_ms: u64,
) -> Result<Option<Entry>, DbError> {
    let Some(to) = act.act_on() else {
        return Ok(None);
    };
    let Some(target) = find(tx, peer, to)? else {
        return Ok(None);
    };
    if act_refusal(&target, actor, me, act, at_ms).is_some() {
        return Ok(None);
    }
    change(tx, target.seq, |r, _| {
        match act {
            Content::Reaction { emoji, .. } => {
                r.reactions.retain(|(who, _)| who != actor);
                if !emoji.is_empty() {
                    r.reactions.push((actor.to_string(), emoji.clone()));
                }
            }
            Content::Edit { text, .. } => {
                r.content = Some(match r.content.take() {
                    Some(Content::Reply { to, .. }) => Content::Reply {
                        to,
                        text: text.clone(),
                    },
                    // An attachment's caption is its text.
                    Some(Content::Attachment(mut a)) => {
                        a.caption.clone_from(text);
                        Content::Attachment(a)
                    }
                    _ => Content::Text(text.clone()),
                });
                r.edited_at_ms = Some(at_ms);
            }
            Content::Delete { .. } => {
                r.content = Some(Content::Deleted);
                r.reactions.clear();
                r.edited_at_ms = None;
            }
            _ => return false,
        }
        true
    })
}

/// `by` read this account's messages `ids` of conversation `peer` at `at_ms`: the
/// messages whose read state changed.
pub fn mark_read(
    tx: &Tx<'_>,
    peer: &str,
    ids: &[MessageId],
    by: &str,
    at_ms: u64,
) -> Result<Vec<Entry>, DbError> {
    let mut out = Vec::new();
    for id in ids {
        let Some(row) = tx.message_by_key(&message_key(tx, peer, true, id))? else {
            continue;
        };
        if let Some(e) = change(tx, row.seq, |r, _| {
            if r.read.iter().any(|(who, _)| who == by) {
                return false;
            }
            r.read.push((by.to_string(), at_ms));
            true
        })? {
            out.push(e);
        }
    }
    Ok(out)
}

/// Message `seq` was sent under a disappearing-message timer of `secs`: every device
/// removes it `secs` after `from_ms`.
pub fn set_expiry(tx: &Tx<'_>, seq: i64, secs: u32, from_ms: u64) -> Result<(), DbError> {
    if secs == 0 {
        return Ok(());
    }
    let until = from_ms.saturating_add(u64::from(secs) * 1000);
    change(tx, seq, |r, _| {
        r.expires_in_secs = secs;
        r.expires_at_ms = Some(until);
        true
    })?;
    tx.set_message_expiry(seq, until)
}

/// Removes the messages whose timer ran out by `now_ms` (not those still being
/// sent); how many.
pub fn sweep_expired(tx: &Tx<'_>, now_ms: u64) -> Result<usize, DbError> {
    tx.delete_expired_messages(now_ms, State::Sending.number())
}

/// Records a message this device is about to send to `peer` (whose identity key is
/// `to_identity` as this device knows it); its seq.
pub fn add_sent(
    tx: &Tx<'_>,
    peer: &str,
    device: u32,
    id: &MessageId,
    written_at_ms: u64,
    content: &Content,
    to_identity: Option<[u8; 32]>,
) -> Result<i64, DbError> {
    let record = Record {
        to_identity,
        ..Record::new(peer, true, device, id, written_at_ms, Some(content.clone()))
    };
    insert(tx, &record, State::Sending, true)?
        .ok_or_else(|| tx.damaged("a message id was used twice"))
}

/// Records a message another device of this account sent to `peer` (its copy), as
/// sent; `None` when it is in the history already.
pub fn add_sent_copy(
    tx: &Tx<'_>,
    peer: &str,
    device: u32,
    id: &MessageId,
    written_at_ms: u64,
    content: &Content,
) -> Result<Option<i64>, DbError> {
    let record = Record::new(peer, true, device, id, written_at_ms, Some(content.clone()));
    // News to this device: `recv` shows it once, as a received message.
    insert(tx, &record, State::Sent, false)
}

/// Up to `limit` messages after local position `after` (any conversation), written
/// or received since `since_ms`, with content: what a newly linked device is sent.
/// Returns them with their positions, oldest first.
pub fn recent(
    tx: &Tx<'_>,
    after: i64,
    since_ms: u64,
    limit: usize,
) -> Result<Vec<(i64, super::content::Synced)>, DbError> {
    let mut out = Vec::new();
    for row in tx.messages_after(after, limit)? {
        let e = entry(tx, &row)?;
        let Some(content) = e.content else { continue };
        // Acts are in their messages already (an edit's text, a delete); reactions
        // and timers stay behind.
        if e.at_ms < since_ms || e.state == State::Failed || is_act(&content) {
            continue;
        }
        out.push((
            e.seq,
            super::content::Synced {
                peer: e.peer,
                outgoing: e.outgoing,
                device: e.device,
                id: e.id,
                at_ms: e.at_ms,
                content,
            },
        ));
    }
    Ok(out)
}

/// Stores a message of the history the primary sent (shown already: it is the past,
/// not news); false when it is in the history already.
pub fn add_synced(tx: &Tx<'_>, m: &super::content::Synced) -> Result<bool, DbError> {
    let state = if m.outgoing {
        State::Sent
    } else {
        State::Received
    };
    let record = Record::new(
        &m.peer,
        m.outgoing,
        m.device,
        &m.id,
        m.at_ms,
        Some(m.content.clone()),
    );
    Ok(insert(tx, &record, state, true)?.is_some())
}

/// Records a received message; `None` when it is in the history already (a copy
/// sent again). A message shown as undecryptable that arrives after all (its sender
/// answered late) takes the place of that row.
pub fn add_received(
    tx: &Tx<'_>,
    from: &str,
    device: u32,
    id: &MessageId,
    at_ms: u64,
    content: Option<Content>,
    problem: Option<String>,
) -> Result<Option<Entry>, DbError> {
    let state = if content.is_some() {
        State::Received
    } else {
        State::Undecryptable
    };
    let record = Record {
        problem,
        ..Record::new(from, false, device, id, at_ms, content)
    };
    let key = message_key(tx, from, false, id);
    let value = encode(&record);
    match insert(tx, &record, state, false)? {
        Some(seq) => Ok(Some(from_record(seq, state, record))),
        None => {
            let Some(row) = tx.message_by_key(&key)? else {
                return Ok(None);
            };
            if row.state != State::Undecryptable.number() || record.content.is_none() {
                return Ok(None);
            }
            tx.update_message(&row, state.number(), &value)?;
            tx.unshow(row.seq)?;
            // Shown again from here on, even if later messages were shown already.
            if shown_from(tx)? > row.seq {
                tx.put(super::db::Table::Kv, SHOWN_FROM, &row.seq.to_be_bytes())?;
            }
            Ok(Some(from_record(row.seq, state, record)))
        }
    }
}

/// Whether a received message from `from` with id `id` is in the history.
pub fn has_received(tx: &Tx<'_>, from: &str, id: &MessageId) -> Result<bool, DbError> {
    tx.has_message_key(&message_key(tx, from, false, id))
}

/// Records a group message this device is about to send (`author`: this account);
/// its seq.
pub fn add_sent_group(
    tx: &Tx<'_>,
    group_id: u64,
    author: &str,
    device: u32,
    id: &MessageId,
    written_at_ms: u64,
    content: &Content,
) -> Result<i64, DbError> {
    let record = Record {
        group: Some(GroupPart {
            group_id,
            author: author.to_string(),
            delivered: 0,
            of: 0,
        }),
        ..Record::new(
            &group_peer(group_id),
            true,
            device,
            id,
            written_at_ms,
            Some(content.clone()),
        )
    };
    insert(tx, &record, State::Sending, true)?
        .ok_or_else(|| tx.damaged("a message id was used twice"))
}

/// Records a received group message (`content` `None`: it could not be decrypted);
/// `own` for one of this account's other devices (kept as sent). `None` when it is
/// in the history already.
#[allow(clippy::too_many_arguments)]
pub fn add_received_group(
    tx: &Tx<'_>,
    group_id: u64,
    author: &str,
    own: bool,
    device: u32,
    id: &MessageId,
    at_ms: u64,
    content: Option<Content>,
    problem: Option<String>,
) -> Result<Option<Entry>, DbError> {
    let state = match (&content, own) {
        (None, _) => State::Undecryptable,
        (Some(_), true) => State::Sent,
        (Some(_), false) => State::Received,
    };
    let record = Record {
        problem,
        group: Some(GroupPart {
            group_id,
            author: author.to_string(),
            delivered: 0,
            of: 0,
        }),
        ..Record::new(&group_peer(group_id), own, device, id, at_ms, content)
    };
    Ok(insert(tx, &record, state, false)?.map(|seq| from_record(seq, state, record)))
}

/// Whether group `group_id`'s conversation has message `id` (written here or not).
pub fn has_group_message(
    tx: &Tx<'_>,
    group_id: u64,
    outgoing: bool,
    id: &MessageId,
) -> Result<bool, DbError> {
    tx.has_message_key(&message_key(tx, &group_peer(group_id), outgoing, id))
}

/// The node queued group message `seq` for `of` devices.
pub fn mark_group_queued(tx: &Tx<'_>, seq: i64, of: u32) -> Result<(), DbError> {
    change(tx, seq, |r, _| match &mut r.group {
        Some(g) => {
            g.of = of;
            true
        }
        None => false,
    })?;
    Ok(())
}

/// `delivered` of the `of` devices group message `seq` went to have it; the entry,
/// unless that is no news.
pub fn mark_group_delivered(
    tx: &Tx<'_>,
    seq: i64,
    delivered: u32,
    of: u32,
) -> Result<Option<Entry>, DbError> {
    change(tx, seq, |r, state| match &mut r.group {
        Some(g) if delivered > g.delivered || of != g.of => {
            g.delivered = g.delivered.max(delivered);
            g.of = of;
            if g.delivered > 0 {
                *state = State::Delivered;
            }
            true
        }
        _ => false,
    })
}

/// The message `seq`.
pub fn get(tx: &Tx<'_>, seq: i64) -> Result<Option<Entry>, DbError> {
    tx.message(seq)?.as_ref().map(|r| entry(tx, r)).transpose()
}

/// Applies `f` to the record and state of message `seq`, writing the result when
/// `f` says it changed something.
fn change(
    tx: &Tx<'_>,
    seq: i64,
    f: impl FnOnce(&mut Record, &mut State) -> bool,
) -> Result<Option<Entry>, DbError> {
    let Some(row) = tx.message(seq)? else {
        return Ok(None);
    };
    let mut record =
        decode(&row.value).map_err(|r| tx.damaged(format!("history row {seq}: {r}")))?;
    let mut state = State::from_number(row.state)
        .ok_or_else(|| tx.damaged(format!("history row {seq}: state {}", row.state)))?;
    if !f(&mut record, &mut state) {
        return Ok(None);
    }
    let value = encode(&record);
    tx.update_message(&row, state.number(), &value)?;
    Ok(Some(entry(
        tx,
        &MessageRow {
            seq,
            key: row.key,
            state: state.number(),
            value: value.into(),
        },
    )?))
}

/// The node accepted message `seq` at `at_ms`; `delivered` devices already have it.
pub fn mark_sent(tx: &Tx<'_>, seq: i64, at_ms: u64, delivered: &[u32]) -> Result<(), DbError> {
    change(tx, seq, |r, state| {
        if *state == State::Sending || *state == State::Failed {
            r.at_ms = at_ms;
            *state = State::Sent;
        }
        for d in delivered {
            if !r.delivered.iter().any(|(x, _)| x == d) {
                r.delivered.push((*d, at_ms));
            }
        }
        if !r.delivered.is_empty() {
            *state = State::Delivered;
        }
        true
    })?;
    Ok(())
}

/// The node refused message `seq` for good.
pub fn mark_failed(tx: &Tx<'_>, seq: i64, why: &str) -> Result<(), DbError> {
    change(tx, seq, |r, state| {
        r.problem = Some(why.to_string());
        *state = State::Failed;
        true
    })?;
    Ok(())
}

/// A recipient device has message `seq`; the entry, unless it is gone or that
/// device's receipt was recorded already (a message sent again draws another).
pub fn mark_delivered(
    tx: &Tx<'_>,
    seq: i64,
    device: u32,
    at_ms: u64,
) -> Result<Option<Entry>, DbError> {
    change(tx, seq, |r, state| {
        if r.delivered.iter().any(|(d, _)| *d == device) {
            return false;
        }
        r.delivered.push((device, at_ms));
        *state = State::Delivered;
        true
    })
}

/// Counts a resend of message `seq` to `device`; the count so far, this one included.
pub fn count_resend(tx: &Tx<'_>, seq: i64, device: u32) -> Result<u32, DbError> {
    let mut count = 0;
    change(tx, seq, |r, _| {
        match r.resends.iter_mut().find(|(d, _)| *d == device) {
            Some((_, n)) => {
                *n += 1;
                count = *n;
            }
            None => {
                r.resends.push((device, 1));
                count = 1;
            }
        }
        true
    })?;
    Ok(count)
}

/// Marks message `seq` as shown to the user; true when this call did it (so that of
/// two processes showing new messages, one shows each).
pub fn claim_shown(tx: &Tx<'_>, seq: i64) -> Result<bool, DbError> {
    tx.claim_shown(seq)
}

/// Up to `limit` received messages not yet shown to the user, oldest first. Every
/// message before the first one left unshown is shown, and the next call starts
/// there (`kv/shown_from`): so this reads what arrived since, not the history.
pub fn unshown(tx: &Tx<'_>, limit: usize) -> Result<Vec<Entry>, DbError> {
    let from = shown_from(tx)?;
    let rows = tx.unshown(from, limit)?;
    let next = match rows.first() {
        Some(r) => r.seq,
        None => tx.last_message_seq()?.map_or(from, |s| s + 1),
    };
    if next != from {
        tx.put(super::db::Table::Kv, SHOWN_FROM, &next.to_be_bytes())?;
    }
    rows.iter().map(|r| entry(tx, r)).collect()
}

/// Where [`unshown`] starts looking.
const SHOWN_FROM: &[u8] = b"shown_from";

fn shown_from(tx: &Tx<'_>) -> Result<i64, DbError> {
    Ok(tx
        .get(super::db::Table::Kv, SHOWN_FROM)?
        .and_then(|v| v.get(..8).and_then(|b| b.try_into().ok()))
        .map_or(0, i64::from_be_bytes))
}

/// Every conversation with its newest message and how many of its received
/// messages come after `read_upto(peer)`, newest first. The index gives each
/// conversation's head; only those heads are unsealed, so the cost grows with the
/// conversations, not the history.
pub fn conversations(
    tx: &Tx<'_>,
    read_upto: impl Fn(&str) -> i64,
) -> Result<Vec<(Entry, usize)>, DbError> {
    let mut out = Vec::new();
    for (conv, last) in tx.conversation_heads()? {
        let Some(row) = tx.message(last)? else {
            continue;
        };
        let e = entry(tx, &row)?;
        // Reactions, edits and deletes live under a conversation key of their own.
        if e.content.as_ref().is_some_and(is_act) {
            continue;
        }
        // Received states number from `State::Received` up.
        let unread =
            tx.count_messages_after(&conv, read_upto(&e.peer), State::Received.number())?;
        out.push((e, unread));
    }
    Ok(out)
}

/// The last `limit` messages of the conversation with `peer` before `before` (all
/// when `None`), oldest first.
pub fn page(
    tx: &Tx<'_>,
    peer: &str,
    before: Option<i64>,
    limit: usize,
) -> Result<Vec<Entry>, DbError> {
    let mut rows = tx.messages(&conv(tx, peer), before, limit)?;
    rows.reverse();
    rows.iter().map(|r| entry(tx, r)).collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::client::content::EDIT_WINDOW_MS;
    use crate::client::db::HomeDb;

    #[test]
    fn acts_keep_one_reaction_each_and_edit_or_delete_only_by_the_author_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let db = HomeDb::open(dir.path(), None).unwrap();
        let (me, bob) = ("+14155550100", "+14155550101");
        let sent_at = 1_000_000;
        let (mine, his) = ([1u8; 16], [2u8; 16]);
        db.write(|tx| {
            add_sent(
                tx,
                bob,
                1,
                &mine,
                sent_at,
                &Content::Text("hi".into()),
                None,
            )?;
            add_received(
                tx,
                bob,
                1,
                &his,
                sent_at,
                Some(Content::Text("yo".into())),
                None,
            )?;
            Ok::<_, DbError>(())
        })
        .unwrap();
        let act = |actor: &str, act: Content, at: u64| {
            db.write(|tx| apply_act(tx, bob, actor, me, &act, at))
                .unwrap()
        };
        let now = |id: MessageId| db.read(|tx| find(tx, bob, &id)).unwrap().unwrap();
        let react = |to, emoji: &str| Content::Reaction {
            to,
            emoji: emoji.into(),
        };
        let own = |who: &str, emoji: &str| (who.to_string(), emoji.to_string());

        // One reaction per person: a new one replaces the old, empty takes it back.
        act(bob, react(mine, "\u{1f44d}"), sent_at + 1).unwrap();
        act(bob, react(mine, "\u{2764}"), sent_at + 2).unwrap();
        act(me, react(mine, "\u{1f602}"), sent_at + 3).unwrap();
        assert_eq!(
            now(mine).reactions,
            vec![own(bob, "\u{2764}"), own(me, "\u{1f602}")]
        );
        act(bob, react(mine, ""), sent_at + 4).unwrap();
        assert_eq!(now(mine).reactions, vec![own(me, "\u{1f602}")]);

        // Only the author edits, and only within the window (and its grace).
        let edit = |text: &str| Content::Edit {
            to: mine,
            text: text.into(),
        };
        assert!(act(bob, edit("not yours"), sent_at + 5).is_none());
        let edited = act(me, edit("hello"), sent_at + EDIT_WINDOW_MS).unwrap();
        assert_eq!(edited.content, Some(Content::Text("hello".into())));
        assert_eq!(edited.edited_at_ms, Some(sent_at + EDIT_WINDOW_MS));
        let late = sent_at + EDIT_WINDOW_MS + ACT_GRACE_MS + 1;
        assert!(act(me, edit("too late"), late).is_none());
        let refused = act_refusal(&now(mine), me, me, &edit("too late"), late).unwrap();
        assert!(refused.contains("within 15 minutes"), "{refused}");
        assert_eq!(now(mine).content, Some(Content::Text("hello".into())));

        // Delete for everyone: the same window; it takes the reactions along.
        act(me, react(his, "\u{1f44d}"), sent_at + 6).unwrap();
        assert!(act(bob, Content::Delete { to: his }, late).is_none());
        assert_eq!(now(his).content, Some(Content::Text("yo".into())));
        let deleted = act(bob, Content::Delete { to: his }, sent_at + EDIT_WINDOW_MS).unwrap();
        assert_eq!(deleted.content, Some(Content::Deleted));
        assert!(deleted.reactions.is_empty());
        assert!(act(me, react(his, "\u{1f44d}"), sent_at + 7).is_none());
        assert!(act(bob, Content::Delete { to: mine }, sent_at + 8).is_none());
    }

    #[test]
    fn the_conversation_list_has_each_head_and_counts_only_unread_received() {
        let dir = tempfile::tempdir().unwrap();
        let db = HomeDb::open(dir.path(), None).unwrap();
        let (bob, carol) = ("+14155550101", "+14155550102");
        let text = |t: &str| Content::Text(t.into());
        let seqs = db
            .write(|tx| {
                let mut seqs = Vec::new();
                for i in 0..6u8 {
                    seqs.push(add_received(
                        tx,
                        bob,
                        1,
                        &[i; 16],
                        0,
                        Some(text("b")),
                        None,
                    )?);
                }
                add_sent(tx, bob, 1, &[10; 16], 0, &text("mine"), None)?;
                add_received(tx, carol, 1, &[20; 16], 0, Some(text("c")), None)?;
                Ok::<_, DbError>(seqs)
            })
            .unwrap();
        let bob_read = seqs.iter().flatten().nth(3).map(|e| e.seq).unwrap();
        let list = db
            .read(|tx| conversations(tx, |p| if p == bob { bob_read } else { 0 }))
            .unwrap();
        let shown: Vec<(&str, usize, Option<&str>)> = list
            .iter()
            .map(|(e, n)| {
                (
                    e.peer.as_str(),
                    *n,
                    e.content.as_ref().and_then(Content::text),
                )
            })
            .collect();
        // Carol wrote last; Bob's head is this account's own message, and two of
        // his six come after where he was read up to.
        assert_eq!(shown, vec![(carol, 1, Some("c")), (bob, 2, Some("mine"))]);
    }

    #[test]
    fn a_conversation_pages_oldest_first_in_both_directions() {
        let dir = tempfile::tempdir().unwrap();
        let db = HomeDb::open(dir.path(), None).unwrap();
        let bob = "+14155550101";
        db.write(|tx| {
            for i in 0..10u8 {
                if i % 2 == 0 {
                    let seq = add_sent(
                        tx,
                        bob,
                        1,
                        &[i; 16],
                        u64::from(i),
                        &Content::Text(format!("to {i}")),
                        None,
                    )?;
                    mark_sent(tx, seq, 100 + u64::from(i), &[])?;
                } else {
                    add_received(
                        tx,
                        bob,
                        1,
                        &[i; 16],
                        u64::from(i),
                        Some(Content::Text(format!("from {i}"))),
                        None,
                    )?;
                }
                // Another conversation in between is not part of it.
                add_received(
                    tx,
                    "+14155550102",
                    1,
                    &[i; 16],
                    0,
                    Some(Content::Text("carol".into())),
                    None,
                )?;
            }
            Ok::<_, DbError>(())
        })
        .unwrap();
        let last = db.read(|tx| page(tx, bob, None, 4)).unwrap();
        let texts: Vec<_> = last
            .iter()
            .map(|e| match &e.content {
                Some(Content::Text(t)) => t.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(texts, ["to 6", "from 7", "to 8", "from 9"]);
        assert_eq!(last[0].state, State::Sent);
        assert!(last[1].state == State::Received && !last[1].outgoing);
        let before = db.read(|tx| page(tx, bob, Some(last[0].seq), 100)).unwrap();
        assert_eq!(before.len(), 6);
        // A copy of a received message is not added twice.
        let again = db
            .write(|tx| {
                add_received(
                    tx,
                    bob,
                    1,
                    &[1; 16],
                    0,
                    Some(Content::Text("x".into())),
                    None,
                )
            })
            .unwrap();
        assert!(again.is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// A damaged record is an error, never a panic.
        #[test]
        fn decoding_damaged_records_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }
    }
}
