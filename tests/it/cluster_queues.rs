//! Device queues as a storage concern: one set of tests run on the single node's
//! sled store and on a 3-member JetStream cluster (two nodes, each on a member of
//! its own), then what only the cluster does: wake-ups across nodes, and a member
//! killed under load with no acknowledged message lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use switchboard::cluster::Cluster;
use switchboard::cluster::queues::{JetStreamQueues, QueueLimits, STREAM, wake_subject, woken_seq};
use switchboard::store::queue_store::{GroupSend, Outgoing, QueueStore, SledQueues};
use switchboard::store::records::QueueItem;
use switchboard::store::{AppendOutcome, DeviceRef, GroupAppend, Store};

use super::cluster::{NatsCluster, retry};

const MAX_QUEUED: u64 = 8;

fn dev(account_id: u64, device_id: u32) -> DeviceRef {
    DeviceRef {
        account_id,
        device_id,
    }
}

const ALICE: DeviceRef = DeviceRef {
    account_id: 1,
    device_id: 1,
};

fn message(id: u8, to: &[DeviceRef]) -> Outgoing {
    Outgoing {
        sender: ALICE,
        sender_number: "+15550001111".into(),
        id: [id; 16],
        envelopes: to.iter().map(|d| (*d, vec![id; 3 + id as usize])).collect(),
        now_ms: 1_000 + u64::from(id),
        expires_at_ms: None,
    }
}

fn id_of(item: &QueueItem) -> [u8; 16] {
    match item {
        QueueItem::Message { id, .. } | QueueItem::Delivered { id, .. } => *id,
        other => panic!("unexpected item {other:?}"),
    }
}

