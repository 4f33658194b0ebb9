//! Registration: verification codes, registering a device (and taking a number over),
//! registration locks, last-seen times and the counters of code sends.

use sled::transaction::Transactional;

use super::*;

impl Store {
    /// Replaces the pending code of `number` with the one `decide` makes from the
    /// current one, or leaves it as it is when `decide` refuses.
    pub fn replace_code<E>(
        &self,
        number: &str,
        decide: impl Fn(Option<&CodeRecord>) -> Result<CodeRecord, E>,
    ) -> Result<Result<CodeRecord, E>, StoreError> {
        let _gate = self.writing();
        let key = layout::number(number);
        let result = self.trees.number_code.transaction(|tree| {
            let current = match tree.get(key)? {
                Some(bytes) => {
                    Some(records::decode::<CodeRecord>(&bytes, "number_code").or_else(abort)?)
                }
                None => None,
            };
            match decide(current.as_ref()) {
                Ok(record) => {
                    tree.insert(key, records::encode(&record).or_else(abort)?)?;
                    Ok(Ok(record))
                }
                Err(e) => Ok(Err(e)),
            }
        });
        Ok(result?)
    }

    /// Deletes the pending code of `number`, if any.
    pub fn remove_code(&self, number: &str) -> Result<(), StoreError> {
        let _gate = self.writing();
        self.trees.number_code.remove(layout::number(number))?;
        Ok(())
    }

