//! The rest of a conversation: replies, reactions, edits, deletes for everyone, read
//! receipts and disappearing messages, in 1:1 and group conversations alike.
//!
//! A reaction, an edit or a delete (an *act*) travels as content of its own, through
//! the same outbox, sent copies and group sessions as a text, and is kept in the
//! history under its conversation's act key (never shown as a message); taking it,
//! on the sending device as on every receiving one, changes the message it names.
//! A read receipt is a job (sent once the messages were shown), and a conversation's
//! timer is a setting every message carries, so each device removes it on its own.

use std::collections::BTreeMap;

use super::{Event, Job, Messenger, MessengerError, Outcome, e2e, encode, history, now_ms};
use crate::client::content::{Content, MAX_EMOJI_BYTES, MAX_READ_IDS};
use crate::client::db::{DbError, Table, Tx};
use crate::client::history::Entry;
use crate::phone::Number;
use crate::proto::MessageId;

/// The timers people can choose (seconds): off, 1 day, 7 days, 90 days.
pub const TIMERS: [u32; 4] = [0, 86_400, 7 * 86_400, 90 * 86_400];

/// A conversation: with one person, or a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conversation {
    With(Number),
    Group(u64),
}

impl Conversation {
    /// Its `peer` in the history.
    pub fn peer(&self) -> String {
        match self {
            Conversation::With(n) => n.to_string(),
            Conversation::Group(g) => history::group_peer(*g),
        }
    }

    /// The conversation a history entry belongs to.
    pub fn of(entry: &Entry) -> Result<Conversation, MessengerError> {
        match &entry.group {
            Some(g) => Ok(Conversation::Group(g.group_id)),
            None => Number::parse_e164(&entry.peer)
                .map(Conversation::With)
                .map_err(|e| MessengerError::History(e.to_string())),
        }
    }
}

fn timer_key(tx: &Tx<'_>, peer: &str) -> Vec<u8> {
    tx.hash(b"timer", &[peer.as_bytes()]).to_vec()
}

/// The disappearing-message timer of conversation `peer` (seconds; 0: off).
pub fn timer(tx: &Tx<'_>, peer: &str) -> Result<u32, DbError> {
    Ok(tx
        .get(Table::Peer, &timer_key(tx, peer))?
        .and_then(|v| v.get(..4).and_then(|b| b.try_into().ok()))
        .map_or(0, u32::from_be_bytes))
}

fn set_timer(tx: &Tx<'_>, peer: &str, secs: u32) -> Result<(), DbError> {
    tx.put(Table::Peer, &timer_key(tx, peer), &secs.to_be_bytes())
}

/// The timer a new message `content` to `peer` goes under: the conversation's (a
/// timer change itself stays).
pub(super) fn timer_for(tx: &Tx<'_>, peer: &str, content: &Content) -> Result<u32, DbError> {
    match content {
        Content::Timer { .. } => Ok(0),
        _ => timer(tx, peer),
    }
}

/// Refuses content no person sends, and texts and reactions over their limits.
pub(super) fn check_content(content: &Content) -> Result<(), MessengerError> {
    if let Some(text) = content.text()
        && text.len() > super::MAX_TEXT_BYTES
    {
        return Err(MessengerError::TooLarge {
            len: text.len(),
            max: super::MAX_TEXT_BYTES,
        });
    }
    match content {
        Content::Reaction { emoji, .. } if emoji.len() > MAX_EMOJI_BYTES => {
            Err(MessengerError::Refused(format!(
                "a reaction is one emoji (at most {MAX_EMOJI_BYTES} bytes)"
            )))
        }
        Content::Reaction { emoji, .. } if emoji.chars().any(|c| c.is_ascii_alphabetic()) => Err(
            MessengerError::Refused("a reaction is an emoji, not text".into()),
        ),
        Content::Timer { secs } if !TIMERS.contains(secs) => Err(MessengerError::Refused(
            "disappearing messages are off, 1 day, 7 days or 90 days".into(),
        )),
        Content::Deleted | Content::Unsupported { .. } => Err(MessengerError::Refused(
            "that is not something a message can carry".into(),
        )),
        _ => Ok(()),
    }
}

/// This device sent `content` to `peer` at `at_ms` (in the transaction that recorded
/// it): an act changes its message here too, a timer change sets the timer.
pub(super) fn sent(
    tx: &Tx<'_>,
    peer: &str,
    me: &str,
    content: &Content,
    at_ms: u64,
) -> Result<(), DbError> {
    match content {
        Content::Timer { secs } => set_timer(tx, peer, *secs),
        c if c.act_on().is_some() => history::apply_act(tx, peer, me, me, c, at_ms).map(|_| ()),
        _ => Ok(()),
    }
}

