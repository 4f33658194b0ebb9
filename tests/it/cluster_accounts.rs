//! Accounts, devices and registrations as a storage concern: one set of tests run
//! on the single node's sled store and on a 3-member JetStream cluster (two nodes,
//! each on a member of its own), among them concurrent verifications of one code
//! on both nodes, of which exactly one registers; and the code-send counters and
//! registration locks, with concurrent sends and PIN guesses through both nodes.

use std::sync::Arc;

use switchboard::discovery::DiscoveryKey;
use switchboard::store::account_store::AccountStore;
use switchboard::store::layout::KeyId;
use switchboard::store::limit_store::LimitStore;
use switchboard::store::records::{CodeRecord, LockRecord, Removal};
use switchboard::store::{DeviceRef, Judgement, Linked, NewDevice, Store, Unlinked, VerifyOutcome};

use super::cluster::NatsCluster;

fn code(secret: u8) -> CodeRecord {
    CodeRecord {
        hash: [secret; 32],
        sent_at_ms: 1_000,
        expires_at_ms: u64::MAX,
        tries_left: 3,
    }
}

fn device(n: u8) -> NewDevice {
    NewDevice {
        key_id: key(n),
        public_key: vec![n; 44],
    }
}

fn key(n: u8) -> KeyId {
    [n; 32]
}

/// A judge of the guess `secret`: right, or one try fewer (none left: the code goes).
fn guess(secret: u8) -> impl Fn(&CodeRecord) -> Judgement<&'static str> + Send + Sync + 'static {
    move |record| {
        if record.hash == [secret; 32] {
            Judgement::Accept
        } else {
            let tries_left = record.tries_left.saturating_sub(1);
            Judgement::Reject {
                update: (tries_left > 0).then(|| CodeRecord {
                    tries_left,
                    ..record.clone()
                }),
                error: "wrong code",
            }
        }
    }
}

/// Issues a code with `secret` for `number` unless one is pending.
async fn issue<A: AccountStore>(store: &A, number: &str, secret: u8) -> Result<CodeRecord, String> {
    store
        .replace_code(number.to_string(), move |current| match current {
            Some(_) => Err("cooldown".to_string()),
            None => Ok(code(secret)),
        })
        .await
        .unwrap()
}

/// The pending code of `number`, read without changing it.
async fn pending<A: AccountStore>(store: &A, number: &str) -> Option<CodeRecord> {
    store
        .replace_code(number.to_string(), |current| Err(current.cloned()))
        .await
        .unwrap()
        .expect_err("the probe never replaces a code")
}