async fn queues_keep_the_rules<Q: QueueStore + 'static>(a: Arc<Q>, b: Arc<Q>) {
    let (bob1, bob2) = (dev(2, 1), dev(2, 2));
    // Queued once for each device, whichever node sends it again.
    let first = a.append(message(1, &[bob1, bob2])).await.unwrap();
    assert_eq!(
        first,
        AppendOutcome::Queued {
            accepted_at_ms: 1_001
        }
    );
    let again = b.append(message(1, &[bob1, bob2])).await.unwrap();
    assert_eq!(
        again,
        AppendOutcome::Duplicate {
            accepted_at_ms: 1_001
        },
        "a resend through another node"
    );
    assert_eq!(a.queue_len(bob1).await.unwrap(), 1);
    assert_eq!(b.queue_len(bob2).await.unwrap(), 1);

    // Read back in the order sent, through either node, with sender and body.
    for id in 2..=5u8 {
        let via = if id % 2 == 0 { &a } else { &b };
        let outcome = via.append(message(id, &[bob1, bob2])).await.unwrap();
        assert!(
            matches!(outcome, AppendOutcome::Queued { .. }),
            "{outcome:?}"
        );
    }
    let (page, more) = b.page(bob1, None, 100, usize::MAX).await.unwrap();
    assert!(!more);
    let ids: Vec<u8> = page.iter().map(|q| id_of(&q.item)[0]).collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    assert!(page.windows(2).all(|w| w[0].seq < w[1].seq));
    match &page[2].item {
        QueueItem::Message {
            from_account,
            from_device,
            from_number,
            body,
            ..
        } => {
            assert_eq!((*from_account, *from_device), (1, 1));
            assert_eq!(from_number, "+15550001111");
            assert_eq!(body, &vec![3u8; 6]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(page[2].queued_at_ms, 1_003);

    // Pages stop at the count and at the byte limit (one item at least).
    let (two, more) = a.page(bob1, None, 2, usize::MAX).await.unwrap();
    assert_eq!((two.len(), more), (2, true));
    let (rest, _) = a
        .page(bob1, Some(two[1].seq), 100, usize::MAX)
        .await
        .unwrap();
    assert_eq!(rest.len(), 3);
    assert_eq!(id_of(&rest[0].item)[0], 3);
    let (one, more) = a.page(bob1, None, 100, 1).await.unwrap();
    assert_eq!((one.len(), more), (1, true));

    // An ack removes only the device's own items, receipt first.
    let (bob2_page, _) = a.page(bob2, None, 100, usize::MAX).await.unwrap();
    let mut seqs = vec![page[0].seq, page[1].seq, bob2_page[0].seq, u64::MAX - 1];
    seqs.dedup();
    let receipts = b
        .ack(bob1, "+15550002222".into(), seqs, 9_000)
        .await
        .unwrap();
    assert_eq!(receipts, vec![ALICE, ALICE]);
    assert_eq!(a.queue_len(bob1).await.unwrap(), 3);
    assert_eq!(a.queue_len(bob2).await.unwrap(), 5, "another device's item");
    let (alice, _) = a.page(ALICE, None, 100, usize::MAX).await.unwrap();
    let got: Vec<(String, u32, u8)> = alice
        .iter()
        .map(|q| match &q.item {
            QueueItem::Delivered {
                to_number,
                device_id,
                id,
            } => (to_number.clone(), *device_id, id[0]),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        vec![("+15550002222".into(), 1, 1), ("+15550002222".into(), 1, 2)]
    );
    // The receipts can be acknowledged in turn, and that queues nothing more.
    let seqs = alice.iter().map(|q| q.seq).collect();
    assert!(
        a.ack(ALICE, "+15550001111".into(), seqs, 9_001)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(b.queue_len(ALICE).await.unwrap(), 0);

    // The same ack through both nodes at once: each answers, the item goes once,
    // and its sender hears of it once.
    let (through_a, through_b) = tokio::join!(
        a.ack(bob1, "+15550002222".into(), vec![page[2].seq], 9_002),
        b.ack(bob1, "+15550002222".into(), vec![page[2].seq], 9_002),
    );
    through_a.unwrap();
    through_b.unwrap();
    assert_eq!(a.queue_len(bob1).await.unwrap(), 2);
    let (alice, _) = b.page(ALICE, None, 100, usize::MAX).await.unwrap();
    assert_eq!(alice.len(), 1, "one receipt for message 3");
    assert_eq!(id_of(&alice[0].item)[0], 3);
    a.ack(ALICE, "+15550001111".into(), vec![alice[0].seq], 9_003)
        .await
        .unwrap();

    // A full queue refuses, through either node.
    let carol = dev(3, 1);
    for id in 10..10 + MAX_QUEUED as u8 {
        let outcome = a.append(message(id, &[carol])).await.unwrap();
        assert!(
            matches!(outcome, AppendOutcome::Queued { .. }),
            "{outcome:?}"
        );
    }
    assert_eq!(
        b.append(message(99, &[carol])).await.unwrap(),
        AppendOutcome::QueueFull { device_id: 1 }
    );
    assert_eq!(a.queue_len(carol).await.unwrap(), MAX_QUEUED);

    // Dropping a device's queue empties it and nobody else's.
    assert_eq!(b.drop_queue(bob2).await.unwrap(), 5);
    assert_eq!(a.queue_len(bob2).await.unwrap(), 0);
    assert!(
        a.page(bob2, None, 10, usize::MAX)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    assert_eq!(a.queue_len(bob1).await.unwrap(), 2);
}

/// Alice's message `id` to group 7, for `to`.
fn group_message(id: u8, to: &[DeviceRef]) -> GroupSend {
    GroupSend {
        sender: ALICE,
        sender_number: "+15550001111".into(),
        group_id: 7,
        id: [id; 16],
        body: vec![id; 100],
        recipients: to.to_vec(),
        now_ms: 2_000 + u64::from(id),
        expires_at_ms: None,
    }
}

/// The (delivered, of) counts of group message `id` in `device`'s queue.
async fn counts_of<Q: QueueStore>(q: &Q, device: DeviceRef, id: u8) -> Vec<(u32, u32)> {
    let (page, _) = q.page(device, None, 100, usize::MAX).await.unwrap();
    page.iter()
        .filter_map(|item| match &item.item {
            QueueItem::GroupDelivered {
                group_id: 7,
                id: i,
                delivered,
                of,
            } if *i == [id; 16] => Some((*delivered, *of)),
            _ => None,
        })
        .collect()
}

async fn group_messages_keep_the_rules<Q: QueueStore + 'static>(a: Arc<Q>, b: Arc<Q>) {
    let (bob1, bob2, carol) = (dev(2, 1), dev(2, 2), dev(3, 1));
    let queued = a
        .append_group(group_message(1, &[bob1, bob2, carol]))
        .await
        .unwrap();
    assert_eq!(
        queued,
        GroupAppend::Queued {
            accepted_at_ms: 2_001
        }
    );
    // Each device reads it, with its body, through either node.
    let mut seqs = HashMap::new();
    for (device, via) in [(bob1, &a), (bob2, &b), (carol, &b)] {
        let (page, _) = via.page(device, None, 100, usize::MAX).await.unwrap();
        assert_eq!(page.len(), 1, "{device:?}: {page:?}");
        match &page[0].item {
            QueueItem::GroupMessage {
                from_account: 1,
                from_device: 1,
                from_number,
                group_id: 7,
                id,
                ..
            } => {
                assert_eq!(from_number, "+15550001111");
                assert_eq!(id, &[1; 16]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(page[0].group_body.as_deref(), Some(&[1u8; 100][..]));
        assert_eq!(page[0].queued_at_ms, 2_001);
        seqs.insert(device, page[0].seq);
    }
    // Nothing counted until a device acknowledges it.
    assert!(counts_of(&*a, ALICE, 1).await.is_empty());
    let woken = a
        .ack(bob1, "+15550002222".into(), vec![seqs[&bob1]], 3_000)
        .await
        .unwrap();
    assert_eq!(woken, vec![ALICE]);
    assert_eq!(counts_of(&*b, ALICE, 1).await, vec![(1, 3)]);
    // Acknowledged again (as after a crash before its answer): counted once.
    a.ack(bob1, "+15550002222".into(), vec![seqs[&bob1]], 3_001)
        .await
        .unwrap();
    assert_eq!(counts_of(&*a, ALICE, 1).await, vec![(1, 3)]);
    // The other two through the other node: the sender's queue holds one count,
    // the latest, not one per device.
    b.ack(bob2, "+15550002222".into(), vec![seqs[&bob2]], 3_002)
        .await
        .unwrap();
    assert_eq!(counts_of(&*a, ALICE, 1).await, vec![(2, 3)]);
    b.ack(carol, "+15550003333".into(), vec![seqs[&carol]], 3_003)
        .await
        .unwrap();
    assert_eq!(counts_of(&*a, ALICE, 1).await, vec![(3, 3)]);
    for device in [bob1, bob2, carol] {
        assert_eq!(a.queue_len(device).await.unwrap(), 0, "{device:?}");
    }

    // A full queue refuses it, naming the device.
    for id in 10..10 + MAX_QUEUED as u8 {
        a.append(message(id, &[carol])).await.unwrap();
    }
    let refused = b
        .append_group(group_message(2, &[bob1, carol]))
        .await
        .unwrap();
    assert_eq!(refused, GroupAppend::QueueFull { device: carol });
}

#[tokio::test(flavor = "multi_thread")]
async fn group_messages_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let queues = Arc::new(SledQueues {
        store,
        max_queued: MAX_QUEUED,
    });
    group_messages_keep_the_rules(queues.clone(), queues).await;
}

/// On the cluster also: the body is stored once, and goes with the last device's
/// acknowledgement.
#[tokio::test(flavor = "multi_thread")]
async fn group_messages_on_a_3_member_jetstream_cluster() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let a = Arc::new(nats.queues(0, limits(MAX_QUEUED)).await);
    let b = Arc::new(nats.queues(1, limits(MAX_QUEUED)).await);
    group_messages_keep_the_rules(a, b).await;
    let cluster = nats.connect(2).await;
    let stream = cluster.jetstream.get_stream(STREAM).await.unwrap();
    let bodies = stream
        .info_with_subjects("sbq.g.>")
        .await
        .unwrap()
        .count()
        .await;
    // Message 1's body went with its last device; message 2's stays (Bob's
    // item landed before Carol's queue refused hers), to age out with it.
    assert_eq!(bodies, 1, "bodies left in {STREAM}");
}

fn limits(max_queued: u64) -> QueueLimits {
    QueueLimits {
        max_queued,
        ttl: Duration::from_secs(3600),
        duplicate_window: Duration::from_secs(120),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn queues_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let queues = Arc::new(SledQueues {
        store,
        max_queued: MAX_QUEUED,
    });
    queues_keep_the_rules(queues.clone(), queues).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn queues_on_a_3_member_jetstream_cluster() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let a = Arc::new(nats.queues(0, limits(MAX_QUEUED)).await);
    let b = Arc::new(nats.queues(2, limits(MAX_QUEUED)).await);
    queues_keep_the_rules(a, b).await;
}

/// Acknowledged items named below a floor go in one purge, which takes every item of
/// the device below the last one named (also those not named: they are below the
/// floor, so acknowledged) and nothing of it beyond, nor of another device; without a
/// floor, or with one item below it, only the items named go.
#[tokio::test(flavor = "multi_thread")]
async fn removals_below_the_floor_are_one_purge_of_that_device_only() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let node = nats.queues(0, limits(100)).await;
    let (bob, carol) = (dev(2, 1), dev(3, 1));
    for id in 1..=6u8 {
        node.append(message(id, &[bob])).await.unwrap();
        node.append(message(id, &[carol])).await.unwrap();
    }
    let seqs = |q: &JetStreamQueues, device| {
        let q = q.clone();
        async move {
            let (page, _) = q.page(device, None, 100, usize::MAX).await.unwrap();
            page.iter().map(|q| q.seq).collect::<Vec<u64>>()
        }
    };
    let b = seqs(&node, bob).await;
    assert_eq!(b.len(), 6);
    // Without a floor: the two named, each.
    node.remove(bob, &[b[0], b[2]], None).await.unwrap();
    assert_eq!(seqs(&node, bob).await, [b[1], b[3], b[4], b[5]]);
    // One below the floor: that one.
    node.remove(bob, &[b[3]], Some(b[5])).await.unwrap();
    assert_eq!(seqs(&node, bob).await, [b[1], b[4], b[5]]);
    // Two below the floor: one purge up to the last named; b[1], not named, goes.
    node.remove(bob, &[b[4], b[3]], Some(b[5] + 10))
        .await
        .unwrap();
    assert_eq!(
        seqs(&node, bob).await,
        [b[5]],
        "b[5] is past the last named"
    );
    assert_eq!(
        seqs(&node, carol).await.len(),
        6,
        "Carol's queue is untouched"
    );
}

/// What is queued through one node wakes the device's stream on another at once
/// (core NATS); a disappearing message past its expiry is never handed out.
#[tokio::test(flavor = "multi_thread")]
async fn an_append_on_one_node_wakes_the_device_on_another() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let node1 = nats.queues(0, limits(100)).await;
    let node2 = nats.queues(1, limits(100)).await;
    let bob = dev(2, 1);
    let mut wakes = node2.wake_ups(bob).await.unwrap();
    // Interest crosses the cluster's routes a moment after subscribing: wait until
    // member 0 forwards to it, as a node that stays up is long past.
    let probe = async_nats::connect(&nats.urls[0]).await.unwrap();
    let mut reached = false;
    for _ in 0..100 {
        probe
            .publish(wake_subject(bob), PROBE.into())
            .await
            .unwrap();
        probe.flush().await.unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), wakes.next()).await {
            reached = true;
            break;
        }
    }
    assert!(reached, "the subscription never reached member 0");
    node1.append(message(1, &[bob])).await.unwrap();
    let woke = tokio::time::timeout(Duration::from_secs(10), wakes.next_wake()).await;
    let Ok(Some(wake_up)) = woke else {
        panic!("no wake-up reached the other node");
    };
    let (page, _) = node2.page(bob, None, 10, usize::MAX).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(
        woken_seq(&wake_up),
        Some(page[0].seq),
        "the wake-up names the item's seq"
    );

    // A read up to what a wake-up named stops there, without asking for more; a
    // read without a limit goes to the end.
    for id in 3..=5u8 {
        node1.append(message(id, &[bob])).await.unwrap();
    }
    let (all, more) = node2.page(bob, None, 10, usize::MAX).await.unwrap();
    assert!(!more);
    let ids: Vec<u8> = all.iter().map(|q| id_of(&q.item)[0]).collect();
    assert_eq!(ids, vec![1, 3, 4, 5]);
    let (upto, more) = node2
        .page_until(bob, Some(all[0].seq), 10, usize::MAX, Some(all[2].seq))
        .await
        .unwrap();
    let ids: Vec<u8> = upto.iter().map(|q| id_of(&q.item)[0]).collect();
    assert_eq!((ids, more), (vec![3, 4], false));
    let (past, _) = node2
        .page_until(bob, Some(all[2].seq), 10, usize::MAX, Some(all[0].seq))
        .await
        .unwrap();
    let ids: Vec<u8> = past.iter().map(|q| id_of(&q.item)[0]).collect();
    assert_eq!(
        ids,
        vec![5],
        "a limit behind the cursor: the next item still comes"
    );
    let seqs: Vec<u64> = all.iter().skip(1).map(|q| q.seq).collect();
    node2
        .ack(bob, "+15550002222".into(), seqs, 2_000)
        .await
        .unwrap();

    let mut gone = message(2, &[bob]);
    gone.expires_at_ms = Some(1);
    node1.append(gone).await.unwrap();
    let (page, _) = node2.page(bob, None, 10, usize::MAX).await.unwrap();
    let ids: Vec<u8> = page.iter().map(|q| id_of(&q.item)[0]).collect();
    assert_eq!(ids, vec![1], "the expired message is left out");
    assert_eq!(node1.queue_len(bob).await.unwrap(), 1, "and deleted");

    // A read up to a woken seq, at once, finds the item woken for through any
    // member, whichever replica answers (one that has not applied it yet is caught
    // up by the leader).
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), wakes.next()).await {}
    let node3 = nats.queues(2, limits(100)).await;
    let mut cursor = page.last().map(|q| q.seq);
    for id in 10..40u8 {
        node1.append(message(id, &[bob])).await.unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(10), wakes.next_wake()).await;
        let Ok(Some(wake_up)) = woke else {
            panic!("no wake-up for message {id}");
        };
        let until = woken_seq(&wake_up);
        let reads = [&node3, &node1, &node2]
            .map(|node| node.page_until(bob, cursor, 10, usize::MAX, until));
        for (member, read) in futures_util::future::join_all(reads)
            .await
            .into_iter()
            .enumerate()
        {
            let (got, more) = read.unwrap();
            let ids: Vec<u8> = got.iter().map(|q| id_of(&q.item)[0]).collect();
            assert_eq!(
                (ids, more),
                (vec![id], false),
                "read through reader {member}"
            );
        }
        cursor = until;
    }
}

