//! Linked devices: the device list, unlinking, lapses, and what a removed device is
//! told.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use switchboard::client::{Client, Home, Messenger};
use switchboard::proto::{ErrorKind, Removal};

use crate::support::*;

#[tokio::test]
async fn a_primary_lists_itself_and_is_never_unlinked() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = node.registered(ALICE).await;
    let me = alice.whoami().await.unwrap();
    let devices = alice.list_devices().await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].device_id, me.device_id);
    assert!(devices[0].primary);
    assert_eq!(
        kind(alice.unlink_device(me.device_id).await),
        ErrorKind::NotPrimary
    );
    assert_eq!(
        kind(alice.unlink_device(me.device_id + 7).await),
        ErrorKind::UnknownDevice {
            device_id: me.device_id + 7
        }
    );
    // Nothing changed.
    assert_eq!(alice.list_devices().await.unwrap(), devices);
    assert_eq!(alice.whoami().await.unwrap().device_id, me.device_id);
    node.shutdown().await;
}

/// Runs `devices link` on `primary` and `devices join` on `new` with the code it
/// prints; returns both outputs (neither asserted).
fn link_with(
    node: &ProcessNode,
    primary: &Path,
    new: &Path,
    name: &str,
    code: impl FnOnce(&str) -> String,
) -> (Output, Output) {
    let (child, printed, lines) = start_link(primary);
    let joined = node.cli(
        new,
        &[
            "devices",
            "join",
            &code(&printed),
            "--server",
            &node.addr,
            "--name",
            name,
        ],
        "",
    );
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let mut linked = child.wait_with_output().expect("devices link");
    linked.stdout = format!("{printed}\n{}", rest.join("\n")).into_bytes();
    (linked, joined)
}

/// [`link_with`] the code as printed; asserts both sides succeeded.
fn link(node: &ProcessNode, primary: &Path, new: &Path, name: &str) -> (Output, Output) {
    let (linked, joined) = link_with(node, primary, new, name, str::to_string);
    assert!(
        linked.status.success(),
        "{}",
        show(&["devices", "link"], &linked)
    );
    assert!(
        joined.status.success(),
        "{}",
        show(&["devices", "join"], &joined)
    );
    (linked, joined)
}

fn ok(home: &Path, args: &[&str]) -> String {
    let out = cli(home, args, "");
    assert!(out.status.success(), "{}", show(args, &out));
    stdout(&out)
}

fn register_home(node: &ProcessNode, name: &str, number: &str) -> PathBuf {
    let home = node.dir.path().join(name);
    node.register_cli(&home, &[], number);
    home
}