async fn accounts_keep_the_rules<A: AccountStore + 'static>(
    a: Arc<A>,
    b: Arc<A>,
    discovery: Arc<DiscoveryKey>,
) {
    let number = "+15550100001";
    let v = |store: &Arc<A>, dev: u8, secret: u8| {
        let store = store.clone();
        async move {
            store
                .verify_and_register(number.to_string(), device(dev), 5_000, guess(secret))
                .await
                .unwrap()
        }
    };
    assert_eq!(v(&a, 1, 7).await, VerifyOutcome::NoCode);

    // A code is issued once; a second request while it is pending is refused and
    // changes nothing, whichever node asks.
    assert_eq!(issue(a.as_ref(), number, 7).await, Ok(code(7)));
    assert_eq!(issue(b.as_ref(), number, 8).await, Err("cooldown".into()));
    assert_eq!(pending(a.as_ref(), number).await, Some(code(7)));

    // A wrong guess costs a try; the right one registers, once.
    assert_eq!(v(&b, 1, 9).await, VerifyOutcome::Rejected("wrong code"));
    assert_eq!(
        pending(a.as_ref(), number).await.map(|c| c.tries_left),
        Some(2)
    );
    let VerifyOutcome::Registered {
        device: primary,
        took_over,
        signed_out,
        revoked_keys,
        indexed,
    } = v(&a, 1, 7).await
    else {
        panic!("the right code did not register");
    };
    assert_eq!(primary.device_id, 1);
    assert!(!took_over && signed_out.is_empty() && revoked_keys.is_empty());
    assert_eq!(
        indexed,
        (discovery.version(), discovery.prf(number).unwrap())
    );
    assert_eq!(
        v(&b, 1, 7).await,
        VerifyOutcome::NoCode,
        "a code is consumed once"
    );
    assert_eq!(pending(b.as_ref(), number).await, None);

    let account_id = primary.account_id;
    let found = b.device_by_key(key(1)).await.unwrap().unwrap();
    assert_eq!((found.device, found.number.as_str()), (primary, number));
    let record = b.account(account_id).await.unwrap().unwrap();
    assert_eq!(record.number, number);
    assert_eq!(record.devices.len(), 1);
    assert_eq!(record.devices[0].key_id, key(1));
    let (id, by_number) = a.account_by_number(number.into()).await.unwrap().unwrap();
    assert_eq!((id, by_number), (account_id, record));
    assert!(
        a.account_by_number("+15550100999".into())
            .await
            .unwrap()
            .is_none()
    );
    assert!(a.device_by_key(key(99)).await.unwrap().is_none());

    // Linking: a companion, never a key in use, never past the maximum.
    let link = |store: &Arc<A>, account: u64, dev: u8, max: u32| {
        let store = store.clone();
        async move {
            store
                .link_device(account, device(dev), format!("laptop {dev}"), max, 6_000)
                .await
                .unwrap()
        }
    };
    let laptop = DeviceRef {
        account_id,
        device_id: 2,
    };
    assert_eq!(
        link(&b, account_id, 2, 3).await,
        Linked::Done {
            device: laptop,
            number: number.into()
        }
    );
    assert_eq!(link(&a, account_id, 2, 3).await, Linked::KeyInUse);
    assert_eq!(link(&a, account_id, 1, 3).await, Linked::KeyInUse);
    assert_eq!(link(&a, account_id, 3, 2).await, Linked::TooMany { max: 2 });
    assert_eq!(link(&a, account_id ^ 1, 3, 3).await, Linked::NoAccount);
    assert!(b.device_by_key(key(3)).await.unwrap().is_none());

    a.mark_device_seen(primary, 7_000).await.unwrap();
    let (listed_number, views) = b.devices(account_id).await.unwrap().unwrap();
    assert_eq!(listed_number, number);
    let summary: Vec<_> = views
        .iter()
        .map(|d| {
            (
                d.device_id,
                d.primary,
                d.name.clone(),
                d.last_seen_ms,
                d.key_id,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, true, None, Some(7_000), key(1)),
            (2, false, Some("laptop 2".into()), Some(6_000), key(2)),
        ]
    );

    // Unlinking: never the primary; the companion's key is revoked.
    assert_eq!(
        a.unlink_device(primary, Removal::Unlinked, 8_000)
            .await
            .unwrap(),
        Unlinked::Primary
    );
    assert_eq!(
        b.unlink_device(laptop, Removal::Unlinked, 8_000)
            .await
            .unwrap(),
        Unlinked::Done { key_id: key(2) }
    );
    assert_eq!(
        a.unlink_device(laptop, Removal::Unlinked, 8_000)
            .await
            .unwrap(),
        Unlinked::NotFound
    );
    assert!(a.device_by_key(key(2)).await.unwrap().is_none());
    let gone = a.removed_key(key(2)).await.unwrap().unwrap();
    assert_eq!((gone.why, gone.at_ms), (Removal::Unlinked, 8_000));
    assert!(a.removed_key(key(1)).await.unwrap().is_none());

    // The number registered again on a new phone keeps the account and signs the
    // old phone out.
    issue(b.as_ref(), number, 11).await.unwrap();
    let VerifyOutcome::Registered {
        device: phone,
        took_over,
        signed_out,
        revoked_keys,
        ..
    } = v(&b, 4, 11).await
    else {
        panic!("registering again failed");
    };
    assert_eq!(
        phone,
        DeviceRef {
            account_id,
            device_id: 3
        },
        "device ids are never reused"
    );
    assert!(took_over);
    assert_eq!(signed_out, vec![primary]);
    assert_eq!(revoked_keys, vec![key(1)]);
    assert!(a.device_by_key(key(1)).await.unwrap().is_none());
    assert_eq!(
        a.removed_key(key(1)).await.unwrap().map(|r| r.why),
        Some(Removal::SignedOut)
    );
    assert_eq!(
        a.device_by_key(key(4)).await.unwrap().unwrap().device,
        phone
    );

    // The same key registering another number leaves the first account.
    let other = "+15550100002";
    issue(a.as_ref(), other, 12).await.unwrap();
    let VerifyOutcome::Registered {
        device: moved,
        took_over,
        signed_out,
        revoked_keys,
        ..
    } = a
        .verify_and_register(other.into(), device(4), 9_000, guess(12))
        .await
        .unwrap()
    else {
        panic!("registering another number failed");
    };
    assert_ne!(moved.account_id, account_id);
    assert!(!took_over);
    assert_eq!(signed_out, vec![phone]);
    assert!(revoked_keys.is_empty());
    assert!(
        b.account(account_id)
            .await
            .unwrap()
            .unwrap()
            .devices
            .is_empty()
    );
    let found = b.device_by_key(key(4)).await.unwrap().unwrap();
    assert_eq!((found.device, found.number.as_str()), (moved, other));

    // A removed code cannot be used.
    let third = "+15550100003";
    issue(a.as_ref(), third, 13).await.unwrap();
    b.remove_code(third.into()).await.unwrap();
    assert_eq!(
        a.verify_and_register(third.into(), device(5), 9_000, guess(13))
            .await
            .unwrap(),
        VerifyOutcome::NoCode
    );
    assert!(a.account_by_number(third.into()).await.unwrap().is_none());
}

