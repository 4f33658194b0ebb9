//! Sending to a group: one Megolm encryption and one upload per message, the sender
//! key shared with the member devices that lack it first (a new one when a device that
//! had it is gone), as the node's `GroupDevicesChanged` names them.

use bincode::{Decode, Encode};

use super::super::senderkeys;
use super::{
    CONTROL, Client, ClientError, Event, Messenger, MessengerError, acts, decode, encode, now_ms,
    put_sent_id,
};
use crate::client::content::{Body, Content, Plaintext};
use crate::client::db::{DbError, Table};
use crate::client::{e2e, groups, history};
use crate::phone::Number;
use crate::proto::{ErrorKind, MemberDevices, MessageId};

/// A group message the node accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSent {
    pub id: MessageId,
    pub accepted_at_ms: u64,
    /// The devices it was queued for.
    pub recipients: u32,
}

/// An outbox entry of a group message: its content is in the history row.
#[derive(Encode, Decode)]
struct GroupOutgoing {
    group_id: u64,
}

/// The outbox key of group message `seq`: its seq and a `g`, so that the outbox
/// holds both kinds in order and tells them apart.
pub(super) fn outbox_key(seq: i64) -> [u8; 9] {
    let mut key = [b'g'; 9];
    key[..8].copy_from_slice(&seq.to_be_bytes());
    key
}

impl Messenger {
    /// Sends a text to group `group_id`; returns once the node holds it.
    pub async fn send_group_text(
        &self,
        group_id: u64,
        text: &str,
    ) -> Result<GroupSent, MessengerError> {
        self.send_group_content(group_id, Content::Text(text.to_string()))
            .await
    }

    /// Sends `content` to group `group_id` (encrypted once, uploaded once); returns
    /// once the node holds it. Kept in the outbox when the node cannot take it now,
    /// as a message to one person is.
    pub async fn send_group_content(
        &self,
        group_id: u64,
        content: Content,
    ) -> Result<GroupSent, MessengerError> {
        acts::check_content(&content)?;
        self.check_act(&history::group_peer(group_id), &content)
            .await?;
        let known = self
            .inner
            .db
            .read_async(move |tx| groups::known(tx, group_id))
            .await?;
        if known.is_none() {
            return Err(MessengerError::Refused(format!(
                "this device is not in group {group_id} (or was not told its key yet)"
            )));
        }
        let client = self.client().await?;
        let id = e2e::new_message_id();
        let written = now_ms();
        let author = self.inner.me.number.to_string();
        let device = self.inner.me.device_id;
        let seq = self
            .inner
            .db
            .write_async(move |tx| {
                let seq =
                    history::add_sent_group(tx, group_id, &author, device, &id, written, &content)?;
                put_sent_id(tx, &id, seq)?;
                let peer = history::group_peer(group_id);
                let secs = acts::timer_for(tx, &peer, &content)?;
                history::set_expiry(tx, seq, secs, written)?;
                acts::sent(tx, &peer, &author, &content, written)?;
                tx.put(
                    Table::Outbox,
                    &outbox_key(seq),
                    &encode(&GroupOutgoing { group_id }),
                )?;
                Ok::<_, DbError>(seq)
            })
            .await?;
        let pushed = self.push_group_outbox(&client, seq).await;
        if matches!(&pushed, Err(e) if e.is_connection()) {
            self.drop_client(&client).await;
        }
        if pushed.is_ok()
            && let Err(e) = self.share_profile_with_group(&client, group_id).await
        {
            self.stash(vec![Event::Warning(format!(
                "the group's members were not given this account's profile key yet: {e}"
            ))]);
        }
        pushed
    }

