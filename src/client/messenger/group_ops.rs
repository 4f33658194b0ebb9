//! The group operations of [`Messenger`]: the node keeps the membership, the group's
//! key and name stay with the members (`client::groups`), and every key that must go
//! out goes as a job (`Job::GroupKey`, `Job::GroupRemoved`) written with the change.

use super::super::groups;
use super::{Client, Job, Messenger, MessengerError, e2e, encode, now_ms};
use crate::phone::Number;
use crate::proto::{GroupChange, GroupInfo};

impl Messenger {
    /// Creates group `name` with `members` (this account its admin): the node keeps
    /// the membership, the name goes sealed under a new group key, and the key goes
    /// to every member (and this account's other devices) as a job each.
    pub async fn create_group(
        &self,
        name: &str,
        members: &[Number],
    ) -> Result<GroupInfo, MessengerError> {
        let client = self.client().await?;
        let key = groups::new_key();
        let info = client
            .create_group(members, groups::seal_name(&key, name))
            .await?;
        let known = groups::KnownGroup {
            group_id: info.group_id,
            name: name.to_string(),
            key,
        };
        let mut to: Vec<String> = members.iter().map(Number::to_string).collect();
        to.push(self.inner.me.number.to_string());
        self.share_group_key(&client, known, to).await?;
        Ok(info)
    }

    /// Admins: adds `members` to group `group_id`; they get its key.
    pub async fn add_to_group(
        &self,
        group_id: u64,
        members: &[Number],
    ) -> Result<GroupInfo, MessengerError> {
        let client = self.client().await?;
        let change = GroupChange::Add {
            numbers: members.iter().map(Number::to_string).collect(),
        };
        let info = client
            .change_group(group_id, change)
            .await?
            .ok_or_else(|| MessengerError::Refused("the group is gone".into()))?;
        let known = self.known_group(group_id).await?;
        let to = members.iter().map(Number::to_string).collect();
        self.share_group_key(&client, known, to).await?;
        Ok(info)
    }

    /// Admins: removes `member` from group `group_id`. The group gets a new key (its
    /// name sealed anew), sent to everyone who remains, so the removed member cannot
    /// read what the group is called from then on.
    pub async fn remove_from_group(
        &self,
        group_id: u64,
        member: &Number,
    ) -> Result<GroupInfo, MessengerError> {
        let client = self.client().await?;
        let change = GroupChange::Remove {
            number: member.to_string(),
        };
        client
            .change_group(group_id, change)
            .await?
            .ok_or_else(|| MessengerError::Refused("the group is gone".into()))?;
        let removed = Job::GroupRemoved {
            to: member.to_string(),
            group_id,
            node_id: e2e::new_message_id(),
        };
        self.inner
            .db
            .write_async(move |tx| tx.add_job(now_ms(), &encode(&removed)))
            .await?;
        let old = self.known_group(group_id).await?;
        let key = groups::new_key();
        let meta = groups::seal_name(&key, &old.name);
        let info = client
            .change_group(group_id, GroupChange::SetMeta { meta })
            .await?
            .ok_or_else(|| MessengerError::Refused("the group is gone".into()))?;
        let to = info.members.iter().map(|m| m.number.clone()).collect();
        let known = groups::KnownGroup {
            group_id,
            name: old.name,
            key,
        };
        self.share_group_key(&client, known, to).await?;
        Ok(info)
    }

    /// Admins: renames group `group_id` (under its key; every member can read it).
    pub async fn rename_group(
        &self,
        group_id: u64,
        name: &str,
    ) -> Result<GroupInfo, MessengerError> {
        let client = self.client().await?;
        let mut known = self.known_group(group_id).await?;
        let meta = groups::seal_name(&known.key, name);
        let info = client
            .change_group(group_id, GroupChange::SetMeta { meta })
            .await?
            .ok_or_else(|| MessengerError::Refused("the group is gone".into()))?;
        known.name = name.to_string();
        let to = info.members.iter().map(|m| m.number.clone()).collect();
        self.share_group_key(&client, known, to).await?;
        Ok(info)
    }

    /// Admins: makes `member` an admin of group `group_id`.
    pub async fn promote_in_group(
        &self,
        group_id: u64,
        member: &Number,
    ) -> Result<GroupInfo, MessengerError> {
        let client = self.client().await?;
        let change = GroupChange::Promote {
            number: member.to_string(),
        };
        client
            .change_group(group_id, change)
            .await?
            .ok_or_else(|| MessengerError::Refused("the group is gone".into()))
    }

    /// Leaves group `group_id`, and forgets it here.
    pub async fn leave_group(&self, group_id: u64) -> Result<(), MessengerError> {
        let client = self.client().await?;
        client.change_group(group_id, GroupChange::Leave).await?;
        self.inner
            .db
            .write_async(move |tx| {
                groups::forget(tx, group_id)?;
                super::super::senderkeys::forget(tx, group_id)
            })
            .await?;
        Ok(())
    }

    /// The groups this device knows (it was told their keys), with their name.
    pub async fn known_groups(&self) -> Result<Vec<groups::KnownGroup>, MessengerError> {
        Ok(self.inner.db.read_async(groups::all).await?)
    }

    /// Group `group_id` as the node has it now, with its name as its key opens it.
    pub async fn group_info(
        &self,
        group_id: u64,
    ) -> Result<(GroupInfo, Option<String>), MessengerError> {
        let client = self.client().await?;
        let info = client.fetch_group(group_id).await?;
        let known = self
            .inner
            .db
            .read_async(move |tx| groups::known(tx, group_id))
            .await?;
        let name = known.and_then(|k| groups::open_name(&k.key, &info.meta));
        Ok((info, name))
    }

    /// This device's sending session for group `group_id` and who has its key.
    pub async fn sender_key(
        &self,
        group_id: u64,
    ) -> Result<Option<super::super::senderkeys::Outbound>, MessengerError> {
        Ok(self
            .inner
            .db
            .read_async(move |tx| super::super::senderkeys::outbound(tx, group_id))
            .await?)
    }

    async fn known_group(&self, group_id: u64) -> Result<groups::KnownGroup, MessengerError> {
        self.inner
            .db
            .read_async(move |tx| groups::known(tx, group_id))
            .await?
            .ok_or_else(|| {
                MessengerError::Refused(format!("this device has no key for group {group_id}"))
            })
    }

    /// Stores `group` here and sends its key to each of `to` (numbers; this account's
    /// own number means its other devices), one job each, written with it.
    async fn share_group_key(
        &self,
        client: &Client,
        group: groups::KnownGroup,
        to: Vec<String>,
    ) -> Result<(), MessengerError> {
        let me = self.inner.me.number.to_string();
        let mut to = to;
        if !to.contains(&me) {
            to.push(me);
        }
        self.inner
            .db
            .write_async(move |tx| {
                groups::remember(tx, &group)?;
                let now = now_ms();
                for number in to {
                    let job = Job::GroupKey {
                        to: number,
                        group_id: group.group_id,
                        node_id: e2e::new_message_id(),
                    };
                    tx.add_job(now, &encode(&job))?;
                }
                Ok::<_, MessengerError>(())
            })
            .await?;
        let events = self.run_jobs(client).await;
        self.stash(events);
        Ok(())
    }
}