/// Rounds of four verifications of one right code at once, two through each node:
/// each round exactly one registers, and the account lists exactly that device.
async fn one_code_registers_once<A: AccountStore + 'static>(a: Arc<A>, b: Arc<A>) {
    for round in 0..12u8 {
        let number = format!("+1555020{round:04}");
        issue(a.as_ref(), &number, 42).await.unwrap();
        let contenders = (0..4u8).map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let number = number.clone();
            let dev = 100 + round * 4 + i;
            tokio::spawn(async move {
                let outcome = store
                    .verify_and_register(number, device(dev), 10_000, guess(42))
                    .await
                    .unwrap();
                (dev, outcome)
            })
        });
        let mut winners = Vec::new();
        for contender in contenders.collect::<Vec<_>>() {
            let (dev, outcome) = contender.await.unwrap();
            match outcome {
                VerifyOutcome::Registered { device, .. } => winners.push((dev, device)),
                VerifyOutcome::NoCode => {}
                other => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let (dev, registered) = winners[0];
        let (_, account) = b.account_by_number(number.clone()).await.unwrap().unwrap();
        let keys: Vec<KeyId> = account.devices.iter().map(|d| d.key_id).collect();
        assert_eq!(keys, vec![key(dev)], "round {round}");
        for i in 0..4u8 {
            let other = 100 + round * 4 + i;
            let found = a.device_by_key(key(other)).await.unwrap();
            if other == dev {
                assert_eq!(found.map(|f| f.device), Some(registered));
            } else {
                assert!(found.is_none(), "round {round}: loser {other} found");
            }
        }
    }
}

/// How many sends are counted under each of `keys` at `now_ms` (within `keep_ms`),
/// asked of a judge that refuses, so nothing is recorded.
async fn counts<S: LimitStore>(store: &S, keys: &[&str], now_ms: u64, keep_ms: u64) -> Vec<usize> {
    store
        .record_code_send(strings(keys), now_ms, keep_ms, |seen| {
            Err(seen.iter().map(Vec::len).collect::<Vec<_>>())
        })
        .await
        .unwrap()
        .expect_err("the probe never counts")
}

fn strings(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

/// A judge allowing at most `max` sends under every key.
fn at_most(max: usize) -> impl Fn(&[Vec<u64>]) -> Result<(), usize> + Send + Sync + 'static {
    move |seen| match seen.iter().position(|times| times.len() >= max) {
        Some(i) => Err(i),
        None => Ok(()),
    }
}