    /// Sends group outbox entry `seq` until the node accepts or refuses it.
    pub(super) async fn push_group_outbox(
        &self,
        client: &Client,
        seq: i64,
    ) -> Result<GroupSent, MessengerError> {
        let mut id = [0u8; 16];
        for attempt in 0..4 {
            let db = self.inner.db.clone();
            let prepared = db
                .write_async(move |tx| {
                    let Some(row) = tx.get(Table::Outbox, &outbox_key(seq))? else {
                        return Ok(None);
                    };
                    let GroupOutgoing { group_id } = decode(&row, "a group outbox entry")?;
                    let (entry, plaintext) = super::outbox_plaintext(tx, seq)?;
                    let (body, digest) = senderkeys::encrypt(tx, group_id, &plaintext, now_ms())?;
                    let secs = entry.expires_in_secs;
                    Ok::<_, MessengerError>(Some((group_id, entry.id, body, digest, secs)))
                })
                .await?;
            let Some((group_id, message_id, body, digest, secs)) = prepared else {
                return self.group_settled_elsewhere(seq).await;
            };
            id = message_id;
            match client
                .send_group_expiring(group_id, id, body, digest, secs)
                .await
            {
                Ok((at, of)) => {
                    self.inner
                        .db
                        .write_async(move |tx| {
                            history::mark_sent(tx, seq, at, &[])?;
                            history::mark_group_queued(tx, seq, of)?;
                            tx.delete(Table::Outbox, &outbox_key(seq))?;
                            Ok::<_, DbError>(())
                        })
                        .await?;
                    return Ok(GroupSent {
                        id,
                        accepted_at_ms: at,
                        recipients: of,
                    });
                }
                Err(ClientError::Node(e)) => {
                    // The devices changed again while this device shared its key: it
                    // shares once more, and after a few rounds leaves the message in
                    // the outbox for the next connection (never marks it failed).
                    if let ErrorKind::GroupDevicesChanged { members } = e.kind {
                        if attempt < 3 {
                            self.share_sender_key(client, group_id, &members).await?;
                        }
                        continue;
                    }
                    let e = ClientError::Node(e);
                    return Err(self.refused(seq, outbox_key(seq).to_vec(), id, e).await);
                }
                Err(e) => return Err(self.refused(seq, outbox_key(seq).to_vec(), id, e).await),
            }
        }
        Err(MessengerError::NotSentYet {
            id,
            reason: "the group's devices kept changing while sending".into(),
        })
    }

    /// What became of group outbox entry `seq`, which another process settled.
    async fn group_settled_elsewhere(&self, seq: i64) -> Result<GroupSent, MessengerError> {
        let entry = self.settled_entry(seq).await?;
        Ok(GroupSent {
            id: entry.id,
            accepted_at_ms: entry.at_ms,
            recipients: entry.group.map_or(0, |g| g.of),
        })
    }

    /// Makes this device's sender key of group `group_id` fit `members` (the node's
    /// list of the devices a message goes to): a new session if a device that had
    /// the key is gone, and the key to every member with a device that lacks it, over
    /// Olm. A member that cannot be reached (no keys published) is told nothing and
    /// counted as told, with a warning: it cannot hold up the group.
    async fn share_sender_key(
        &self,
        client: &Client,
        group_id: u64,
        members: &[MemberDevices],
    ) -> Result<(), MessengerError> {
        let now = members.to_vec();
        let (key, missing) = self
            .inner
            .db
            .write_async(move |tx| senderkeys::reconcile(tx, group_id, &now, now_ms()))
            .await?;
        for member in missing {
            let number = Number::parse_e164(&member.number)
                .map_err(|e| MessengerError::History(e.to_string()))?;
            let node_id = e2e::new_message_id();
            let body = Body::SenderKey {
                group_id,
                key: key.clone(),
            };
            let plaintext = Plaintext::new(node_id, now_ms(), body).encode();
            match self
                .transmit(client, &number, node_id, plaintext, CONTROL)
                .await
            {
                Ok(()) => {}
                Err(e) if e.is_connection() || e.is_transient() => return Err(e),
                Err(e) => self.stash(vec![Event::Warning(format!(
                    "{number} cannot be given this device's key for group {group_id}: {e}"
                ))]),
            }
            let key = key.clone();
            self.inner
                .db
                .write_async(move |tx| senderkeys::mark_shared(tx, group_id, &key, &member))
                .await?;
        }
        Ok(())
    }
}
