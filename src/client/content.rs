//! What travels inside the end-to-end encryption: a versioned, extensible format.
//!
//! Olm plaintext (client to client; the node never sees it):
//! - `0x02` (the format) · bincode [`Wire`]: the message's own id (which stays the
//!   same when the message is sent again, under a new node id), when the author
//!   wrote it, the node id of the envelope it answers a retry request for, the
//!   disappearing-message timer it was sent under (seconds, 0 for none), and the
//!   content as a kind number and that kind's bincode body.
//! - `0x01` · the same without the timer (clients before disappearing messages).
//! - `0x00` · bincode of a text (the format of clients before it): read as
//!   [`Content::Text`] with the envelope's node id as its id.
//!
//! A kind this build does not know becomes [`Content::Unsupported`]: shown as
//! "unsupported message", never an error and never dropped. Kinds are never
//! renumbered; a body may grow fields at its end only in a new kind.

use bincode::{Decode, Encode};

use crate::proto::MessageId;

const FORMAT: u8 = 2;
const FORMAT_1: u8 = 1;
const LEGACY_FORMAT: u8 = 0;
/// The largest plaintext decoded (an envelope is at most half a frame anyway).
const MAX_PLAINTEXT: usize = 1 << 20;

/// Kind numbers, as on the wire.
mod kind {
    pub const TEXT: u16 = 1;
    pub const RETRY_REQUEST: u16 = 2;
    pub const RETRY_UNAVAILABLE: u16 = 3;
    pub const SENT_COPY: u16 = 4;
    pub const HISTORY_SYNC: u16 = 5;
    pub const GROUP_KEY: u16 = 6;
    pub const GROUP_REMOVED: u16 = 7;
    pub const SENDER_KEY: u16 = 8;
    pub const PROFILE_KEY: u16 = 9;
    pub const REPLY: u16 = 10;
    pub const REACTION: u16 = 11;
    pub const EDIT: u16 = 12;
    pub const DELETE: u16 = 13;
    pub const READ: u16 = 14;
    pub const TIMER: u16 = 15;
    pub const NOTHING_TO_SHOW: u16 = 16;
    pub const ATTACHMENT: u16 = 17;
}

/// The longest emoji (a reaction) taken: a few code points with modifiers and
/// joiners.
pub const MAX_EMOJI_BYTES: usize = 64;
/// The most message ids one read receipt carries.
pub const MAX_READ_IDS: usize = 256;

/// The largest Megolm session key taken (vodozemac's are 229 bytes).
const MAX_SENDER_KEY: usize = 1024;

/// The most history entries one `HistorySync` plaintext carries.
pub const MAX_SYNC_ENTRIES: usize = 200;

/// One message of the history a primary hands a newly linked device.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Synced {
    /// The other side of the conversation (E.164).
    pub peer: String,
    /// Whether the account wrote it.
    pub outgoing: bool,
    /// The author's device.
    pub device: u32,
    pub id: MessageId,
    pub at_ms: u64,
    pub content: Content,
}

/// What a person sent: the part of a message an app shows, or something a person did
/// to another message of the conversation (an *act*: a reaction, an edit, a delete),
/// which changes that message rather than showing as one. Stored in the history as
/// bincode: variants are only ever added at the end.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Content {
    Text(String),
    /// A kind of content from a newer client that this build cannot show.
    Unsupported {
        kind: u16,
    },
    /// A text that answers message `to` of the same conversation (quoted by id).
    Reply {
        to: MessageId,
        text: String,
    },
    /// `emoji` on message `to`, one per person per message (a new one replaces the
    /// old); empty takes the reaction back.
    Reaction {
        to: MessageId,
        emoji: String,
    },
    /// The new text of message `to`, by its author within [`EDIT_WINDOW_MS`].
    Edit {
        to: MessageId,
        text: String,
    },
    /// "Delete for everyone" of message `to`, by its author within
    /// [`EDIT_WINDOW_MS`].
    Delete {
        to: MessageId,
    },
    /// The conversation's disappearing-message timer is now `secs` (0: off).
    Timer {
        secs: u32,
    },
    /// What a message deleted for everyone became (history only: never sent).
    Deleted,
    /// A file (a photo, a voice note, a document): its key and where the node holds
    /// its ciphertext (see `client::attachment`).
    Attachment(super::attachment::Attachment),
}

