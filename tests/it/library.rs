//! The client library against an in-process node: registration and its rules.

use switchboard::client::{Client, ClientError};
use switchboard::proto::{Channel, ErrorKind, Request};
use switchboard::tls::Credentials;

use crate::support::*;

#[tokio::test]
async fn register_and_whoami() {
    let node = InProcessNode::start(&config_text("")).await;
    let client = node.connect().await;
    let alice = number(ALICE);
    let sent = client
        .request_code(&alice, Channel::Sms, "en")
        .await
        .unwrap();
    assert_eq!(sent.expires_in_secs, 600);
    assert_eq!(sent.tries, 5);
    let reg = client.verify_code(&alice, CODE).await.unwrap();
    assert_eq!(reg.number, ALICE);
    assert!(!reg.took_over);
    let me = client.whoami().await.unwrap();
    assert_eq!(
        (me.number.as_str(), me.account_id, me.device_id),
        (ALICE, reg.account_id, reg.device_id)
    );
    assert_eq!(client.fingerprint(), node.fingerprint);
    client.close().await;
    node.shutdown().await;
}

#[tokio::test]
async fn many_requests_in_flight_on_one_connection() {
    let node = InProcessNode::start(&config_text("")).await;
    let client = node.registered(ALICE).await;
    let calls = (0..64).map(|_| client.whoami());
    let answers = futures_join_all(calls).await;
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|i| i.number == ALICE))
    );
    node.shutdown().await;
}

/// Joins futures without pulling in the futures crate.
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out = Vec::with_capacity(set.len());
    for f in set {
        out.push(f.await);
    }
    out
}

#[tokio::test]
async fn unregistered_device_is_unauthenticated() {
    let node = InProcessNode::start(&config_text("")).await;
    let client = node.connect().await;
    assert_eq!(kind(client.whoami().await), ErrorKind::Unauthenticated);
    node.shutdown().await;
}

#[tokio::test]
async fn resend_cooldown_is_enforced() {
    let node = InProcessNode::start(&config_text("")).await;
    let client = node.connect().await;
    let bob = number(BOB);
    client.request_code(&bob, Channel::Sms, "en").await.unwrap();
    match kind(client.request_code(&bob, Channel::Voice, "en").await) {
        ErrorKind::RateLimited { retry_after_secs } => {
            assert!((1..=60).contains(&retry_after_secs))
        }
        other => panic!("{other:?}"),
    }
    node.shutdown().await;
}

#[tokio::test]
async fn verify_needs_a_pending_code_and_a_well_formed_one() {
    let node = InProcessNode::start(&config_text("")).await;
    let client = node.connect().await;
    let carol = number(CAROL);
    assert_eq!(
        kind(client.verify_code(&carol, CODE).await),
        ErrorKind::NoCodePending
    );
    client
        .request_code(&carol, Channel::Sms, "en")
        .await
        .unwrap();
    assert_eq!(
        kind(client.verify_code(&carol, "12345").await),
        ErrorKind::InvalidCode
    );
    assert_eq!(
        kind(client.verify_code(&carol, "abcdef").await),
        ErrorKind::InvalidCode
    );
    // Malformed codes did not use up tries.
    assert_eq!(
        kind(client.verify_code(&carol, "000000").await),
        ErrorKind::WrongCode { tries_left: 4 }
    );
    client.verify_code(&carol, CODE).await.unwrap();
    // A code is used once.
    assert_eq!(
        kind(client.verify_code(&carol, CODE).await),
        ErrorKind::NoCodePending
    );
    node.shutdown().await;
}

