//! Groups in a JetStream key-value bucket (`sb_groups`): `g.ID` holds the
//! [`GroupRecord`] (the truth, every change a compare-and-set with the same rules
//! as sled's, [`apply_change`]); `a.ACCOUNT` lists the groups an account may be in.
//!
//! JetStream has no transaction over two keys, so the account lists are hints
//! written so that none is ever missing: an account's list gains a group before the
//! group's record names it, and loses it only after. `groups_of` keeps the groups
//! whose record names the account, so a hint left by a crash in between shows
//! nothing.

use bincode::{Decode, Encode};

use super::bucket::Bucket;
use super::{Cluster, ClusterError};
use crate::store::records::GroupRecord;
use crate::store::{GroupChange, GroupRefusal, GroupStore, StoreError, apply_change, new_group};

/// The bucket's name.
pub const BUCKET: &str = "sb_groups";

/// The groups an account may be in (a hint: the group record decides).
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
struct AccountGroups {
    groups: Vec<u64>,
}

/// [`GroupStore`] on a JetStream cluster.
#[derive(Debug, Clone)]
pub struct JetStreamGroups {
    bucket: Bucket,
}

fn group_key(id: u64) -> String {
    format!("g.{id}")
}

fn account_key(account: u64) -> String {
    format!("a.{account}")
}

impl JetStreamGroups {
    /// The bucket on `cluster`, created with `replicas` replicas if it is not there.
    pub async fn open(cluster: &Cluster, replicas: usize) -> Result<JetStreamGroups, ClusterError> {
        let bucket = Bucket::open(
            cluster,
            BUCKET,
            "switchboard: group membership, roles and versions",
            replicas,
        )
        .await?;
        Ok(JetStreamGroups { bucket })
    }

    /// Adds (or, with `add` false, removes) `group` in each account's list.
    async fn hint(&self, accounts: &[u64], group: u64, add: bool) -> Result<(), StoreError> {
        for &account in accounts {
            self.bucket
                .modify(&account_key(account), |slot: &mut Option<AccountGroups>| {
                    let list = slot.get_or_insert_with(AccountGroups::default);
                    let at = list.groups.iter().position(|&g| g == group);
                    match (add, at) {
                        (true, None) => list.groups.push(group),
                        (false, Some(i)) => {
                            list.groups.remove(i);
                        }
                        _ => return ((), false),
                    }
                    ((), true)
                })
                .await?;
        }
        Ok(())
    }
}

impl GroupStore for JetStreamGroups {
    async fn create_group(
        &self,
        creator: u64,
        members: Vec<u64>,
        meta: Vec<u8>,
        max: u32,
        now_ms: u64,
    ) -> Result<Result<(u64, GroupRecord), GroupRefusal>, StoreError> {
        let record = match new_group(creator, &members, &meta, max, now_ms) {
            Ok(r) => r,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let accounts: Vec<u64> = record.members.iter().map(|m| m.account_id).collect();
        // Ids are drawn at random across the cluster (below 2^63, never 0); one
        // already taken (by another node, just now) is drawn again.
        for _ in 0..8 {
            let id = rand::random::<u64>() >> 1;
            if id == 0 {
                continue;
            }
            self.hint(&accounts, id, true).await?;
            let created = self
                .bucket
                .modify(&group_key(id), |slot: &mut Option<GroupRecord>| {
                    if slot.is_some() {
                        return (false, false);
                    }
                    *slot = Some(record.clone());
                    (true, true)
                })
                .await?;
            if created {
                return Ok(Ok((id, record)));
            }
            self.hint(&accounts, id, false).await?;
        }
        Err(StoreError::Engine("no free group id after 8 draws".into()))
    }

    async fn change_group(
        &self,
        group: u64,
        actor: u64,
        change: GroupChange,
        max: u32,
        now_ms: u64,
    ) -> Result<Result<Option<GroupRecord>, GroupRefusal>, StoreError> {
        // Those an Add may bring in get the hint first (one too many is harmless).
        if let GroupChange::Add(accounts) = &change {
            self.hint(accounts, group, true).await?;
        }
        let outcome = self
            .bucket
            .modify(&group_key(group), |slot: &mut Option<GroupRecord>| {
                let Some(current) = slot.as_ref() else {
                    return (Err(GroupRefusal::NotMember), false);
                };
                let mut record = current.clone();
                match apply_change(&mut record, actor, &change, max, now_ms) {
                    Err(refusal) => (Err(refusal), false),
                    Ok((_, removed)) => {
                        let kept = (!record.members.is_empty()).then_some(record);
                        *slot = kept.clone();
                        (Ok((kept, removed)), true)
                    }
                }
            })
            .await?;
        match outcome {
            Err(refusal) => Ok(Err(refusal)),
            Ok((kept, removed)) => {
                self.hint(&removed, group, false).await?;
                Ok(Ok(kept))
            }
        }
    }

    async fn group(&self, group: u64) -> Result<Option<GroupRecord>, StoreError> {
        Ok(self.bucket.read(&group_key(group)).await?.0)
    }

    async fn groups_of(&self, account: u64) -> Result<Vec<u64>, StoreError> {
        let (hints, _) = self
            .bucket
            .read::<AccountGroups>(&account_key(account))
            .await?;
        let mut out = Vec::new();
        for group in hints.map(|h| h.groups).unwrap_or_default() {
            if let Some(record) = self.group(group).await?
                && record.members.iter().any(|m| m.account_id == account)
            {
                out.push(group);
            }
        }
        Ok(out)
    }
}

impl JetStreamGroups {
    /// Writes group `id` as the single node kept it (`switchboard admin
    /// export-to-cluster`): its members' lists first, as every change does.
    pub async fn import(&self, id: u64, record: &GroupRecord) -> Result<(), StoreError> {
        let members: Vec<u64> = record.members.iter().map(|m| m.account_id).collect();
        self.hint(&members, id, true).await?;
        self.bucket.put(&group_key(id), record).await
    }
}
