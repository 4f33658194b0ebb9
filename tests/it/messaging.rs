//! Messaging through the client library: queues, delivery, acknowledgement, keys.
//! Bodies here are opaque bytes (the node never decrypts); the CLI tests cover the
//! encryption end to end.

use std::time::Duration;

use switchboard::client::e2e::new_message_id;
use switchboard::client::{Client, ClientError, Messenger, Subscription};
use switchboard::proto::{
    Accepted, Delivery, DeviceEnvelope, ErrorKind, Item, MessageId, Outgoing, Push,
};

use crate::support::*;

async fn send_with_id(
    client: &Client,
    to: &str,
    id: MessageId,
    body: &[u8],
) -> Result<Accepted, ClientError> {
    client
        .send(Outgoing {
            expires_in_secs: 0,
            id,
            to: to.into(),
            envelopes: vec![DeviceEnvelope {
                device_id: 1,
                body: body.to_vec(),
            }],
        })
        .await
}

async fn send_raw(client: &Client, to: &str, body: &[u8]) -> Result<Accepted, ClientError> {
    send_with_id(client, to, new_message_id(), body).await
}

async fn next(sub: &mut Subscription) -> Push {
    crate::support::next_push(sub).await
}

/// Reads the backlog (up to its end marker) without acknowledging it.
async fn backlog(sub: &mut Subscription) -> Vec<Delivery> {
    let mut items = Vec::new();
    loop {
        let push = next(sub).await;
        items.extend(push.items);
        if push.backlog_end {
            return items;
        }
    }
}

/// Subscribes, reads the backlog, acknowledges it all and ends the subscription.
async fn drain(client: &Client) -> Vec<Delivery> {
    let mut sub = client.subscribe().await.expect("subscribe");
    let items = backlog(&mut sub).await;
    sub.ack(items.iter().map(|d| d.seq).collect())
        .await
        .expect("ack");
    sub.finish().await.expect("finish");
    items
}

fn bodies(items: &[Delivery]) -> Vec<String> {
    items
        .iter()
        .filter_map(|d| match &d.item {
            Item::Message(m) => Some(String::from_utf8_lossy(&m.body).into_owned()),
            Item::Delivered(_)
            | Item::GroupMessage(_)
            | Item::GroupDelivered(_)
            | Item::Typing(_) => None,
        })
        .collect()
}

#[tokio::test]
async fn offline_backlog_arrives_in_order_once_and_the_sender_gets_receipts() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            send_raw(&alice, BOB, format!("m{i}").as_bytes())
                .await
                .unwrap()
                .id,
        );
    }
    let got = drain(&bob).await;
    assert_eq!(bodies(&got), ["m0", "m1", "m2", "m3", "m4"]);
    assert!(
        got.iter()
            .all(|d| matches!(&d.item, Item::Message(m) if m.from == ALICE))
    );
    assert!(drain(&bob).await.is_empty(), "acknowledged items came back");

    let receipts: Vec<_> = drain(&alice)
        .await
        .into_iter()
        .filter_map(|d| match d.item {
            Item::Delivered(r) => Some(r),
            Item::Message(_)
            | Item::GroupMessage(_)
            | Item::GroupDelivered(_)
            | Item::Typing(_) => None,
        })
        .collect();
    assert_eq!(receipts.iter().map(|r| r.id).collect::<Vec<_>>(), ids);
    assert!(receipts.iter().all(|r| r.to == BOB && r.device_id == 1));
    node.shutdown().await;
}

#[tokio::test]
async fn an_online_device_gets_messages_pushed() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;
    let mut sub = bob.subscribe().await.unwrap();
    assert!(backlog(&mut sub).await.is_empty());
    for i in 0..3 {
        send_raw(&alice, BOB, format!("live{i}").as_bytes())
            .await
            .unwrap();
        let push = next(&mut sub).await;
        assert_eq!(bodies(&push.items), [format!("live{i}")]);
        sub.ack(push.items.iter().map(|d| d.seq).collect())
            .await
            .unwrap();
    }
    sub.finish().await.unwrap();
    assert!(drain(&bob).await.is_empty());
    node.shutdown().await;
}

