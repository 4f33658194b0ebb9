//! `switchboard admin export-to-cluster`: a single node's community moved into a
//! cluster of two nodes over 3 NATS members, and carrying on there. Clients are the
//! CLI as a process; the node and the export too.

use std::path::Path;
use std::process::{Command, Output};

use crate::cluster::NatsCluster;
use crate::cluster_nodes::{found_contacts, ok, register, texts_of};
use crate::support::*;

/// A fourth test number, to register after the move.
const DAVE: &str = "+14155550103";

fn export(data: &Path, to: &Path) -> Output {
    Command::new(BIN)
        .arg("admin")
        .arg("--data")
        .arg(data)
        .args(["export-to-cluster", "--json", "--to"])
        .arg(to)
        .output()
        .expect("run the export")
}

fn show_out(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Alice, Bob and Carol on one node: a profile, a group, a direct message, a group
/// message Carol read and Bob did not, and a 9 MiB file for Bob, all waiting for
/// him when the node stops. Exported, then served by two cluster nodes with the
/// node's certificate: Bob reads everything once, the file whole, Alice's count
/// says 2 of 2, her profile is found, a number registered after the move claims
/// Bob's one-time keys, and discovery finds everyone. A second export is refused.
#[test]
fn a_single_node_moved_into_a_cluster_carries_on_there() {
    use sha2::Digest;
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let extra = format!("\"{DAVE}\" = \"{CODE}\"\n");
    let mut single = ProcessNode::start(&config_text(&extra));
    let dir = tempfile::tempdir().expect("temp dir");
    let home = |name: &str| dir.path().join(name);
    let (alice, bob, carol, dave) = (home("alice"), home("bob"), home("carol"), home("dave"));
    for (h, number) in [(&alice, ALICE), (&bob, BOB), (&carol, CAROL)] {
        register(h, number, &single.addr);
    }
    ok(&alice, &["profile", "set", "--name", "Alice A."]);
    ok(&alice, &["group", "create", "Family", BOB, CAROL]);
    ok(&alice, &["send", BOB, "before the move"]);
    ok(&alice, &["send", "--group", "Family", "dinner at 8"]);
    assert!(ok(&carol, &["recv"]).contains("dinner at 8"));
    let plain: Vec<u8> = (0..9u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = dir.path().join("holiday.bin");
    std::fs::write(&file, &plain).expect("file");
    ok(
        &alice,
        &["send", BOB, "--file", file.to_str().expect("utf-8 path")],
    );
    let card = dir.path().join("contacts.vcf");
    std::fs::write(
        &card,
        format!(
            "BEGIN:VCARD\nVERSION:3.0\nFN:Bob\nTEL:{BOB}\nEND:VCARD\n\
             BEGIN:VCARD\nVERSION:3.0\nFN:Carol\nTEL:{CAROL}\nEND:VCARD\n\
             BEGIN:VCARD\nVERSION:3.0\nFN:Dave\nTEL:{DAVE}\nEND:VCARD\n"
        ),
    )
    .expect("vcard");
    ok(
        &alice,
        &["contacts", "import", card.to_str().expect("utf-8 path")],
    );
    // Alice looked her contacts up on the node: the cluster's key is a new version,
    // so her next sync looks them up again rather than trusting the node's answers.
    assert_eq!(
        found_contacts(&alice),
        vec![BOB.to_string(), CAROL.to_string()]
    );
    assert!(single.stop(), "the node stops cleanly");

    // The cluster's nodes get the node's certificate.
    let data = single.data_dir();
    let (cert, key) = (data.join("tls/cert.pem"), data.join("tls/key.pem"));
    let urls: Vec<String> = nats.urls.iter().map(|u| format!("{u:?}")).collect();
    let config = config_text(&format!(
        "{extra}[server]\ntls_cert = {cert:?}\ntls_key = {key:?}\n[cluster]\nnats = [{}]\n",
        urls.join(", ")
    ));
    let cluster_toml = dir.path().join("cluster.toml");
    std::fs::write(&cluster_toml, &config).expect("cluster config");
    let out = export(&data, &cluster_toml);
    assert!(out.status.success(), "{}", show_out(&out));
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", show_out(&out)));
    for (field, want) in [
        ("accounts", 3),
        ("devices", 3),
        ("profiles", 1),
        ("groups", 1),
        ("group_messages", 1),
        ("attachments", 1),
        ("indexed", 3),
        ("expired_items", 0),
    ] {
        assert_eq!(report[field], want, "{field}: {report}");
    }
    assert!(
        report["queue_items"].as_u64() >= Some(3),
        "the direct message, the group message and the file's: {report}"
    );
    assert!(
        report["attachment_bytes"].as_u64() > Some(9 << 20),
        "the file, encrypted: {report}"
    );
    assert!(
        report["one_time_keys"].as_u64() > Some(0),
        "the devices' unclaimed one-time keys: {report}"
    );
    assert_eq!(
        report["node_fingerprint"], report["cluster_fingerprint"],
        "{report}"
    );
    // Run again, it refuses and writes nothing.
    let again = export(&data, &cluster_toml);
    assert!(!again.status.success(), "{}", show_out(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exported to the cluster already"),
        "{}",
        show_out(&again)
    );

    let one = ProcessNode::start(&config);
    let two = ProcessNode::start(&config);
    assert_eq!(
        one.fingerprint, single.fingerprint,
        "clients keep their pin"
    );
    let both = format!("{},{}", one.addr, two.addr);
    let bad = cli(&alice, &["servers", "node-without-port"], "");
    assert!(!bad.status.success(), "{}", show(&["servers"], &bad));
    assert!(
        stderr(&bad).contains("not a node address"),
        "{}",
        stderr(&bad)
    );
    assert!(
        ok(&alice, &["servers"]).starts_with(&single.addr),
        "unchanged"
    );
    for h in [&alice, &carol] {
        ok(h, &["servers", &both]);
    }
    ok(&bob, &["servers", &format!("{},{}", two.addr, one.addr)]);
    assert!(ok(&bob, &["servers"]).starts_with(&two.addr));

    let saves = dir.path().join("bob-saves");
    let args = ["recv", "--save-dir", saves.to_str().expect("utf-8 path")];
    let out = cli(&bob, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
    let got = stdout(&out);
    assert!(got.contains("before the move"), "{got}");
    assert!(
        got.contains(&format!("[Family] {ALICE} dinner at 8")),
        "{got}"
    );
    assert_eq!(got.matches("dinner at 8").count(), 1, "once: {got}");
    let saved = std::fs::read(saves.join("holiday.bin")).expect("saved");
    assert_eq!(
        sha2::Sha256::digest(&saved),
        sha2::Sha256::digest(&plain),
        "the saved file is the original"
    );
    assert!(!ok(&bob, &["recv"]).contains("dinner at 8"), "read once");
    // Carol's read counted on the node, Bob's on the cluster.
    let history = ok(&alice, &["history", "--group", "Family"]);
    let _ = ok(&alice, &["recv"]);
    let history_after = ok(&alice, &["history", "--group", "Family"]);
    assert!(
        history_after.contains("dinner at 8  (delivered to 2 of 2)"),
        "before reading receipts:\n{history}\nafter:\n{history_after}"
    );
    let profile = ok(&bob, &["profile", "show", ALICE]);
    assert!(profile.contains("Alice A."), "{profile}");

    // Someone new, after the move: Bob's exported one-time keys make the session.
    register(&dave, DAVE, &both);
    ok(&dave, &["send", BOB, "hello from after the move"]);
    assert_eq!(
        texts_of(&bob),
        vec!["hello from after the move".to_string()]
    );

    let mut found = found_contacts(&alice);
    found.sort();
    assert_eq!(
        found,
        vec![BOB.to_string(), CAROL.to_string(), DAVE.to_string()]
    );
}

/// An export does not begin while a node runs on the cluster (its sweep took a
/// turn a moment ago). While an export is unfinished (here: another node's, broken
/// off), no cluster node serves, and no other node's export begins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_export_keeps_nodes_and_other_exports_out() {
    use std::sync::Arc;
    use switchboard::cluster::accounts::{ExportMark, ExportStart};
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let key = switchboard::discovery::DiscoveryKey::from_seed(&[1; 32], 1).expect("key");
    // The buckets are opened until the cluster's meta leader is there.
    let accounts = nats.accounts(0, Arc::new(key)).await;
    let (tls, config) = crate::cluster_nodes::cluster_config(&nats, "");
    let file = tls.path().join("cluster.toml");
    std::fs::write(&file, &config).expect("config");
    let mut single = ProcessNode::start(&config_text(""));
    assert!(single.stop());
    // A node's sweep took its turn a moment ago: a node runs on the cluster.
    let quotas = nats.quotas(0).await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert!(
        quotas
            .take_turn("lapse", now_ms, 60_000)
            .await
            .expect("turn")
    );
    let out = export(&single.data_dir(), &file);
    assert!(!out.status.success(), "{}", show_out(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ran on the cluster"),
        "{}",
        show_out(&out)
    );

    let mark = ExportMark {
        source: "sha256:another-node".into(),
        started_at_ms: 1,
        done: false,
        discovery_version: 2,
    };
    assert_eq!(
        accounts.begin_export(&mark).await.expect("mark"),
        ExportStart::Fresh
    );

    let err = crate::cluster_nodes::serve_fails(&file, &tls.path().join("data"));
    assert!(err.contains("has not finished"), "{err}");

    let out = export(&single.data_dir(), &file);
    assert!(!out.status.success(), "{}", show_out(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("export of another node"),
        "{}",
        show_out(&out)
    );
}
