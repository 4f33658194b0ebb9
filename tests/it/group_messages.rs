//! Group messages end to end: sender keys (Megolm) shared over Olm, one upload per
//! message, a new sender key when a member goes, counted deliveries.

use std::time::Duration;

use switchboard::client::content::Content;
use switchboard::client::history::{self, State};
use switchboard::client::{Event, Home};
use switchboard::proto::Item;

use crate::support::*;

/// The group messages among `events`: (group, author, text), in order.
fn group_texts(events: &[Event]) -> Vec<(u64, String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => match (&m.group, &m.content) {
                (Some(g), Some(Content::Text(t))) => {
                    Some((g.group_id, g.author.clone(), t.clone()))
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The latest count of deliveries of `id` among `events`.
fn delivered_count(events: &[Event], id: [u8; 16]) -> Option<(u32, u32)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::GroupDelivered {
                id: i,
                delivered,
                of,
                ..
            } if *i == id => Some((*delivered, *of)),
            _ => None,
        })
        .next_back()
}

/// The group message bodies in `home`'s queue on the node, read without taking them
/// (as someone on the wire would see them).
async fn capture_bodies(home: &Home) -> Vec<Vec<u8>> {
    let client = home.load().unwrap().connect().await.unwrap();
    let mut sub = client.subscribe().await.unwrap();
    let mut out = Vec::new();
    loop {
        let push = next_push(&mut sub).await;
        for d in &push.items {
            if let Item::GroupMessage(g) = &d.item {
                out.push(g.body.clone());
            }
        }
        if push.backlog_end {
            break;
        }
    }
    sub.finish().await.unwrap();
    client.close().await;
    out
}

/// Alice, Bob and Carol in a group: a message reaches both, encrypted once; Carol is
/// removed and cannot read what follows, even from the wire, while Bob, offline
/// during the rotation, gets the new key and every message after it, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_messages_reach_members_and_a_removed_member_reads_nothing_after() {
    let node = InProcessNode::start(&config_text("")).await;
    let (_a, _, alice) = person(&node, ALICE).await;
    let (_b, bob_home, bob) = person(&node, BOB).await;
    let (_c, carol_home, carol) = person(&node, CAROL).await;
    let g = alice
        .create_group("Family", &[number(BOB), number(CAROL)])
        .await
        .unwrap()
        .group_id;
    let sent = alice.send_group_text(g, "hello").await.unwrap();
    assert_eq!(sent.recipients, 2);
    for member in [&bob, &carol] {
        let events = receive_backlog(member).await;
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::AddedToGroup { name, .. } if name == "Family")),
            "{events:?}"
        );
        assert_eq!(
            group_texts(&events),
            [(g, ALICE.to_string(), "hello".to_string())]
        );
    }
    // One count of the deliveries, not a receipt per device; the history has it.
    let events = receive_backlog(&alice).await;
    assert_eq!(
        delivered_count(&events, sent.id),
        Some((2, 2)),
        "{events:?}"
    );
    let page = alice
        .db()
        .read(|tx| history::page(tx, &history::group_peer(g), None, 10))
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].state, State::Delivered);
    let part = page[0].group.clone().unwrap();
    assert_eq!((part.delivered, part.of), (2, 2));

    // Carol is removed while Bob is away; Alice's next messages use a new key.
    let before = alice.sender_key(g).await.unwrap().unwrap().session_id;
    alice.remove_from_group(g, &number(CAROL)).await.unwrap();
    for i in 1..=3 {
        alice
            .send_group_text(g, &format!("after {i}"))
            .await
            .unwrap();
    }
    let after = alice.sender_key(g).await.unwrap().unwrap();
    assert_ne!(after.session_id, before);
    assert_eq!(after.shared.keys().collect::<Vec<_>>(), [BOB]);
    // What crossed the wire to Bob, tried with every key Carol's device holds (it has
    // not even heard of its removal yet): nothing opens.
    let captured = capture_bodies(&bob_home).await;
    assert_eq!(captured.len(), 3);
    let carol_db = carol_home.db().unwrap();
    for body in &captured {
        let out = carol_db
            .read(|tx| switchboard::client::senderkeys::decrypt(tx, g, ALICE, 1, body))
            .unwrap();
        assert_eq!(
            out,
            Err(switchboard::client::senderkeys::Failure::NoSession)
        );
    }
    let events = receive_backlog(&carol).await;
    assert!(group_texts(&events).is_empty(), "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::RemovedFromGroup { by, .. } if by == ALICE)),
        "{events:?}"
    );
    // Bob, back, reads them in order.
    let texts: Vec<String> = group_texts(&receive_backlog(&bob).await)
        .into_iter()
        .map(|(_, _, t)| t)
        .collect();
    assert_eq!(texts, ["after 1", "after 2", "after 3"]);
    // Bob writes to the group: his own sender key, shared with Alice.
    bob.send_group_text(g, "hi all").await.unwrap();
    assert_eq!(
        group_texts(&receive_backlog(&alice).await),
        [(g, BOB.to_string(), "hi all".to_string())]
    );
    // Carol, out, can send nothing to it.
    assert!(carol.send_group_text(g, "still here?").await.is_err());
    for m in [alice, bob, carol] {
        m.close().await;
    }
    node.shutdown().await;
}

