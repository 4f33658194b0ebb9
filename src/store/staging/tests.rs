//! Tests of the hand-off: staging, the write-behind, tickets and receipts.

use proptest::prelude::*;

use super::*;
use crate::store::AppendOutcome;
use crate::store::queues::tests::{alice_and_bob, registered};
use crate::store::records::QueueItem;

const ALICE: &str = "+14155550100";
const BOB: &str = "+14155550101";

fn online(devices: &[DeviceRef], max_bytes: usize) -> AppendPolicy {
    AppendPolicy {
        max_queued: 1000,
        handoff: Some(HandOff {
            online: devices.to_vec(),
            max_bytes,
        }),
        expires_at_ms: None,
    }
}

fn send(
    store: &Store,
    from: DeviceRef,
    to: DeviceRef,
    id: u8,
    policy: AppendPolicy,
) -> (AppendOutcome, Option<TicketWaiter>) {
    store
        .append_with(from, ALICE, [id; 16], vec![(to, vec![id])], 1, policy)
        .expect("append")
}

fn sled_seqs(store: &Store, device: DeviceRef) -> Vec<u64> {
    store
        .trees
        .queue
        .scan_prefix(device.key())
        .keys()
        .map(|k| layout::parse_queue(&k.expect("key")).expect("queue key").1)
        .collect()
}

fn staged_seqs(store: &Store, device: DeviceRef) -> Vec<u64> {
    let q = store.queue_writer();
    q.staged
        .devices
        .get(&device.key())
        .map(|m| m.keys().copied().collect())
        .unwrap_or_default()
}

fn ids(page: &[Queued]) -> Vec<u8> {
    page.iter()
        .map(|q| match &q.item {
            QueueItem::Message { body, .. } => body[0],
            QueueItem::Delivered { id, .. } => 100 + id[0],
            QueueItem::GroupMessage { id, .. } | QueueItem::GroupDelivered { id, .. } => {
                200 + id[0]
            }
        })
        .collect()
}

fn settled(ticket: &Ticket) -> bool {
    ticket.pending.load(Ordering::Acquire) == 0
}

#[test]
fn a_message_acknowledged_from_memory_never_reaches_sled() {
    let (_dir, store, alice, bob) = alice_and_bob();
    store.queue_len(bob).expect("len");
    store.queue_len(alice).expect("len");
    let (outcome, ticket) = send(&store, alice, bob, 1, online(&[bob], usize::MAX));
    assert_eq!(outcome, AppendOutcome::Queued { accepted_at_ms: 1 });
    let ticket = ticket.expect("staged for an online device");
    assert!(sled_seqs(&store, bob).is_empty());
    assert_eq!(store.queue_len(bob).expect("len"), 1);
    assert_eq!(store.queue_totals().0, 1);

    let (page, full) = store
        .staged_page(bob, None, 10, usize::MAX)
        .expect("all of it in memory");
    assert!(!full);
    assert_eq!(ids(&page), [1]);
    assert_eq!(store.queue_page(bob, None, 10).expect("page"), page);
    assert!(!settled(&ticket));

    // The sender's handler still waits: the receipt rides on its answer.
    let receipts = store.ack(bob, BOB, &[page[0].seq], 2).expect("ack");
    assert!(receipts.is_empty(), "no receipt queued: {receipts:?}");
    assert!(settled(&ticket));
    assert!(!ticket.written(), "acknowledged, not written");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(ticket.settled());
    assert_eq!(ticket.delivered(), [bob.device_id]);
    ticket.answered();
    assert!(
        store
            .staged_page(alice, None, 10, usize::MAX)
            .is_some_and(|(p, _)| p.is_empty())
    );

    assert_eq!(
        store.write_staged(None).expect("write"),
        WriteBehind { units: 1, items: 0 }
    );
    assert_eq!(store.trees.queue.len(), 0, "nothing was written");
    assert_eq!(store.trees.sent_message.len(), 0, "no sent-id either");
    assert_eq!(store.queue_totals(), (0, 0));
    assert_eq!(store.queue_len(bob).expect("len"), 0);
    let stats = store.handoff_stats();
    assert_eq!(stats.staged.load(Ordering::Relaxed), 1);
    assert_eq!(stats.acknowledged.load(Ordering::Relaxed), 1);
    assert_eq!(stats.written.load(Ordering::Relaxed), 0);
}

