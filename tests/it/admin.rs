//! Operator tools against a running node (a child process): the admin commands over
//! the admin socket, backups under load restored into a fresh data dir, the metrics
//! endpoint, JSON logs and `check-config`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use switchboard::client::Client;
use switchboard::proto::ErrorKind;
use switchboard::tls::Credentials;

use crate::support::{
    ALICE, BIN, BOB, CAROL, CODE, ProcessNode, config_text, http_get, kind, next_push, outgoing,
    parse_openmetrics, push_numbers, sample, send_numbered, show, stdout,
};

/// Runs `switchboard admin ARGS --data DATA`.
pub(crate) fn admin(data: &Path, args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = std::process::Command::new(BIN)
        .arg("admin")
        .args(args)
        .arg("--data")
        .arg(data)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn admin");
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes());
    child.wait_with_output().expect("admin output")
}

pub(crate) fn admin_ok(data: &Path, args: &[&str]) -> String {
    let out = admin(data, args, "");
    assert!(out.status.success(), "{}", show(args, &out));
    stdout(&out)
}

pub(crate) fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test]
async fn admin_commands_against_a_running_node() {
    let node = ProcessNode::start(&config_text(""));
    let data = node.data_dir();
    let alice = node.registered(ALICE).await;
    let (bob_creds, _) = Credentials::generate_device().expect("key");
    let bob = node.registered_as(&bob_creds, BOB).await;
    for i in 0..3 {
        send_numbered(&alice, BOB, i).await.expect("send");
    }

    // Exactly two accounts and three queued messages; both devices online.
    let stats = json(&admin_ok(&data, &["stats", "--json"]));
    assert_eq!(stats["accounts"], 2, "{stats}");
    assert_eq!(stats["devices"], 2, "{stats}");
    assert_eq!(stats["queued_messages"], 3, "{stats}");
    assert_eq!(stats["queued_receipts"], 0, "{stats}");
    assert_eq!(stats["online_devices"], 2, "{stats}");
    assert!(stats["queued_bytes"].as_u64().expect("bytes") > 3 * 32 * 1024);
    assert!(stats["oldest_queued_ms"].as_u64().is_some(), "{stats}");
    assert!(stats["data_dir_bytes"].as_u64().expect("size") > 0);
    assert!(stats["uptime_secs"].as_u64().is_some(), "{stats}");
    let text = admin_ok(&data, &["stats"]);
    assert!(text.contains("accounts          2\n"), "{text}");
    assert!(text.contains("queued messages   3\n"), "{text}");

    let accounts = json(&admin_ok(&data, &["accounts", "--json"]));
    let accounts = accounts.as_array().expect("list");
    assert_eq!(accounts.len(), 2);
    let bob_row = accounts
        .iter()
        .find(|a| a["number"] == BOB)
        .expect("bob listed");
    assert_eq!(bob_row["devices"][0]["queued"], 3);
    let table = admin_ok(&data, &["accounts"]);
    assert!(table.contains(ALICE) && table.contains(BOB) && table.contains("2 account(s)"));

    let account = json(&admin_ok(&data, &["account", BOB, "--json"]));
    assert_eq!(account["number"], BOB);
    assert_eq!(account["devices"].as_array().expect("devices").len(), 1);
    assert_eq!(account["devices"][0]["primary"], true, "{account}");
    assert!(account["devices"][0]["last_seen_ms"].is_u64(), "{account}");
    let text = admin_ok(&data, &["account", BOB]);
    assert!(text.contains(" primary, key "), "{text}");
    let out = admin(&data, &["account", CAROL], "");
    assert!(!out.status.success());
    assert!(
        crate::support::stderr(&out).contains("has no account on this node"),
        "{}",
        show(&["account", CAROL], &out)
    );

    // No confirmation, no deletion.
    let out = admin(&data, &["delete", BOB], "");
    assert!(!out.status.success());
    assert!(crate::support::stderr(&out).contains("--yes"));
    assert_eq!(json(&admin_ok(&data, &["stats", "--json"]))["accounts"], 2);

    let deleted = admin_ok(&data, &["delete", BOB, "--yes"]);
    assert!(
        deleted.contains(
            "deleted +14155550101: 1 device(s), 3 queued item(s), 1 connection(s) closed"
        ),
        "{deleted}"
    );
    let stats = json(&admin_ok(&data, &["stats", "--json"]));
    assert_eq!(
        (&stats["accounts"], &stats["queued_messages"]),
        (&serde_json::json!(1), &serde_json::json!(0)),
        "{stats}"
    );
    // Bob's connection was closed, and his device is told why when it comes back;
    // nobody can send to him any more.
    assert!(bob.whoami().await.is_err());
    let again = Client::connect(&node.addr, &bob_creds, Some(node.fingerprint))
        .await
        .expect("connect");
    assert_eq!(
        kind(again.whoami().await),
        ErrorKind::DeviceRemoved {
            why: switchboard::proto::Removal::AccountDeleted
        }
    );
    let id = switchboard::client::e2e::new_message_id();
    assert_eq!(
        kind(alice.send(outgoing(BOB, id, vec![1; 10])).await),
        ErrorKind::UnknownRecipient
    );

    let rotated = admin_ok(&data, &["rotate-discovery-key"]);
    assert!(rotated.contains("rotated to version 2"), "{rotated}");

    // Backup while running, restore into a new dir; never into a used one.
    let backup = node.dir.path().join("node.backup");
    let out = admin_ok(&data, &["backup", backup.to_str().expect("path")]);
    assert!(out.contains("checksum verified"), "{out}");
    let out = admin(&data, &["backup", backup.to_str().expect("path")], "");
    assert!(!out.status.success(), "an existing file is not overwritten");
    let restored = node.dir.path().join("restored");
    let out = admin(&restored, &["restore", backup.to_str().expect("path")], "");
    assert!(out.status.success(), "{}", show(&["restore"], &out));
    let out = admin(&restored, &["restore", backup.to_str().expect("path")], "");
    assert!(crate::support::stderr(&out).contains("not empty"));
    let out = admin(&data, &["restore", backup.to_str().expect("path")], "");
    assert!(
        crate::support::stderr(&out).contains("a node is running"),
        "{}",
        show(&["restore"], &out)
    );
    // The restored data dir, opened offline (no node on it), says the same.
    let stats = json(&admin_ok(&restored, &["stats", "--json"]));
    assert_eq!(stats["accounts"], 1, "{stats}");
    assert_eq!(stats["online_devices"], serde_json::Value::Null);
}