/// A second device of a member gets the group's messages, and the messages its own
/// account sent from the other device, as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_of_every_member_gets_the_message_once() {
    let node = InProcessNode::start(&config_text("")).await;
    let (_a, _, alice) = person(&node, ALICE).await;
    let (_b, bob_home, bob) = person(&node, BOB).await;
    let (_l, laptop) = linked_laptop(&node, &bob_home).await;
    let g = alice
        .create_group("Team", &[number(BOB)])
        .await
        .unwrap()
        .group_id;
    let sent = alice.send_group_text(g, "one").await.unwrap();
    assert_eq!(sent.recipients, 2, "both of Bob's devices");
    for device in [&bob, &laptop] {
        assert_eq!(
            group_texts(&receive_backlog(device).await),
            [(g, ALICE.to_string(), "one".to_string())]
        );
    }
    // Bob writes from his phone: Alice and his laptop get it, the laptop as sent.
    bob.send_group_text(g, "from the phone").await.unwrap();
    let events = receive_backlog(&laptop).await;
    let mine: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) if m.group.is_some() => Some((m.outgoing, m.content.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(mine, [(true, Some(Content::Text("from the phone".into())))]);
    assert_eq!(group_texts(&receive_backlog(&alice).await).len(), 1);
    // Nothing twice, wherever it is read again.
    for device in [&alice, &bob, &laptop] {
        assert!(group_texts(&receive_backlog(device).await).is_empty());
    }
    for m in [alice, bob, laptop] {
        m.close().await;
    }
    node.shutdown().await;
}

/// 200 members (test numbers): every member device gets each message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_200_members_gets_each_message_exactly_once() {
    const MEMBERS: usize = 200;
    let numbers: Vec<String> = (0..MEMBERS - 1)
        .map(|i| format!("+1415555{:04}", 2000 + i))
        .collect();
    let extra: String = numbers
        .iter()
        .map(|n| format!("\"{n}\" = \"{CODE}\"\n"))
        .collect();
    let node = InProcessNode::start_with(&config_text(&extra), |c| {
        c.messages.key_claims_per_account_per_hour = 100_000;
    })
    .await;
    let (_a, _, alice) = person(&node, ALICE).await;
    let mut members = Vec::new();
    for n in &numbers {
        members.push(person(&node, n).await);
    }
    let to: Vec<_> = numbers.iter().map(|n| number(n)).collect();
    let g = alice.create_group("Club", &to).await.unwrap().group_id;
    let mut ids = Vec::new();
    for i in 0..3 {
        let sent = alice.send_group_text(g, &format!("m{i}")).await.unwrap();
        assert_eq!(sent.recipients as usize, MEMBERS - 1);
        ids.push(sent.id);
    }
    for (_, _, m) in &members {
        let texts: Vec<String> = group_texts(&receive_backlog(m).await)
            .into_iter()
            .map(|(_, _, t)| t)
            .collect();
        assert_eq!(texts, ["m0", "m1", "m2"]);
        assert!(group_texts(&receive_backlog(m).await).is_empty());
    }
    let events = receive_backlog(&alice).await;
    for id in ids {
        assert_eq!(
            delivered_count(&events, id),
            Some((MEMBERS as u32 - 1, MEMBERS as u32 - 1))
        );
    }
    // Far fewer counts than devices: one item per message in Alice's queue at a time.
    let counts = events
        .iter()
        .filter(|e| matches!(e, Event::GroupDelivered { .. }))
        .count();
    assert!(counts <= 3, "{counts} counts for 3 messages");
    alice.close().await;
    for (_, _, m) in members {
        m.close().await;
    }
    node.shutdown().await;
}

