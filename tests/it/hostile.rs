//! Clients that misbehave: each gets an error or a closed stream, and the node keeps
//! serving everyone else.

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
