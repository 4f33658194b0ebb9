//! Groups: who is in them, with which role, at which version. The node enforces the
//! rules (admins add, remove and promote; anyone may leave; the last admin to leave
//! hands the role to the member who joined first); what a group is called is its
//! members' secret ([`GroupRecord::meta`] is opaque here).

use sled::transaction::Transactional;

use super::records::{self, GroupMemberRecord, GroupRecord};
use super::{Store, StoreError, abort};

/// A change to a group, by one of its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupChange {
    /// Admins: add these accounts (those already in are left as they are).
    Add(Vec<u64>),
    /// Admins: remove this member.
    Remove(u64),
    /// Admins: make this member an admin.
    Promote(u64),
    /// Anyone: leave.
    Leave,
    /// Admins: replace the encrypted name, description and picture.
    SetMeta(Vec<u8>),
}

/// Why a group change was refused (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupRefusal {
    /// The actor is not a member (or there is no such group: the same to them).
    NotMember,
    NotAdmin,
    /// The group would have more than `max` members.
    Full {
        max: u32,
    },
    /// The account to remove or promote is not a member.
    NotInGroup(u64),
}

fn group_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

fn member_key(account: u64, group: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&account.to_be_bytes());
    k[8..].copy_from_slice(&group.to_be_bytes());
    k
}

impl Store {
    /// Creates a group of `creator` (its admin) and `members`, with `meta`; at most
    /// `max` members in all. Returns its id and record.
    pub fn create_group(
        &self,
        creator: u64,
        members: &[u64],
        meta: &[u8],
        max: u32,
        now_ms: u64,
    ) -> Result<Result<(u64, GroupRecord), GroupRefusal>, StoreError> {
        let _gate = self.writing();
        let mut list = vec![GroupMemberRecord {
            account_id: creator,
            admin: true,
            joined_at_ms: now_ms,
        }];
        for &m in members {
            if !list.iter().any(|x| x.account_id == m) {
                list.push(GroupMemberRecord {
                    account_id: m,
                    admin: false,
                    joined_at_ms: now_ms,
                });
            }
        }
        if list.len() > max as usize {
            return Ok(Err(GroupRefusal::Full { max }));
        }
        let id = self.next_id()?;
        let record = GroupRecord {
            version: 1,
            created_at_ms: now_ms,
            members: list,
            meta: meta.to_vec(),
        };
        let value = records::encode(&record)?;
        let t = &self.trees;
        (&t.group, &t.account_group).transaction(|(groups, index)| {
            groups.insert(&group_key(id), value.as_slice())?;
            for m in &record.members {
                index.insert(&member_key(m.account_id, id), &[][..])?;
            }
            Ok(())
        })?;
        Ok(Ok((id, record)))
    }

    /// Applies `change` by `actor` to group `group` (at most `max` members), in one
    /// transaction. `Ok(None)`: the group is gone (its last member left).
    pub fn change_group(
        &self,
        group: u64,
        actor: u64,
        change: &GroupChange,
        max: u32,
        now_ms: u64,
    ) -> Result<Result<Option<GroupRecord>, GroupRefusal>, StoreError> {
        let _gate = self.writing();
        self.change_group_held(group, actor, change, max, now_ms)
    }

    /// [`Store::change_group`] for a caller that holds the write gate.
    pub(super) fn change_group_held(
        &self,
        group: u64,
        actor: u64,
        change: &GroupChange,
        max: u32,
        now_ms: u64,
    ) -> Result<Result<Option<GroupRecord>, GroupRefusal>, StoreError> {
        let t = &self.trees;
        let outcome = (&t.group, &t.account_group).transaction(|(groups, index)| {
            let Some(bytes) = groups.get(group_key(group))? else {
                return Ok(Err(GroupRefusal::NotMember));
            };
            let mut record = records::decode::<GroupRecord>(&bytes, "group").or_else(abort)?;
            let Some(me) = record
                .members
                .iter()
                .find(|m| m.account_id == actor)
                .copied()
            else {
                return Ok(Err(GroupRefusal::NotMember));
            };
            let admin_only = !matches!(change, GroupChange::Leave);
            if admin_only && !me.admin {
                return Ok(Err(GroupRefusal::NotAdmin));
            }
            let position =
                |r: &GroupRecord, a: u64| r.members.iter().position(|m| m.account_id == a);
            let mut removed = Vec::new();
            let mut added = Vec::new();
            match change {
                GroupChange::Add(accounts) => {
                    for &a in accounts {
                        if position(&record, a).is_none() && !added.contains(&a) {
                            added.push(a);
                        }
                    }
                    if record.members.len() + added.len() > max as usize {
                        return Ok(Err(GroupRefusal::Full { max }));
                    }
                    record
                        .members
                        .extend(added.iter().map(|&a| GroupMemberRecord {
                            account_id: a,
                            admin: false,
                            joined_at_ms: now_ms,
                        }));
                }
                GroupChange::Remove(a) | GroupChange::Promote(a) => {
                    let Some(at) = position(&record, *a) else {
                        return Ok(Err(GroupRefusal::NotInGroup(*a)));
                    };
                    if matches!(change, GroupChange::Remove(_)) {
                        record.members.remove(at);
                        removed.push(*a);
                    } else {
                        record.members[at].admin = true;
                    }
                }
                GroupChange::Leave => {
                    if let Some(at) = position(&record, actor) {
                        record.members.remove(at);
                    }
                    removed.push(actor);
                }
                GroupChange::SetMeta(meta) => record.meta = meta.clone(),
            }
            // A group always has an admin while it has members: the one who joined
            // first (the list is in joining order) takes over.
            if !record.members.is_empty() && !record.members.iter().any(|m| m.admin) {
                record.members[0].admin = true;
            }
            for a in &removed {
                index.remove(&member_key(*a, group)[..])?;
            }
            for a in &added {
                index.insert(&member_key(*a, group), &[][..])?;
            }
            if record.members.is_empty() {
                groups.remove(&group_key(group))?;
                return Ok(Ok(None));
            }
            record.version += 1;
            groups.insert(&group_key(group), records::encode(&record).or_else(abort)?)?;
            Ok(Ok(Some(record)))
        })?;
        Ok(outcome)
    }