    /// Judges a guess at the pending code of `number` and, when `judge` accepts it,
    /// consumes the code and makes `new_device` the number's device, all in one
    /// transaction. A number that already has an account keeps it: the account moves
    /// to the new device and its old devices are signed out (their keys revoked).
    pub fn verify_and_register<E: Clone>(
        &self,
        number: &str,
        new_device: &NewDevice,
        now_ms: u64,
        judge: impl Fn(&CodeRecord) -> Judgement<E>,
    ) -> Result<VerifyOutcome<E>, StoreError> {
        let _gate = self.writing();
        // No code pending: nothing to judge, and no id or PRF worth the work.
        if !self
            .trees
            .number_code
            .contains_key(layout::number(number))?
        {
            return Ok(VerifyOutcome::NoCode);
        }
        // Ids are drawn outside the transaction (sled cannot inside); an unused one is
        // simply skipped. They start at 1: 0 reads as "none" too easily.
        let fresh_account_id = self
            .next_id()?
            .checked_add(1)
            .ok_or_else(|| StoreError::Corrupt("the id space is exhausted".into()))?;
        // The PRF (an OPRF evaluation) only once a code was found right. The gate is
        // held, so no rotation changes the key meanwhile.
        let key_version = self.discovery_key().version();
        let prf_cell: std::cell::OnceCell<Result<Prf, String>> = std::cell::OnceCell::new();
        let prf_of = || {
            prf_cell
                .get_or_init(|| self.discovery_key().prf(number).map_err(|e| e.to_string()))
                .clone()
        };
        let t = &self.trees;
        let outcome = (
            &t.number_code,
            &t.number_account,
            &t.account,
            &t.device_key,
            &t.discovery_index,
            &t.removed_key,
        )
            .transaction(|(codes, numbers, accounts, device_keys, index, removed)| {
                let number_key = layout::number(number);
                let Some(bytes) = codes.get(number_key)? else {
                    return Ok(VerifyOutcome::NoCode);
                };
                let record = records::decode::<CodeRecord>(&bytes, "number_code").or_else(abort)?;
                match judge(&record) {
                    Judgement::Reject { update, error } => {
                        match update {
                            Some(r) => {
                                codes.insert(number_key, records::encode(&r).or_else(abort)?)?
                            }
                            None => codes.remove(number_key)?,
                        };
                        return Ok(VerifyOutcome::Rejected(error));
                    }
                    Judgement::Accept => {
                        codes.remove(number_key)?;
                    }
                }

                // The new key may already belong to a device (the same home registering
                // again): detach it from wherever it is first. That device is signed
                // out too: its queue and keys go with it.
                let mut signed_out = Vec::new();
                if let Some(bytes) = device_keys.get(new_device.key_id)? {
                    let (acct, dev) = layout::parse_device(&bytes)
                        .ok_or_else(|| StoreError::Corrupt("device_key value".into()))
                        .or_else(abort)?;
                    if let Some(abytes) = accounts.get(layout::account(acct))? {
                        let mut a =
                            records::decode::<AccountRecord>(&abytes, "account").or_else(abort)?;
                        a.devices.retain(|d| d.device_id != dev);
                        signed_out.push(DeviceRef {
                            account_id: acct,
                            device_id: dev,
                        });
                        accounts
                            .insert(&layout::account(acct), records::encode(&a).or_else(abort)?)?;
                    }
                }

                let (account_id, mut account, took_over) = match numbers.get(number_key)? {
                    Some(id) => {
                        let id = layout::parse_account(&id)
                            .ok_or_else(|| StoreError::Corrupt("number_account value".into()))
                            .or_else(abort)?;
                        let bytes = accounts
                            .get(layout::account(id))?
                            .ok_or_else(|| StoreError::Corrupt(format!("account {id} missing")))
                            .or_else(abort)?;
                        (
                            id,
                            records::decode::<AccountRecord>(&bytes, "account").or_else(abort)?,
                            true,
                        )
                    }
                    None => {
                        let account = AccountRecord {
                            number: number.to_string(),
                            created_at_ms: now_ms,
                            next_device_id: 1,
                            devices: Vec::new(),
                        };
                        numbers.insert(number_key, &layout::account(fresh_account_id))?;
                        (fresh_account_id, account, false)
                    }
                };

                let mut revoked_keys = Vec::new();
                let gone = records::encode(&records::RemovedKeyRecord {
                    why: records::Removal::SignedOut,
                    at_ms: now_ms,
                })
                .or_else(abort)?;
                for old in account.devices.drain(..) {
                    device_keys.remove(&old.key_id)?;
                    if old.key_id != new_device.key_id {
                        removed.insert(&old.key_id, gone.as_slice())?;
                        revoked_keys.push(old.key_id);
                    }
                    signed_out.push(DeviceRef {
                        account_id,
                        device_id: old.device_id,
                    });
                }
                let device_id = account.next_device_id;
                account.next_device_id += 1;
                account.devices.push(DeviceRecord {
                    device_id,
                    key_id: new_device.key_id,
                    public_key: new_device.public_key.clone(),
                    created_at_ms: now_ms,
                });
                accounts.insert(
                    &layout::account(account_id),
                    records::encode(&account).or_else(abort)?,
                )?;
                device_keys.insert(&new_device.key_id, &layout::device(account_id, device_id))?;
                removed.remove(&new_device.key_id)?;
                let prf = prf_of().map_err(StoreError::Corrupt).or_else(abort)?;
                index.insert(&prf, &layout::account(account_id))?;
                Ok(VerifyOutcome::Registered {
                    device: DeviceRef {
                        account_id,
                        device_id,
                    },
                    took_over,
                    signed_out,
                    revoked_keys,
                    indexed: (key_version, prf),
                })
            })?;
        Ok(outcome)
    }

    /// Counts one verification code under every key of `keys`, if `judge` allows it
    /// given the send times already counted under them (in the same order, each
    /// pruned to the last `keep_ms`). Atomic: a refused request records nothing.
    pub fn record_code_send<E>(
        &self,
        keys: &[String],
        now_ms: u64,
        keep_ms: u64,
        judge: impl Fn(&[Vec<u64>]) -> Result<(), E>,
    ) -> Result<Result<(), E>, StoreError> {
        let _gate = self.writing();
        let result = self.trees.code_sends.transaction(|tree| {
            let mut all = Vec::with_capacity(keys.len());
            for key in keys {
                let mut times = match tree.get(key.as_bytes())? {
                    Some(v) => records::decode::<Vec<u64>>(&v, "code_sends").or_else(abort)?,
                    None => Vec::new(),
                };
                times.retain(|t| now_ms < t.saturating_add(keep_ms));
                all.push(times);
            }
            if let Err(e) = judge(&all) {
                return Ok(Err(e));
            }
            for (key, mut times) in keys.iter().zip(all) {
                times.push(now_ms);
                tree.insert(key.as_bytes(), records::encode(&times).or_else(abort)?)?;
            }
            Ok(Ok(()))
        });
        Ok(result?)
    }

