//! A client given several node addresses (the nodes of one deployment, sharing one
//! certificate, so one pinned fingerprint) connects to the first that answers,
//! keeps to the one that answered last, and moves on when that one goes; a node
//! with another certificate is refused, never skipped over.

use switchboard::client::{ClientError, Connector};
use switchboard::tls::Credentials;

use crate::support::*;

/// An address on 127.0.0.1 where nothing listens.
fn dead_address() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("local addr");
    drop(socket);
    addr.to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_with_several_addresses_fails_over_to_the_next_node() {
    let mut a = ProcessNode::start(&config_text(""));
    let tls = a.data_dir().join("tls");
    let b = ProcessNode::start(&config_text(&format!(
        "[server]\ntls_cert = {:?}\ntls_key = {:?}\n",
        tls.join("cert.pem"),
        tls.join("key.pem")
    )));
    assert_eq!(
        a.fingerprint, b.fingerprint,
        "one certificate for both nodes"
    );
    let dead = dead_address();
    let (creds, _) = Credentials::generate_device().expect("device key");
    let list = format!("{dead}, {},{}", a.addr, b.addr);
    let connector = Connector::new(&list, &creds, Some(a.fingerprint)).unwrap();
    assert_eq!(connector.addresses(), vec![dead.as_str(), &a.addr, &b.addr]);

    // Nothing at the first address: the second answers, and serves.
    let client = connector.connect().await.unwrap();
    assert_eq!(client.server(), a.addr);
    register(&client, ALICE).await;
    // The one that answered last is tried first.
    client.close().await;
    let again = connector.connect().await.unwrap();
    assert_eq!(again.server(), a.addr);

    // Node a is killed: the next connect finds b, which serves (it has data of
    // its own here; nodes of a cluster share theirs).
    a.kill9();
    let moved = connector.connect().await.unwrap();
    assert_eq!(moved.server(), b.addr);
    register(&moved, ALICE).await;
    let next = connector.connect().await.unwrap();
    assert_eq!(next.server(), b.addr, "b is now the one tried first");

    // No node answers: one error naming each address.
    let (creds, _) = Credentials::generate_device().expect("device key");
    let nowhere = Connector::new(&format!("{dead},{}", a.addr), &creds, None).unwrap();
    match nowhere.connect().await {
        Err(ClientError::Connect { reason, .. }) => {
            assert!(reason.contains("no node answered"), "{reason}");
            assert!(
                reason.contains(&dead) && reason.contains(&a.addr),
                "{reason}"
            );
        }
        other => panic!("{:?}", other.map(|c| c.server().to_string())),
    }

    // A node with another certificate is refused, not skipped over to b.
    let stranger = ProcessNode::start(&config_text(""));
    let (creds, _) = Credentials::generate_device().expect("device key");
    let wrong = Connector::new(
        &format!("{},{}", stranger.addr, b.addr),
        &creds,
        Some(b.fingerprint),
    )
    .unwrap();
    match wrong.connect().await {
        Err(ClientError::FingerprintMismatch { server, .. }) => assert_eq!(server, stranger.addr),
        other => panic!("{:?}", other.map(|c| c.server().to_string())),
    }
}

/// The CLI takes the list in `--server` and keeps it: registering, sending and
/// receiving all go past the address where nothing answers.
#[test]
fn the_cli_takes_several_addresses_and_keeps_them() {
    let node = ProcessNode::start(&config_text(""));
    let list = format!("{},{}", dead_address(), node.addr);
    let root = node.dir.path();
    let (alice, bob) = (root.join("alice"), root.join("bob"));
    for (home, number) in [(&alice, ALICE), (&bob, BOB)] {
        let args = ["register", number, "--server", &list, "--code", CODE];
        let out = node.cli(home, &args, "");
        assert!(out.status.success(), "{}", show(&args, &out));
    }
    let state = std::fs::read_to_string(alice.join("state.toml")).unwrap();
    assert!(state.contains(&list), "{state}");
    node.ok(&alice, &["send", BOB, "over the list"]);
    let got = node.ok(&bob, &["recv"]);
    assert!(got.contains("over the list"), "{got}");
}