/// Message `e` went into the history (received, or a copy from another device of
/// this account), sent under a timer of `secs`: it gets its expiry, an act changes the
/// message it names, a timer change sets the conversation's timer, and what there is
/// to show becomes an event.
pub(super) fn took(
    tx: &Tx<'_>,
    me: &str,
    e: Entry,
    secs: u32,
    out: &mut Outcome,
) -> Result<(), MessengerError> {
    history::set_expiry(tx, e.seq, secs, e.at_ms)?;
    let actor = history::author(&e, me).to_string();
    match &e.content {
        Some(act) if act.act_on().is_some() => {
            if let Some(entry) = history::apply_act(tx, &e.peer, &actor, me, act, e.at_ms)? {
                out.events.push(Event::Changed {
                    by: actor,
                    act: act.clone(),
                    entry,
                });
            }
        }
        Some(Content::Timer { secs }) => {
            set_timer(tx, &e.peer, *secs)?;
            out.events.push(Event::Message(e));
        }
        _ => out.events.push(Event::Message(e)),
    }
    Ok(())
}

/// A conversation as a list of them shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationSummary {
    pub conversation: Conversation,
    /// Its newest message.
    pub last: Entry,
    /// Messages from others since the user last read it.
    pub unread: usize,
}

fn read_key(tx: &Tx<'_>, peer: &str) -> Vec<u8> {
    tx.hash(b"read-upto", &[peer.as_bytes()]).to_vec()
}

fn read_upto(tx: &Tx<'_>, peer: &str) -> i64 {
    tx.get(Table::Peer, &read_key(tx, peer))
        .ok()
        .flatten()
        .and_then(|v| v.get(..8).and_then(|b| b.try_into().ok()))
        .map_or(0, i64::from_be_bytes)
}

impl Messenger {
    /// Every conversation, newest first, with its newest message and unread count
    /// (read from the index: the cost grows with the conversations, not the
    /// history).
    pub async fn conversations(&self) -> Result<Vec<ConversationSummary>, MessengerError> {
        self.inner
            .db
            .read_async(move |tx| {
                let mut out = Vec::new();
                for (last, unread) in history::conversations(tx, |p| read_upto(tx, p))? {
                    if let Ok(conversation) = Conversation::of(&last) {
                        out.push(ConversationSummary {
                            conversation,
                            last,
                            unread,
                        });
                    }
                }
                Ok::<_, MessengerError>(out)
            })
            .await
    }

    /// The user has read `conversation` up to local position `seq`.
    pub async fn mark_conversation_read(
        &self,
        conversation: &Conversation,
        seq: i64,
    ) -> Result<(), MessengerError> {
        let peer = conversation.peer();
        self.inner
            .db
            .write_async(move |tx| {
                if read_upto(tx, &peer) < seq {
                    tx.put(Table::Peer, &read_key(tx, &peer), &seq.to_be_bytes())?;
                }
                Ok::<_, MessengerError>(())
            })
            .await
    }

    /// The last `limit` messages of `conversation`, oldest first.
    pub async fn page(
        &self,
        conversation: &Conversation,
        limit: usize,
    ) -> Result<Vec<Entry>, MessengerError> {
        let peer = conversation.peer();
        self.inner
            .db
            .read_async(move |tx| Ok::<_, MessengerError>(history::page(tx, &peer, None, limit)?))
            .await
    }

    /// Sends `content` to `conversation`; the message's id once the node holds it.
    pub async fn send_to(
        &self,
        conversation: &Conversation,
        content: Content,
    ) -> Result<MessageId, MessengerError> {
        match conversation {
            Conversation::With(n) => self.send_content(n, content).await.map(|s| s.id),
            Conversation::Group(g) => self.send_group_content(*g, content).await.map(|s| s.id),
        }
    }

    /// Refuses an act on a message that is not in conversation `peer`, or that its
    /// sender may not do (an edit of someone else's message, or too late), with why.
    pub(super) async fn check_act(
        &self,
        peer: &str,
        content: &Content,
    ) -> Result<(), MessengerError> {
        // A reply quotes a message of its own conversation, as an act names one.
        let to = match content {
            Content::Reply { to, .. } => *to,
            c => match c.act_on() {
                Some(to) => *to,
                None => return Ok(()),
            },
        };
        let (peer, act) = (peer.to_string(), content.clone());
        let me = self.inner.me.number.to_string();
        self.inner
            .db
            .read_async(move |tx| {
                let Some(target) = history::find(tx, &peer, &to)? else {
                    return Err(MessengerError::Refused(format!(
                        "there is no message {} in this conversation",
                        hex::encode(to)
                    )));
                };
                if act.act_on().is_none() {
                    return Ok(());
                }
                match history::act_refusal(&target, &me, &me, &act, now_ms()) {
                    Some(why) => Err(MessengerError::Refused(why)),
                    None => Ok(()),
                }
            })
            .await
    }