#[test]
fn a_receipt_nobody_can_carry_is_queued_and_acknowledged_from_memory() {
    let (_dir, store, alice, bob) = alice_and_bob();
    store.queue_len(alice).expect("len");
    // Nobody waits (the handler is gone before the ack): the receipt is queued.
    let (_, gone) = send(&store, alice, bob, 1, online(&[bob], usize::MAX));
    drop(gone);
    // A handler that leaves after the ack, without answering: queued as well.
    let (_, leaving) = send(&store, alice, bob, 2, online(&[bob], usize::MAX));
    let page = store.queue_page(bob, None, 10).expect("page");
    assert_eq!(ids(&page), [1, 2]);
    let seqs: Vec<u64> = page.iter().map(|q| q.seq).collect();
    let receipts = store
        .ack_from_memory(bob, BOB, &seqs, 2)
        .expect("ack")
        .expect("all in memory");
    assert_eq!(receipts, [alice], "the first receipt, queued at once");
    let carried = leaving.expect("waiter").leave().expect("receipts to queue");
    assert_eq!(carried.sender, alice);
    // The queue length of Alice is known (loaded above): no wait, no scan.
    assert!(store.try_stage_carried(&carried).expect("stage"));

    let (receipts, _) = store
        .staged_page(alice, None, 10, usize::MAX)
        .expect("receipts in memory");
    assert_eq!(ids(&receipts), [101, 102]);
    let seqs: Vec<u64> = receipts.iter().map(|q| q.seq).collect();
    assert_eq!(
        store.ack_from_memory(alice, ALICE, &seqs, 3).expect("ack"),
        Some(Vec::new())
    );
    assert_eq!(
        store.ack_from_memory(alice, ALICE, &seqs, 3).expect("ack"),
        None,
        "gone from memory: the store thread must look in sled"
    );
    store.write_staged(None).expect("write");
    assert_eq!(store.trees.queue.len(), 0);
    assert_eq!(store.queue_totals(), (0, 0));
}

/// A handler on an async worker that leaves its answer's receipts never waits for the
/// queue writer lock nor counts a queue: it hands them to the store thread instead.
#[test]
fn receipts_left_by_an_unanswered_send_never_wait_on_an_async_worker() {
    let (_dir, store, alice, bob) = alice_and_bob();
    let carried = crate::store::CarriedReceipts {
        sender: alice,
        number: BOB.to_string(),
        id: [7; 16],
        devices: vec![bob.device_id],
    };
    // The sender's queue length is not known yet: that would be a sled scan.
    assert!(!store.try_stage_carried(&carried).expect("try"));
    store.queue_len(alice).expect("len");
    // The lock is held (by the store thread, say): no wait either.
    {
        let _held = store.queue_writer();
        assert!(!store.try_stage_carried(&carried).expect("try"));
    }
    assert!(store.try_stage_carried(&carried).expect("try"));
    store
        .stage_carried(&carried)
        .expect("the store thread's way");
    assert_eq!(store.queue_len(alice).expect("len"), 2);
}