#[tokio::test]
async fn the_node_rejects_numbers_that_are_not_e164() {
    let node = InProcessNode::start(&config_text("")).await;
    let client = node.connect().await;
    for bad in ["+1 415 555 0100", "14155550100", "+1", "", "+99912345678"] {
        let request = Request::RequestCode {
            number: bad.to_string(),
            channel: Channel::Sms,
            locale: "en".into(),
        };
        match client.call(&request).await {
            Err(ClientError::Node(e)) => {
                assert_eq!(e.kind, ErrorKind::InvalidNumber, "{bad:?}");
                assert!(e.message.contains(&format!("{bad:?}")), "{}", e.message);
            }
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    node.shutdown().await;
}

#[tokio::test]
async fn registering_again_moves_the_account_and_signs_the_old_device_out() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = number(ALICE);
    let (old_key, _) = Credentials::generate_device().unwrap();
    let old = node.connect_as(&old_key).await;
    old.request_code(&alice, Channel::Sms, "en").await.unwrap();
    old.verify_code(&alice, CODE).await.unwrap();
    let first = old.whoami().await.unwrap();
    let mut deliveries = old.subscribe().await.unwrap();
    let backlog = deliveries.next().await.unwrap().unwrap();
    assert!(backlog.backlog_end);

    let new = node.connect().await;
    new.request_code(&alice, Channel::Sms, "en").await.unwrap();
    let reg = new.verify_code(&alice, CODE).await.unwrap();
    assert!(reg.took_over);
    assert_eq!(reg.account_id, first.account_id);
    assert_ne!(reg.device_id, first.device_id);
    // The old device's live connection is closed at once, with the reason.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), deliveries.next())
        .await
        .expect("the old device's delivery stream was left open");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    let closed = old
        .whoami()
        .await
        .expect_err("the old connection still answers");
    assert!(closed.to_string().contains("signed out"), "{closed}");
    // Its key no longer belongs to any device.
    let again = node.connect_as(&old_key).await;
    let refused = again.whoami().await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("signed out")),
        "{refused:?}"
    );
    assert_eq!(
        kind(refused),
        ErrorKind::DeviceRemoved {
            why: switchboard::proto::Removal::SignedOut
        }
    );
    assert_eq!(new.whoami().await.unwrap().device_id, reg.device_id);
    node.shutdown().await;
}

#[tokio::test]
async fn one_device_key_on_two_connections_is_one_device() {
    let node = InProcessNode::start(&config_text("")).await;
    let (creds, _) = Credentials::generate_device().unwrap();
    let a = node.connect_as(&creds).await;
    let alice = number(ALICE);
    a.request_code(&alice, Channel::Sms, "en").await.unwrap();
    let reg = a.verify_code(&alice, CODE).await.unwrap();
    let b = node.connect_as(&creds).await;
    assert_eq!(b.whoami().await.unwrap().device_id, reg.device_id);
    node.shutdown().await;
}

#[tokio::test]
async fn restart_keeps_registrations() {
    let node = InProcessNode::start(&config_text("")).await;
    let (creds, _) = Credentials::generate_device().unwrap();
    let client = node.connect_as(&creds).await;
    let bob = number(BOB);
    client.request_code(&bob, Channel::Sms, "en").await.unwrap();
    let reg = client.verify_code(&bob, CODE).await.unwrap();
    client.close().await;
    let fingerprint = node.fingerprint;
    let dir = node.stop().await;

    let node = InProcessNode::start_in(dir, &config_text("")).await;
    assert_eq!(
        node.fingerprint, fingerprint,
        "the certificate must survive a restart"
    );
    let client = Client::connect(&node.addr, &creds, Some(fingerprint))
        .await
        .unwrap();
    let me = client.whoami().await.unwrap();
    assert_eq!(
        (me.account_id, me.device_id),
        (reg.account_id, reg.device_id)
    );
    client.close().await;
    node.shutdown().await;
}

#[tokio::test]
async fn connections_per_address_are_capped() {
    let node =
        InProcessNode::start(&config_text("[limits]\nmax_connections_per_address = 2\n")).await;
    let a = node.connect().await;
    let b = node.connect().await;
    let (creds, _) = Credentials::generate_device().unwrap();
    let third = Client::connect(&node.addr, &creds, Some(node.fingerprint)).await;
    assert!(
        matches!(third, Err(ClientError::Connect { .. })),
        "third connection was accepted"
    );
    // The first two still work, and a closed one frees its place.
    assert_eq!(kind(a.whoami().await), ErrorKind::Unauthenticated);
    a.close().await;
    let c = node.connect().await;
    assert_eq!(kind(c.whoami().await), ErrorKind::Unauthenticated);
    assert_eq!(kind(b.whoami().await), ErrorKind::Unauthenticated);
    node.shutdown().await;
}

#[tokio::test]
async fn a_wildcard_ipv6_listener_serves_ipv4_and_ipv6_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let node = InProcessNode::start_on(dir, "[::]:0", &config_text("")).await;
    let port = node.addr.rsplit(':').next().unwrap().to_string();
    let (creds, _) = Credentials::generate_device().unwrap();
    for host in ["127.0.0.1", "[::1]"] {
        let addr = format!("{host}:{port}");
        let client = Client::connect(&addr, &creds, Some(node.fingerprint))
            .await
            .unwrap_or_else(|e| panic!("connect over {addr}: {e}"));
        assert_eq!(kind(client.whoami().await), ErrorKind::Unauthenticated);
        client.close().await;
    }
    node.shutdown().await;
}