/// How long after sending a message its author may edit it or delete it for
/// everyone (WhatsApp's and Signal's window).
pub const EDIT_WINDOW_MS: u64 = 15 * 60 * 1000;

impl Content {
    /// The message this content acts on, for a reaction, an edit or a delete.
    pub fn act_on(&self) -> Option<&MessageId> {
        match self {
            Content::Reaction { to, .. } | Content::Edit { to, .. } | Content::Delete { to } => {
                Some(to)
            }
            _ => None,
        }
    }

    /// The text a person reads, if it has one.
    pub fn text(&self) -> Option<&str> {
        match self {
            Content::Text(t) | Content::Reply { text: t, .. } | Content::Edit { text: t, .. } => {
                Some(t)
            }
            Content::Attachment(a) => Some(&a.caption),
            _ => None,
        }
    }
}

/// Everything a plaintext can carry: content for people, or a message between
/// clients that nobody sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Content(Content),
    /// "I could not decrypt your envelopes `ids` (sent by your device `device`);
    /// please send them again." Carries no plaintext of the messages.
    RetryRequest {
        device: u32,
        ids: Vec<MessageId>,
    },
    /// "I cannot send `id` again" (not kept, too old, or asked too often).
    RetryUnavailable {
        id: MessageId,
    },
    /// To this account's other devices: "this device sent `content` to `to`", so a
    /// conversation reads the same on every device. Accepted only from the own
    /// account.
    SentCopy {
        to: String,
        content: Content,
    },
    /// To a newly linked device of this account: part of the recent history (oldest
    /// first). Accepted only from the own account.
    HistorySync {
        entries: Vec<Synced>,
    },
    /// "You are in group `group_id`, called `name`; its key is `key`" (32 bytes): to
    /// a member added to a group, and to every member when the key changes.
    GroupKey {
        group_id: u64,
        name: String,
        key: Vec<u8>,
    },
    /// "You were removed from group `group_id`" (by the sender, an admin).
    GroupRemoved {
        group_id: u64,
    },
    /// "My messages to group `group_id` are encrypted with this Megolm session":
    /// the session key (`SessionKey::to_bytes`) of the sending device, to every other
    /// member device.
    SenderKey {
        group_id: u64,
        key: Vec<u8>,
    },
    /// "My profile key is `key`; my profile changed" (to contacts and group members):
    /// with it they can fetch and read the sender's profile.
    ProfileKey {
        key: [u8; 32],
    },
    /// Read receipt: the recipient was shown messages `ids` of the sender (in group
    /// `group_id`, or 1:1).
    Read {
        group_id: Option<u64>,
        ids: Vec<MessageId>,
    },
    /// The answer to a retry request for envelope `id` that carried nothing a person
    /// sees (a receipt, a key): forget it.
    NothingToShow {
        id: MessageId,
    },
}

#[derive(Encode, Decode)]
struct ReplyBody {
    to: MessageId,
    text: String,
}

#[derive(Encode, Decode)]
struct ReactionBody {
    to: MessageId,
    emoji: String,
}

#[derive(Encode, Decode)]
struct ReadBody {
    group_id: Option<u64>,
    ids: Vec<MessageId>,
}

#[derive(Encode, Decode)]
struct SenderKeyBody {
    group_id: u64,
    key: Vec<u8>,
}

#[derive(Encode, Decode)]
struct GroupKeyBody {
    group_id: u64,
    name: String,
    key: Vec<u8>,
}