/// The bytes of every file under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            dir_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// As people use it: Alice's message reaches Bob's and Carol's `recv` with the
/// group's name (Bob reading later, as if offline); after Carol is removed, the next
/// message reaches Bob and not Carol, who is told. A 60 KiB message (just under the envelope
/// limit) to 3 members grows the data dir by about one copy of it.
#[test]
fn send_group_recv_and_history_through_the_cli() {
    const DAVE: &str = "+14155550103";
    let node = ProcessNode::start(&config_text(&format!("\"{DAVE}\" = \"{CODE}\"\n")));
    let home = |name: &str, number: &str| {
        let h = node.dir.path().join(name);
        node.register_cli(&h, &[], number);
        h
    };
    let (alice, bob, carol) = (home("alice", ALICE), home("bob", BOB), home("carol", CAROL));
    node.ok(&alice, &["group", "create", "Family", BOB, CAROL]);
    node.ok(&carol, &["recv"]);
    let id = node.ok(&alice, &["send", "--group", "Family", "dinner at 8"]);
    assert_eq!(id.trim().len(), 32, "{id}");
    for member in [&carol, &bob] {
        let got = node.ok(member, &["recv"]);
        assert!(
            got.contains(&format!("[Family] {ALICE} dinner at 8")),
            "{got}"
        );
    }
    let json = node.ok(&alice, &["recv", "--json"]);
    assert!(
        json.contains(r#""delivered":2"#) && json.contains(r#""of":2"#),
        "{json}"
    );
    let history = node.ok(&alice, &["history", "--group", "Family"]);
    assert!(
        history.contains("dinner at 8  (delivered to 2 of 2)"),
        "{history}"
    );
    let history = node.ok(&bob, &["history", "--group", "Family", "--json"]);
    assert!(
        history.contains(&format!(r#""from":"{ALICE}""#)),
        "{history}"
    );
    let info = node.ok(&alice, &["group", "info", "Family"]);
    assert!(info.contains("has your key (devices [1])"), "{info}");

    node.ok(&alice, &["group", "remove", "Family", CAROL]);
    node.ok(&alice, &["send", "--group", "Family", "not for carol"]);
    assert!(
        node.ok(&bob, &["recv"])
            .contains("[Family] +14155550100 not for carol")
    );
    let got = node.ok(&carol, &["recv"]);
    assert!(got.contains("removed you from Family"), "{got}");
    assert!(!got.contains("not for carol"), "{got}");
    let out = node.cli(&carol, &["send", "--group", "Family", "hello?"], "");
    assert!(!out.status.success());

    // 60 KiB to three members (Bob, Carol again, Dave): about one copy on disk.
    let dave = home("dave", DAVE);
    node.ok(&alice, &["group", "add", "Family", CAROL, DAVE]);
    node.ok(&alice, &["send", "--group", "Family", "warm up"]);
    // Just under the 64 KiB an envelope may be once encrypted.
    let big = "x".repeat(60 * 1024);
    let before = dir_bytes(&node.data_dir());
    node.ok(&alice, &["send", "--group", "Family", &big]);
    let grown = dir_bytes(&node.data_dir()).saturating_sub(before);
    assert!(
        grown < 2 * 60 * 1024,
        "the data dir grew by {grown} bytes for a 60 KiB message to 3 members"
    );
    eprintln!("a 60 KiB message to 3 members grew the data dir by {grown} bytes");
    for member in [&bob, &carol, &dave] {
        assert!(node.ok(member, &["recv"]).contains(&big[..100]));
    }
}

/// SIGKILL of the node in the middle of membership changes: the group is whole after
/// the restart (Carol in or out, never half), the change can be made again, and the
/// next message reaches exactly the members.
#[test]
fn a_sigkill_in_the_middle_of_a_membership_change_leaves_the_group_whole() {
    let mut node = ProcessNode::start(&config_text(""));
    let home = |name: &str, number: &str| {
        let h = node.dir.path().join(name);
        node.register_cli(&h, &[], number);
        h
    };
    let (alice, bob, carol) = (home("alice", ALICE), home("bob", BOB), home("carol", CAROL));
    node.ok(&alice, &["group", "create", "Family", BOB, CAROL]);
    node.ok(&bob, &["recv"]);
    node.ok(&carol, &["recv"]);
    for round in 0..4u64 {
        let remove = round % 2 == 0;
        let verb = if remove { "remove" } else { "add" };
        let change = {
            let alice = alice.clone();
            std::thread::spawn(move || cli(&alice, &["group", verb, "Family", CAROL], ""))
        };
        // Somewhere in the change: its connection, its request, its key shares.
        std::thread::sleep(Duration::from_millis(20 + 40 * round));
        node.crash_and_restart();
        let first = change.join().unwrap();
        // Whatever the kill cut, the node has Carol in or out, and the change can be
        // made (again) until it holds.
        let info = node.ok(&alice, &["group", "info", "Family", "--json"]);
        let v: serde_json::Value = serde_json::from_str(info.trim()).unwrap();
        let members: Vec<&str> = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["number"].as_str().unwrap())
            .collect();
        assert!(members.starts_with(&[ALICE, BOB]), "{members:?}");
        let carol_in = members.contains(&CAROL);
        if carol_in == remove {
            assert!(
                !first.status.success() || !remove,
                "{}",
                show(&[verb], &first)
            );
            node.ok(&alice, &["group", verb, "Family", CAROL]);
        }
        let text = format!("round {round}");
        node.ok(&alice, &["send", "--group", "Family", &text]);
        assert!(node.ok(&bob, &["recv"]).contains(&text));
        let got = node.ok(&carol, &["recv"]);
        assert_eq!(got.contains(&text), !remove, "round {round}: {got}");
    }
}