#[test]
fn unacknowledged_items_are_written_after_the_sled_part_in_order() {
    let (_dir, store, alice, bob) = alice_and_bob();
    let before = Instant::now();
    // Bob offline: straight to sled.
    for id in 0..2 {
        assert!(send(&store, alice, bob, id, 1000.into()).1.is_none());
    }
    // Online: staged. Offline again but with items in memory: staged too.
    let t2 = send(&store, alice, bob, 2, online(&[bob], usize::MAX)).1;
    let t3 = send(&store, alice, bob, 3, online(&[bob], usize::MAX)).1;
    let t4 = send(&store, alice, bob, 4, online(&[], usize::MAX)).1;
    let tickets: Vec<TicketWaiter> = [t2, t3, t4].into_iter().flatten().collect();
    assert_eq!(tickets.len(), 3);
    assert_eq!(sled_seqs(&store, bob).len(), 2);
    assert_eq!(staged_seqs(&store, bob).len(), 3);
    assert!(
        store.staged_page(bob, None, 10, usize::MAX).is_none(),
        "sled has items above the cursor"
    );

    let page = store.queue_page(bob, None, 10).expect("page");
    assert_eq!(ids(&page), [0, 1, 2, 3, 4]);
    assert!(page.windows(2).all(|w| w[0].seq < w[1].seq));
    let (first, full) = store
        .queue_page_within(bob, None, 3, usize::MAX)
        .expect("page");
    assert_eq!((ids(&first), full), (vec![0, 1, 2], true));
    let (rest, full) = store
        .queue_page_within(bob, first.last().map(|q| q.seq), 3, usize::MAX)
        .expect("page");
    assert_eq!((ids(&rest), full), (vec![3, 4], false));
    let (memory, _) = store
        .staged_page(bob, Some(page[1].seq), 10, usize::MAX)
        .expect("past the sled part");
    assert_eq!(ids(&memory), [2, 3, 4]);

    assert_eq!(
        store.write_staged(Some(before)).expect("write"),
        WriteBehind::default(),
        "nothing is due before its window ran out"
    );
    assert_eq!(
        store.write_staged(None).expect("write"),
        WriteBehind { units: 3, items: 3 }
    );
    assert!(tickets.iter().all(|t| settled(t) && t.written()));
    assert_eq!(
        sled_seqs(&store, bob),
        page.iter().map(|q| q.seq).collect::<Vec<_>>()
    );
    assert_eq!(store.trees.sent_message.len(), 5);
    assert_eq!(store.queue_page(bob, None, 10).expect("page"), page);
    assert_eq!(store.queue_len(bob).expect("len"), 5);
}

#[test]
fn a_resend_while_staged_is_a_duplicate_with_the_same_ticket() {
    let (_dir, store, alice, bob) = alice_and_bob();
    let (_, first) = send(&store, alice, bob, 7, online(&[bob], usize::MAX));
    let (outcome, again) = send(&store, alice, bob, 7, online(&[bob], usize::MAX));
    assert_eq!(outcome, AppendOutcome::Duplicate { accepted_at_ms: 1 });
    let (first, again) = (first.expect("ticket"), again.expect("ticket"));
    assert!(Arc::ptr_eq(&first.ticket, &again.ticket));
    assert_eq!(store.queue_len(bob).expect("len"), 1);

    store.write_staged(None).expect("write");
    let (outcome, ticket) = send(&store, alice, bob, 7, online(&[bob], usize::MAX));
    assert_eq!(outcome, AppendOutcome::Duplicate { accepted_at_ms: 1 });
    assert!(ticket.is_none(), "written: the sent-id is in sled");
}

#[test]
fn an_answered_send_leaves_no_sent_id_and_its_resend_is_queued_again() {
    let (_dir, store, alice, bob) = alice_and_bob();
    // Written at once (bob offline): the record is in sled until the answer.
    assert!(send(&store, alice, bob, 1, 1000.into()).1.is_none());
    assert_eq!(store.trees.sent_message.len(), 1);
    store.forget_sent(alice, [1; 16], 1).expect("forget");
    assert_eq!(store.trees.sent_message.len(), 0);
    let (outcome, _) = send(&store, alice, bob, 1, 1000.into());
    assert!(
        matches!(outcome, AppendOutcome::Queued { .. }),
        "{outcome:?}"
    );
    assert_eq!(store.queue_len(bob).expect("len"), 2);

    // Staged, and its items written by a write that is not its unit's (bob went
    // slow): answered before the write-behind reaches the unit, whose record then
    // is never written.
    let (_, ticket) = send(&store, alice, bob, 2, online(&[bob], usize::MAX));
    let ticket = ticket.expect("staged");
    store
        .write_device_staged(&mut store.queue_writer(), bob.key())
        .expect("write");
    assert!(settled(&ticket) && ticket.written());
    store.forget_sent(alice, [2; 16], 1).expect("forget");
    assert_eq!(store.write_staged(None).expect("write").units, 1);
    assert_eq!(
        store.trees.sent_message.len(),
        1,
        "only the resend's record"
    );
    assert_eq!(staged_seqs(&store, bob), Vec::<u64>::new());
    assert_eq!(store.queue_len(bob).expect("len"), 3);

    // Forgetting a record that is not there, or another acceptance's, changes nothing.
    store.forget_sent(bob, [9; 16], 1).expect("forget");
    store.forget_sent(alice, [1; 16], 2).expect("forget");
    assert_eq!(store.trees.sent_message.len(), 1);
}