/// One decoded plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plaintext {
    /// The message's own id: the node id it was first sent under.
    pub id: MessageId,
    /// When the author wrote it (ms since the Unix epoch, the author's clock).
    pub written_at_ms: u64,
    /// Set on a message sent again in answer to a retry request: the node id of the
    /// envelope that could not be decrypted.
    pub retry_of: Option<MessageId>,
    /// The disappearing-message timer it was sent under: every device removes it
    /// this many seconds after it was sent (0: never).
    pub expires_in_secs: u32,
    pub body: Body,
}

#[derive(Encode, Decode)]
struct Wire {
    id: MessageId,
    written_at_ms: u64,
    retry_of: Option<MessageId>,
    expires_in_secs: u32,
    kind: u16,
    body: Vec<u8>,
}

/// Format 1: [`Wire`] without the timer.
#[derive(Encode, Decode)]
struct Wire1 {
    id: MessageId,
    written_at_ms: u64,
    retry_of: Option<MessageId>,
    kind: u16,
    body: Vec<u8>,
}

#[derive(Encode, Decode)]
struct SentCopyBody {
    to: String,
    kind: u16,
    body: Vec<u8>,
}

/// A content's kind number and body, as on the wire.
fn content_parts(content: &Content) -> (u16, Vec<u8>) {
    match content {
        Content::Text(text) => (kind::TEXT, to_vec(text)),
        Content::Unsupported { kind } => (*kind, Vec::new()),
        Content::Reply { to, text } => (
            kind::REPLY,
            to_vec(&ReplyBody {
                to: *to,
                text: text.clone(),
            }),
        ),
        Content::Reaction { to, emoji } => (
            kind::REACTION,
            to_vec(&ReactionBody {
                to: *to,
                emoji: emoji.clone(),
            }),
        ),
        Content::Edit { to, text } => (
            kind::EDIT,
            to_vec(&ReplyBody {
                to: *to,
                text: text.clone(),
            }),
        ),
        Content::Delete { to } => (kind::DELETE, to_vec(to)),
        Content::Timer { secs } => (kind::TIMER, to_vec(secs)),
        // Never sent; should it be, it reads as a delete of nothing.
        Content::Deleted => (kind::DELETE, to_vec(&[0u8; 16])),
        Content::Attachment(a) => (kind::ATTACHMENT, to_vec(a)),
    }
}

#[derive(Encode, Decode)]
struct RetryRequestBody {
    device: u32,
    ids: Vec<MessageId>,
}

/// The most envelope ids one retry request carries.
pub const MAX_RETRY_IDS: usize = 256;

/// The old format: bincode of `enum { Text(String) }`.
#[derive(Encode, Decode)]
enum LegacyContent {
    Text(String),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_PLAINTEXT>()
}

fn to_vec<T: Encode>(value: &T) -> Vec<u8> {
    bincode::encode_to_vec(value, config())
        .unwrap_or_else(|e| unreachable!("encoding to a Vec cannot fail: {e}"))
}

impl Plaintext {
    /// A new message's plaintext.
    pub fn new(id: MessageId, written_at_ms: u64, body: Body) -> Plaintext {
        Plaintext {
            id,
            written_at_ms,
            retry_of: None,
            expires_in_secs: 0,
            body,
        }
    }

    /// This plaintext under a disappearing-message timer of `secs` (0: none).
    pub fn expiring(mut self, secs: u32) -> Plaintext {
        self.expires_in_secs = secs;
        self
    }