    /// The account of `number` with its registration lock, if it has both, and when
    /// the account was last seen (ms; 0 when never recorded).
    pub fn registration_lock(
        &self,
        number: &str,
    ) -> Result<Option<(u64, records::LockRecord, u64)>, StoreError> {
        let Some(id) = self.trees.number_account.get(layout::number(number))? else {
            return Ok(None);
        };
        let account = layout::parse_account(&id)
            .ok_or_else(|| StoreError::Corrupt("number_account value".into()))?;
        let Some(bytes) = self.trees.registration_lock.get(layout::account(account))? else {
            return Ok(None);
        };
        let lock = records::decode::<records::LockRecord>(&bytes, "registration_lock")?;
        let seen = match self.trees.account_seen.get(layout::account(account))? {
            Some(v) => be_u64(&v, "account_seen value")?,
            None => 0,
        };
        Ok(Some((account, lock, seen)))
    }

    /// Judges the code pending for `number` without registering anything: `judge`
    /// says what the record becomes (`None` deletes it) and what to answer. `None`
    /// when no code is pending.
    pub fn judge_code<E>(
        &self,
        number: &str,
        judge: impl Fn(&CodeRecord) -> (Option<CodeRecord>, E),
    ) -> Result<Option<E>, StoreError> {
        let _gate = self.writing();
        let key = layout::number(number);
        let codes = &self.trees.number_code;
        // Compare-and-swap, so a guess judged here and one judged by a registration
        // at the same time never both count against the same tries.
        for _ in 0..64 {
            let Some(bytes) = codes.get(key)? else {
                return Ok(None);
            };
            let record = records::decode::<CodeRecord>(&bytes, "number_code")?;
            let (update, answer) = judge(&record);
            let new = update.map(|r| records::encode(&r)).transpose()?;
            if codes
                .compare_and_swap(key, Some(&bytes), new.as_deref())?
                .is_ok()
            {
                return Ok(Some(answer));
            }
        }
        Err(StoreError::Corrupt(
            "the code record kept changing while it was judged".into(),
        ))
    }

    /// Takes one wrong-PIN try of `account`'s registration lock, before the PIN is
    /// judged, atomically: concurrent guesses each take a try of their own.
    /// `Some((tries left after this one, the lock as now stored))` when one was left;
    /// `None` when none is (or there is no lock any more).
    pub fn take_pin_try(
        &self,
        account: u64,
        max: u32,
    ) -> Result<Option<(u32, records::LockRecord)>, StoreError> {
        let _gate = self.writing();
        let key = layout::account(account);
        let locks = &self.trees.registration_lock;
        for _ in 0..64 {
            let Some(bytes) = locks.get(key)? else {
                return Ok(None);
            };
            let mut lock = records::decode::<records::LockRecord>(&bytes, "registration_lock")?;
            if lock.wrong_tries >= max {
                return Ok(None);
            }
            lock.wrong_tries += 1;
            let new = records::encode(&lock)?;
            if locks
                .compare_and_swap(key, Some(&bytes), Some(new))?
                .is_ok()
            {
                return Ok(Some((max - lock.wrong_tries, lock)));
            }
        }
        Err(StoreError::Corrupt(
            "the registration lock kept changing while a try was taken".into(),
        ))
    }

    /// Sets (`Some`) or clears (`None`) the registration lock of `account`.
    pub fn set_registration_lock(
        &self,
        account: u64,
        lock: Option<&records::LockRecord>,
    ) -> Result<(), StoreError> {
        let _gate = self.writing();
        match lock {
            Some(l) => {
                self.trees
                    .registration_lock
                    .insert(layout::account(account), records::encode(l)?)?;
            }
            None => {
                self.trees
                    .registration_lock
                    .remove(layout::account(account))?;
            }
        }
        Ok(())
    }