    /// Group `group`, if there is one.
    pub fn group(&self, group: u64) -> Result<Option<GroupRecord>, StoreError> {
        match self.trees.group.get(group_key(group))? {
            Some(bytes) => Ok(Some(records::decode(&bytes, "group")?)),
            None => Ok(None),
        }
    }

    /// The groups `account` is in, by id.
    pub fn groups_of(&self, account: u64) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::new();
        for key in self
            .trees
            .account_group
            .scan_prefix(account.to_be_bytes())
            .keys()
        {
            let key = key?;
            let id = key
                .get(8..16)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .ok_or_else(|| StoreError::Corrupt("account_group key".into()))?;
            out.push(u64::from_be_bytes(id));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(r: &GroupRecord) -> Vec<(u64, bool)> {
        r.members.iter().map(|m| (m.account_id, m.admin)).collect()
    }

    #[test]
    fn admins_change_a_group_anyone_leaves_and_the_first_to_join_takes_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (id, g) = store
            .create_group(1, &[2, 3, 2], b"meta", 4, 10)
            .unwrap()
            .unwrap();
        assert_eq!(members(&g), [(1, true), (2, false), (3, false)]);
        assert_eq!(g.version, 1);
        let change = |actor, c: GroupChange| store.change_group(id, actor, &c, 4, 20).unwrap();
        assert_eq!(
            change(2, GroupChange::Add(vec![4])),
            Err(GroupRefusal::NotAdmin)
        );
        assert_eq!(change(9, GroupChange::Leave), Err(GroupRefusal::NotMember));
        assert_eq!(
            change(1, GroupChange::Add(vec![4, 5])),
            Err(GroupRefusal::Full { max: 4 })
        );
        assert_eq!(
            change(1, GroupChange::Remove(7)),
            Err(GroupRefusal::NotInGroup(7))
        );
        // Nothing changed so far.
        assert_eq!(store.group(id).unwrap().unwrap().version, 1);
        let g = change(1, GroupChange::Add(vec![4, 2])).unwrap().unwrap();
        assert_eq!((g.version, g.members.len()), (2, 4));
        assert_eq!(store.groups_of(4).unwrap(), vec![id]);
        let g = change(1, GroupChange::Remove(3)).unwrap().unwrap();
        assert_eq!(members(&g), [(1, true), (2, false), (4, false)]);
        assert!(store.groups_of(3).unwrap().is_empty());
        // The last admin leaves: the member who joined first takes over.
        let g = change(1, GroupChange::Leave).unwrap().unwrap();
        assert_eq!(members(&g), [(2, true), (4, false)]);
        let g = change(2, GroupChange::Promote(4)).unwrap().unwrap();
        assert_eq!(members(&g), [(2, true), (4, true)]);
        let g = change(4, GroupChange::SetMeta(b"new".to_vec()))
            .unwrap()
            .unwrap();
        assert_eq!(g.meta, b"new");
        assert_eq!(
            change(2, GroupChange::Leave)
                .unwrap()
                .unwrap()
                .members
                .len(),
            1
        );
        // The last member leaves: the group is gone.
        assert_eq!(change(4, GroupChange::Leave), Ok(None));
        assert_eq!(store.group(id).unwrap(), None);
        assert!(store.groups_of(4).unwrap().is_empty());
        assert_eq!(
            store.create_group(1, &[2, 3, 4, 5], b"", 4, 30).unwrap(),
            Err(GroupRefusal::Full { max: 4 })
        );
    }

    #[test]
    fn a_deleted_account_leaves_its_groups() {
        use crate::store::queues::tests::registered;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let alice = registered(&store, "+14155550100", 1).account_id;
        let bob = registered(&store, "+14155550101", 2).account_id;
        let (id, _) = store
            .create_group(alice, &[bob], b"", 10, 1)
            .unwrap()
            .unwrap();
        store.delete_account("+14155550100").unwrap().unwrap();
        let g = store.group(id).unwrap().unwrap();
        assert_eq!(members(&g), [(bob, true)]);
        assert!(store.groups_of(alice).unwrap().is_empty());
    }
}
