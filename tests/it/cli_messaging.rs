//! End-to-end encrypted messaging with the CLI as a process against a node process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::*;

fn register(node: &ProcessNode, name: &str, number: &str) -> PathBuf {
    let home = node.dir.path().join(name);
    let args = ["register", number, "--server", &node.addr, "--code", CODE];
    let out = node.cli(&home, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
    home
}

/// Runs `send`, asserts success, returns the printed message id.
fn send(home: &Path, to: &str, text: &str) -> String {
    let args = ["send", to, text];
    let out = cli(home, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
    let id = stdout(&out).trim().to_string();
    assert_eq!(id.len(), 32, "{}", show(&args, &out));
    id
}

fn recv(home: &Path, extra: &[&str]) -> (String, String) {
    let mut args = vec!["recv"];
    args.extend_from_slice(extra);
    let out = cli(home, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
    (stdout(&out), stderr(&out))
}

/// The texts of `recv`'s plain output lines from `from`.
fn texts_from(output: &str, from: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ' ');
            let (_time, sender, text) = (parts.next()?, parts.next()?, parts.next()?);
            (sender == from).then(|| text.to_string())
        })
        .collect()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn offline_messages_survive_sigkill_and_are_received_once_in_order() {
    let mut node = ProcessNode::start(&config_text(""));
    let alice = register(&node, "alice", ALICE);
    let bob = register(&node, "bob", BOB);
    let texts = [
        "first: the eagle lands at noon",
        "second: bring the blue folder",
        "third: zebra-crossing-7741",
    ];
    for text in texts {
        send(&alice, BOB, text);
    }
    // Killed right after the third send returned: no chance to flush on the way out.
    node.kill9();
    node.restart();

    let (out, err) = recv(&bob, &[]);
    assert_eq!(
        texts_from(&out, ALICE),
        texts,
        "stdout:\n{out}\nstderr:\n{err}"
    );
    let (again, _) = recv(&bob, &[]);
    assert!(
        texts_from(&again, ALICE).is_empty(),
        "delivered twice:\n{again}"
    );

    // Alice sees the receipts.
    let (receipts, _) = recv(&alice, &["--json"]);
    let delivered = receipts
        .lines()
        .filter(|l| l.contains("\"delivered\"") && l.contains(BOB))
        .count();
    assert_eq!(delivered, 3, "{receipts}");

    // No sent text, nor any 8-byte run of one, is in the node's data dir or its log.
    node.stop();
    let mut haystacks: Vec<(String, Vec<u8>)> = files_under(&node.data_dir())
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    haystacks.push(("node log".into(), node.log().into_bytes()));
    assert!(haystacks.iter().map(|(_, b)| b.len()).sum::<usize>() > 0);
    for text in texts {
        for needle in text.as_bytes().windows(8) {
            for (name, hay) in &haystacks {
                assert!(
                    !hay.windows(needle.len()).any(|w| w == needle),
                    "{:?} of a sent text appears in {name}",
                    String::from_utf8_lossy(needle)
                );
            }
        }
    }
}

#[test]
fn recv_follow_prints_a_message_as_it_arrives() {
    let node = ProcessNode::start(&config_text(""));
    let alice = register(&node, "alice", ALICE);
    let bob = register(&node, "bob", BOB);
    let mut follower = Command::new(BIN)
        .arg("--home")
        .arg(&bob)
        .args(["recv", "--follow", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    // Give the follower time to subscribe (its first message proves it did).
    send(&alice, BOB, "warm-up");
    let (_, first) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the follower printed the warm-up message");
    assert!(first.contains("warm-up"), "{first}");

    let sent_at = Instant::now();
    let id = send(&alice, BOB, "live, with \"quotes\"");
    let returned = Instant::now();
    let (printed_at, line) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the follower printed the message");
    let _ = follower.kill();
    let _ = follower.wait();
    let value: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(value["id"], id.as_str());
    assert_eq!(value["from"], ALICE);
    assert_eq!(value["text"], "live, with \"quotes\"");
    assert!(value["sent_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    // Timing is reported, not asserted: these machines are shared and noisy.
    eprintln!(
        "recv --follow printed the message {:?} after send started, {:?} after it returned",
        printed_at - sent_at,
        printed_at.saturating_duration_since(returned)
    );
}

#[test]
fn stdin_text_and_control_characters() {
    let node = ProcessNode::start(&config_text(""));
    let alice = register(&node, "alice", ALICE);
    let bob = register(&node, "bob", BOB);
    let args = ["send", "(415) 555-0101", "-"];
    let out = cli(&alice, &args, "two\nlines \u{1b}[31mred\n");
    assert!(out.status.success(), "{}", show(&args, &out));
    let (plain, _) = recv(&bob, &["--json"]);
    let value: serde_json::Value = serde_json::from_str(plain.trim()).unwrap();
    assert_eq!(value["text"], "two\nlines \u{1b}[31mred");

    send(&alice, BOB, "a\nb\u{1b}c");
    let (plain, _) = recv(&bob, &[]);
    assert_eq!(texts_from(&plain, ALICE), ["a\\nb\\u{1b}c"], "{plain}");
}

#[test]
fn send_errors_are_clear_and_exit_non_zero() {
    let node = ProcessNode::start(&config_text(""));
    let alice = register(&node, "alice", ALICE);
    let cases: [(&[&str], &str); 4] = [
        (&["send", "+14155550199", "hello"], "not registered"),
        (&["send", "+1 23", "hello"], "number"),
        (&["send", ALICE, "hello"], "own number"),
        (&["send", BOB, ""], "empty"),
    ];
    for (args, needle) in cases {
        let out = cli(&alice, args, "");
        assert!(!out.status.success(), "{}", show(args, &out));
        assert!(stderr(&out).contains(needle), "{}", show(args, &out));
    }
    // Bob registers but has never been online since: his keys were published at
    // registration, so Alice can write to him.
    let bob = register(&node, "bob", BOB);
    send(&alice, BOB, "hello");
    let unregistered = node.dir.path().join("nobody");
    let out = cli(&unregistered, &["send", BOB, "hi"], "");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("register"), "{}", stderr(&out));
    assert_eq!(texts_from(&recv(&bob, &[]).0, ALICE), ["hello"]);
}

#[test]
fn safety_numbers_match_and_a_new_identity_is_warned_about() {
    let node = ProcessNode::start(&config_text(""));
    let alice = register(&node, "alice", ALICE);
    let bob = register(&node, "bob", BOB);
    let safety = |home: &Path, of: &str| {
        let args = ["safety", of];
        let out = cli(home, &args, "");
        assert!(out.status.success(), "{}", show(&args, &out));
        stdout(&out).trim().to_string()
    };
    let from_alice = safety(&alice, BOB);
    assert_eq!(from_alice, safety(&bob, ALICE));
    assert_eq!(from_alice.split(' ').count(), 12, "{from_alice}");

    send(&alice, BOB, "before");
    assert_eq!(texts_from(&recv(&bob, &[]).0, ALICE), ["before"]);

    // Bob moves to a new phone: a new home, a new identity key.
    let bob2 = register(&node, "bob-new-phone", BOB);
    let args = ["send", BOB, "after"];
    let out = cli(&alice, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
    assert!(
        stderr(&out).contains("identity key has changed"),
        "{}",
        show(&args, &out)
    );
    assert_eq!(texts_from(&recv(&bob2, &[]).0, ALICE), ["after"]);
    assert_ne!(safety(&alice, BOB), from_alice);
    assert_eq!(safety(&alice, BOB), safety(&bob2, ALICE));

    // Bob's new phone replies; Alice reads it without a second warning.
    send(&bob2, ALICE, "new phone, same bob");
    let (out, err) = recv(&alice, &[]);
    assert_eq!(texts_from(&out, BOB), ["new phone, same bob"]);
    assert!(!err.contains("identity key has changed"), "{err}");

    // Bob moves again and writes first: Alice's `recv` is where she learns of it.
    let bob3 = register(&node, "bob-third-phone", BOB);
    send(&bob3, ALICE, "third phone");
    let (out, err) = recv(&alice, &[]);
    assert_eq!(texts_from(&out, BOB), ["third phone"]);
    assert!(err.contains("identity key has changed"), "{err}");
}