#[tokio::test]
async fn after_too_many_wrong_pins_no_pin_is_accepted() {
    let node = InProcessNode::start(&config_text(
        "[verification]\nmax_pin_tries = 2\nresend_cooldown_secs = 0\n",
    ))
    .await;
    let owner = node.registered(ALICE).await;
    owner.set_lock("4321").await.unwrap();
    let thief = node.connect().await;
    let alice = number(ALICE);
    thief
        .request_code(&alice, Channel::Sms, "en")
        .await
        .unwrap();
    // The code alone is not enough; the code stays pending for a try with the PIN.
    assert!(matches!(
        kind(thief.verify_code(&alice, CODE).await),
        ErrorKind::RegistrationLocked { tries_left: 2, lapses_in_secs } if lapses_in_secs > 6 * 86_400
    ));
    for left in [1, 0] {
        assert!(matches!(
            kind(thief.verify_code_with_pin(&alice, CODE, "0000").await),
            ErrorKind::RegistrationLocked { tries_left, .. } if tries_left == left
        ));
    }
    // Now even the right PIN is refused, until the lock lapses.
    let refused = thief
        .verify_code_with_pin(&alice, CODE, "4321")
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("too many wrong PINs"),
        "{refused}"
    );
    assert_eq!(owner.whoami().await.unwrap().number, ALICE);
    // The owner can still clear it, and then the code alone registers.
    owner.clear_lock().await.unwrap();
    let reg = thief.verify_code(&alice, CODE).await.unwrap();
    assert!(reg.took_over);
    node.shutdown().await;
}

/// 64 wrong PINs sent at once over 8 connections by someone holding the code: each
/// takes a try before it is judged, so no more than the lock's tries are ever
/// judged, and then not even the right PIN gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_pin_guesses_are_judged_no_more_than_the_tries_allow() {
    let node = InProcessNode::start(&config_text(
        "[verification]\nmax_pin_tries = 5\n\
         [metrics]\nenabled = true\nlisten = \"127.0.0.1:0\"\n",
    ))
    .await;
    let owner = node.registered(ALICE).await;
    owner.set_lock("4321").await.unwrap();
    let alice = number(ALICE);
    let mut thieves = Vec::new();
    for _ in 0..8 {
        thieves.push(std::sync::Arc::new(node.connect().await));
    }
    thieves[0]
        .request_code(&alice, Channel::Sms, "en")
        .await
        .unwrap();
    let mut guesses = tokio::task::JoinSet::new();
    for i in 0..64u32 {
        let (thief, alice) = (thieves[i as usize % 8].clone(), alice.clone());
        guesses.spawn(async move {
            let pin = format!("{:04}", 1000 + i);
            thief.verify_code_with_pin(&alice, CODE, &pin).await
        });
    }
    let mut judged_wrong = 0;
    while let Some(result) = guesses.join_next().await {
        match kind(result.unwrap()) {
            ErrorKind::RegistrationLocked { .. } => judged_wrong += 1,
            other => panic!("a guess got {other:?}"),
        }
    }
    assert_eq!(judged_wrong, 64);
    // The right PIN now gets nothing: every try was taken.
    assert!(matches!(
        kind(thieves[0].verify_code_with_pin(&alice, CODE, "4321").await),
        ErrorKind::RegistrationLocked { tries_left: 0, .. }
    ));
    let (_, _, body) = http_get(node.metrics.as_deref().unwrap());
    let samples = parse_openmetrics(&body);
    let checks = sample(&samples, "switchboard_registration_lock_pin_checks_total");
    assert!(
        checks <= 5.0,
        "{checks} PINs were judged, the lock allows 5"
    );
    assert_eq!(owner.whoami().await.unwrap().number, ALICE);
    node.shutdown().await;
}

/// Verification attempts that change no account (no code pending, a wrong code)
/// leave every cache of registrations alone; a registration does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_verifications_leave_the_registration_caches_alone() {
    let node = InProcessNode::start(&config_text(
        "[metrics]\nenabled = true\nlisten = \"127.0.0.1:0\"\n",
    ))
    .await;
    let url = node.metrics.clone().unwrap();
    let changes = || {
        let (_, _, body) = http_get(&url);
        sample(&parse_openmetrics(&body), "switchboard_directory_changes")
    };
    let stranger = node.connect().await;
    let (alice, bob) = (number(ALICE), number(BOB));
    let before = changes();
    for _ in 0..20 {
        assert_eq!(
            kind(stranger.verify_code(&alice, "000000").await),
            ErrorKind::NoCodePending
        );
    }
    stranger
        .request_code(&bob, Channel::Sms, "en")
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(matches!(
            kind(stranger.verify_code(&bob, "000000").await),
            ErrorKind::WrongCode { .. }
        ));
    }
    assert_eq!(changes(), before, "failed attempts emptied the caches");
    stranger.verify_code(&bob, CODE).await.unwrap();
    assert_eq!(changes(), before + 1.0);
    node.shutdown().await;
}
