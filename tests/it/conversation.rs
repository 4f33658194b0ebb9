//! The rest of a conversation end to end: profiles, read receipts, typing, replies,
//! reactions, edits, deletes and disappearing messages, through the CLI and the
//! library, 1:1 and in groups, with linked devices and offline recipients.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use switchboard::client::content::{Body, Content, Plaintext};
use switchboard::client::e2e::{self, Olm};
use switchboard::client::history::{self, Entry};
use switchboard::client::messenger::{Conversation, MessengerError};
use switchboard::client::{Event, Home, Messenger};
use switchboard::proto::{Outgoing, TypingTo};

use crate::support::*;

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A small PNG with a text chunk carrying a "GPS" note, as a camera's metadata would.
fn photo_with_metadata() -> Vec<u8> {
    let img = image::RgbImage::from_fn(800, 600, |x, y| image::Rgb([x as u8, y as u8, 90]));
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    // A tEXt chunk before IEND: keyword "GPS", text "51.5N 0.1W".
    let chunk_data = b"GPS\x0051.5N 0.1W";
    let mut chunk = (chunk_data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(b"tEXt");
    chunk.extend_from_slice(chunk_data);
    let crc = crc32(&chunk[4..]);
    chunk.extend_from_slice(&crc.to_be_bytes());
    let iend = png.len() - 12;
    png.splice(iend..iend, chunk);
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Alice sets a name and a photo; Bob, who has her as "Mum" and got a message from
/// her, sees "Mum (Alice A.)"; Carol, who never talked to her, cannot read it; a new
/// name shows as such.
#[test]
fn a_profile_reaches_the_people_written_to_and_no_one_else() {
    let node = ProcessNode::start(&config_text(""));
    let root = node.dir.path().to_path_buf();
    let (alice, bob, carol) = (
        node.home("alice", ALICE),
        node.home("bob", BOB),
        node.home("carol", CAROL),
    );
    let photo = root.join("me.png");
    let png = photo_with_metadata();
    assert!(png.windows(3).any(|w| w == b"GPS"));
    std::fs::write(&photo, &png).unwrap();
    let set = node.ok(
        &alice,
        &[
            "profile",
            "set",
            "--name",
            "Alice A.",
            "--about",
            "gardening",
            "--photo",
            photo.to_str().unwrap(),
        ],
    );
    assert!(set.contains("profile set: Alice A. (photo,"), "{set}");

    let card = root.join("bob.vcf");
    std::fs::write(
        &card,
        format!("BEGIN:VCARD\nVERSION:3.0\nFN:Mum\nTEL:{ALICE}\nEND:VCARD\n"),
    )
    .unwrap();
    node.ok(&bob, &["contacts", "import", card.to_str().unwrap()]);
    let before = node.ok(&bob, &["contacts", "list"]);
    assert!(
        before.contains("Mum ") && !before.contains("Alice A."),
        "{before}"
    );

    node.ok(&alice, &["send", BOB, "hi love"]);
    let got = node.ok(&bob, &["recv"]);
    assert!(got.contains("hi love"), "{got}");
    let listed = node.ok(&bob, &["contacts", "list"]);
    assert!(listed.contains("Mum (Alice A.)"), "{listed}");
    let rows = json_lines(&node.ok(&bob, &["contacts", "list", "--json"]));
    assert_eq!(rows[0]["profile_name"], "Alice A.", "{rows:?}");

    // The photo came shrunk, re-encoded, without the metadata.
    let saved = root.join("alice.jpg");
    let shown = node.ok(
        &bob,
        &[
            "profile",
            "show",
            ALICE,
            "--save-photo",
            saved.to_str().unwrap(),
        ],
    );
    assert!(shown.contains("about: gardening"), "{shown}");
    let jpeg = std::fs::read(&saved).unwrap();
    assert_eq!(&jpeg[..2], &[0xff, 0xd8]);
    assert!(!jpeg.windows(3).any(|w| w == b"GPS"));
    let decoded = image::load_from_memory(&jpeg).unwrap();
    assert!(decoded.width() <= 512 && decoded.height() <= 512);

    // Carol never talked to Alice: no key, nothing to read.
    let out = node.cli(&carol, &["profile", "show", ALICE], "");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot be read"), "{}", stderr(&out));

    // A new name: Bob is told, and sees it as a change.
    node.ok(&alice, &["profile", "set", "--name", "Alice B."]);
    let got = node.ok(&bob, &["recv"]);
    assert!(
        got.contains("changed their profile name from “Alice A.” to “Alice B.”"),
        "{got}"
    );
    let listed = node.ok(&bob, &["contacts", "list"]);
    assert!(listed.contains("Mum (Alice B., was Alice A.)"), "{listed}");
    // And the next message from her shows her name beside her number.
    node.ok(&alice, &["send", BOB, "dinner?"]);
    let got = node.ok(&bob, &["recv"]);
    assert!(
        got.contains(&format!("{ALICE} (Mum (Alice B., was Alice A.)) dinner?")),
        "{got}"
    );
}

/// Bob reads Alice's message and her history shows it read; Alice reacts, edits,
/// deletes and replies, and Bob (reading later, as if offline) sees all of it.
#[test]
fn receipts_reactions_edits_deletes_and_replies_through_the_cli() {
    let node = ProcessNode::start(&config_text(""));
    let root = node.dir.path().to_path_buf();
    let home = |name: &str, number: &str| {
        let h = root.join(name);
        node.register_cli(&h, &[], number);
        h
    };
    let (alice, bob) = (home("alice", ALICE), home("bob", BOB));
    let hello = node
        .ok(&alice, &["send", BOB, "hello Bob"])
        .trim()
        .to_string();
    node.ok(&bob, &["recv"]);
    let read = node.ok(&alice, &["recv"]);
    assert!(
        read.contains(&format!("read by {BOB} (id {hello})")),
        "{read}"
    );
    let rows = json_lines(&node.ok(&alice, &["history", BOB, "--json"]));
    let row = rows.iter().find(|r| r["id"] == hello.as_str()).unwrap();
    assert_eq!(row["read_by"][0]["by"], BOB, "{row}");
    let text = node.ok(&alice, &["history", BOB]);
    assert!(text.contains("hello Bob  (delivered) · read"), "{text}");
    // And the same as JSON, for scripts.
    let again = node
        .ok(&alice, &["send", BOB, "read this too"])
        .trim()
        .to_string();
    node.ok(&bob, &["recv"]);
    let events = json_lines(&node.ok(&alice, &["recv", "--json"]));
    let read = events
        .iter()
        .find(|e| e["read"]["id"] == again.as_str())
        .unwrap_or_else(|| panic!("no read receipt in {events:?}"));
    assert_eq!(read["read"]["by"], BOB, "{read}");
    assert!(read["read"]["group"].is_null(), "{read}");

    let question = node
        .ok(&bob, &["send", ALICE, "how are you?"])
        .trim()
        .to_string();
    node.ok(&alice, &["recv"]);
    // Short ids, as people type them.
    node.ok(&alice, &["react", &question[..8], "👍"]);
    let typo = node
        .ok(&alice, &["send", BOB, "I am fnie"])
        .trim()
        .to_string();
    node.ok(&alice, &["edit", &typo, "I am fine"]);
    let oops = node
        .ok(&alice, &["send", BOB, "wrong chat, sorry"])
        .trim()
        .to_string();
    node.ok(&alice, &["delete", &oops]);
    node.ok(&alice, &["send", BOB, "and you?", "--reply-to", &question]);

    // Bob cannot edit Alice's message, nor delete it.
    let out = node.cli(&bob, &["edit", &typo, "hacked"], "");
    assert!(!out.status.success());
    let out = node.cli(&bob, &["recv"], "");
    assert!(out.status.success(), "{}", show(&["recv"], &out));
    let got = stdout(&out);
    assert!(
        got.contains(&format!("{ALICE} reacted 👍: how are you?")),
        "{got}"
    );
    assert!(
        got.contains(&format!("{ALICE} edited: I am fine (edited)")),
        "{got}"
    );
    assert!(
        got.contains(&format!("{ALICE} deleted: this message was deleted")),
        "{got}"
    );
    let out = node.cli(&bob, &["edit", &typo, "hacked"], "");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("only its author"), "{}", stderr(&out));

    let history = node.ok(&bob, &["history", ALICE]);
    assert!(
        history.contains(&format!("how are you?  [👍 {ALICE}]")),
        "{history}"
    );
    assert!(history.contains("I am fine (edited)"), "{history}");
    assert!(
        !history.contains("fnie") && !history.contains("wrong chat"),
        "{history}"
    );
    assert!(history.contains("this message was deleted"), "{history}");
    assert!(
        history.contains("[reply to “how are you?”] and you?"),
        "{history}"
    );
    // Alice's own history reads the same.
    let mine = node.ok(&alice, &["history", BOB]);
    assert!(
        mine.contains("I am fine (edited)") && mine.contains("this message was deleted"),
        "{mine}"
    );
    let rows = json_lines(&node.ok(&bob, &["history", ALICE, "--json"]));
    let q = rows.iter().find(|r| r["id"] == question.as_str()).unwrap();
    assert_eq!(q["reactions"][0]["emoji"], "👍", "{q}");
    // A reaction taken back.
    node.ok(&alice, &["react", &question, ""]);
    node.ok(&bob, &["recv"]);
    let history = node.ok(&bob, &["history", ALICE]);
    assert!(!history.contains("👍"), "{history}");
}

/// With read receipts off, Bob sends none, and sees none of Alice's.
#[test]
fn read_receipts_can_be_turned_off() {
    let node = ProcessNode::start(&config_text(""));
    let root = node.dir.path().to_path_buf();
    let (alice, bob) = (root.join("alice"), root.join("bob"));
    node.register_cli(&alice, &[], ALICE);
    node.register_cli(&bob, &[], BOB);
    std::fs::write(bob.join("settings.toml"), "read_receipts = false\n").unwrap();
    let id = node.ok(&alice, &["send", BOB, "psst"]).trim().to_string();
    node.ok(&bob, &["recv"]);
    node.ok(&alice, &["recv"]);
    let rows = json_lines(&node.ok(&alice, &["history", BOB, "--json"]));
    let row = rows.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(row["read_by"].as_array().map(Vec::len), Some(0), "{row}");
    // Bob's message, read by Alice (who sends receipts): Bob is not shown it.
    let back = node.ok(&bob, &["send", ALICE, "ok"]).trim().to_string();
    node.ok(&alice, &["recv"]);
    let got = node.ok(&bob, &["recv"]);
    assert!(!got.contains("read by"), "{got}");
    let rows = json_lines(&node.ok(&bob, &["history", ALICE, "--json"]));
    let row = rows.iter().find(|r| r["id"] == back.as_str()).unwrap();
    assert_eq!(row["read_by"].as_array().map(Vec::len), Some(0), "{row}");
}

fn entry_with(m: &Messenger, peer: &str, id: &[u8; 16]) -> Entry {
    m.db()
        .read(|tx| history::find(tx, peer, id))
        .unwrap()
        .unwrap_or_else(|| panic!("no message {} with {peer}", hex::encode(id)))
}

/// In a group: a reply, a reaction, an edit and a delete reach every member; read
/// receipts count "read by n of m"; an edit by someone else is refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_in_a_group() {
    let node = InProcessNode::start(&config_text("")).await;
    let (_a, _, alice) = person(&node, ALICE).await;
    let (_b, _, bob) = person(&node, BOB).await;
    let (_c, _, carol) = person(&node, CAROL).await;
    let group = alice
        .create_group("Family", &[number(BOB), number(CAROL)])
        .await
        .expect("group");
    receive_backlog(&bob).await;
    receive_backlog(&carol).await;
    let conv = Conversation::Group(group.group_id);
    let peer = conv.peer();
    let dinner = alice
        .send_to(&conv, Content::Text("dinner at 7".into()))
        .await
        .unwrap();
    let shown: Vec<Entry> = receive_backlog(&bob)
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(shown.len(), 1);
    assert_eq!(bob.mark_read(&shown).await.unwrap(), 1);
    receive_backlog(&carol).await;
    carol
        .send_to(
            &conv,
            Content::Reaction {
                to: dinner,
                emoji: "❤️".into(),
            },
        )
        .await
        .unwrap();
    let refused = carol
        .send_to(
            &conv,
            Content::Edit {
                to: dinner,
                text: "dinner at 9".into(),
            },
        )
        .await;
    assert!(
        matches!(&refused, Err(MessengerError::Refused(why)) if why.contains("only its author")),
        "{refused:?}"
    );
    alice
        .send_to(
            &conv,
            Content::Edit {
                to: dinner,
                text: "dinner at 8".into(),
            },
        )
        .await
        .unwrap();
    let reply = bob
        .send_to(
            &conv,
            Content::Reply {
                to: dinner,
                text: "see you".into(),
            },
        )
        .await
        .unwrap();
    // A reply quotes a message of its own conversation only.
    let elsewhere = bob
        .send_to(
            &Conversation::With(number(ALICE)),
            Content::Reply {
                to: dinner,
                text: "wrong place".into(),
            },
        )
        .await;
    assert!(
        matches!(&elsewhere, Err(MessengerError::Refused(why)) if why.contains("no message")),
        "{elsewhere:?}"
    );
    let gone = alice
        .send_to(&conv, Content::Text("typo".into()))
        .await
        .unwrap();
    alice
        .send_to(&conv, Content::Delete { to: gone })
        .await
        .unwrap();

    let events = receive_backlog(&alice).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Read { by, .. } if by == BOB)),
        "{events:?}"
    );
    receive_backlog(&bob).await;
    receive_backlog(&carol).await;
    for m in [&alice, &bob, &carol] {
        let d = entry_with(m, &peer, &dinner);
        assert_eq!(d.content, Some(Content::Text("dinner at 8".into())));
        assert!(d.edited_at_ms.is_some());
        assert_eq!(d.reactions, vec![(CAROL.to_string(), "❤️".to_string())]);
        assert_eq!(entry_with(m, &peer, &gone).content, Some(Content::Deleted));
        assert!(matches!(
            entry_with(m, &peer, &reply).content,
            Some(Content::Reply { to, .. }) if to == dinner
        ));
    }
    let mine = entry_with(&alice, &peer, &dinner);
    assert_eq!(
        mine.read
            .iter()
            .map(|(w, _)| w.as_str())
            .collect::<Vec<_>>(),
        [BOB]
    );
    // Acts never show as messages of their own.
    let page = alice
        .db()
        .read(|tx| history::page(tx, &peer, None, 100))
        .unwrap();
    assert!(
        page.iter()
            .all(|e| e.content.as_ref().is_none_or(|c| c.act_on().is_none()))
    );
    assert_eq!(page.len(), 3, "{page:?}");
    // Only an admin sets the group's timer; then every member's copy carries it.
    let day = 86_400;
    assert!(matches!(
        bob.set_timer(&conv, day).await,
        Err(MessengerError::Refused(why)) if why.contains("admins")
    ));
    alice.set_timer(&conv, day).await.unwrap();
    let brief = alice
        .send_to(&conv, Content::Text("brief".into()))
        .await
        .unwrap();
    receive_backlog(&bob).await;
    assert_eq!(bob.timer(&conv).await.unwrap(), day);
    assert_eq!(entry_with(&bob, &peer, &brief).expires_in_secs, day);
    for m in [alice, bob, carol] {
        m.close().await;
    }
    node.shutdown().await;
}

