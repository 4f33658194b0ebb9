//! Groups on the node: membership, roles and versions, enforced against a client
//! library that tries anyway.

use switchboard::proto::{
    ErrorKind, GroupChange, GroupInfo, GroupReceipt, MemberDevices, group_devices_digest,
};

use crate::support::*;

fn roles(g: &GroupInfo) -> Vec<(String, bool)> {
    g.members
        .iter()
        .map(|m| (m.number.clone(), m.admin))
        .collect()
}

fn role(n: &str, admin: bool) -> (String, bool) {
    (n.to_string(), admin)
}

#[tokio::test]
async fn the_node_keeps_members_and_roles_and_enforces_who_may_change_them() {
    let node = InProcessNode::start(&config_text(
        "\"+14155550103\" = \"123456\"\n\"+14155550104\" = \"123456\"\n[groups]\nmax_members = 4\n",
    ))
    .await;
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;
    let carol = node.registered(CAROL).await;
    const DAVE: &str = "+14155550103";
    let dave = node.registered(DAVE).await;

    let g = alice
        .create_group(&[number(BOB), number(CAROL)], b"sealed name".to_vec())
        .await
        .unwrap();
    let id = g.group_id;
    assert_eq!(g.version, 1);
    assert_eq!(g.meta, b"sealed name");
    assert_eq!(
        roles(&g),
        [role(ALICE, true), role(BOB, false), role(CAROL, false)]
    );
    assert_eq!(bob.fetch_group(id).await.unwrap(), g);
    assert_eq!(bob.list_groups().await.unwrap()[0].group_id, id);

    // A member who is not an admin cannot add, remove, promote or rename; a
    // stranger cannot even look; nothing changed.
    let add = |n: &str| GroupChange::Add {
        numbers: vec![n.to_string()],
    };
    for change in [
        add(DAVE),
        GroupChange::Remove {
            number: ALICE.into(),
        },
        GroupChange::Promote { number: BOB.into() },
        GroupChange::SetMeta { meta: vec![1] },
    ] {
        assert_eq!(
            kind(bob.change_group(id, change).await),
            ErrorKind::NotGroupAdmin
        );
    }
    assert_eq!(kind(dave.fetch_group(id).await), ErrorKind::NotGroupMember);
    assert_eq!(
        kind(dave.change_group(id, GroupChange::Leave).await),
        ErrorKind::NotGroupMember
    );
    assert_eq!(
        kind(alice.change_group(id, add("+14155550199")).await),
        ErrorKind::UnknownRecipient
    );
    assert_eq!(bob.fetch_group(id).await.unwrap().version, 1);

    // Admins change it; every change bumps the version; the size limit holds.
    let g = alice.change_group(id, add(DAVE)).await.unwrap().unwrap();
    assert_eq!((g.version, g.members.len()), (2, 4));
    const ERIN: &str = "+14155550104";
    node.registered(ERIN).await;
    assert_eq!(
        kind(alice.change_group(id, add(ERIN)).await),
        ErrorKind::GroupFull { max: 4 }
    );
    let g = alice
        .change_group(
            id,
            GroupChange::Remove {
                number: CAROL.into(),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        roles(&g),
        [role(ALICE, true), role(BOB, false), role(DAVE, false)]
    );
    assert_eq!(kind(carol.fetch_group(id).await), ErrorKind::NotGroupMember);
    assert!(carol.list_groups().await.unwrap().is_empty());

    // The last admin leaves: the member who joined first takes over.
    assert_eq!(
        alice.change_group(id, GroupChange::Leave).await.unwrap(),
        None
    );
    let g = bob.fetch_group(id).await.unwrap();
    assert_eq!(roles(&g), [role(BOB, true), role(DAVE, false)]);
    let g = bob
        .change_group(
            id,
            GroupChange::Promote {
                number: DAVE.into(),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(roles(&g), [role(BOB, true), role(DAVE, true)]);
    assert_eq!(g.version, 5);
    node.shutdown().await;
}

#[tokio::test]
async fn groups_survive_a_restart_and_changes_are_rate_limited() {
    let node = InProcessNode::start(&config_text("[groups]\nchanges_per_account_hour = 3\n")).await;
    let alice = node.registered(ALICE).await;
    node.registered(BOB).await;
    let g = alice.create_group(&[number(BOB)], vec![]).await.unwrap();
    for meta in [vec![1], vec![2]] {
        alice
            .change_group(g.group_id, GroupChange::SetMeta { meta })
            .await
            .unwrap();
    }
    assert!(matches!(
        kind(
            alice
                .change_group(g.group_id, GroupChange::SetMeta { meta: vec![3] })
                .await
        ),
        ErrorKind::RateLimited { .. }
    ));
    let dir = node.stop().await;
    let node = InProcessNode::start_in(dir, &config_text("")).await;
    // Bob on a new phone: the same account, still in the group.
    let bob = node.registered(BOB).await;
    let kept = bob.fetch_group(g.group_id).await.unwrap();
    assert_eq!((kept.version, kept.meta), (3, vec![2]));
    node.shutdown().await;
}

fn ok(home: &std::path::Path, args: &[&str]) -> String {
    let out = cli(home, args, "");
    assert!(out.status.success(), "{}", show(args, &out));
    stdout(&out)
}

/// The group commands as a person uses them: the name is shared end-to-end, the
/// node enforces the roles, a removed member is out and the others get a new key.
#[test]
fn group_commands_create_invite_remove_and_rename() {
    let node = ProcessNode::start(&config_text(""));
    let home = |name: &str, number: &str| {
        let h = node.dir.path().join(name);
        node.register_cli(&h, &[], number);
        h
    };
    let (alice, bob, carol) = (home("alice", ALICE), home("bob", BOB), home("carol", CAROL));
    let created = ok(&alice, &["group", "create", "Family", BOB, CAROL]);
    assert!(created.contains("with 3 members"), "{created}");
    let got = ok(&bob, &["recv"]);
    assert!(
        got.contains(&format!("{ALICE} added you to Family")),
        "{got}"
    );
    assert!(ok(&carol, &["recv"]).contains("added you to Family"));
    assert!(ok(&bob, &["group", "list"]).contains("Family"));
    let info = ok(&bob, &["group", "info", "Family"]);
    assert!(info.starts_with("Family (group"), "{info}");
    assert!(info.contains(&format!("{ALICE} admin")), "{info}");
    assert!(info.contains(&format!("{BOB} member (you)")), "{info}");

    // Bob is no admin: the node refuses, whatever his client tries.
    let out = cli(&bob, &["group", "remove", "Family", CAROL], "");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("only the group's admins"),
        "{}",
        show(&["group", "remove"], &out)
    );

    assert!(ok(&alice, &["group", "remove", "Family", CAROL]).contains("2 members now"));
    let out = cli(&carol, &["group", "info", "Family"], "");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not in that group"),
        "{}",
        show(&["group", "info"], &out)
    );
    // Carol is told, and her device forgets the group.
    let got = ok(&carol, &["recv"]);
    assert!(
        got.contains(&format!("{ALICE} removed you from Family")),
        "{got}"
    );
    assert!(ok(&carol, &["group", "list"]).trim().is_empty());
    let out = cli(&carol, &["group", "info", "Family"], "");
    assert!(
        stderr(&out).contains("knows no group called"),
        "{}",
        show(&["group", "info"], &out)
    );
    // Bob gets the new key quietly and still reads the name; then a rename.
    let got = ok(&bob, &["recv"]);
    assert!(!got.contains("added you"), "{got}");
    assert!(ok(&bob, &["group", "info", "Family"]).starts_with("Family"));
    ok(&alice, &["group", "rename", "Family", "Clan"]);
    ok(&bob, &["recv"]);
    assert!(ok(&bob, &["group", "list", "--json"]).contains(r#""name":"Clan""#));
    let json = ok(&bob, &["group", "info", "Clan", "--json"]);
    assert!(
        json.contains(r#""role":"admin""#) && json.contains(r#""version":4"#),
        "{json}"
    );
    ok(&bob, &["group", "leave", "Clan"]);
    assert!(ok(&bob, &["group", "list"]).trim().is_empty());
    let info = ok(&alice, &["group", "info", "Clan"]);
    assert!(!info.contains(BOB), "{info}");
}

/// A device's backlog (acknowledged).
async fn backlog(client: &switchboard::client::Client) -> Vec<switchboard::proto::Item> {
    let mut sub = client.subscribe().await.expect("subscribe");
    let mut out = Vec::new();
    loop {
        let push = next_push(&mut sub).await;
        sub.ack(push.items.iter().map(|d| d.seq).collect())
            .await
            .expect("ack");
        out.extend(push.items.into_iter().map(|d| d.item));
        if push.backlog_end {
            break;
        }
    }
    sub.finish().await.expect("finish");
    out
}

/// The group messages of a device's backlog (acknowledged): (group, from, body).
async fn group_backlog(client: &switchboard::client::Client) -> Vec<(u64, String, Vec<u8>)> {
    backlog(client)
        .await
        .into_iter()
        .filter_map(|item| match item {
            switchboard::proto::Item::GroupMessage(g) => Some((g.group_id, g.from, g.body)),
            _ => None,
        })
        .collect()
}

/// The digest of these members' devices.
fn digest(members: &[(&str, &[u32])]) -> [u8; 32] {
    let members: Vec<MemberDevices> = members
        .iter()
        .map(|(number, devices)| MemberDevices {
            number: number.to_string(),
            devices: devices.to_vec(),
        })
        .collect();
    group_devices_digest(&members)
}

/// A group message is uploaded once and reaches every member device, online or not;
/// a removed member gets nothing after; a stranger cannot send to the group.
#[tokio::test]
async fn a_group_message_is_uploaded_once_and_reaches_every_member() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;
    let carol = node.registered(CAROL).await;
    let g = alice
        .create_group(&[number(BOB), number(CAROL)], vec![])
        .await
        .unwrap();
    let body = vec![42u8; 64 * 1024];
    let id = switchboard::client::e2e::new_message_id();
    let both = digest(&[(BOB, &[1]), (CAROL, &[1])]);
    // A sender whose key went to other devices is told which ones it must go to,
    // and nothing is queued.
    let wrong = alice
        .send_group(g.group_id, id, body.clone(), digest(&[(BOB, &[1])]))
        .await;
    match kind(wrong) {
        ErrorKind::GroupDevicesChanged { members } => assert_eq!(
            members,
            [(BOB, vec![1]), (CAROL, vec![1])].map(|(number, devices)| MemberDevices {
                number: number.into(),
                devices
            })
        ),
        other => panic!("{other:?}"),
    }
    let (_, recipients) = alice
        .send_group(g.group_id, id, body.clone(), both)
        .await
        .unwrap();
    assert_eq!(recipients, 2);
    for member in [&bob, &carol] {
        assert_eq!(
            group_backlog(member).await,
            [(g.group_id, ALICE.to_string(), body.clone())]
        );
    }
    // Alice's queue holds one count of the deliveries, not a receipt per device.
    assert_eq!(
        backlog(&alice).await,
        [switchboard::proto::Item::GroupDelivered(GroupReceipt {
            group_id: g.group_id,
            id,
            delivered: 2,
            of: 2
        })]
    );
    // A stranger is not in the group; a member who was removed gets nothing after.
    let dave_less = node.connect().await;
    assert!(matches!(
        kind(dave_less.send_group(g.group_id, id, vec![1], both).await),
        ErrorKind::Unauthenticated
    ));
    alice
        .change_group(
            g.group_id,
            GroupChange::Remove {
                number: CAROL.into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        kind(
            carol
                .send_group(
                    g.group_id,
                    switchboard::client::e2e::new_message_id(),
                    vec![1],
                    digest(&[(ALICE, &[1]), (BOB, &[1])])
                )
                .await
        ),
        ErrorKind::NotGroupMember
    );
    let (_, recipients) = alice
        .send_group(
            g.group_id,
            switchboard::client::e2e::new_message_id(),
            b"after".to_vec(),
            digest(&[(BOB, &[1])]),
        )
        .await
        .unwrap();
    assert_eq!(recipients, 1);
    assert_eq!(
        group_backlog(&bob).await,
        [(g.group_id, ALICE.to_string(), b"after".to_vec())]
    );
    assert!(group_backlog(&carol).await.is_empty());
    // Bob writes back: Alice gets it.
    bob.send_group(
        g.group_id,
        switchboard::client::e2e::new_message_id(),
        b"hi".to_vec(),
        digest(&[(ALICE, &[1])]),
    )
    .await
    .unwrap();
    assert_eq!(
        group_backlog(&alice).await,
        [(g.group_id, BOB.to_string(), b"hi".to_vec())]
    );
    node.shutdown().await;
}

/// A group message counts against the sender's envelopes per minute once per device
/// it goes to, as messages to one person do; one account's budget is its own.
#[tokio::test]
async fn a_group_message_counts_once_per_recipient_device_against_the_send_quota() {
    let node = InProcessNode::start(&config_text(
        "[messages]\nenvelopes_per_account_minute = 5\n",
    ))
    .await;
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;
    let _carol = node.registered(CAROL).await;
    let g = alice
        .create_group(&[number(BOB), number(CAROL)], vec![])
        .await
        .unwrap();
    let both = digest(&[(BOB, &[1]), (CAROL, &[1])]);
    let new_id = switchboard::client::e2e::new_message_id;
    // Two group messages: 4 envelopes of 5.
    for _ in 0..2 {
        alice
            .send_group(g.group_id, new_id(), vec![1], both)
            .await
            .unwrap();
    }
    // A third would make 6: refused, and so is a message to Bob after it is spent.
    assert!(matches!(
        kind(alice.send_group(g.group_id, new_id(), vec![1], both).await),
        ErrorKind::RateLimited { .. }
    ));
    send_numbered(&alice, BOB, 1).await.unwrap();
    assert!(matches!(
        kind(send_numbered(&alice, BOB, 2).await),
        ErrorKind::RateLimited { .. }
    ));
    // Nothing of the refused ones was queued; Bob's own budget is untouched.
    assert_eq!(group_backlog(&bob).await.len(), 2);
    bob.send_group(
        g.group_id,
        new_id(),
        vec![2],
        digest(&[(ALICE, &[1]), (CAROL, &[1])]),
    )
    .await
    .unwrap();
    node.shutdown().await;
}