#[tokio::test]
async fn admin_commands_work_on_a_stopped_data_dir() {
    let mut node = ProcessNode::start(&config_text(""));
    let data = node.data_dir();
    let alice = node.registered(ALICE).await;
    node.registered(BOB).await;
    send_numbered(&alice, BOB, 7).await.expect("send");
    drop(alice);
    assert!(node.stop());
    assert!(
        !data.join("admin.sock").exists(),
        "the node removes its socket"
    );
    let stats = json(&admin_ok(&data, &["stats", "--json"]));
    assert_eq!(
        (
            stats["accounts"].as_u64(),
            stats["queued_messages"].as_u64()
        ),
        (Some(2), Some(1))
    );
    let out = admin_ok(&data, &["delete", ALICE, "--yes"]);
    assert!(
        out.contains("deleted +14155550100: 1 device(s), 0 queued item(s)"),
        "{out}"
    );
    node.spawn();
    let stats = json(&admin_ok(&data, &["stats", "--json"]));
    assert_eq!(stats["accounts"], 1, "{stats}");
}

/// Messages flow from Alice to Bob while a backup is taken. The backup, restored into
/// a fresh data dir, runs a node (with the same certificate) that delivers every
/// message acknowledged before the backup began, in order, and nothing never sent.
#[tokio::test]
async fn backup_under_load_restores_every_acknowledged_message() {
    // Bounded: the sender stops 50 messages after the backup is done, or at this cap.
    const MAX_SENDS: u32 = 20_000;
    let node = ProcessNode::start(&config_text(""));
    let data = node.data_dir();
    let (bob_key, _) = Credentials::generate_device().expect("key");
    node.registered_as(&bob_key, BOB).await.close().await;
    let alice = node.registered(ALICE).await;

    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let backup_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (acked, backup_done) = (acked.clone(), backup_done.clone());
        tokio::spawn(async move {
            let mut after_backup = 0;
            for i in 0..MAX_SENDS {
                if backup_done.load(std::sync::atomic::Ordering::Acquire) {
                    after_backup += 1;
                    if after_backup > 50 {
                        break;
                    }
                }
                let mut body = vec![0x42; 1024];
                body[..4].copy_from_slice(&i.to_be_bytes());
                let id = switchboard::client::e2e::new_message_id();
                if alice.send(outgoing(BOB, id, body)).await.is_ok() {
                    acked.lock().expect("lock").push(i);
                }
            }
        })
    };
    // Let some traffic through, then back up while it goes on.
    for _ in 0..500 {
        if acked.lock().expect("lock").len() >= 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before: Vec<u32> = acked.lock().expect("lock").clone();
    let backup = node.dir.path().join("load.backup");
    let path = backup.to_str().expect("path").to_string();
    let data2 = data.clone();
    let out = tokio::task::spawn_blocking(move || admin(&data2, &["backup", &path], ""))
        .await
        .expect("backup task");
    backup_done.store(true, std::sync::atomic::Ordering::Release);
    assert!(out.status.success(), "{}", show(&["backup"], &out));
    let during = acked.lock().expect("lock").len();
    sender.await.expect("sender");
    let all: BTreeSet<u32> = acked.lock().expect("lock").iter().copied().collect();
    // The sender ran before, during and after the backup (it stops 50 sends after).
    assert!(
        all.len() > during,
        "sending went on after the backup ({} before it, {during} at its end, {} in all)",
        before.len(),
        all.len()
    );

    let restored_dir = tempfile::tempdir().expect("tempdir");
    let restored = restored_dir.path().join("data");
    let out = admin(&restored, &["restore", backup.to_str().expect("path")], "");
    assert!(out.status.success(), "{}", show(&["restore"], &out));
    let fresh = ProcessNode::start_with_data(&config_text(""), Some(restored));
    assert_eq!(
        fresh.fingerprint, node.fingerprint,
        "the certificate came back"
    );

    let bob = Client::connect(&fresh.addr, &bob_key, Some(fresh.fingerprint))
        .await
        .expect("bob connects to the restored node");
    let mut sub = bob.subscribe().await.expect("subscribe");
    let mut got = Vec::new();
    loop {
        let push = next_push(&mut sub).await;
        got.extend(push_numbers(&push));
        if push.backlog_end {
            break;
        }
    }
    let got_set: BTreeSet<u32> = got.iter().copied().collect();
    let lost: Vec<u32> = before
        .iter()
        .filter(|i| !got_set.contains(i))
        .copied()
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged before the backup, but not restored: {lost:?}"
    );
    assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
    assert!(got.iter().all(|i| all.contains(i)), "a phantom message");
    eprintln!(
        "backup under load: {} acked before it began, {} restored, {} acked in all",
        before.len(),
        got.len(),
        all.len()
    );
}