    /// Takes back a send counted by [`Store::record_code_send`] at `at_ms` (the code
    /// could not be delivered after all).
    pub fn forget_code_send(&self, keys: &[String], at_ms: u64) -> Result<(), StoreError> {
        let _gate = self.writing();
        self.trees.code_sends.transaction(|tree| {
            for key in keys {
                if let Some(v) = tree.get(key.as_bytes())? {
                    let mut times = records::decode::<Vec<u64>>(&v, "code_sends").or_else(abort)?;
                    if let Some(i) = times.iter().position(|t| *t == at_ms) {
                        times.remove(i);
                        tree.insert(key.as_bytes(), records::encode(&times).or_else(abort)?)?;
                    }
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Drops limit keys with no send in the last `keep_ms`. Returns how many.
    pub fn sweep_code_sends(&self, now_ms: u64, keep_ms: u64) -> Result<usize, StoreError> {
        let _gate = self.writing();
        let mut dropped = 0;
        for entry in self.trees.code_sends.iter() {
            let (key, value) = entry?;
            let times = records::decode::<Vec<u64>>(&value, "code_sends")?;
            if times.iter().all(|t| now_ms >= t.saturating_add(keep_ms)) {
                // Only if unchanged since read: a send in between keeps it.
                if self
                    .trees
                    .code_sends
                    .compare_and_swap(&key, Some(value), None::<&[u8]>)?
                    .is_ok()
                {
                    dropped += 1;
                }
            }
        }
        Ok(dropped)
    }
}

#[cfg(test)]
pub(in crate::store) mod tests {
    use super::*;

    pub(in crate::store) fn code(tries: u32) -> CodeRecord {
        CodeRecord {
            hash: [7; 32],
            sent_at_ms: 1,
            expires_at_ms: 2,
            tries_left: tries,
        }
    }

    pub(in crate::store) fn device(n: u8) -> NewDevice {
        NewDevice {
            key_id: [n; 32],
            public_key: vec![n; 44],
        }
    }

    #[test]
    fn register_then_take_over_revokes_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let n = "+14155550100";
        let put = |s: &Store| s.replace_code::<()>(n, |_| Ok(code(5))).unwrap().unwrap();

        put(&store);
        let first = store
            .verify_and_register::<()>(n, &device(1), 10, |_| Judgement::Accept)
            .unwrap();
        let VerifyOutcome::Registered {
            device: d1,
            took_over: false,
            ..
        } = first
        else {
            panic!("{first:?}")
        };
        assert_eq!(store.device_by_key(&[1; 32]).unwrap().unwrap().device, d1);

        put(&store);
        let second = store
            .verify_and_register::<()>(n, &device(2), 11, |_| Judgement::Accept)
            .unwrap();
        let VerifyOutcome::Registered {
            device: d2,
            took_over: true,
            signed_out,
            revoked_keys,
            ..
        } = second
        else {
            panic!("{second:?}")
        };
        assert_eq!(d2.account_id, d1.account_id);
        assert_ne!(d2.device_id, d1.device_id);
        assert_eq!(signed_out, vec![d1]);
        assert_eq!(revoked_keys, vec![[1; 32]]);
        assert_eq!(store.device_by_key(&[1; 32]).unwrap(), None);
        assert_eq!(store.account_count(), 1);
    }

    #[test]
    fn rejection_commits_the_update_and_registers_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let n = "+14155550100";
        store
            .replace_code::<()>(n, |_| Ok(code(5)))
            .unwrap()
            .unwrap();
        let out = store
            .verify_and_register(n, &device(1), 10, |r| Judgement::Reject {
                update: Some(code(r.tries_left - 1)),
                error: "wrong",
            })
            .unwrap();
        assert_eq!(out, VerifyOutcome::Rejected("wrong"));
        let left = store
            .replace_code::<u32>(n, |r| Err(r.map_or(99, |r| r.tries_left)))
            .unwrap();
        assert_eq!(left, Err(4));
        assert_eq!(store.account_count(), 0);
        assert_eq!(store.device_by_key(&[1; 32]).unwrap(), None);
    }
}