/// The issue's walkthrough: link, fan-out both ways, the sent copy, history on the
/// new device, the safety number unchanged, unlink.
#[test]
fn a_linked_device_reads_and_writes_the_same_conversations() {
    let node = ProcessNode::start(&config_text(""));
    let alice = register_home(&node, "alice", ALICE);
    let bob = register_home(&node, "bob", BOB);
    ok(&alice, &["send", BOB, "before the link"]);
    assert!(ok(&bob, &["recv"]).contains("before the link"));
    ok(&bob, &["send", ALICE, "a reply before the link"]);
    assert!(ok(&alice, &["recv"]).contains("a reply before the link"));
    let safety_before = ok(&alice, &["safety", BOB]);
    let bobs_safety_before = ok(&bob, &["safety", ALICE]);

    let laptop = node.dir.path().join("alice-laptop");
    let (linked, joined) = link(&node, &alice, &laptop, "laptop");
    let code = stdout(&linked)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(code.len(), 13, "the code alone on the first line: {code:?}");
    assert!(
        stdout(&linked).contains("linked \"laptop\" as device 2"),
        "{}",
        stdout(&linked)
    );
    assert!(
        stdout(&joined).contains("as device 2"),
        "{}",
        stdout(&joined)
    );

    // The history from before the link comes to the new device (once it receives),
    // as the past: `recv` does not show it as news.
    assert!(
        stderr(&linked).contains("sent the new device the recent history (2 messages)"),
        "{}",
        stderr(&linked)
    );
    let first = ok(&laptop, &["recv"]);
    assert!(!first.contains("before the link"), "{first}");
    let history = ok(&laptop, &["history", BOB]);
    assert!(history.contains("before the link"), "{history}");
    assert!(history.contains("a reply before the link"), "{history}");

    // Bob writes once; both of Alice's devices get it.
    let out = cli(&bob, &["send", ALICE, "to both of you"], "");
    assert!(out.status.success(), "{}", show(&["send"], &out));
    assert!(
        stderr(&out).contains(&format!("{ALICE} linked a new device (device 2)")),
        "{}",
        show(&["send"], &out)
    );
    assert!(ok(&alice, &["recv"]).contains("to both of you"));
    assert!(ok(&laptop, &["recv"]).contains("to both of you"));

    // The laptop writes; Bob gets it, and Alice's phone has it as sent by her.
    let sent = cli(&laptop, &["send", BOB, "from the laptop"], "");
    assert!(sent.status.success(), "{}", show(&["send"], &sent));
    assert!(stderr(&sent).is_empty(), "{}", show(&["send"], &sent));
    let got = ok(&bob, &["recv"]);
    assert!(got.contains("from the laptop"), "{got}");
    // Receipts say which device has it.
    let receipts = ok(&laptop, &["recv"]);
    assert!(
        receipts.contains(&format!("delivered to {BOB} device 1")),
        "{receipts}"
    );
    let phone = ok(&alice, &["recv"]);
    assert!(
        phone.contains(&format!(
            "to {BOB} from the laptop (sent from your device 2)"
        )),
        "{phone}"
    );
    let history = ok(&alice, &["history", BOB]);
    assert!(history.contains("from the laptop"), "{history}");

    // One account identity: the safety numbers did not change.
    assert_eq!(ok(&alice, &["safety", BOB]), safety_before);
    assert_eq!(ok(&laptop, &["safety", BOB]), safety_before);
    assert_eq!(ok(&bob, &["safety", ALICE]), bobs_safety_before);

    let list = ok(&alice, &["devices", "list"]);
    assert!(list.contains("primary (this device)"), "{list}");
    assert!(list.contains("\"laptop\""), "{list}");
    let json = ok(&laptop, &["devices", "list", "--json"]);
    assert_eq!(json.lines().count(), 2, "{json}");
    assert!(json.contains(r#""this_device":true"#) && json.contains(r#""name":"laptop""#));

    // Unlinked: the laptop can read nothing sent after, and is told why.
    assert!(ok(&alice, &["devices", "unlink", "2"]).contains("device 2 is unlinked"));
    ok(&bob, &["send", ALICE, "after the unlink"]);
    assert!(ok(&alice, &["recv"]).contains("after the unlink"));
    let out = cli(&laptop, &["recv"], "");
    assert!(!out.status.success(), "{}", show(&["recv"], &out));
    assert!(
        stderr(&out).contains("this device was unlinked"),
        "{}",
        show(&["recv"], &out)
    );
    assert!(!stdout(&out).contains("after the unlink"));
    assert_eq!(ok(&alice, &["safety", BOB]), safety_before);
}

/// A code works once, a guess at its secret kills it, and an account has at most
/// `accounts.max_devices` devices; registering the number again signs every one out.
#[test]
fn link_codes_are_one_time_secret_and_limited() {
    let node = ProcessNode::start(&config_text("[accounts]\nmax_devices = 2\n"));
    let alice = register_home(&node, "alice", ALICE);

    // A third party who knows the nameplate but not the secret: nothing is linked,
    // both sides are told, and the code is dead for the right device too.
    let thief = node.dir.path().join("thief");
    let (linked, joined) = link_with(&node, &alice, &thief, "thief", |code| {
        let (plate, secret) = code.split_once('-').expect("NNNNNN-PPPPPP");
        let wrong = (secret.parse::<u32>().expect("digits") + 1) % 1_000_000;
        format!("{plate}-{wrong:06}")
    });
    assert!(
        !linked.status.success(),
        "{}",
        show(&["devices", "link"], &linked)
    );
    assert!(
        stderr(&linked).contains("not its secret"),
        "{}",
        show(&["devices", "link"], &linked)
    );
    assert!(
        !joined.status.success(),
        "{}",
        show(&["devices", "join"], &joined)
    );
    let code = stdout(&linked)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let late = cli(
        &node.dir.path().join("late"),
        &["devices", "join", &code, "--server", &node.addr],
        "",
    );
    assert!(!late.status.success());
    assert!(
        stderr(&late).contains("unknown, expired, already used"),
        "{}",
        show(&["devices", "join"], &late)
    );
    assert!(!cli(&thief, &["whoami"], "").status.success());
    assert_eq!(
        ok(&alice, &["devices", "list", "--json"]).lines().count(),
        1
    );

    // The right code links once; used again, it is refused.
    let laptop = node.dir.path().join("laptop");
    let (linked, _) = link(&node, &alice, &laptop, "laptop");
    let used = stdout(&linked)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let again = cli(
        &node.dir.path().join("again"),
        &["devices", "join", &used, "--server", &node.addr],
        "",
    );
    assert!(
        !again.status.success(),
        "{}",
        show(&["devices", "join"], &again)
    );

    // At the limit, no code is even handed out; a linked device cannot link.
    let out = cli(&alice, &["devices", "link"], "");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("as many as this node allows"),
        "{}",
        show(&["devices", "link"], &out)
    );
    let out = cli(&laptop, &["devices", "link"], "");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("only the account's primary"),
        "{}",
        show(&["devices", "link"], &out)
    );

    // A new primary for the number signs out every device, the linked one too.
    let new_phone = register_home(&node, "alice-new-phone", ALICE);
    let out = cli(&laptop, &["recv"], "");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("signed out"),
        "{}",
        show(&["recv"], &out)
    );
    assert_eq!(
        ok(&new_phone, &["devices", "list", "--json"])
            .lines()
            .count(),
        1
    );
}