#[tokio::test]
async fn metrics_are_valid_openmetrics_and_count_the_sends() {
    let node = ProcessNode::start(&config_text(
        "[metrics]\nenabled = true\nlisten = \"127.0.0.1:0\"\n",
    ));
    let url = node.metrics.clone().expect("metrics url");
    let alice = node.registered(ALICE).await;
    let _bob = node.registered(BOB).await;
    const SENDS: u32 = 7;
    for i in 0..SENDS {
        let id = switchboard::client::e2e::new_message_id();
        alice
            .send(outgoing(BOB, id, i.to_be_bytes().to_vec()))
            .await
            .expect("send");
    }
    let id = switchboard::client::e2e::new_message_id();
    assert_eq!(
        kind(alice.send(outgoing(CAROL, id, vec![1])).await),
        ErrorKind::UnknownRecipient
    );

    let (status, content_type, body) = http_get(&url);
    assert!(status.contains("200"), "{status}");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let samples = parse_openmetrics(&body);
    assert_eq!(
        sample(&samples, "switchboard_messages_accepted_total"),
        f64::from(SENDS),
        "{body}"
    );
    assert_eq!(
        sample(
            &samples,
            "switchboard_requests_total{kind=\"send\",outcome=\"ok\"}"
        ),
        f64::from(SENDS)
    );
    assert_eq!(
        sample(
            &samples,
            "switchboard_requests_total{kind=\"send\",outcome=\"unknown_recipient\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&samples, "switchboard_queue_items"),
        f64::from(SENDS)
    );
    assert_eq!(sample(&samples, "switchboard_connections_open"), 2.0);
    assert_eq!(
        sample(
            &samples,
            "switchboard_code_requests_total{outcome=\"sent\"}"
        ),
        2.0
    );
    assert!(sample(&samples, "switchboard_group_commit_batch_count") >= 1.0);
    assert!(sample(&samples, "switchboard_store_bytes") > 0.0);

    // Every metric the Grafana dashboard queries is one the node serves.
    let dashboard = json(include_str!("../../config/grafana-dashboard.json"));
    // A labelled family has no sample until its first event, but its TYPE is there.
    let families: BTreeSet<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .flat_map(|name| {
            ["", "_total", "_bucket", "_sum", "_count"].map(|suffix| format!("{name}{suffix}"))
        })
        .collect();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("switchboard_") {
                    queried += 1;
                    assert!(
                        families.contains(word),
                        "the dashboard queries {word}, which the node does not serve"
                    );
                }
            }
        }
    }
    assert!(queried >= 10);

    let (status, _, _) = http_get(&url.replace("/metrics", "/other"));
    assert!(status.contains("404"), "{status}");
}