#[test]
fn a_resend_after_a_forgotten_staged_record_keeps_its_own_record() {
    let (_dir, store, alice, bob) = alice_and_bob();
    store.queue_len(bob).expect("len");
    // To bob (online: staged) and to alice's own device (offline: written at once),
    // so the ticket counts as written and its unit would write the record.
    let both = |id: u8, at: u64| {
        store
            .append_with(
                alice,
                ALICE,
                [id; 16],
                vec![(bob, vec![id]), (alice, vec![id])],
                at,
                online(&[bob], usize::MAX),
            )
            .expect("append")
    };
    let (_, first) = both(5, 1);
    assert!(first.expect("staged").written());
    // Answered (bob acknowledged in time, say), and the record forgotten while the
    // first unit waits for its window; then the client sends the same id again.
    store.forget_sent(alice, [5; 16], 1).expect("forget");
    let (outcome, again) = both(5, 2);
    assert_eq!(outcome, AppendOutcome::Queued { accepted_at_ms: 2 });
    let again = again.expect("staged");
    // The first unit is written: the staged record is the resend's, not its own.
    assert_eq!(
        store
            .write_oldest_unit(&mut store.queue_writer(), false)
            .expect("write"),
        Some(1)
    );
    assert_eq!(
        store.trees.sent_message.len(),
        0,
        "no record before its items"
    );
    assert_eq!(staged_seqs(&store, bob).len(), 1);
    // A late forget of the first acceptance leaves the resend's record alone.
    store.forget_sent(alice, [5; 16], 1).expect("forget");
    assert_eq!(store.write_staged(None).expect("write").units, 1);
    assert!(settled(&again));
    let record = store
        .trees
        .sent_message
        .get(layout::sent(alice.key(), &[5; 16]))
        .expect("read")
        .expect("the resend's record");
    assert_eq!(records::queued_at(&record), Some(2));
}

#[test]
fn a_receipt_written_straight_to_sled_follows_the_senders_staged_items() {
    let (_dir, store, alice, bob) = alice_and_bob();
    // Alice to an offline Bob: in sled. Bob to an online Alice: in memory.
    send(&store, alice, bob, 1, 1000.into());
    let (_, ticket) = send(&store, bob, alice, 2, online(&[alice], usize::MAX));
    let ticket = ticket.expect("staged");
    let written = store.queue_page(bob, None, 10).expect("page");
    store.ack(bob, BOB, &[written[0].seq], 5).expect("ack");

    assert!(staged_seqs(&store, alice).is_empty());
    assert!(settled(&ticket) && ticket.written());
    let page = store.queue_page(alice, None, 10).expect("page");
    assert_eq!(ids(&page), [2, 101], "the message, then the receipt");
    assert_eq!(
        sled_seqs(&store, alice),
        page.iter().map(|q| q.seq).collect::<Vec<_>>()
    );
}