fn lock(tries: u32) -> LockRecord {
    LockRecord {
        pin_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        set_at_ms: 5,
        wrong_tries: tries,
    }
}

async fn limits_keep_the_rules<S: AccountStore + LimitStore + 'static>(a: Arc<S>, b: Arc<S>) {
    let keys = ["n:+15550100009", "a:127.0.0.1", "c:US", "g"];
    const KEEP: u64 = 10_000;
    // Counted under every key, through either node, until the judge refuses; a
    // refused send records nothing.
    for (i, now) in [1_000u64, 1_001, 1_002].into_iter().enumerate() {
        let store = if i % 2 == 0 { &a } else { &b };
        store
            .record_code_send(strings(&keys), now, KEEP, at_most(3))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        a.record_code_send(strings(&keys), 1_003, KEEP, at_most(3))
            .await
            .unwrap(),
        Err(0)
    );
    assert_eq!(counts(b.as_ref(), &keys, 1_004, KEEP).await, vec![3; 4]);
    // A key of its own counts alone; the shared ones see it.
    b.record_code_send(strings(&["n:+15550100010", "g"]), 1_005, KEEP, at_most(9))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        counts(a.as_ref(), &keys, 1_006, KEEP).await,
        vec![3, 3, 3, 4]
    );
    // A send taken back is counted no more, under any of its keys.
    a.forget_code_send(strings(&keys), 1_001).await.unwrap();
    assert_eq!(
        counts(b.as_ref(), &keys, 1_007, KEEP).await,
        vec![2, 2, 2, 3]
    );
    // Sends older than the window are not counted.
    assert_eq!(
        counts(a.as_ref(), &keys, 1_002 + KEEP, KEEP).await,
        vec![0, 0, 0, 1]
    );

    // Twenty sends at once through both nodes, at most 5 under the global key:
    // exactly 5 pass, and 5 are counted.
    let global = ["limit-race"];
    let mut racing = tokio::task::JoinSet::new();
    for i in 0..20u64 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        racing.spawn(async move {
            store
                .record_code_send(strings(&global), 2_000 + i, KEEP, at_most(5))
                .await
                .unwrap()
                .is_ok()
        });
    }
    let passed = racing.join_all().await.into_iter().filter(|ok| *ok).count();
    assert_eq!(passed, 5);
    assert_eq!(counts(a.as_ref(), &global, 2_100, KEEP).await, vec![5]);
    // A sweep keeps counters with sends in the window.
    b.sweep_code_sends(2_100, KEEP).await.unwrap();
    assert_eq!(counts(a.as_ref(), &global, 2_100, KEEP).await, vec![5]);

    // A pending code judged without registering: none, then a try taken, then gone.
    let number = "+15550100009";
    let take = |store: &Arc<S>| {
        let store = store.clone();
        async move {
            store
                .judge_code(number.to_string(), |record| {
                    let tries_left = record.tries_left - 1;
                    let update = (tries_left > 0).then(|| CodeRecord {
                        tries_left,
                        ..record.clone()
                    });
                    (update, tries_left)
                })
                .await
                .unwrap()
        }
    };
    assert_eq!(take(&a).await, None);
    issue(a.as_ref(), number, 4).await.unwrap();
    assert_eq!(take(&b).await, Some(2));
    assert_eq!(
        pending(a.as_ref(), number).await.map(|c| c.tries_left),
        Some(2)
    );
    // Concurrent judgements each take a try of their own.
    let (x, y) = tokio::join!(take(&a), take(&b));
    let mut got = vec![x, y];
    got.sort();
    assert_eq!(got, vec![Some(0), Some(1)]);
    assert_eq!(pending(b.as_ref(), number).await, None);

    // A registration lock on the number's account.
    assert_eq!(a.registration_lock(number.to_string()).await.unwrap(), None);
    issue(a.as_ref(), number, 4).await.unwrap();
    let registered = b
        .verify_and_register(number.to_string(), device(40), 3_000, guess(4))
        .await
        .unwrap();
    let VerifyOutcome::Registered { device: dev, .. } = registered else {
        panic!("{registered:?}");
    };
    let account = dev.account_id;
    assert_eq!(a.registration_lock(number.to_string()).await.unwrap(), None);
    a.set_registration_lock(account, Some(lock(0)))
        .await
        .unwrap();
    b.mark_device_seen(dev, 7_000).await.unwrap();
    assert_eq!(
        b.registration_lock(number.to_string()).await.unwrap(),
        Some((account, lock(0), 7_000))
    );
    // Wrong-PIN tries: ten guesses at once through both nodes take exactly three.
    let mut guessing = tokio::task::JoinSet::new();
    for i in 0..10 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        guessing.spawn(async move { store.take_pin_try(account, 3).await.unwrap() });
    }
    let mut left: Vec<u32> = guessing
        .join_all()
        .await
        .into_iter()
        .flatten()
        .map(|(left, _)| left)
        .collect();
    left.sort();
    assert_eq!(left, vec![0, 1, 2]);
    assert_eq!(a.take_pin_try(account, 3).await.unwrap(), None);
    assert_eq!(
        a.registration_lock(number.to_string()).await.unwrap(),
        Some((account, lock(3), 7_000))
    );
    // Cleared: no lock, and no tries to take.
    b.set_registration_lock(account, None).await.unwrap();
    assert_eq!(a.registration_lock(number.to_string()).await.unwrap(), None);
    assert_eq!(b.take_pin_try(account, 3).await.unwrap(), None);
    a.set_registration_lock(account + 1, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let discovery = store.discovery_key();
    accounts_keep_the_rules(store.clone(), store.clone(), discovery).await;
    one_code_registers_once(store.clone(), store.clone()).await;
    limits_keep_the_rules(store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_on_a_3_member_jetstream_cluster() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let discovery = Arc::new(DiscoveryKey::generate(1).unwrap());
    let a = Arc::new(nats.accounts(0, discovery.clone()).await);
    let b = Arc::new(nats.accounts(1, discovery.clone()).await);
    accounts_keep_the_rules(a.clone(), b.clone(), discovery).await;
    one_code_registers_once(a.clone(), b.clone()).await;
    limits_keep_the_rules(a, b).await;
}

/// An account deleted through one node (`admin delete`) stays deleted through the
/// other: a link to it is refused (the account entry is kept, without devices, and
/// is not an account to link to), its key is told removed, and the number registers
/// again as a new account, whose id is never the deleted one's.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_account_takes_no_link_and_its_number_registers_anew() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let discovery = Arc::new(DiscoveryKey::generate(1).unwrap());
    let a = nats.accounts(0, discovery.clone()).await;
    let b = nats.accounts(1, discovery).await;
    let number = "+15550100009";
    let register = |store: &switchboard::cluster::accounts::JetStreamAccounts, dev: u8| {
        let store = store.clone();
        async move {
            issue(&store, number, 7).await.expect("a code");
            match store
                .verify_and_register(number.to_string(), device(dev), 5_000, guess(7))
                .await
                .unwrap()
            {
                VerifyOutcome::Registered { device, .. } => device,
                other => panic!("not registered: {other:?}"),
            }
        }
    };
    let primary = register(&a, 1).await;
    let (id, devices) = a
        .delete_account(number, 6_000)
        .await
        .unwrap()
        .expect("deleted");
    assert_eq!((id, devices.len()), (primary.account_id, 1));
    assert_eq!(a.delete_account(number, 6_001).await.unwrap(), None, "once");
    assert_eq!(
        b.link_device(id, device(2), "laptop".into(), 5, 7_000)
            .await
            .unwrap(),
        Linked::NoAccount
    );
    assert_eq!(b.device_by_key(key(1)).await.unwrap(), None);
    assert_eq!(
        b.removed_key(key(1)).await.unwrap().map(|r| r.why),
        Some(Removal::AccountDeleted)
    );
    assert_eq!(b.account_by_number(number.to_string()).await.unwrap(), None);
    let again = register(&b, 3).await;
    assert_ne!(again.account_id, id, "a new account");
    assert_eq!(
        a.account_by_number(number.to_string())
            .await
            .unwrap()
            .map(|(id, _)| id),
        Some(again.account_id)
    );
}