    /// The message whose id (in hex) is `id`, or starts with it (at least 4 hex
    /// digits, among the last 5,000 messages); an error names what is wrong.
    pub async fn find_message(&self, id: &str) -> Result<Entry, MessengerError> {
        let id = id.trim().to_ascii_lowercase();
        if id.len() < 4 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(MessengerError::Refused(format!(
                "{id:?} is not a message id (hex digits, as `history` shows them; at least 4)"
            )));
        }
        self.inner
            .db
            .read_async(move |tx| {
                if let Ok(bytes) = hex::decode(&id)
                    && let Ok(full) = <MessageId>::try_from(bytes.as_slice())
                    && let Some(e) = history::by_id(tx, &full)?
                {
                    return Ok(e);
                }
                let mut found = history::by_id_prefix(tx, &id, 5_000)?;
                match found.len() {
                    0 => Err(MessengerError::Refused(format!("no message has id {id}"))),
                    1 => Ok(found.remove(0)),
                    n => Err(MessengerError::Refused(format!(
                        "{n} messages have ids starting with {id}; give more of it"
                    ))),
                }
            })
            .await
    }

    /// Sets the disappearing-message timer of `conversation` to `secs` (one of
    /// [`TIMERS`]): every message sent from now on disappears from every device that
    /// long after it was sent, and the node drops its copies as soon. In a group only
    /// an admin may.
    pub async fn set_timer(
        &self,
        conversation: &Conversation,
        secs: u32,
    ) -> Result<MessageId, MessengerError> {
        if let Conversation::Group(g) = conversation {
            let (info, _) = self.group_info(*g).await?;
            let me = self.inner.me.number.as_str();
            if !info.members.iter().any(|m| m.number == me && m.admin) {
                return Err(MessengerError::Refused(
                    "only the group's admins set its disappearing messages".into(),
                ));
            }
        }
        self.send_to(conversation, Content::Timer { secs }).await
    }

    /// The disappearing-message timer of `conversation` (seconds; 0: off).
    pub async fn timer(&self, conversation: &Conversation) -> Result<u32, MessengerError> {
        let peer = conversation.peer();
        self.inner
            .db
            .read_async(move |tx| Ok::<_, MessengerError>(timer(tx, &peer)?))
            .await
    }

    /// Removes from the history the messages whose timer ran out; how many.
    pub async fn sweep_expired(&self) -> Result<usize, MessengerError> {
        self.inner
            .db
            .write_async(|tx| Ok::<_, MessengerError>(history::sweep_expired(tx, now_ms())?))
            .await
    }

    /// The user was shown `entries`: read receipts go to their authors (as jobs, so a
    /// lost connection loses none), unless read receipts are off in the settings.
    /// Returns how many receipts were queued.
    pub async fn mark_read(&self, entries: &[Entry]) -> Result<usize, MessengerError> {
        if !self.inner.settings.read_receipts {
            return Ok(0);
        }
        let me = self.inner.me.number.to_string();
        let mut by: BTreeMap<(String, Option<u64>), Vec<MessageId>> = BTreeMap::new();
        for e in entries {
            let author = history::author(e, &me);
            if e.outgoing || author == me || e.content.as_ref().is_none_or(|c| c.act_on().is_some())
            {
                continue;
            }
            by.entry((author.to_string(), e.group.as_ref().map(|g| g.group_id)))
                .or_default()
                .push(e.id);
        }
        if by.is_empty() {
            return Ok(0);
        }
        let queued = self
            .inner
            .db
            .write_async(move |tx| {
                let mut n = 0;
                for ((to, group_id), ids) in by {
                    for chunk in ids.chunks(MAX_READ_IDS) {
                        let job = Job::Read {
                            to: to.clone(),
                            group_id,
                            ids: chunk.to_vec(),
                            node_id: e2e::new_message_id(),
                        };
                        tx.add_job(now_ms(), &encode(&job))?;
                        n += 1;
                    }
                }
                Ok::<_, MessengerError>(n)
            })
            .await?;
        if let Ok(client) = self.client().await {
            let events = self.run_jobs(&client).await;
            self.stash(events);
        }
        Ok(queued)
    }
}