#[test]
fn a_device_that_lets_a_window_run_out_is_written_to_until_it_catches_up() {
    let (_dir, store, alice, bob) = alice_and_bob();
    let first = send(&store, alice, bob, 1, online(&[bob], usize::MAX)).1;
    let second = send(&store, alice, bob, 2, online(&[bob], usize::MAX)).1;
    assert!(first.is_some() && second.is_some());
    // The write-behind finds both unacknowledged when their window ran out.
    let later = Instant::now();
    store.write_staged(Some(later)).expect("write");
    // Bob is slow now: a send to him is written at once, although he is online.
    let third = send(&store, alice, bob, 3, online(&[bob], usize::MAX)).1;
    assert!(third.is_none(), "written, no window to wait for");
    assert!(staged_seqs(&store, bob).is_empty());
    // He acknowledges the first only: still behind.
    let page = store.queue_page(bob, None, 10).expect("page");
    assert_eq!(ids(&page), [1, 2, 3]);
    store.ack(bob, BOB, &[page[0].seq], 2).expect("ack");
    assert!(
        send(&store, alice, bob, 4, online(&[bob], usize::MAX))
            .1
            .is_none()
    );
    // Past the item that made him slow: staged again.
    store.ack(bob, BOB, &[page[1].seq], 2).expect("ack");
    assert!(
        send(&store, alice, bob, 5, online(&[bob], usize::MAX))
            .1
            .is_some()
    );
    assert_eq!(
        ids(&store.queue_page(bob, None, 10).expect("page")),
        [3, 4, 5]
    );
}

#[test]
fn an_append_runs_in_memory_only_when_it_needs_no_write() {
    use crate::store::InMemory;
    let (_dir, store, alice, bob) = alice_and_bob();
    let try_send = |id: u8, policy: &AppendPolicy| {
        store
            .append_in_memory(alice, ALICE, [id; 16], vec![(bob, vec![id])], 1, policy)
            .expect("append in memory")
    };
    // Bob's queue length is not loaded yet (he never subscribed): the store thread.
    assert!(matches!(
        try_send(1, &online(&[bob], usize::MAX)),
        InMemory::NeedsStore(e) if e == [(bob, vec![1])]
    ));
    store.queue_len(bob).expect("len");
    // Offline, or beyond the byte limit: the store thread.
    assert!(matches!(try_send(1, &1000.into()), InMemory::NeedsStore(_)));
    assert!(matches!(
        try_send(1, &online(&[bob], 16)),
        InMemory::NeedsStore(_)
    ));
    // Online and keeping up: staged right here, and a resend finds it.
    let InMemory::Done(outcome, Some(ticket)) = try_send(1, &online(&[bob], usize::MAX)) else {
        panic!("staged in memory");
    };
    assert_eq!(outcome, AppendOutcome::Queued { accepted_at_ms: 1 });
    assert_eq!(staged_seqs(&store, bob).len(), 1);
    let InMemory::Done(again, Some(same)) = try_send(1, &online(&[bob], usize::MAX)) else {
        panic!("a duplicate of the staged send");
    };
    assert_eq!(again, AppendOutcome::Duplicate { accepted_at_ms: 1 });
    assert!(Arc::ptr_eq(&ticket.ticket, &same.ticket));
    // Its window runs out: written, and Bob is slow, so the next needs the thread.
    store.write_staged(Some(Instant::now())).expect("write");
    assert!(matches!(
        try_send(2, &online(&[bob], usize::MAX)),
        InMemory::NeedsStore(_)
    ));
    // A resend of the written one is a duplicate found in sled, without a ticket.
    store
        .ack(bob, BOB, &staged_or_sled(&store, bob), 2)
        .expect("ack");
    let InMemory::Done(outcome, None) = try_send(1, &online(&[bob], usize::MAX)) else {
        panic!("a duplicate from sled");
    };
    assert_eq!(outcome, AppendOutcome::Duplicate { accepted_at_ms: 1 });
}

fn staged_or_sled(store: &Store, device: DeviceRef) -> Vec<u64> {
    store
        .queue_page(device, None, 100)
        .expect("page")
        .iter()
        .map(|q| q.seq)
        .collect()
}