#[tokio::test]
async fn unacknowledged_items_are_delivered_again() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;
    send_raw(&alice, BOB, b"one").await.unwrap();
    send_raw(&alice, BOB, b"two").await.unwrap();
    let mut sub = bob.subscribe().await.unwrap();
    let first = backlog(&mut sub).await;
    // Acknowledge only the first.
    sub.ack(vec![first[0].seq]).await.unwrap();
    sub.finish().await.unwrap();
    let again = drain(&bob).await;
    assert_eq!(bodies(&again), ["two"]);
    assert_eq!(again[0].seq, first[1].seq);
    node.shutdown().await;
}

#[tokio::test]
async fn order_holds_per_sender_with_several_senders() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = node.registered(ALICE).await;
    let carol = node.registered(CAROL).await;
    let bob = node.registered(BOB).await;
    let sends = |client: Client, who: &'static str| async move {
        for i in 0..40 {
            send_raw(&client, BOB, format!("{who}{i}").as_bytes())
                .await
                .unwrap();
        }
        client
    };
    let (alice, carol) = tokio::join!(sends(alice, "a"), sends(carol, "c"));
    let got = bodies(&drain(&bob).await);
    assert_eq!(got.len(), 80);
    for who in ["a", "c"] {
        let mine: Vec<&String> = got.iter().filter(|b| b.starts_with(who)).collect();
        let expected: Vec<String> = (0..40).map(|i| format!("{who}{i}")).collect();
        assert_eq!(mine, expected.iter().collect::<Vec<_>>(), "order of {who}");
    }
    alice.close().await;
    carol.close().await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_resend_after_a_lost_answer_queues_nothing_new() {
    // The node waits this long for QUIC to confirm that an answer arrived.
    let node = InProcessNode::start(&config_text(
        "[limits]\nrequest_timeout_ms = 500\n[metrics]\nenabled = true\nlisten = \"127.0.0.1:0\"\n",
    ))
    .await;
    let creds = switchboard::tls::Credentials::generate_device().unwrap().0;
    let alice = node.connect_as(&creds).await;
    register(&alice, ALICE).await;
    let bob = node.registered(BOB).await;
    // Bob is online and takes the push but never acknowledges it, so the send is
    // written once its hand-off window runs out, and keeps a sent-id record.
    let mut sub = bob.subscribe().await.expect("subscribe");
    assert!(next(&mut sub).await.backlog_end);

    // Alice's first try goes through a relay that loses every answer.
    let relay = LossyRelay::start(&node.addr).await;
    let lossy = Client::connect(&relay.addr, &creds, Some(node.fingerprint))
        .await
        .expect("connect through the relay");
    relay.lose_replies(true);
    let id = new_message_id();
    let lost = tokio::spawn(async move { send_with_id(&lossy, BOB, id, b"once").await });
    let push = next(&mut sub).await;
    assert_eq!(
        bodies(&push.items),
        ["once"],
        "the node queued the first try"
    );
    // Wait until the node wrote the send (its window is 500 ms), answered, and gave
    // up waiting for the lost answer's acknowledgement (500 ms): the case under test.
    let url = node.metrics.clone().expect("metrics url");
    let unconfirmed = |url: String| async move {
        let (_, _, text) = tokio::task::spawn_blocking(move || http_get(&url))
            .await
            .expect("metrics");
        sample(
            &parse_openmetrics(&text),
            "switchboard_send_answers_unconfirmed_total",
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while unconfirmed(url.clone()).await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the node never gave up on the lost answer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // So Alice sends again, over a connection that works: same message, same time.
    let again = send_with_id(&alice, BOB, id, b"once").await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.accepted_at_ms, push.items[0].queued_at_ms);
    lost.abort();
    sub.finish().await.expect("finish");
    assert_eq!(bodies(&drain(&bob).await), ["once"], "one copy queued");
    // Answered, but not counted as a new message.
    let (_, _, text) = tokio::task::spawn_blocking(move || http_get(&url))
        .await
        .expect("metrics");
    let samples = parse_openmetrics(&text);
    let accepted = sample(&samples, "switchboard_messages_accepted_total");
    assert_eq!(accepted, 1.0, "{text}");

    // The same id from another sender is another message.
    let carol = node.registered(CAROL).await;
    assert!(
        !send_with_id(&carol, BOB, id, b"other")
            .await
            .unwrap()
            .duplicate
    );
    node.shutdown().await;
}

#[tokio::test]
async fn once_the_sender_has_the_answer_its_sent_id_is_forgotten() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;
    let id = new_message_id();
    assert!(
        !send_with_id(&alice, BOB, id, b"once")
            .await
            .unwrap()
            .duplicate
    );
    // The node drops the record once QUIC confirms Alice has the answer, just after
    // she reads it. A resend before that is still a duplicate (and answered, which
    // drops the record again); bounded.
    let mut queued_again = false;
    for _ in 0..200 {
        if !send_with_id(&alice, BOB, id, b"once")
            .await
            .unwrap()
            .duplicate
        {
            queued_again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(queued_again, "the sent-id record outlived the answer");
    // Queued twice at the node: the recipient's client drops the copy by id.
    let got = drain(&bob).await;
    assert_eq!(bodies(&got), ["once", "once"]);
    assert!(
        got.iter()
            .all(|d| matches!(&d.item, Item::Message(m) if m.id == id))
    );
    node.shutdown().await;
}

#[tokio::test]
async fn bad_sends_get_typed_errors_and_change_nothing() {
    let node = InProcessNode::start(&config_text(
        "[limits]\nmax_frame_bytes = 4096\n[messages]\nmax_envelope_bytes = 1024\nmax_queued_per_device = 3\n",
    ))
    .await;
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;
    assert_eq!(
        kind(send_raw(&alice, "+14155550199", b"x").await),
        ErrorKind::UnknownRecipient
    );
    assert_eq!(
        kind(send_raw(&alice, "not a number", b"x").await),
        ErrorKind::InvalidNumber
    );
    assert_eq!(
        kind(send_raw(&alice, BOB, &[0; 1025]).await),
        ErrorKind::EnvelopeTooLarge { max: 1024 }
    );
    let wrong_device = alice
        .send(Outgoing {
            expires_in_secs: 0,
            id: new_message_id(),
            to: BOB.into(),
            envelopes: vec![DeviceEnvelope {
                device_id: 7,
                body: b"x".to_vec(),
            }],
        })
        .await;
    assert_eq!(
        kind(wrong_device),
        ErrorKind::StaleDevices { devices: vec![1] }
    );
    let unregistered = node.connect().await;
    assert_eq!(
        kind(send_raw(&unregistered, BOB, b"x").await),
        ErrorKind::Unauthenticated
    );

    for i in 0..3 {
        send_raw(&alice, BOB, format!("q{i}").as_bytes())
            .await
            .unwrap();
    }
    assert_eq!(
        kind(send_raw(&alice, BOB, b"q3").await),
        ErrorKind::QueueFull { device_id: 1 }
    );
    assert_eq!(bodies(&drain(&bob).await), ["q0", "q1", "q2"]);
    // Receiving made room.
    send_raw(&alice, BOB, b"q4").await.unwrap();
    assert_eq!(bodies(&drain(&bob).await), ["q4"]);
    node.shutdown().await;
}

#[tokio::test]
async fn expired_items_are_swept() {
    let node = InProcessNode::start(&config_text(
        "[messages]\nttl_secs = 1\nsweep_interval_secs = 1\n",
    ))
    .await;
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;
    send_raw(&alice, BOB, b"stale").await.unwrap();
    // It is queued (looked at without acknowledging, well within its second)...
    let mut sub = bob.subscribe().await.unwrap();
    assert_eq!(sub.queued, 1, "the message was never queued");
    assert_eq!(bodies(&backlog(&mut sub).await), ["stale"]);
    sub.finish().await.unwrap();
    // ...and then swept. Bounded wait: the sweep runs every second and drops items
    // over a second old.
    let mut left = 1;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut sub = bob.subscribe().await.unwrap();
        left = backlog(&mut sub).await.len();
        sub.finish().await.unwrap();
        if left == 0 {
            break;
        }
    }
    assert_eq!(left, 0, "the expired message was never swept");
    node.shutdown().await;
}

#[tokio::test]
async fn another_device_cannot_read_or_acknowledge_bobs_queue() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;
    let carol = node.registered(CAROL).await;
    for i in 0..3 {
        send_raw(&alice, BOB, format!("for bob {i}").as_bytes())
            .await
            .unwrap();
    }
    // Peek at Bob's seqs without acknowledging them.
    let mut sub = bob.subscribe().await.unwrap();
    let seqs: Vec<u64> = backlog(&mut sub).await.iter().map(|d| d.seq).collect();
    sub.finish().await.unwrap();
    assert_eq!(seqs.len(), 3);

    // Carol's delivery stream is her own queue: empty. Her acks of Bob's seqs do nothing.
    let mut theirs = carol.subscribe().await.unwrap();
    assert!(backlog(&mut theirs).await.is_empty());
    theirs.ack(seqs.clone()).await.unwrap();
    theirs.finish().await.unwrap();
    // A device that is not registered cannot subscribe at all.
    let stranger = node.connect().await;
    assert_eq!(
        kind(stranger.subscribe().await.map(|s| s.queued)),
        ErrorKind::Unauthenticated
    );
    assert_eq!(
        bodies(&drain(&bob).await),
        ["for bob 0", "for bob 1", "for bob 2"]
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_graceful_restart_keeps_queued_messages() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = node.registered(ALICE).await;
    let bob_creds = switchboard::tls::Credentials::generate_device().unwrap().0;
    let bob = node.connect_as(&bob_creds).await;
    let b = number(BOB);
    bob.request_code(&b, switchboard::proto::Channel::Sms, "en")
        .await
        .unwrap();
    bob.verify_code(&b, CODE).await.unwrap();
    bob.close().await;
    send_raw(&alice, BOB, b"kept").await.unwrap();
    alice.close().await;
    let dir = node.stop().await;
    let node = InProcessNode::start_in(dir, &config_text("")).await;
    let bob = node.connect_as(&bob_creds).await;
    assert_eq!(bodies(&drain(&bob).await), ["kept"]);
    node.shutdown().await;
}

#[tokio::test]
async fn one_time_keys_run_out_then_the_fallback_key_works_and_the_device_tops_up() {
    let node = InProcessNode::start(&config_text(
        "[messages]\none_time_keys_low = 10\nkey_claims_per_pair_per_hour = 1000\n",
    ))
    .await;
    let (_bob_dir, bob_home) = registered_home(&node.addr, node.fingerprint, BOB).await;
    let carol = node.registered(CAROL).await;
    let b = number(BOB);
    // Carol claims every one-time key Bob published; two claims never share one.
    let mut claimed = std::collections::HashSet::new();
    for _ in 0..switchboard::client::e2e::ONE_TIME_KEY_TARGET {
        let bundles = carol.fetch_bundles(&b, true).await.unwrap();
        let otk = bundles.devices[0].one_time_key.expect("a one-time key");
        assert!(
            claimed.insert(otk.key),
            "a one-time key was handed out twice"
        );
    }
    let exhausted = carol.fetch_bundles(&b, true).await.unwrap();
    assert_eq!(exhausted.devices[0].one_time_key, None);
    assert!(exhausted.devices[0].fallback.is_some());

    // Alice starts a session on the fallback key; Bob reads it.
    let (_alice_dir, alice_home) = registered_home(&node.addr, node.fingerprint, ALICE).await;
    let alice = Messenger::open(&alice_home).unwrap();
    alice.send_text(&b, "via fallback").await.unwrap();
    alice.close().await;
    let bob = Messenger::open(&bob_home).unwrap();
    let events = receive_backlog(&bob).await;
    assert_eq!(texts(&events), ["via fallback"], "{events:?}");
    bob.close().await;

    // The node told Bob his keys ran out, and Bob topped up: fetchers get one-time
    // keys again.
    assert!(
        carol.fetch_bundles(&b, true).await.unwrap().devices[0]
            .one_time_key
            .is_some(),
        "Bob did not top up"
    );
    node.shutdown().await;
}

/// Fetching someone's bundles again and again does not drain their one-time keys:
/// past the claim limits the bundles come with the fallback key only.
#[tokio::test]
async fn one_client_cannot_drain_someones_one_time_keys() {
    let node = InProcessNode::start(&config_text(
        "[messages]\nkey_claims_per_pair_per_hour = 5\nkey_claims_per_account_per_hour = 8\n",
    ))
    .await;
    let (_bob_dir, _bob_home) = registered_home(&node.addr, node.fingerprint, BOB).await;
    let (mallory, alice) = (node.registered(CAROL).await, node.registered(ALICE).await);
    let b = number(BOB);
    let mut claimed = 0;
    for _ in 0..30 {
        let bundles = mallory.fetch_bundles(&b, true).await.unwrap();
        let bundle = &bundles.devices[0];
        assert!(bundle.fallback.is_some(), "sessions can always start");
        claimed += usize::from(bundle.one_time_key.is_some());
    }
    assert_eq!(claimed, 5, "one requester's quota");
    // Someone else still gets one-time keys, until Bob's own quota is spent.
    for _ in 0..3 {
        assert!(
            alice.fetch_bundles(&b, true).await.unwrap().devices[0]
                .one_time_key
                .is_some()
        );
    }
    assert!(
        alice.fetch_bundles(&b, true).await.unwrap().devices[0]
            .one_time_key
            .is_none()
    );
    node.shutdown().await;
}

#[tokio::test]
async fn key_uploads_with_bad_signatures_are_refused() {
    let node = InProcessNode::start(&config_text("")).await;
    let bob = node.registered(BOB).await;
    let upload = switchboard::proto::KeyUpload {
        identity: switchboard::proto::IdentityKeys {
            curve25519: [9; 32],
            ed25519: [9; 32],
        },
        fallback: None,
        one_time_keys: vec![switchboard::proto::SignedKey {
            key: [1; 32],
            signature: [2; 64],
        }],
        account_signature: None,
    };
    assert_eq!(kind(bob.publish_keys(upload).await), ErrorKind::BadKeys);
    let carol = node.registered(CAROL).await;
    assert_eq!(
        kind(carol.fetch_bundles(&number(BOB), true).await),
        ErrorKind::NoKeys
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_capped_udp_buffer_is_logged_and_the_node_still_serves() {
    // 1 GiB is beyond any default net.core.rmem_max: the kernel caps it, the node says
    // so and serves on the buffer it got.
    let node = ProcessNode::start(&config_text("[server]\nudp_buffer_bytes = 1073741824\n"));
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;
    let mut sub = bob.subscribe().await.unwrap();
    assert!(backlog(&mut sub).await.is_empty());
    send_raw(&alice, BOB, b"through a capped buffer")
        .await
        .unwrap();
    let push = next(&mut sub).await;
    assert_eq!(bodies(&push.items), ["through a capped buffer"]);
    let log = node.log();
    assert!(
        log.contains("the kernel capped the UDP receive buffer")
            && log.contains("asked=1073741824"),
        "{log}"
    );
}

#[tokio::test]
async fn pushes_that_are_already_here_are_taken_without_waiting() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = std::sync::Arc::new(node.registered(ALICE).await);
    let bob = node.registered(BOB).await;
    let mut sub = bob.subscribe().await.unwrap();
    assert!(backlog(&mut sub).await.is_empty());
    assert!(sub.ready().unwrap().is_none(), "nothing is here yet");
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..3 {
        let alice = alice.clone();
        sends.spawn(async move { send_raw(&alice, BOB, format!("r{i}").as_bytes()).await });
    }
    // Unacknowledged, the three wait out the hand-off window and are written: their
    // senders are answered only then, long after the node pushed them to Bob.
    while let Some(sent) = sends.join_next().await {
        sent.unwrap().unwrap();
    }
    // So all three are here: one `next`, then `ready` takes the rest without waiting.
    let mut items = next(&mut sub).await.items;
    while let Some(push) = sub.ready().unwrap() {
        items.extend(push.items);
    }
    let mut got = bodies(&items);
    got.sort();
    assert_eq!(got, ["r0", "r1", "r2"]);
    assert!(items.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(sub.ready().unwrap().is_none());
    sub.ack(items.iter().map(|d| d.seq).collect())
        .await
        .unwrap();
    sub.finish().await.unwrap();
    node.shutdown().await;
}

#[tokio::test]
async fn a_subscription_read_cancelled_midway_loses_nothing() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;
    let mut sub = bob.subscribe().await.unwrap();
    assert!(backlog(&mut sub).await.is_empty());
    // 60 KB (the largest envelope is 64 KiB) spans many packets, so reads raced
    // against a tiny timeout are cut off in the middle of the frame again and again.
    let body: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    let expected = body.clone();
    let send = tokio::spawn(async move {
        let accepted = send_raw(&alice, BOB, &body).await;
        (alice, accepted)
    });
    // Poll a fresh read once, drop it, let the connection run, again: every chunk
    // that arrives is read by a future that is then dropped.
    let mut cancelled = 0;
    let push = loop {
        let polled = {
            let read = std::pin::pin!(sub.next());
            let waker = std::task::Waker::noop();
            read.poll(&mut std::task::Context::from_waker(waker))
        };
        match polled {
            std::task::Poll::Ready(read) => break read.unwrap().expect("a push"),
            std::task::Poll::Pending => cancelled += 1,
        }
        assert!(cancelled < 1_000_000, "no push arrived");
        tokio::task::yield_now().await;
    };
    assert!(cancelled > 0);
    let [item] = &push.items[..] else {
        panic!("one item expected: {push:?}");
    };
    let Item::Message(m) = &item.item else {
        panic!("a message expected");
    };
    assert!(m.body == expected, "the body arrived intact");
    sub.ack(vec![item.seq]).await.unwrap();
    let (_alice, accepted) = send.await.unwrap();
    assert_eq!(accepted.unwrap().delivered, [1]);
    sub.finish().await.unwrap();
    node.shutdown().await;
}

#[tokio::test]
async fn requests_are_answered_without_a_stop_sending() {
    // A request stream ends with the client's FIN; the node reads it, so closing the
    // stream costs no STOP_SENDING (one packet per request otherwise, src/quic.rs).
    let node = InProcessNode::start(&config_text(
        "[metrics]\nenabled = true\nlisten = \"127.0.0.1:0\"\n",
    ))
    .await;
    let url = node.metrics.clone().expect("metrics url");
    let closed = |url: String| async move {
        let (_, _, text) = tokio::task::spawn_blocking(move || http_get(&url))
            .await
            .expect("metrics");
        sample(
            &parse_openmetrics(&text),
            "switchboard_request_streams_closed_total",
        )
    };
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;
    let mut sub = bob.subscribe().await.unwrap();
    assert!(backlog(&mut sub).await.is_empty());
    let before = closed(url.clone()).await;
    for i in 0..10 {
        alice.whoami().await.unwrap();
        send_raw(&alice, BOB, format!("m{i}").as_bytes())
            .await
            .unwrap();
    }
    // The node closes each stream once the client acknowledged its reply (up to its
    // ACK delay later): wait until all 20 are closed. A STOP_SENDING would have been
    // queued then; one more round trip brings anything queued before its reply.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while closed(url.clone()).await < before + 20.0 {
        assert!(std::time::Instant::now() < deadline, "streams never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    alice.whoami().await.unwrap();
    let stats = alice.connection().stats();
    assert_eq!(stats.frame_rx.stop_sending, 0, "{:?}", stats.frame_rx);
    assert!(stats.frame_rx.stream >= 20, "{:?}", stats.frame_rx);
}

/// A bad network between both clients and the node (10% of datagrams lost, 5% sent
/// twice, all delayed up to 30 ms so they arrive out of order): every message is
/// delivered once, in order, and every receipt arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_reordering_network_loses_nothing_and_delivers_once_in_order() {
    const N: u32 = 100;
    let node = InProcessNode::start(&config_text("")).await;
    let alice_path = ChaosRelay::start(&node.addr, 1, 0.10, 0.05, Duration::from_millis(30)).await;
    let bob_path = ChaosRelay::start(&node.addr, 2, 0.10, 0.05, Duration::from_millis(30)).await;
    let (alice_key, _) = switchboard::tls::Credentials::generate_device().unwrap();
    let (bob_key, _) = switchboard::tls::Credentials::generate_device().unwrap();
    let over = |path: &ChaosRelay, key: &switchboard::tls::Credentials| {
        let (addr, key, fp) = (path.addr.clone(), key.clone(), node.fingerprint);
        async move {
            Client::connect(&addr, &key, Some(fp))
                .await
                .expect("connect")
        }
    };
    let alice = over(&alice_path, &alice_key).await;
    register(&alice, ALICE).await;
    let bob = over(&bob_path, &bob_key).await;
    register(&bob, BOB).await;

    let mut sub = bob.subscribe().await.unwrap();
    assert!(backlog(&mut sub).await.is_empty());
    let receiver = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < N as usize {
            let push = tokio::time::timeout(Duration::from_secs(60), sub.next())
                .await
                .expect("a push within 60 s")
                .unwrap()
                .expect("the stream stays open");
            got.extend(push_numbers(&push));
            sub.ack(push.items.iter().map(|d| d.seq).collect())
                .await
                .unwrap();
        }
        sub.finish().await.unwrap();
        got
    });
    let mut delivered_with_answer = std::collections::BTreeSet::new();
    let mut ids = Vec::new();
    for i in 0..N {
        let mut body = vec![0u8; 64];
        body[..4].copy_from_slice(&i.to_be_bytes());
        let id = new_message_id();
        let accepted = alice.send(outgoing(BOB, id, body)).await.expect("send");
        assert!(!accepted.duplicate);
        if !accepted.delivered.is_empty() {
            delivered_with_answer.insert(id);
        }
        ids.push(id);
    }
    let got = receiver.await.unwrap();
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "once each, in order");

    // Every receipt: carried by the answer, or queued for Alice.
    let mut receipts = delivered_with_answer;
    let mut alice_sub = alice.subscribe().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while receipts.len() < N as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "{} receipts of {N}",
            receipts.len()
        );
        let push = tokio::time::timeout(Duration::from_secs(30), alice_sub.next())
            .await
            .expect("a push within 30 s")
            .unwrap()
            .expect("the stream stays open");
        for d in &push.items {
            if let Item::Delivered(r) = &d.item {
                receipts.insert(r.id);
            }
        }
        alice_sub
            .ack(push.items.iter().map(|d| d.seq).collect())
            .await
            .unwrap();
    }
    assert!(ids.iter().all(|id| receipts.contains(id)));
    alice_sub.finish().await.unwrap();
    // The network really was bad, both ways.
    for path in [&alice_path, &bob_path] {
        let (lost, doubled) = path.faults();
        assert!(lost > 10 && doubled > 5, "lost {lost}, doubled {doubled}");
    }
    node.shutdown().await;
}