/// A reaction made on Alice's phone shows on her laptop; an edit too.
#[tokio::test(flavor = "multi_thread")]
async fn acts_reach_the_accounts_other_devices() {
    let node = InProcessNode::start(&config_text("")).await;
    let (_a, alice_home, alice) = person(&node, ALICE).await;
    let (_b, _, bob) = person(&node, BOB).await;
    let (_l, laptop) = linked_laptop(&node, &alice_home).await;
    let question = bob.send_text(&number(ALICE), "lunch?").await.unwrap().id;
    receive_backlog(&alice).await;
    receive_backlog(&laptop).await;
    let bob_conv = Conversation::With(number(BOB));
    alice
        .send_to(
            &bob_conv,
            Content::Reaction {
                to: question,
                emoji: "🍕".into(),
            },
        )
        .await
        .unwrap();
    let mine = alice
        .send_to(&bob_conv, Content::Text("yes at 1".into()))
        .await
        .unwrap();
    alice
        .send_to(
            &bob_conv,
            Content::Edit {
                to: mine,
                text: "yes at 12".into(),
            },
        )
        .await
        .unwrap();
    let events = receive_backlog(&laptop).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Changed { by, .. } if by == ALICE)),
        "{events:?}"
    );
    let q = entry_with(&laptop, BOB, &question);
    assert_eq!(q.reactions, vec![(ALICE.to_string(), "🍕".to_string())]);
    let m = entry_with(&laptop, BOB, &mine);
    assert_eq!(m.content, Some(Content::Text("yes at 12".into())));
    receive_backlog(&bob).await;
    assert_eq!(entry_with(&bob, ALICE, &question).reactions.len(), 1);
    for m in [alice, bob, laptop] {
        m.close().await;
    }
    node.shutdown().await;
}