    /// The bytes to encrypt.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, body) = match &self.body {
            Body::Content(content) => content_parts(content),
            Body::SentCopy { to, content } => {
                let (kind, body) = content_parts(content);
                (
                    kind::SENT_COPY,
                    to_vec(&SentCopyBody {
                        to: to.clone(),
                        kind,
                        body,
                    }),
                )
            }
            Body::RetryRequest { device, ids } => (
                kind::RETRY_REQUEST,
                to_vec(&RetryRequestBody {
                    device: *device,
                    ids: ids.clone(),
                }),
            ),
            Body::RetryUnavailable { id } => (kind::RETRY_UNAVAILABLE, to_vec(id)),
            Body::HistorySync { entries } => (kind::HISTORY_SYNC, to_vec(entries)),
            Body::GroupRemoved { group_id } => (kind::GROUP_REMOVED, to_vec(group_id)),
            Body::SenderKey { group_id, key } => (
                kind::SENDER_KEY,
                to_vec(&SenderKeyBody {
                    group_id: *group_id,
                    key: key.clone(),
                }),
            ),
            Body::ProfileKey { key } => (kind::PROFILE_KEY, to_vec(key)),
            Body::NothingToShow { id } => (kind::NOTHING_TO_SHOW, to_vec(id)),
            Body::Read { group_id, ids } => (
                kind::READ,
                to_vec(&ReadBody {
                    group_id: *group_id,
                    ids: ids.clone(),
                }),
            ),
            Body::GroupKey {
                group_id,
                name,
                key,
            } => (
                kind::GROUP_KEY,
                to_vec(&GroupKeyBody {
                    group_id: *group_id,
                    name: name.clone(),
                    key: key.clone(),
                }),
            ),
        };
        let mut out = vec![FORMAT];
        out.extend(to_vec(&Wire {
            id: self.id,
            written_at_ms: self.written_at_ms,
            retry_of: self.retry_of,
            expires_in_secs: self.expires_in_secs,
            kind,
            body,
        }));
        out
    }

    /// Decodes a decrypted plaintext. `node_id` and `queued_at_ms` stand in for the id
    /// and time that the old format did not carry.
    pub fn decode(
        bytes: &[u8],
        node_id: MessageId,
        queued_at_ms: u64,
    ) -> Result<Plaintext, String> {
        let (&format, rest) = bytes.split_first().ok_or("an empty plaintext")?;
        match format {
            FORMAT | FORMAT_1 => {
                let wire = if format == FORMAT {
                    whole::<Wire>(rest)?
                } else {
                    let w = whole::<Wire1>(rest)?;
                    Wire {
                        id: w.id,
                        written_at_ms: w.written_at_ms,
                        retry_of: w.retry_of,
                        expires_in_secs: 0,
                        kind: w.kind,
                        body: w.body,
                    }
                };
                let body = decode_body(wire.kind, &wire.body)?;
                Ok(Plaintext {
                    id: wire.id,
                    written_at_ms: wire.written_at_ms,
                    retry_of: wire.retry_of,
                    expires_in_secs: wire.expires_in_secs,
                    body,
                })
            }
            LEGACY_FORMAT => {
                let (LegacyContent::Text(text), _) = bincode::decode_from_slice(bytes, config())
                    .map_err(|e| format!("an unreadable plaintext: {e}"))?;
                Ok(Plaintext::new(
                    node_id,
                    queued_at_ms,
                    Body::Content(Content::Text(text)),
                ))
            }
            // A later format: nothing of it can be read but that it is a message.
            _ => Ok(Plaintext::new(
                node_id,
                queued_at_ms,
                Body::Content(Content::Unsupported { kind: 0 }),
            )),
        }
    }
}

/// A whole plaintext of one wire format: nothing may follow it.
fn whole<T: Decode<()>>(rest: &[u8]) -> Result<T, String> {
    let (wire, used): (T, usize) = bincode::decode_from_slice(rest, config())
        .map_err(|e| format!("an unreadable plaintext: {e}"))?;
    if used != rest.len() {
        return Err("trailing bytes after the plaintext".into());
    }
    Ok(wire)
}

