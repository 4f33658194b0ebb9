//! Groups on the node: membership, roles and versions, enforced against a client
//! library that tries anyway.

use switchboard::proto::{ErrorKind, GroupChange, GroupInfo};

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
