//! Clients that misbehave: each gets an error or a closed stream, and the node keeps
//! serving everyone else.

use std::time::Duration;

use switchboard::client::Client;
use switchboard::proto::{ErrorKind, Reply, frame};

use crate::support::*;

/// Sends raw bytes on a new stream and returns the node's reply, if any.
async fn raw(client: &Client, bytes: &[u8]) -> Option<Reply> {
    let (mut send, mut recv) = client.connection().open_bi().await.expect("open stream");
    send.write_all(bytes).await.expect("write");
    send.finish().expect("finish");
    frame::read::<Reply, _>(&mut recv, 1 << 20)
        .await
        .ok()
        .flatten()
}

fn error_kind(reply: Option<Reply>) -> ErrorKind {
    match reply {
        Some(Reply::Err(e)) => e.kind,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[tokio::test]
async fn garbage_oversized_truncated_and_unknown_frames_get_errors() {
    let node = InProcessNode::start(&config_text("")).await;
    let good = node.registered(ALICE).await;
    let bad = node.connect().await;

    // Garbage payload.
    let mut garbage = 9u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff; 9]);
    assert_eq!(error_kind(raw(&bad, &garbage).await), ErrorKind::Malformed);

    // An oversized frame: refused on its length prefix alone.
    let mut huge = (64u32 << 20).to_be_bytes().to_vec();
    huge.extend_from_slice(&[0; 100]);
    assert_eq!(
        error_kind(raw(&bad, &huge).await),
        ErrorKind::FrameTooLarge { max: 256 * 1024 }
    );

    // An unknown request kind (variant 200).
    assert_eq!(
        error_kind(raw(&bad, &[0, 0, 0, 1, 200]).await),
        ErrorKind::Malformed
    );

    // A frame cut short by the end of the stream.
    assert_eq!(
        error_kind(raw(&bad, &[0, 0, 0, 50, 1, 2]).await),
        ErrorKind::Malformed
    );

    // A hostile length inside the payload (a string claiming 2^60 bytes).
    let mut liar = vec![0, 0, 0, 10, 1, 253];
    liar.extend_from_slice(&(1u64 << 60).to_le_bytes());
    assert_eq!(error_kind(raw(&bad, &liar).await), ErrorKind::Malformed);

    // The offender's connection still answers proper requests; so does everyone else's.
    let refused = bad
        .whoami()
        .await
        .expect_err("unregistered device answered");
    assert!(refused.to_string().contains("not registered"), "{refused}");
    assert_eq!(good.whoami().await.unwrap().number, ALICE);
    node.shutdown().await;
}