/// A linked device away longer than `accounts.companion_lapse_days` is unlinked, and
/// told so; the primary never lapses.
#[tokio::test]
async fn a_linked_device_that_stays_away_lapses() {
    let node = InProcessNode::start_with(&config_text(""), lapse_soon).await;
    let _laptop = lapses(&node, &node).await;
    node.shutdown().await;
}

/// The same in cluster mode: linked through node 1, found lapsed through node 2 (one
/// node's sweep per interval lists the cluster's accounts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_that_stays_away_lapses_in_a_cluster() {
    let Some(nats) = crate::cluster::NatsCluster::start(3) else {
        return;
    };
    let (_tls, config) = crate::cluster_nodes::cluster_config(&nats, "");
    let one = InProcessNode::start_with(&config, lapse_soon).await;
    let two = InProcessNode::start_with(&config, lapse_soon).await;
    let laptop = lapses(&one, &two).await;
    // What it published went with it.
    let keys = nats
        .connect(0)
        .await
        .jetstream
        .get_key_value(switchboard::cluster::keys::BUCKET)
        .await
        .expect("the key bucket");
    let entry = format!("d.{}.{}", laptop.account_id, laptop.device_id);
    assert_eq!(keys.get(&entry).await.expect("read"), None, "{entry}");
    let primary = format!("d.{}.1", laptop.account_id);
    assert!(
        keys.get(&primary).await.expect("read").is_some(),
        "{primary}"
    );
    one.shutdown().await;
    two.shutdown().await;
}