#[test]
fn an_append_without_a_hand_off_writes_the_staged_items_first() {
    let (_dir, store, alice, bob) = alice_and_bob();
    let staged = send(&store, alice, bob, 1, online(&[bob], usize::MAX)).1;
    store
        .append(alice, ALICE, [2; 16], vec![(bob, vec![2])], 1, 1000)
        .expect("append");
    assert!(staged.is_some_and(|t| settled(&t) && t.written()));
    assert!(staged_seqs(&store, bob).is_empty());
    let page = store.queue_page(bob, None, 10).expect("page");
    assert_eq!(ids(&page), [1, 2]);
    assert_eq!(
        sled_seqs(&store, bob),
        page.iter().map(|q| q.seq).collect::<Vec<_>>()
    );
}

#[test]
fn beyond_the_byte_limit_the_oldest_sends_are_written() {
    let (_dir, store, alice, bob) = alice_and_bob();
    let tickets: Vec<TicketWaiter> = (0..3)
        .filter_map(|id| send(&store, alice, bob, id, online(&[bob], 1)).1)
        .collect();
    assert_eq!(tickets.len(), 3);
    assert!(tickets.iter().all(|t| settled(t) && t.written()));
    assert_eq!(sled_seqs(&store, bob).len(), 3);
    assert!(staged_seqs(&store, bob).is_empty());
    assert_eq!(store.queue_writer().staged.bytes, 0);
}

#[test]
fn dropping_a_device_forgets_its_staged_items_and_a_backup_keeps_them() {
    let (dir, store, alice, bob) = alice_and_bob();
    let (_, ticket) = send(&store, alice, bob, 1, online(&[bob], usize::MAX));
    send(&store, bob, alice, 2, online(&[alice], usize::MAX));

    let mut backup = Vec::new();
    store
        .write_backup(&mut backup, &[], |_| {})
        .expect("backup");
    let target = dir.path().join("restored");
    crate::store::backup::restore(&backup[..], &target, |_| {}).expect("restore");
    let restored = Store::open(&target.join("db")).expect("open");
    assert_eq!(ids(&restored.queue_page(bob, None, 10).expect("page")), [1]);
    drop(restored);

    send(&store, alice, bob, 3, online(&[bob], usize::MAX));
    let dropped = store.drop_device(bob).expect("drop");
    assert_eq!(dropped, 2, "one written by the backup, one in memory");
    assert!(
        ticket.is_some_and(|t| settled(&t) && t.written()),
        "settled as a write: the sender waits for the commit that covers the drop"
    );
    assert!(staged_seqs(&store, bob).is_empty());
    assert_eq!(store.queue_len(bob).expect("len"), 0);
    assert_eq!(store.queue_totals().0, 1, "Alice's message from Bob");
}

