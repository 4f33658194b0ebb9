//! The hand-off: messages for an online device are pushed from memory and, once it
//! acknowledges them, never written; those it does not acknowledge within
//! `messages.handoff_ms` are written, and then survive a crash like any other.

use switchboard::client::Client;
use switchboard::client::e2e::new_message_id;
use switchboard::tls::Credentials;

use crate::support::{
    ALICE, BOB, CAROL, ProcessNode, config_text, http_get, next_push, outgoing, parse_openmetrics,
    push_numbers,
};

/// The node's hand-off counters: (staged, acknowledged, written), and its queue items.
fn handoff(url: &str) -> (f64, f64, f64, f64) {
    let (_, _, body) = http_get(url);
    let samples = parse_openmetrics(&body);
    let value = |name: &str| {
        samples
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("{name} missing from the metrics"))
    };
    (
        value("switchboard_handoff_items_total{outcome=\"staged\"}"),
        value("switchboard_handoff_items_total{outcome=\"acknowledged\"}"),
        value("switchboard_handoff_items_total{outcome=\"written\"}"),
        value("switchboard_queue_items"),
    )
}

fn config(handoff_ms: u64) -> String {
    config_text(&format!(
        "[metrics]\nenabled = true\nlisten = \"127.0.0.1:0\"\n[messages]\nhandoff_ms = {handoff_ms}\n"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_acknowledged_from_memory_are_never_written() {
    const N: u32 = 20;
    // A long window, so that a slow machine still acknowledges within it.
    let node = ProcessNode::start(&config(10_000));
    let url = node.metrics.clone().expect("metrics url");
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;
    let mut alice_sub = alice.subscribe().await.expect("subscribe");
    assert!(next_push(&mut alice_sub).await.backlog_end);
    let mut bob_sub = bob.subscribe().await.expect("subscribe");
    let receiver = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < N as usize {
            let push = next_push(&mut bob_sub).await;
            got.extend(push_numbers(&push));
            let seqs: Vec<u64> = push.items.iter().map(|d| d.seq).collect();
            bob_sub.ack(seqs).await.expect("ack");
        }
        got
    });
    // Each send is answered only once Bob acknowledged it (nothing was written, so
    // no group commit could have answered it), and the answer carries the receipt.
    for i in 0..N {
        let accepted = alice
            .send(outgoing(BOB, new_message_id(), i.to_be_bytes().to_vec()))
            .await
            .expect("send");
        assert!(!accepted.duplicate);
        assert_eq!(accepted.delivered, [1], "Bob's device 1 acknowledged it");
    }
    let got = receiver.await.expect("receiver");
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "in order, once each");

    // No receipt is queued for Alice: the answers carried them.
    let (staged, acknowledged, written, queued) = handoff(&url);
    assert_eq!(staged, f64::from(N));
    assert_eq!(acknowledged, f64::from(N));
    assert_eq!(written, 0.0);
    assert_eq!(queued, 0.0);
    // And none comes later: a marker Bob sends now is the first thing Alice is
    // pushed (her queue is in order, so a receipt queued before it would come first).
    let carol = node.registered(CAROL).await;
    let marker = tokio::spawn(async move {
        carol
            .send(outgoing(ALICE, new_message_id(), b"marker".to_vec()))
            .await
    });
    let push = next_push(&mut alice_sub).await;
    let items: Vec<_> = push.items.iter().map(|d| &d.item).collect();
    assert!(
        matches!(items[..], [switchboard::proto::Item::Message(m)] if m.body == b"marker"),
        "Alice was pushed something before the marker: {push:?}"
    );
    alice_sub
        .ack(push.items.iter().map(|d| d.seq).collect())
        .await
        .expect("ack");
    marker.await.expect("marker task").expect("marker answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_messages_are_written_and_survive_a_kill() {
    const N: u32 = 5;
    let mut node = ProcessNode::start(&config(100));
    let url = node.metrics.clone().expect("metrics url");
    let alice = node.registered(ALICE).await;
    let (bob_key, _) = Credentials::generate_device().expect("device key");
    let bob = node.registered_as(&bob_key, BOB).await;
    // Bob is online and is pushed every message, but never acknowledges.
    let mut bob_sub = bob.subscribe().await.expect("subscribe");
    for i in 0..N {
        alice
            .send(outgoing(BOB, new_message_id(), i.to_be_bytes().to_vec()))
            .await
            .expect("answered once written and durable");
    }
    let mut pushed = Vec::new();
    while pushed.len() < N as usize {
        pushed.extend(push_numbers(&next_push(&mut bob_sub).await));
    }
    assert_eq!(pushed, (0..N).collect::<Vec<_>>());
    // The first waited out its window and was written; that made Bob slow, so the
    // rest were written at once.
    let (staged, acknowledged, written, queued) = handoff(&url);
    assert_eq!(
        (staged, acknowledged, written, queued),
        (1.0, 0.0, 1.0, f64::from(N))
    );

    // Every send was answered, so every message is on disk.
    drop(bob_sub);
    drop(bob);
    node.crash_and_restart();
    let bob = Client::connect(&node.addr, &bob_key, Some(node.fingerprint))
        .await
        .expect("reconnect");
    let mut bob_sub = bob.subscribe().await.expect("subscribe");
    let mut again = Vec::new();
    while again.len() < N as usize {
        again.extend(push_numbers(&next_push(&mut bob_sub).await));
    }
    assert_eq!(again, (0..N).collect::<Vec<_>>());
}