/// Hashes of every file under `dir`.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                use sha2::Digest;
                let bytes = std::fs::read(&p).unwrap_or_default();
                out.insert(
                    p.display().to_string(),
                    sha2::Sha256::digest(&bytes).to_vec(),
                );
            }
        }
    }
    out
}

/// Typing reaches a connected device at once, never one that is offline, and never
/// touches the node's data dir.
#[tokio::test(flavor = "multi_thread")]
async fn typing_is_forwarded_live_and_never_written() {
    let node = InProcessNode::start(&config_text("")).await;
    let (_a, _, alice) = person(&node, ALICE).await;
    let (_b, _, bob) = person(&node, BOB).await;
    let (_c, _, carol) = person(&node, CAROL).await;
    let group = alice
        .create_group("Trio", &[number(BOB), number(CAROL)])
        .await
        .unwrap();
    receive_backlog(&bob).await;
    receive_backlog(&carol).await;
    // Bob follows; Carol is offline.
    let (tx, mut typing) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let following = bob.clone();
    let follower = tokio::spawn(async move {
        following
            .receive(
                true,
                async {
                    let _ = stop_rx.await;
                },
                move |e| {
                    if let Event::Typing {
                        from,
                        group_id,
                        typing,
                        ..
                    } = e
                    {
                        let _ = tx.send((from, group_id, typing));
                    }
                },
            )
            .await
    });
    let client = alice.client().await.unwrap();
    // Until Bob's follower has its delivery stream, a notice finds no device, or one
    // of the stream `receive_backlog` is closing, which drops it: try until one is
    // seen.
    let mut got = None;
    for _ in 0..100 {
        let told = client
            .typing(TypingTo::Account(BOB.into()), true)
            .await
            .unwrap();
        if told == 1
            && let Ok(seen) = tokio::time::timeout(Duration::from_millis(200), typing.recv()).await
        {
            got = seen;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got, Some((ALICE.to_string(), None, true)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Late copies of the tries above are not counted among the 50 below.
    while typing.try_recv().is_ok() {}
    let before = files(node.dir.path());
    for i in 0..50 {
        let conv = if i % 2 == 0 {
            Conversation::With(number(BOB))
        } else {
            Conversation::Group(group.group_id)
        };
        assert_eq!(
            alice.typing(&conv, i % 3 != 0).await.unwrap(),
            1,
            "only Bob is connected"
        );
        assert_eq!(
            alice
                .typing(&Conversation::With(number(CAROL)), true)
                .await
                .unwrap(),
            0
        );
    }
    let mut seen = 0;
    while seen < 50 {
        match tokio::time::timeout(Duration::from_secs(10), typing.recv()).await {
            Ok(Some(_)) => seen += 1,
            other => panic!("typing {seen} of 50: {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        files(node.dir.path()),
        before,
        "typing wrote to the data dir"
    );
    // Carol, coming online, finds nothing of it.
    let events = receive_backlog(&carol).await;
    assert!(
        !events.iter().any(|e| matches!(e, Event::Typing { .. })),
        "{events:?}"
    );
    let _ = stop_tx.send(());
    follower.await.unwrap().unwrap();
    for m in [alice, bob, carol] {
        m.close().await;
    }
    node.shutdown().await;
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A 7-day timer: every message sent under it carries the expiry on both sides,
/// disappears from each history when it runs out, and the node drops its copy at the
/// same time; what was sent before, or in another conversation, stays.
#[tokio::test(flavor = "multi_thread")]
async fn disappearing_messages_go_from_every_history_and_the_node() {
    let node = InProcessNode::start(&config_text("")).await;
    let (_a, _, alice) = person(&node, ALICE).await;
    let (_b, _, bob) = person(&node, BOB).await;
    let (_c, _, carol) = person(&node, CAROL).await;
    let bob_conv = Conversation::With(number(BOB));
    let kept = alice
        .send_to(&bob_conv, Content::Text("forever".into()))
        .await
        .unwrap();
    let week = 7 * 86_400;
    alice.set_timer(&bob_conv, week).await.unwrap();
    assert!(matches!(
        alice.set_timer(&bob_conv, 3600).await,
        Err(MessengerError::Refused(_))
    ));
    let secret = alice
        .send_to(&bob_conv, Content::Text("burn after reading".into()))
        .await
        .unwrap();
    let sent = entry_with(&alice, BOB, &secret);
    assert_eq!(sent.expires_in_secs, week);
    let until = sent.expires_at_ms.unwrap();
    assert!(until.abs_diff(wall_ms() + u64::from(week) * 1000) < 60_000);
    receive_backlog(&bob).await;
    // Bob's conversation has the timer now, and his copy the same expiry.
    assert_eq!(
        bob.timer(&Conversation::With(number(ALICE))).await.unwrap(),
        week
    );
    let got = entry_with(&bob, ALICE, &secret);
    assert_eq!(got.expires_in_secs, week);
    assert!(got.expires_at_ms.unwrap().abs_diff(until) < 60_000);
    // A week on, each device removes it on its own; the rest stays.
    for (m, peer) in [(&alice, BOB), (&bob, ALICE)] {
        let gone = m
            .db()
            .write(|tx| history::sweep_expired(tx, until + 60_000))
            .unwrap();
        assert_eq!(gone, 1, "on {peer}'s side");
        assert!(
            m.db()
                .read(|tx| history::find(tx, peer, &secret))
                .unwrap()
                .is_none()
        );
        assert!(
            m.db()
                .read(|tx| history::find(tx, peer, &kept))
                .unwrap()
                .is_some()
        );
    }

    // The node: a message under the timer, one from Carol without, Bob offline.
    let second = alice
        .send_to(&bob_conv, Content::Text("this one too".into()))
        .await
        .unwrap();
    carol
        .send_text(&number(BOB), "no timer here")
        .await
        .unwrap();
    let until = entry_with(&alice, BOB, &second).expires_at_ms.unwrap();
    for m in [&alice, &bob, &carol] {
        m.close().await;
    }
    let dir = node.stop().await;
    {
        let store = switchboard::store::Store::open(&dir.path().join("data").join("db")).unwrap();
        // Before its time nothing goes; at it, the disappearing message and only it.
        assert_eq!(store.sweep(0, until - 60_000).unwrap().items, 0);
        assert_eq!(store.sweep(0, until + 60_000).unwrap().items, 1);
    }
}

/// A content kind from a newer client arrives at this one: `recv` shows "unsupported
/// message", never an error, and the message is in the history.
#[tokio::test(flavor = "multi_thread")]
async fn a_newer_content_kind_shows_as_unsupported() {
    let node = InProcessNode::start(&config_text("")).await;
    let (_a, _, alice) = person(&node, ALICE).await;
    let (bob_dir, _, bob) = person(&node, BOB).await;
    bob.close().await;
    alice.send_text(&number(BOB), "first").await.unwrap();
    let client = alice.client().await.unwrap();
    let id = e2e::new_message_id();
    let plain = Plaintext::new(
        id,
        wall_ms(),
        Body::Content(Content::Unsupported { kind: 999 }),
    )
    .encode();
    let envelopes = alice
        .db()
        .write(|tx| {
            let mut olm = Olm::new(tx);
            let e = olm.encrypt(BOB, &plain)?;
            olm.flush()?;
            Ok::<_, e2e::E2eError>(e)
        })
        .unwrap();
    client
        .send(Outgoing {
            id,
            to: BOB.into(),
            envelopes,
            expires_in_secs: 0,
        })
        .await
        .unwrap();
    alice.send_text(&number(BOB), "last").await.unwrap();
    let out = tokio::task::spawn_blocking({
        let path = bob_dir.path().to_path_buf();
        move || cli(&path, &["recv"], "")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", show(&["recv"], &out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].ends_with("first"), "{text}");
    assert!(
        lines[1].contains("[unsupported message (kind 999)"),
        "{text}"
    );
    assert!(lines[2].ends_with("last"), "{text}");
    alice.close().await;
    node.shutdown().await;
}

/// "Last seen" goes only to those with the profile key, to the hour, and only to
/// those who share theirs; looking profiles up costs discovery budget.
#[tokio::test(flavor = "multi_thread")]
async fn last_seen_is_opt_in_and_profile_fetches_cost_budget() {
    let node = InProcessNode::start(&config_text("[discovery]\ndaily_budget = 3\n")).await;
    let open = |home: &Home, share: bool| {
        std::fs::write(
            home.dir().join("settings.toml"),
            format!("share_last_seen = {share}\n"),
        )
        .unwrap();
        Messenger::open(home).unwrap()
    };
    let (_a, a_home) = registered_home(&node.addr, node.fingerprint, ALICE).await;
    let (_b, b_home) = registered_home(&node.addr, node.fingerprint, BOB).await;
    let (_c, c_home) = registered_home(&node.addr, node.fingerprint, CAROL).await;
    let (alice, bob, carol) = (
        open(&a_home, true),
        open(&b_home, true),
        open(&c_home, false),
    );
    alice.set_profile("Alice", "", None).await.unwrap();
    alice.send_text(&number(BOB), "hi").await.unwrap();
    alice.send_text(&number(CAROL), "hi").await.unwrap();
    receive_backlog(&bob).await;
    receive_backlog(&carol).await;
    let seen = bob
        .cached_profile(&number(ALICE))
        .await
        .unwrap()
        .and_then(|k| k.last_seen_ms)
        .expect("Bob shares his, so he sees hers");
    assert_eq!(seen % 3_600_000, 0);
    assert!(wall_ms() - seen < 3_600_000);
    let carols = carol.cached_profile(&number(ALICE)).await.unwrap().unwrap();
    assert_eq!(carols.profile.name, "Alice");
    assert_eq!(carols.last_seen_ms, None, "Carol does not share hers");
    // Carol has used one lookup (Alice's profile); two more distinct numbers, and the
    // next is refused.
    let client = carol.client().await.unwrap();
    let v = [9; 32];
    assert_eq!(client.fetch_profile(&number(BOB), v).await.unwrap(), None);
    let dave = number("+14155550103");
    assert_eq!(client.fetch_profile(&dave, v).await.unwrap(), None);
    let eve = number("+14155550104");
    assert!(matches!(
        kind(client.fetch_profile(&eve, v).await),
        switchboard::proto::ErrorKind::RateLimited { .. }
    ));
    for m in [alice, bob, carol] {
        m.close().await;
    }
    node.shutdown().await;
}

/// The same commands in a group, through the CLI: a reply, a reaction, an edit, a
/// delete, "read by n of m", the group's timer (admins only) and typing.
#[test]
fn the_commands_in_a_group_through_the_cli() {
    let node = ProcessNode::start(&config_text(""));
    let (alice, bob, carol) = (
        node.home("alice", ALICE),
        node.home("bob", BOB),
        node.home("carol", CAROL),
    );
    node.ok(&alice, &["group", "create", "Family", BOB, CAROL]);
    node.ok(&bob, &["recv"]);
    node.ok(&carol, &["recv"]);
    let dinner = node
        .ok(&alice, &["send", "--group", "Family", "dinner at 7"])
        .trim()
        .to_string();
    node.ok(&bob, &["recv"]);
    node.ok(&carol, &["recv"]);
    node.ok(&carol, &["react", &dinner[..8], "🎉"]);
    node.ok(&alice, &["edit", &dinner, "dinner at 8"]);
    node.ok(
        &bob,
        &[
            "send",
            "--group",
            "Family",
            "on my way",
            "--reply-to",
            &dinner,
        ],
    );
    let oops = node
        .ok(&alice, &["send", "--group", "Family", "oops"])
        .trim()
        .to_string();
    node.ok(&alice, &["delete", &oops]);
    // Only an admin sets the timer.
    let out = node.cli(&bob, &["timer", "--group", "Family", "7d"], "");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("admins"), "{}", stderr(&out));
    let set = node.ok(&alice, &["timer", "--group", "Family", "7d"]);
    assert!(set.contains("disappearing messages: 7 days"), "{set}");
    node.ok(&alice, &["send", "--group", "Family", "gone in a week"]);
    let told = node.cli(&alice, &["typing", "--group", "Family"], "");
    assert!(told.status.success(), "{}", show(&["typing"], &told));
    assert!(
        stderr(&told).contains("told 0 connected device(s)"),
        "{}",
        stderr(&told)
    );

    node.ok(&carol, &["recv"]);
    node.ok(&alice, &["recv"]);
    let history = node.ok(&carol, &["history", "--group", "Family"]);
    assert!(
        history.contains(&format!("dinner at 8 (edited)  [🎉 {CAROL}]")),
        "{history}"
    );
    assert!(
        history.contains("[reply to “dinner at 8”] on my way"),
        "{history}"
    );
    assert!(history.contains("this message was deleted"), "{history}");
    assert!(
        history.contains("[disappearing messages: 7 days]"),
        "{history}"
    );
    assert!(
        history.contains("gone in a week") && history.contains("· disappears"),
        "{history}"
    );
    // Bob and Carol read "dinner": 2 of the 2 other members.
    let mine = node.ok(&alice, &["history", "--group", "Family"]);
    assert!(mine.contains("· read by 2 of 2"), "{mine}");
}

/// In a group, Carol, who never wrote to Alice, reads Alice's profile (its key came
/// with the group's messages) and gets the file Alice sends to the group.
#[test]
fn a_group_shares_profiles_and_files_through_the_cli() {
    let node = ProcessNode::start(&config_text(""));
    let (alice, bob, carol) = (
        node.home("alice", ALICE),
        node.home("bob", BOB),
        node.home("carol", CAROL),
    );
    node.ok(&alice, &["profile", "set", "--name", "Alice A."]);
    node.ok(&alice, &["group", "create", "Family", BOB, CAROL]);
    node.ok(&alice, &["send", "--group", "Family", "welcome"]);
    node.ok(&bob, &["recv"]);
    node.ok(&carol, &["recv"]);
    let shown = node.ok(&carol, &["profile", "show", ALICE]);
    assert!(shown.contains("Alice A."), "{shown}");

    let file = node.dir.path().join("menu.pdf");
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();
    node.ok(
        &alice,
        &[
            "send",
            "--group",
            "Family",
            "--file",
            file.to_str().unwrap(),
            "--caption",
            "the menu",
        ],
    );
    for (who, home) in [("bob", &bob), ("carol", &carol)] {
        let saves = node.dir.path().join(format!("{who}-saves"));
        let got = node.ok(home, &["recv", "--save-dir", saves.to_str().unwrap()]);
        assert!(
            got.contains("[file: menu.pdf,") && got.contains("the menu"),
            "{who}: {got}"
        );
        assert_eq!(
            std::fs::read(saves.join("menu.pdf")).unwrap(),
            bytes,
            "{who}"
        );
    }
}