fn lapse_soon(c: &mut switchboard::config::Config) {
    c.accounts.companion_lapse = Duration::from_millis(1500);
    c.messages.sweep_interval = Duration::from_millis(100);
}

/// Alice's laptop, linked through `first`, lapses; `second` tells it so. The laptop.
async fn lapses(first: &InProcessNode, second: &InProcessNode) -> switchboard::store::DeviceRef {
    let (_a, alice) = registered_home(&first.addr, first.fingerprint, ALICE).await;
    let laptop_dir = tempfile::tempdir().unwrap();
    let laptop = Home::new(Some(laptop_dir.path().to_path_buf())).unwrap();
    let id = link_home(&alice, &laptop, &first.addr, first.fingerprint, "laptop").await;
    let reg = alice.load().unwrap();
    let phone = Client::connect(&second.addr, &reg.credentials, Some(second.fingerprint))
        .await
        .unwrap();
    assert_eq!(phone.list_devices().await.unwrap().len(), 2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while phone.list_devices().await.unwrap().len() > 1 {
        assert!(Instant::now() < deadline, "device {id} never lapsed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reg = laptop.load().unwrap();
    let away = Client::connect(&second.addr, &reg.credentials, Some(second.fingerprint))
        .await
        .unwrap();
    // Told by the answer, or (connected while the node was still closing the
    // device's connections) by the connection's close.
    match away.whoami().await {
        Err(switchboard::client::ClientError::Removed(why)) => {
            assert!(why.contains("stayed away too long"), "{why}")
        }
        other => assert_eq!(
            kind(other),
            ErrorKind::DeviceRemoved {
                why: Removal::Lapsed
            }
        ),
    }
    // The primary was away as long (it never lapses).
    let me = phone.whoami().await.unwrap();
    assert_eq!(me.device_id, 1);
    switchboard::store::DeviceRef {
        account_id: me.account_id,
        device_id: id,
    }
}

/// The texts of a device's history with `peer`: (outgoing, text), each message once
/// per id.
async fn texts(home: &Home, peer: &str) -> Vec<(bool, String)> {
    let m = Messenger::open(home).unwrap();
    receive_backlog(&m).await;
    let entries = m.history(&number(peer), None, 1000).await.unwrap();
    m.close().await;
    let mut ids = std::collections::HashSet::new();
    for e in &entries {
        assert!(
            ids.insert(e.id),
            "message {} twice: {entries:?}",
            hex::encode(e.id)
        );
    }
    entries
        .into_iter()
        .filter_map(|e| match e.content {
            Some(switchboard::client::content::Content::Text(t)) => Some((e.outgoing, t)),
            _ => None,
        })
        .collect()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 3,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Every current device of both accounts has each message exactly once: the
    /// other account's devices as received, the sender's own as sent.
    #[test]
    fn every_device_of_both_accounts_gets_each_message_once(
        alice_devices in 1usize..=3,
        bob_devices in 1usize..=3,
        sends in proptest::collection::vec((proptest::bool::ANY, 0usize..3), 1..6),
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let node = InProcessNode::start(&config_text("")).await;
            let mut dirs = Vec::new();
            let mut accounts: Vec<Vec<Home>> = Vec::new();
            for (number, count) in [(ALICE, alice_devices), (BOB, bob_devices)] {
                let (dir, primary) = registered_home(&node.addr, node.fingerprint, number).await;
                dirs.push(dir);
                let mut homes = vec![primary];
                for i in 1..count {
                    let dir = tempfile::tempdir().unwrap();
                    let home = Home::new(Some(dir.path().to_path_buf())).unwrap();
                    link_home(&homes[0], &home, &node.addr, node.fingerprint, &format!("d{i}"))
                        .await;
                    dirs.push(dir);
                    homes.push(home);
                }
                accounts.push(homes);
            }
            let mut sent: [Vec<String>; 2] = [Vec::new(), Vec::new()];
            for (n, (from_bob, device)) in sends.iter().enumerate() {
                let (from, to) = if *from_bob { (1, ALICE) } else { (0, BOB) };
                let homes = &accounts[from];
                let home = &homes[device % homes.len()];
                let text = format!("message {n}");
                let m = Messenger::open(home).unwrap();
                m.send_text(&number(to), &text).await.unwrap();
                m.close().await;
                sent[from].push(text);
            }
            for (account, peer) in [(0, BOB), (1, ALICE)] {
                for home in &accounts[account] {
                    let mut got = texts(home, peer).await;
                    got.sort();
                    let mut want: Vec<(bool, String)> = sent[account]
                        .iter()
                        .map(|t| (true, t.clone()))
                        .chain(sent[1 - account].iter().map(|t| (false, t.clone())))
                        .collect();
                    want.sort();
                    assert_eq!(got, want, "a device of account {account}");
                }
            }
            node.shutdown().await;
        });
    }
}

/// A link code expires: after its lifetime nobody can join with it, and the primary
/// stops waiting.
#[tokio::test]
async fn an_expired_link_code_links_nothing() {
    let node = InProcessNode::start_with(&config_text(""), |c| {
        c.accounts.link_code_ttl = Duration::from_millis(500);
    })
    .await;
    let (_a, alice) = registered_home(&node.addr, node.fingerprint, ALICE).await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let primary = switchboard::client::link::link_device(&alice, move |code, _| {
        let _ = tx.send(*code);
    });
    let late = async {
        let code = rx.await.expect("a code");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(Some(dir.path().to_path_buf())).unwrap();
        let joined =
            switchboard::client::link::join_account(&home, code, &node.addr, "late", None).await;
        (joined, home.load().is_err())
    };
    let (linked, (joined, nothing_saved)) = tokio::join!(primary, late);
    let linked = linked.expect_err("nothing joined in time");
    assert!(linked.to_string().contains("expired"), "{linked}");
    let joined = joined.expect_err("the code expired");
    assert!(joined.to_string().contains("expired"), "{joined}");
    assert!(
        nothing_saved,
        "a failed join leaves no registration in its home"
    );
    node.shutdown().await;
}

/// A linked device may unlink itself, never another device (nor the primary).
#[tokio::test]
async fn a_linked_device_unlinks_itself_only() {
    let node = InProcessNode::start(&config_text("")).await;
    let (_a, alice) = registered_home(&node.addr, node.fingerprint, ALICE).await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let homes: Vec<Home> = dirs
        .iter()
        .map(|d| Home::new(Some(d.path().to_path_buf())).unwrap())
        .collect();
    let (fp, addr) = (node.fingerprint, node.addr.clone());
    let first = link_home(&alice, &homes[0], &addr, fp, "laptop").await;
    let second = link_home(&alice, &homes[1], &addr, fp, "tablet").await;
    let connect = |home: &Home| {
        let reg = home.load().unwrap();
        let addr = addr.clone();
        async move {
            Client::connect(&addr, &reg.credentials, Some(fp))
                .await
                .unwrap()
        }
    };
    let laptop = connect(&homes[0]).await;
    assert_eq!(
        kind(laptop.unlink_device(second).await),
        ErrorKind::NotPrimary
    );
    assert_eq!(kind(laptop.unlink_device(1).await), ErrorKind::NotPrimary);
    assert_eq!(laptop.list_devices().await.unwrap().len(), 3);
    laptop.unlink_device(first).await.unwrap();
    let again = connect(&homes[0]).await;
    assert_eq!(
        kind(again.whoami().await),
        ErrorKind::DeviceRemoved {
            why: Removal::Unlinked
        }
    );
    let tablet = connect(&homes[1]).await;
    let left: Vec<u32> = tablet
        .list_devices()
        .await
        .unwrap()
        .iter()
        .map(|d| d.device_id)
        .collect();
    assert_eq!(left, vec![1, second]);
    node.shutdown().await;
}