const PROBE: &str = "probe";

trait NextWake {
    async fn next_wake(&mut self) -> Option<async_nats::Message>;
}

impl NextWake for async_nats::Subscriber {
    async fn next_wake(&mut self) -> Option<async_nats::Message> {
        // Probes still in flight are not wake-ups.
        while let Some(m) = self.next().await {
            if m.payload.as_ref() != PROBE.as_bytes() {
                return Some(m);
            }
        }
        None
    }
}

/// Two senders through two nodes append without pause while the queue stream's
/// leader is killed (SIGKILL). A send whose answer is lost is sent again with the
/// same id, as a client does. Afterwards every acknowledged message is in the
/// queue exactly once, nothing is there that was not sent, and each sender's
/// messages are in the order sent.
#[tokio::test(flavor = "multi_thread")]
async fn the_stream_leader_killed_under_load_loses_no_acknowledged_message() {
    let Some(mut nats) = NatsCluster::start(3) else {
        return;
    };
    const PER_SENDER: u16 = 300;
    let bob = dev(2, 1);
    let mut nodes = Vec::new();
    for _ in 0..2 {
        // Each node knows every member, as a node's config lists them.
        let cluster = retry(|| Cluster::connect(&nats.urls)).await;
        nodes.push(Arc::new(
            retry(|| JetStreamQueues::open(&cluster, 3, limits(10_000))).await,
        ));
    }
    let mut senders = Vec::new();
    for (k, node) in nodes.iter().enumerate() {
        let node = node.clone();
        senders.push(tokio::spawn(async move {
            let sender = dev(10 + k as u64, 1);
            let (mut acked, mut errors) = (Vec::new(), 0u32);
            for i in 0..PER_SENDER {
                let mut id = [0u8; 16];
                id[0] = k as u8;
                id[1..3].copy_from_slice(&i.to_be_bytes());
                let m = Outgoing {
                    sender,
                    sender_number: format!("+1555000{k}"),
                    id,
                    envelopes: vec![(bob, id.to_vec())],
                    now_ms: 1,
                    expires_at_ms: None,
                };
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    match node.append(m.clone()).await {
                        Ok(AppendOutcome::Queued { .. } | AppendOutcome::Duplicate { .. }) => {
                            acked.push(id);
                            break;
                        }
                        Ok(other) => panic!("{other:?}"),
                        Err(e) => {
                            errors += 1;
                            assert!(Instant::now() < deadline, "never acknowledged: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            (acked, errors)
        }));
    }
    // Once some are in, kill whichever member leads the stream.
    let deadline = Instant::now() + Duration::from_secs(60);
    while nodes[0].queue_len(bob).await.unwrap_or(0) < 100 {
        assert!(Instant::now() < deadline, "no load");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let index = nats.kill_leader_of(STREAM).await;
    let leader = format!("n{index}");

    let mut acked = Vec::new();
    let mut errors = 0;
    for s in senders {
        let (ids, e) = s.await.unwrap();
        acked.extend(ids);
        errors += e;
    }
    let survivor = &nodes[usize::from(index == 0)];
    let mut queued: Vec<[u8; 16]> = Vec::new();
    let mut after = None;
    loop {
        let (page, _) = retry(|| survivor.page(bob, after, 500, usize::MAX)).await;
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        queued.extend(page.iter().map(|q| id_of(&q.item)));
    }
    let mut counts: HashMap<[u8; 16], u32> = HashMap::new();
    for id in &queued {
        *counts.entry(*id).or_default() += 1;
    }
    let lost = acked.iter().filter(|id| !counts.contains_key(*id)).count();
    let doubled = counts.values().filter(|&&n| n > 1).count();
    let phantoms = queued.iter().filter(|id| !acked.contains(id)).count();
    for k in 0..2u8 {
        let order: Vec<u16> = queued
            .iter()
            .filter(|id| id[0] == k)
            .map(|id| u16::from_be_bytes([id[1], id[2]]))
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "sender {k} out of order"
        );
    }
    println!(
        "leader {leader} killed: {} acknowledged, {} queued, {lost} lost, {doubled} doubled, \
         {phantoms} phantoms, {errors} sends tried again",
        acked.len(),
        queued.len()
    );
    assert_eq!(acked.len(), 2 * usize::from(PER_SENDER));
    assert_eq!(lost, 0, "acknowledged messages lost");
    assert_eq!(doubled, 0, "a message stored twice");
    assert_eq!(phantoms, 0);
}