#[test]
fn json_logs_carry_the_connection_span_and_no_codes() {
    let mut node = ProcessNode::start(&config_text("[log]\nformat = \"json\"\n"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let alice = node.registered(ALICE).await;
        alice.whoami().await.expect("whoami");
    });
    assert!(node.stop());
    let log = node.log();
    let mut conn_lines = 0;
    for line in log.lines() {
        let v = json(line);
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["spans"].as_array().is_some_and(|s| {
            s.iter()
                .any(|s| s["name"] == "conn" && s["remote"].is_string())
        }) {
            conn_lines += 1;
        }
    }
    assert!(conn_lines > 0, "no line inside a connection span:\n{log}");
    assert!(!log.contains(CODE), "a code in the log:\n{log}");
}

#[test]
fn check_config_prints_the_settings_or_names_the_nearest_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[server]\nlisten = \"127.0.0.1:5000\"\n[verification.sms]\nkind = \"http\"\nurl = \"https://gw.example/send\"\nusername = \"u\"\npassword = \"hunter2-secret\"\nform = { to = \"{number}\" }\n",
    )
    .expect("write");
    let out = std::process::Command::new(BIN)
        .arg("check-config")
        .arg(&good)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", show(&["check-config"], &out));
    let text = stdout(&out);
    assert!(text.contains("valid"), "{text}");
    assert!(text.contains("listen = \"127.0.0.1:5000\""), "{text}");
    // Defaults are shown too, and the password is not.
    assert!(text.contains("max_connections = 10000"), "{text}");
    assert!(!text.contains("hunter2-secret"), "{text}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_conections = 5\n").expect("write");
    let out = std::process::Command::new(BIN)
        .arg("check-config")
        .arg(&bad)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = crate::support::stderr(&out);
    assert!(err.contains("did you mean `max_connections`?"), "{err}");
}

#[test]
fn the_systemd_unit_runs_flags_the_binary_has() {
    let unit = include_str!("../../config/switchboard.service");
    for directive in [
        "User=switchboard",
        "ProtectSystem=strict",
        "StateDirectory=switchboard",
        "Restart=on-failure",
        "LimitNOFILE=",
        "NoNewPrivileges=true",
    ] {
        assert!(unit.contains(directive), "missing {directive}");
    }
    for key in ["ExecStartPre=", "ExecStart="] {
        let line = unit
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key}"));
        let words: Vec<&str> = line[key.len()..].split_whitespace().collect();
        let subcommand = words[1];
        let help = std::process::Command::new(BIN)
            .args([subcommand, "--help"])
            .output()
            .expect("help");
        assert!(help.status.success(), "no subcommand {subcommand}");
        let help = stdout(&help);
        for flag in words.iter().filter(|w| w.starts_with("--")) {
            let flag = flag.split('=').next().unwrap_or(flag);
            assert!(help.contains(flag), "{subcommand} has no {flag}");
        }
    }
}