#[tokio::test]
async fn unfinished_streams_time_out_while_others_are_served() {
    let node = InProcessNode::start(&config_text(
        "[limits]\nrequest_timeout_ms = 300\nmax_streams_per_connection = 4\n",
    ))
    .await;
    let good = node.registered(BOB).await;
    let bad = node.connect().await;

    // Four streams (the connection's whole allowance) opened with half a frame each.
    let mut held = Vec::new();
    for _ in 0..4 {
        let (mut send, recv) = bad.connection().open_bi().await.unwrap();
        send.write_all(&[0, 0, 0, 20, 1]).await.unwrap();
        held.push((send, recv));
    }
    // Meanwhile a well-behaved client is served at once.
    for _ in 0..10 {
        assert_eq!(good.whoami().await.unwrap().number, BOB);
    }
    // The node gives up on the unfinished requests: each stream is reset, no reply.
    for (_send, mut recv) in held {
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            frame::read::<Reply, _>(&mut recv, 1 << 20),
        )
        .await
        .expect("the node never closed an unfinished stream");
        assert!(got.is_err(), "an unfinished request got a reply: {got:?}");
    }
    // Its allowance is back: the same connection can make a proper request.
    assert!(
        bad.whoami()
            .await
            .is_err_and(|e| e.to_string().contains("not registered"))
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_garbage_does_not_stop_a_good_client() {
    let node = InProcessNode::start(&config_text("")).await;
    let good = node.registered(CAROL).await;
    let bad = node.connect().await;
    let flood = async {
        for i in 0..300u32 {
            let mut bytes = 16u32.to_be_bytes().to_vec();
            bytes.extend_from_slice(&i.to_le_bytes().repeat(4));
            let _ = raw(&bad, &bytes).await;
        }
    };
    let work = async {
        for _ in 0..30 {
            assert_eq!(good.whoami().await.unwrap().number, CAROL);
        }
    };
    tokio::join!(flood, work);
    node.shutdown().await;
}

#[tokio::test]
async fn a_length_claiming_billions_of_items_is_refused_without_allocating() {
    let node = InProcessNode::start(&config_text("")).await;
    let bad = node.connect().await;
    // A `Send` (variant 5): a 16-byte id, a one-byte recipient, then an envelope list
    // whose varint length claims 2^40 entries.
    let mut payload = vec![5u8];
    payload.extend_from_slice(&[7; 16]);
    payload.extend_from_slice(&[1, b'x']);
    payload.push(253);
    payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    assert_eq!(error_kind(raw(&bad, &frame).await), ErrorKind::Malformed);
    node.shutdown().await;
}

#[tokio::test]
async fn requests_before_registration_are_refused_and_change_nothing() {
    let node = InProcessNode::start(&config_text("")).await;
    let bob = node.registered(BOB).await;
    let stranger = node.connect().await;
    assert_eq!(
        kind(
            stranger
                .send(outgoing(BOB, [1; 16], b"let me in".to_vec()))
                .await
        ),
        ErrorKind::Unauthenticated
    );
    assert_eq!(
        kind(stranger.fetch_bundles(&number(BOB), true).await),
        ErrorKind::Unauthenticated
    );
    assert_eq!(
        kind(stranger.subscribe().await.map(|_| ())),
        ErrorKind::Unauthenticated
    );
    // Bob's queue is as empty as before.
    let mut sub = bob.subscribe().await.unwrap();
    let push = sub.next().await.unwrap().unwrap();
    assert!(push.items.is_empty() && push.backlog_end);
    node.shutdown().await;
}

#[tokio::test]
async fn a_used_code_cannot_be_replayed_by_another_device() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = node.registered(ALICE).await;
    // Someone who saw the code (or the VerifyCode request) sends it again.
    let thief = node.connect().await;
    assert_eq!(
        kind(thief.verify_code(&number(ALICE), CODE).await),
        ErrorKind::NoCodePending
    );
    assert_eq!(kind(thief.whoami().await), ErrorKind::Unauthenticated);
    assert_eq!(alice.whoami().await.unwrap().number, ALICE);
    node.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_code_requests_is_rate_limited() {
    let node = InProcessNode::start(&config_text("")).await;
    let good = node.registered(BOB).await;
    let flooder = node.connect().await;
    let carol = number(CAROL);
    flooder
        .request_code(&carol, switchboard::proto::Channel::Sms, "en")
        .await
        .expect("the first request");
    for _ in 0..50 {
        match kind(
            flooder
                .request_code(&carol, switchboard::proto::Channel::Sms, "en")
                .await,
        ) {
            ErrorKind::RateLimited { retry_after_secs } => assert!(retry_after_secs > 0),
            other => panic!("a repeated code request got {other:?}"),
        }
    }
    assert_eq!(good.whoami().await.unwrap().number, BOB);
    node.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_streams_on_one_connection_waits_its_turn() {
    let node =
        InProcessNode::start(&config_text("[limits]\nmax_streams_per_connection = 8\n")).await;
    let good = node.registered(ALICE).await;
    let bad = std::sync::Arc::new(node.connect().await);
    // 400 requests at once on one connection: QUIC lets only 8 streams be open at a
    // time, so the rest wait in the flooder's own client, not in the node.
    let flood: Vec<_> = (0..400)
        .map(|_| {
            let bad = bad.clone();
            tokio::spawn(async move { kind(bad.whoami().await) })
        })
        .collect();
    for _ in 0..20 {
        assert_eq!(good.whoami().await.unwrap().number, ALICE);
    }
    for task in flood {
        assert_eq!(task.await.unwrap(), ErrorKind::Unauthenticated);
    }
    node.shutdown().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    let node = InProcessNode::start(&config_text("[limits]\nidle_timeout_ms = 1000\n")).await;
    let idle = node.registered(ALICE).await;
    // Bounded: the node closes it after a second without traffic.
    let why = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        idle.connection().closed(),
    )
    .await
    .expect("an idle connection was kept");
    assert!(
        matches!(why, quinn::ConnectionError::TimedOut) || why.to_string().contains("closed"),
        "{why}"
    );
    let closed = idle
        .whoami()
        .await
        .expect_err("an idle connection was kept");
    assert!(
        closed.to_string().contains("timed out") || closed.to_string().contains("closed"),
        "{closed}"
    );
    // A new connection works.
    assert_eq!(
        node.registered(ALICE).await.whoami().await.unwrap().number,
        ALICE
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_device_that_never_reads_its_deliveries_stalls_only_itself() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;
    let carol = node.registered(CAROL).await;
    // Bob subscribes and then reads nothing: the node can push only as far as QUIC
    // flow control lets it, and the rest stays in his queue.
    let mut stalled = bob.subscribe().await.unwrap();
    for i in 0..300u32 {
        send_numbered(&alice, BOB, i)
            .await
            .expect("a send to a stalled device is still accepted");
    }
    // Everyone else is served as usual.
    carol
        .send(outgoing(ALICE, [9; 16], b"hi".to_vec()))
        .await
        .unwrap();
    let mut sub = alice.subscribe().await.unwrap();
    let push = sub.next().await.unwrap().unwrap();
    assert_eq!(push.items.len(), 1);
    // When Bob reads at last, everything is there, in order.
    let mut got = Vec::new();
    while got.len() < 300 {
        let push = tokio::time::timeout(std::time::Duration::from_secs(10), stalled.next())
            .await
            .expect("a push")
            .unwrap()
            .unwrap();
        for d in &push.items {
            if let switchboard::proto::Item::Message(m) = &d.item {
                got.push(numbered(&m.body));
            }
        }
        stalled
            .ack(push.items.iter().map(|d| d.seq).collect())
            .await
            .unwrap();
    }
    assert_eq!(got, (0..300).collect::<Vec<_>>());
    node.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_discovery_requests_hits_the_budget_and_hurts_nobody() {
    let node = InProcessNode::start(&config_text("[discovery]\ndaily_budget = 3000\n")).await;
    let good = node.registered(ALICE).await;
    let flooder = node.registered(BOB).await;
    let point = switchboard::discovery::blind("+14155550177")
        .unwrap()
        .element;
    let flood = async {
        let mut refused = 0;
        for _ in 0..10 {
            match flooder.evaluate(vec![point; 1024]).await {
                Ok(_) => {}
                Err(e) => {
                    assert!(matches!(
                        kind(Err::<(), _>(e)),
                        ErrorKind::RateLimited { .. }
                    ));
                    refused += 1;
                }
            }
        }
        refused
    };
    let work = async {
        for _ in 0..20 {
            assert_eq!(good.whoami().await.unwrap().number, ALICE);
        }
        good.evaluate(vec![point]).await.unwrap()
    };
    let (refused, (_, evaluated, left)) = tokio::join!(flood, work);
    assert_eq!(
        refused, 8,
        "2 batches of 1024 fit a budget of 3000; 8 are refused"
    );
    assert_eq!((evaluated.len(), left), (1, 2999));
    node.shutdown().await;
}

/// Connects a raw QUIC client offering only the ALPN id `alpn`.
async fn speaking(
    node: &InProcessNode,
    alpn: &[u8],
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let (creds, _) = switchboard::tls::Credentials::generate_device().expect("device key");
    let (crypto, _) =
        switchboard::tls::client_crypto_speaking(&creds, Some(node.fingerprint), alpn)
            .expect("tls config");
    let endpoint = switchboard::client::client_endpoint(false).expect("endpoint");
    let addr: std::net::SocketAddr = node.addr.parse().expect("addr");
    endpoint
        .connect_with(quinn::ClientConfig::new(crypto), addr, "switchboard")
        .expect("connect")
        .await
}

#[tokio::test]
async fn an_app_of_another_protocol_version_is_told_to_update() {
    let node = InProcessNode::start(&config_text(
        "[metrics]\nenabled = true\nlisten = \"127.0.0.1:0\"\n",
    ))
    .await;
    // An app of version 2: the handshake completes, and the node closes the
    // connection at once with a reason people can read.
    let old = speaking(&node, b"switchboard/2").await.expect("handshake");
    let closed = tokio::time::timeout(Duration::from_secs(10), old.closed())
        .await
        .expect("the node closes an outdated connection");
    let reason = switchboard::client::version_mismatch(&closed)
        .unwrap_or_else(|| panic!("not recognised as a version mismatch: {closed:?}"));
    assert!(reason.contains("update the app"), "{reason}");

    // An app of a version the node does not know at all: the handshake fails, and
    // the app can tell why.
    let unknown = speaking(&node, b"switchboard/99")
        .await
        .expect_err("no common version");
    assert!(
        switchboard::client::version_mismatch(&unknown).is_some(),
        "not recognised as a version mismatch: {unknown:?}"
    );

    // Apps of this version are served as ever, and the metric counts the old one.
    let good = node.registered(ALICE).await;
    good.whoami().await.expect("whoami");
    assert_eq!(node.metric("switchboard_outdated_clients_total").await, 1.0);
}