#[derive(Debug, Clone)]
enum Op {
    /// From device `from` (0 or 1) to the other, with the recipient online or not.
    Send { from: usize, online: bool },
    /// Device `who` acknowledges the item at `index` (modulo its queue) of its queue.
    Ack { who: usize, index: usize },
    /// The send at `index` (modulo the sends so far) is sent again, with its id.
    Resend { index: usize, online: bool },
    /// The sender of the send at `index` got its answer: its sent-id record goes.
    Forget { index: usize },
    /// The write-behind at shutdown or for a backup: everything.
    WriteAll,
    /// The write-behind with every window run out (devices become slow).
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, any::<bool>()).prop_map(|(from, online)| Op::Send { from, online }),
        3 => (0..2usize, 0..8usize).prop_map(|(who, index)| Op::Ack { who, index }),
        1 => (0..40usize, any::<bool>()).prop_map(|(index, online)| Op::Resend { index, online }),
        1 => (0..40usize).prop_map(|index| Op::Forget { index }),
        1 => Just(Op::WriteAll),
        1 => Just(Op::Expire),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever mix of staged and written items, acknowledgements from memory
    /// and from sled, resends, answered sends and write-behind runs: every queue
    /// reads back as the model says, in seq order, with sled holding only items
    /// older than any staged, and no sent-id record in sled before its items.
    #[test]
    fn queues_read_back_as_the_model_says(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let devices = [registered(&store, ALICE, 1), registered(&store, BOB, 2)];
        let numbers = [ALICE, BOB];
        // Per device: what its queue holds, as `ids` renders it.
        let mut model: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        // Every send so far: (sender, id).
        let mut sends: Vec<(usize, u8)> = Vec::new();
        for (n, op) in ops.into_iter().enumerate() {
            let send = match op {
                Op::Send { from, online } => Some((from, n as u8, online)),
                Op::Resend { index, online } if !sends.is_empty() => {
                    let (from, id) = sends[index % sends.len()];
                    Some((from, id, online))
                }
                _ => None,
            };
            match op {
                Op::Send { .. } | Op::Resend { .. } => {
                    let Some((from, id, is_online)) = send else { continue };
                    let to = 1 - from;
                    let policy = if is_online {
                        online(&[devices[to]], 4096)
                    } else {
                        1000.into()
                    };
                    // As the node does: in memory if it can, else the full append.
                    let envelopes = vec![(devices[to], vec![id])];
                    let outcome = match store
                        .append_in_memory(devices[from], numbers[from], [id; 16], envelopes, 1, &policy)
                        .expect("append in memory")
                    {
                        crate::store::InMemory::Done(outcome, _) => outcome,
                        crate::store::InMemory::NeedsStore(envelopes) => {
                            store
                                .append_with(devices[from], numbers[from], [id; 16], envelopes, 1, policy)
                                .expect("append")
                                .0
                        }
                    };
                    match outcome {
                        AppendOutcome::Queued { .. } => model[to].push(id),
                        AppendOutcome::Duplicate { .. } => {
                            prop_assert!(matches!(op, Op::Resend { .. }), "a new id is no duplicate");
                        }
                        AppendOutcome::QueueFull { .. } => prop_assert!(false, "no queue is full"),
                    }
                    if matches!(op, Op::Send { .. }) {
                        sends.push((from, id));
                    }
                }
                Op::Forget { index } => {
                    if sends.is_empty() {
                        continue;
                    }
                    let (from, id) = sends[index % sends.len()];
                    store.forget_sent(devices[from], [id; 16], 1).expect("forget");
                }
                Op::Ack { who, index } => {
                    let page = store.queue_page(devices[who], None, 100).expect("page");
                    if page.is_empty() {
                        continue;
                    }
                    let item = &page[index % page.len()];
                    store.ack(devices[who], numbers[who], &[item.seq], 2).expect("ack");
                    let position = index % model[who].len();
                    let acked = model[who].remove(position);
                    if acked < 100 {
                        model[1 - who].push(100 + acked);
                    }
                }
                Op::WriteAll => {
                    store.write_staged(None).expect("write");
                }
                Op::Expire => {
                    store.write_staged(Some(Instant::now())).expect("write");
                }
            }
            for (d, device) in devices.iter().enumerate() {
                let page = store.queue_page(*device, None, 100).expect("page");
                prop_assert_eq!(ids(&page), model[d].clone());
                prop_assert!(page.windows(2).all(|w| w[0].seq < w[1].seq));
                prop_assert_eq!(store.queue_len(*device).expect("len"), model[d].len() as u64);
                let (sled, staged) = (sled_seqs(&store, *device), staged_seqs(&store, *device));
                if let (Some(newest_written), Some(oldest_staged)) = (sled.last(), staged.first()) {
                    prop_assert!(newest_written < oldest_staged, "sled {:?} staged {:?}", sled, staged);
                }
            }
            prop_assert_eq!(
                store.queue_totals().0,
                (model[0].len() + model[1].len()) as u64
            );
            // A sent-id record in sled means its items are in sled (or acknowledged):
            // none of them is still staged.
            let q = store.queue_writer();
            for key in store.trees.sent_message.iter().keys() {
                let key = key.expect("sent key");
                let staged = q.staged.devices.values().flat_map(|m| m.values());
                for item in staged {
                    if let Some((sender, id)) = item.from {
                        let mine = layout::sent(sender.key(), &id);
                        prop_assert!(mine[..] != key[..], "a record in sled before its items");
                    }
                }
            }
        }
    }
}