fn decode_body(kind: u16, body: &[u8]) -> Result<Body, String> {
    fn whole<T: Decode<()>>(body: &[u8]) -> Result<T, String> {
        let (value, used) = bincode::decode_from_slice(body, config())
            .map_err(|e| format!("an unreadable message body: {e}"))?;
        if used != body.len() {
            return Err("trailing bytes after the message body".into());
        }
        Ok(value)
    }
    Ok(match kind {
        kind::TEXT => Body::Content(Content::Text(whole(body)?)),
        kind::RETRY_REQUEST => {
            let r: RetryRequestBody = whole(body)?;
            if r.ids.len() > MAX_RETRY_IDS {
                return Err(format!("a retry request for {} envelopes", r.ids.len()));
            }
            Body::RetryRequest {
                device: r.device,
                ids: r.ids,
            }
        }
        kind::RETRY_UNAVAILABLE => Body::RetryUnavailable { id: whole(body)? },
        kind::GROUP_REMOVED => Body::GroupRemoved {
            group_id: whole(body)?,
        },
        kind::GROUP_KEY => {
            let g: GroupKeyBody = whole(body)?;
            if g.key.len() != 32 {
                return Err(format!("a group key of {} bytes", g.key.len()));
            }
            Body::GroupKey {
                group_id: g.group_id,
                name: g.name,
                key: g.key,
            }
        }
        kind::SENDER_KEY => {
            let k: SenderKeyBody = whole(body)?;
            if k.key.len() > MAX_SENDER_KEY {
                return Err(format!("a sender key of {} bytes", k.key.len()));
            }
            Body::SenderKey {
                group_id: k.group_id,
                key: k.key,
            }
        }
        kind::HISTORY_SYNC => {
            let entries: Vec<Synced> = whole(body)?;
            if entries.len() > MAX_SYNC_ENTRIES {
                return Err(format!("a history sync of {} entries", entries.len()));
            }
            Body::HistorySync { entries }
        }
        kind::SENT_COPY => {
            let copy: SentCopyBody = whole(body)?;
            let content = match decode_body(copy.kind, &copy.body)? {
                Body::Content(content) => content,
                _ => return Err("a sent copy of something that is not content".into()),
            };
            Body::SentCopy {
                to: copy.to,
                content,
            }
        }
        kind::PROFILE_KEY => Body::ProfileKey { key: whole(body)? },
        kind::NOTHING_TO_SHOW => Body::NothingToShow { id: whole(body)? },
        kind::READ => {
            let r: ReadBody = whole(body)?;
            if r.ids.len() > MAX_READ_IDS {
                return Err(format!("a read receipt for {} messages", r.ids.len()));
            }
            Body::Read {
                group_id: r.group_id,
                ids: r.ids,
            }
        }
        kind::REPLY => {
            let r: ReplyBody = whole(body)?;
            Body::Content(Content::Reply {
                to: r.to,
                text: r.text,
            })
        }
        kind::EDIT => {
            let r: ReplyBody = whole(body)?;
            Body::Content(Content::Edit {
                to: r.to,
                text: r.text,
            })
        }
        kind::REACTION => {
            let r: ReactionBody = whole(body)?;
            if r.emoji.len() > MAX_EMOJI_BYTES {
                return Err(format!("a reaction of {} bytes", r.emoji.len()));
            }
            Body::Content(Content::Reaction {
                to: r.to,
                emoji: r.emoji,
            })
        }
        kind::DELETE => Body::Content(Content::Delete { to: whole(body)? }),
        kind::TIMER => Body::Content(Content::Timer { secs: whole(body)? }),
        kind::ATTACHMENT => {
            let a: super::attachment::Attachment = whole(body)?;
            a.check()?;
            Body::Content(Content::Attachment(a))
        }
        other => Body::Content(Content::Unsupported { kind: other }),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn check(p: Plaintext) {
        assert_eq!(Plaintext::decode(&p.encode(), [0; 16], 0), Ok(p));
    }

    /// The new kinds byte for byte, as PROTOCOL.md has them (and as the fuzz seeds).
    #[test]
    fn the_device_and_group_kinds_as_bytes() {
        let wire = |kind: u8, body: &[u8]| {
            let mut out = vec![1];
            out.extend([7; 16]);
            out.extend([5, 0, kind, body.len() as u8]);
            out.extend_from_slice(body);
            out
        };
        let body = |bytes: Vec<u8>| Plaintext::decode(&bytes, [0; 16], 0).map(|p| p.body);
        assert_eq!(body(wire(7, &[9])), Ok(Body::GroupRemoved { group_id: 9 }));
        let mut key = vec![9, 6];
        key.extend_from_slice(b"Family");
        key.push(32);
        key.extend([3; 32]);
        assert_eq!(
            body(wire(6, &key)),
            Ok(Body::GroupKey {
                group_id: 9,
                name: "Family".into(),
                key: vec![3; 32]
            })
        );
        let mut copy = vec![12];
        copy.extend_from_slice(b"+14155550101");
        copy.extend([1, 3, 2]);
        copy.extend_from_slice(b"hi");
        assert_eq!(
            body(wire(4, &copy)),
            Ok(Body::SentCopy {
                to: "+14155550101".into(),
                content: Content::Text("hi".into())
            })
        );
        let mut sync = vec![1, 12];
        sync.extend_from_slice(b"+14155550101");
        sync.extend([0, 2]);
        sync.extend([4; 16]);
        sync.extend([5, 0, 2]);
        sync.extend_from_slice(b"ok");
        assert_eq!(
            body(wire(5, &sync)),
            Ok(Body::HistorySync {
                entries: vec![Synced {
                    peer: "+14155550101".into(),
                    outgoing: false,
                    device: 2,
                    id: [4; 16],
                    at_ms: 5,
                    content: Content::Text("ok".into())
                }]
            })
        );
        assert_eq!(
            body(wire(8, &[9, 2, 0xaa, 0xbb])),
            Ok(Body::SenderKey {
                group_id: 9,
                key: vec![0xaa, 0xbb]
            })
        );
        // A group key of the wrong size is refused, not taken.
        let mut short = vec![9, 0, 3];
        short.extend([1, 2, 3]);
        assert!(body(wire(6, &short)).is_err());
    }

    /// The kinds of the rest of a conversation, byte for byte (format 2, as PROTOCOL.md
    /// and the fuzz seeds have them).
    #[test]
    fn the_conversation_kinds_as_bytes() {
        let wire = |expires: &[u8], kind: u8, body: &[u8]| {
            let mut out = vec![2];
            out.extend([7; 16]);
            out.extend([5, 0]);
            out.extend_from_slice(expires);
            out.extend([kind, body.len() as u8]);
            out.extend_from_slice(body);
            out
        };
        let decode = |bytes: Vec<u8>| Plaintext::decode(&bytes, [0; 16], 0).unwrap();
        let to = [4u8; 16];
        let mut reply = to.to_vec();
        reply.extend([2, b'o', b'k']);
        let p = decode(wire(&[0xfc, 0x80, 0x51, 0x01, 0x00], 10, &reply));
        assert_eq!(p.expires_in_secs, 86_400);
        assert_eq!(
            p.body,
            Body::Content(Content::Reply {
                to,
                text: "ok".into()
            })
        );
        let mut reaction = to.to_vec();
        reaction.push(4);
        reaction.extend("👍".as_bytes());
        assert_eq!(
            decode(wire(&[0], 11, &reaction)).body,
            Body::Content(Content::Reaction {
                to,
                emoji: "👍".into()
            })
        );
        assert_eq!(
            decode(wire(&[0], 13, &to)).body,
            Body::Content(Content::Delete { to })
        );
        let mut read = vec![1, 9, 1];
        read.extend(to);
        assert_eq!(
            decode(wire(&[0], 14, &read)).body,
            Body::Read {
                group_id: Some(9),
                ids: vec![to]
            }
        );
        assert_eq!(
            decode(wire(&[0], 15, &[0xfc, 0x80, 0x3a, 0x09, 0x00])).body,
            Body::Content(Content::Timer { secs: 604_800 })
        );
        assert_eq!(
            decode(wire(&[0], 9, &[3; 32])).body,
            Body::ProfileKey { key: [3; 32] }
        );
        // A reaction that is a whole text is refused; so is a body with bytes after it.
        let mut long = to.to_vec();
        long.push(100);
        long.extend([b'x'; 100]);
        assert!(Plaintext::decode(&wire(&[0], 11, &long), [0; 16], 0).is_err());
        let mut trailing = to.to_vec();
        trailing.push(0);
        assert!(Plaintext::decode(&wire(&[0], 13, &trailing), [0; 16], 0).is_err());
    }

    #[test]
    fn every_body_round_trips() {
        let mut p = Plaintext::new(
            [7; 16],
            1_700_000_000_000,
            Body::Content(Content::Text("hi".into())),
        );
        check(p.clone());
        p.retry_of = Some([9; 16]);
        check(p.clone());
        p.body = Body::SentCopy {
            to: "+14155550101".into(),
            content: Content::Text("to bob".into()),
        };
        check(p.clone());
        p.body = Body::HistorySync {
            entries: vec![Synced {
                peer: "+14155550101".into(),
                outgoing: false,
                device: 2,
                id: [3; 16],
                at_ms: 5,
                content: Content::Text("old".into()),
            }],
        };
        check(p.clone());
        p.body = Body::GroupRemoved { group_id: 9 };
        check(p.clone());
        p.body = Body::SenderKey {
            group_id: 9,
            key: vec![1; 229],
        };
        check(p.clone());
        p.body = Body::GroupKey {
            group_id: 9,
            name: "Family".into(),
            key: vec![7; 32],
        };
        check(p.clone());
        p.body = Body::RetryRequest {
            device: 3,
            ids: vec![[1; 16], [2; 16]],
        };
        check(p.clone());
        p.body = Body::RetryUnavailable { id: [2; 16] };
        check(p.clone());
        p.body = Body::NothingToShow { id: [2; 16] };
        check(p.clone());
        p.body = Body::ProfileKey { key: [8; 32] };
        check(p.clone());
        p.body = Body::Read {
            group_id: None,
            ids: vec![[1; 16]],
        };
        check(p.clone());
        p = p.expiring(604_800);
        for content in [
            Content::Reply {
                to: [1; 16],
                text: "yes".into(),
            },
            Content::Reaction {
                to: [1; 16],
                emoji: "❤️".into(),
            },
            Content::Edit {
                to: [1; 16],
                text: "fixed".into(),
            },
            Content::Delete { to: [1; 16] },
            Content::Timer { secs: 86_400 },
        ] {
            p.body = Body::Content(content);
            check(p.clone());
        }
    }

    #[test]
    fn an_unknown_kind_is_unsupported_not_an_error() {
        let wire = Wire {
            id: [5; 16],
            written_at_ms: 1,
            retry_of: None,
            expires_in_secs: 0,
            kind: 4242,
            body: vec![1, 2, 3],
        };
        let mut bytes = vec![FORMAT];
        bytes.extend(to_vec(&wire));
        let p = Plaintext::decode(&bytes, [0; 16], 0).unwrap();
        assert_eq!(p.id, [5; 16]);
        assert_eq!(p.body, Body::Content(Content::Unsupported { kind: 4242 }));
        // A whole later format too.
        let p = Plaintext::decode(&[7, 1, 2], [3; 16], 9).unwrap();
        assert_eq!(p.body, Body::Content(Content::Unsupported { kind: 0 }));
        assert_eq!((p.id, p.written_at_ms), ([3; 16], 9));
    }

    #[test]
    fn the_old_format_reads_as_text() {
        let old = to_vec(&LegacyContent::Text("from an old client".into()));
        assert_eq!(old[0], LEGACY_FORMAT);
        let p = Plaintext::decode(&old, [4; 16], 77).unwrap();
        assert_eq!(
            p.body,
            Body::Content(Content::Text("from an old client".into()))
        );
        assert_eq!((p.id, p.written_at_ms), ([4; 16], 77));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Whatever a (malicious) peer encrypts, decoding it errs or succeeds; it never
        /// panics nor allocates without bound.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Plaintext::decode(&bytes, [0; 16], 0);
        }

        #[test]
        fn texts_round_trip(text in ".{0,200}", id in any::<[u8; 16]>(), at in any::<u64>()) {
            let p = Plaintext::new(id, at, Body::Content(Content::Text(text)));
            prop_assert_eq!(Plaintext::decode(&p.encode(), [0; 16], 0), Ok(p));
        }
    }
}
