//! Switchboard nodes in cluster mode: two node processes over one 3-member NATS
//! JetStream cluster, sharing one certificate, each serving any device. Clients are
//! the CLI as a process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use switchboard::tls::Credentials;

use crate::cluster::NatsCluster;
use crate::support::*;

/// Two nodes in cluster mode on `nats`, serving one certificate (in the returned
/// dir) made for them.
pub(crate) fn two_nodes(nats: &NatsCluster) -> (tempfile::TempDir, ProcessNode, ProcessNode) {
    two_nodes_with(nats, "")
}

/// [`two_nodes`], with `extra` (whole config sections) in their config.
fn two_nodes_with(
    nats: &NatsCluster,
    extra: &str,
) -> (tempfile::TempDir, ProcessNode, ProcessNode) {
    let (tls, config) = cluster_config(nats, extra);
    let one = ProcessNode::start(&config);
    let two = ProcessNode::start(&config);
    assert_eq!(one.fingerprint, two.fingerprint, "one certificate");
    (tls, one, two)
}

/// A cluster node's config on `nats`, with `extra` (whole config sections), and the
/// dir of the certificate it names, made here.
pub(crate) fn cluster_config(nats: &NatsCluster, extra: &str) -> (tempfile::TempDir, String) {
    let tls = tempfile::tempdir().expect("temp dir");
    let (_, pem) = Credentials::generate_node(vec!["localhost".into()]).expect("certificate");
    let (cert, key) = (tls.path().join("cert.pem"), tls.path().join("key.pem"));
    std::fs::write(&cert, pem.cert).expect("cert");
    std::fs::write(&key, pem.key).expect("key");
    let urls: Vec<String> = nats.urls.iter().map(|u| format!("{u:?}")).collect();
    let config = config_text(&format!(
        "[server]\ntls_cert = {cert:?}\ntls_key = {key:?}\n[cluster]\nnats = [{}]\n{extra}",
        urls.join(", ")
    ));
    (tls, config)
}

pub(crate) fn register(home: &Path, number: &str, servers: &str) {
    let args = ["register", number, "--server", servers, "--code", CODE];
    let out = cli(home, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
}

fn send(home: &Path, to: &str, text: &str) -> String {
    let args = ["send", to, text];
    let out = cli(home, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
    stdout(&out).trim().to_string()
}

/// `recv --follow --json` of `home`, its lines (with when each was read) on the
/// channel.
fn follow(home: &Path) -> (std::process::Child, mpsc::Receiver<(Instant, String)>) {
    let mut follower = Command::new(BIN)
        .arg("--home")
        .arg(home)
        .args(["recv", "--follow", "--json"])
        .env_remove("SWITCHBOARD_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn recv --follow");
    let (tx, rx) = mpsc::channel();
    let stdout = follower.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    (follower, rx)
}

/// The next line of `rx` that is a message, as JSON.
fn next_message(rx: &mpsc::Receiver<(Instant, String)>) -> (Instant, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (at, line) = rx
            .recv_timeout(left)
            .expect("the follower printed a message");
        let value: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        if value["text"].is_string() {
            return (at, value);
        }
    }
}

pub(crate) fn texts_of(home: &Path) -> Vec<String> {
    let args = ["recv", "--json"];
    let out = cli(home, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
    stdout(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["text"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_message_sent_through_one_node_is_received_through_another() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (_tls, mut one, two) = two_nodes(&nats);
    let dir = tempfile::tempdir().expect("temp dir");

    let alice: PathBuf = dir.path().join("alice");
    let bob: PathBuf = dir.path().join("bob");
    // Alice knows both nodes, node 1 first; Bob only node 2.
    register(&alice, ALICE, &format!("{},{}", one.addr, two.addr));
    register(&bob, BOB, &two.addr);

    let (mut follower, rx) = follow(&bob);
    // The first message proves the follower subscribed.
    send(&alice, BOB, "warm-up");
    let (_, first) = next_message(&rx);
    assert_eq!(first["text"], "warm-up");

    let sent_at = Instant::now();
    let id = send(&alice, BOB, "through node 1, out of node 2");
    let returned = Instant::now();
    let (printed_at, value) = next_message(&rx);
    assert_eq!(value["id"], id.as_str());
    assert_eq!(value["from"], ALICE);
    assert_eq!(value["text"], "through node 1, out of node 2");
    // Timing is reported, not asserted: these machines are shared and noisy.
    eprintln!(
        "recv --follow on node 2 printed a send through node 1 {:?} after the send \
         started, {:?} after it returned",
        printed_at - sent_at,
        printed_at.saturating_duration_since(returned)
    );

    // Bob answers through node 2; Alice reads it through node 1.
    send(&bob, ALICE, "and back");
    assert_eq!(texts_of(&alice), vec!["and back".to_string()]);

    // Node 1 is killed: Alice's client carries on through node 2, and nothing
    // she was told was sent is lost.
    one.kill9();
    send(&alice, BOB, "node 1 is gone");
    let (_, value) = next_message(&rx);
    assert_eq!(value["text"], "node 1 is gone");
    let _ = follower.kill();
    let _ = follower.wait();
}

/// Runs the CLI of `home` with `args`, which must succeed; its stdout.
pub(crate) fn ok(home: &Path, args: &[&str]) -> String {
    let out = cli(home, args, "");
    assert!(out.status.success(), "{}", show(args, &out));
    stdout(&out)
}

/// A new device joins through node 2 an account whose primary opened the link
/// through node 1 (the link slot is in the cluster); messages then reach both of
/// Alice's devices, whichever node each is on, and unlinking it through node 1 signs
/// it out.
#[test]
fn a_device_links_through_another_node_than_its_primary() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (_tls, one, two) = two_nodes(&nats);
    let dir = tempfile::tempdir().expect("temp dir");
    let (alice, laptop, bob) = (
        dir.path().join("alice"),
        dir.path().join("laptop"),
        dir.path().join("bob"),
    );
    register(&alice, ALICE, &one.addr);
    register(&bob, BOB, &two.addr);
    let (link, code, lines) = start_link(&alice);
    let joined = ok(
        &laptop,
        &[
            "devices", "join", &code, "--server", &two.addr, "--name", "laptop",
        ],
    );
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let linked = link.wait_with_output().expect("devices link");
    assert!(linked.status.success(), "{}", stderr(&linked));
    assert!(
        rest.join("\n").contains("linked \"laptop\" as device 2"),
        "{rest:?} / {joined}"
    );
    let listed = ok(&alice, &["devices", "list"]);
    assert!(listed.contains("laptop"), "{listed}");

    // Bob (node 2) writes to Alice: her phone (node 1) and laptop (node 2) read it.
    ok(&bob, &["send", ALICE, "to both of you"]);
    for device in [&alice, &laptop] {
        let got = ok(device, &["recv"]);
        assert!(got.contains("to both of you"), "{got}");
    }
    // The laptop writes; Bob reads, and the phone has the sent copy.
    ok(&laptop, &["send", BOB, "from the laptop"]);
    assert!(ok(&bob, &["recv"]).contains("from the laptop"));
    assert!(ok(&alice, &["recv"]).contains("from the laptop"));

    // Unlinked through node 1, the laptop is refused by node 2.
    ok(&alice, &["devices", "unlink", "2"]);
    let args = ["recv"];
    let out = cli(&laptop, &args, "");
    assert!(!out.status.success(), "{}", show(&args, &out));
}

/// A 20 MiB file (three segments in the cluster's object store) sent through node
/// 1 is saved whole by its recipient through node 2, and the cluster drops it once
/// every device it was for has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_sent_through_one_node_is_saved_through_another() {
    use sha2::Digest;
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (_tls, one, two) = two_nodes(&nats);
    let dir = tempfile::tempdir().expect("temp dir");
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    register(&alice, ALICE, &one.addr);
    register(&bob, BOB, &two.addr);
    // A session first, so Alice's device knows the upload is for one download.
    send(&alice, BOB, "hello");
    assert_eq!(texts_of(&bob), vec!["hello".to_string()]);
    let plain: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = dir.path().join("holiday.bin");
    std::fs::write(&file, &plain).expect("file");
    let id = ok(
        &alice,
        &["send", BOB, "--file", file.to_str().expect("utf-8 path")],
    );
    assert_eq!(id.trim().len(), 32, "{id}");
    let objects = segment_objects(&nats).await;
    let count = || segments_stored(&objects);
    assert_eq!(count().await, 3, "20 MiB in 8 MiB segments");

    let saves = dir.path().join("bob-saves");
    let args = ["recv", "--save-dir", saves.to_str().expect("utf-8 path")];
    let out = cli(&bob, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
    assert!(
        stderr(&out).contains("saved holiday.bin"),
        "{}",
        show(&args, &out)
    );
    let saved = std::fs::read(saves.join("holiday.bin")).expect("saved");
    assert_eq!(
        sha2::Sha256::digest(&saved),
        sha2::Sha256::digest(&plain),
        "the saved file is the original"
    );
    assert_eq!(count().await, 0, "downloaded by every device: dropped");
}

/// Uploads `plain` sealed with `key` by hand over `client`, one segment's worth and
/// a bit, and stops writing (the caller closes the connection): the upload's id.
async fn break_off_upload(
    client: &switchboard::client::Client,
    plain: &[u8],
    key: &[u8; 32],
) -> [u8; 16] {
    use switchboard::client::attachment::{CHUNK, ciphertext_len, seal_chunk};
    use switchboard::cluster::blobs::SEGMENT;
    let size = ciphertext_len(plain.len() as u64);
    let (mut send, _recv, id, offset) = crate::support::begin_upload(client, size, None).await;
    assert_eq!(offset, 0);
    let mut sent = 0u64;
    for i in 0..plain.len().div_ceil(CHUNK) as u64 {
        let start = i as usize * CHUNK;
        let end = (start + CHUNK).min(plain.len());
        let sealed = seal_chunk(key, i, end == plain.len(), &plain[start..end]);
        send.write_all(&sealed).await.unwrap();
        sent += sealed.len() as u64;
        if sent > SEGMENT + 1000 {
            break;
        }
    }
    id
}

/// An upload broken off through node 1 after one whole segment resumes through
/// node 2 from that segment (what the cluster stored), and reads back whole
/// through either node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_broken_off_through_one_node_resumes_through_another() {
    use sha2::Digest;
    use switchboard::client::Client;
    use switchboard::client::attachment::{self, CHUNK, DownloadState, ciphertext_len};
    use switchboard::cluster::blobs::SEGMENT;
    use switchboard::proto::{Reply, Request, Response, frame};
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (_tls, one, two) = two_nodes(&nats);
    let (dir, home) = registered_home(&one.addr, one.fingerprint, ALICE).await;
    let creds = home.load().expect("Alice's registration").credentials;
    let connect = |node: &ProcessNode| {
        let (addr, fp, creds) = (node.addr.clone(), node.fingerprint, creds.clone());
        async move { Client::connect(&addr, &creds, Some(fp)).await.unwrap() }
    };
    let plain: Vec<u8> = (0..(SEGMENT as usize + 5 * CHUNK + 77) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let path = dir.path().join("r.bin");
    std::fs::write(&path, &plain).unwrap();
    let key = [9u8; 32];
    let total = ciphertext_len(plain.len() as u64);
    assert!(total > SEGMENT, "more than one segment");
    // By hand through node 1: one segment's worth and a bit, then the connection goes.
    let raw = connect(&one).await;
    let id = break_off_upload(&raw, &plain, &key).await;
    // Bounded: the segment is in the cluster within seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    let resumed_at = loop {
        let client = connect(&two).await;
        let (mut s, mut r) = client.connection().open_bi().await.unwrap();
        let again = Request::Upload {
            size: total,
            downloads: 0,
            resume: Some(id),
        };
        frame::write(&mut s, &again).await.unwrap();
        let offset = match frame::read::<Reply, _>(&mut r, 1 << 20).await.unwrap() {
            Some(Reply::Ok(Response::UploadReady { id: same, offset })) => {
                assert_eq!(same, id);
                offset
            }
            // Node 1 still holds it in flight: try again.
            Some(Reply::Err(_)) => 0,
            other => panic!("{other:?}"),
        };
        client.close().await;
        if offset == SEGMENT {
            break offset;
        }
        assert!(Instant::now() < deadline, "no segment stored (at {offset})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(resumed_at, SEGMENT);
    raw.connection().close(0u32.into(), b"gone");
    // The client's own resume through node 2 completes it; it reads back whole
    // through either node.
    let via_two = connect(&two).await;
    let up = via_two
        .upload_file(&path, &key, 0, Some(id), &mut |_, _| {})
        .await
        .unwrap();
    assert_eq!(up.id, id);
    assert_eq!(up.digest, <[u8; 32]>::from(sha2::Sha256::digest(&plain)));
    let att = attachment::Attachment {
        id,
        key,
        size: up.size,
        digest: up.digest,
        name: "r.bin".into(),
        mime: String::new(),
        thumbnail: None,
        caption: String::new(),
    };
    for node in [&one, &two] {
        let client = connect(node).await;
        let out_path = dir.path().join("back.bin");
        let mut out = tokio::fs::File::create(&out_path).await.unwrap();
        let mut state = DownloadState::default();
        client
            .download_into(&att, &mut out, &mut state, &mut |_, _| {})
            .await
            .unwrap();
        drop(out);
        assert_eq!(state.digest(), up.digest);
        assert_eq!(std::fs::read(&out_path).unwrap(), plain);
    }
}

/// The contacts in `home` the last sync found on the node, by number.
pub(crate) fn found_contacts(home: &Path) -> Vec<String> {
    ok(home, &["contacts", "sync"]);
    ok(home, &["contacts", "list", "--json"])
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["registered"] == true)
        .filter_map(|v| v["number"].as_str().map(str::to_string))
        .collect()
}

/// Contact discovery over the cluster: one filter, built once for the cluster and
/// served alike by both nodes; a contact registered through node 2 is found by a
/// sync through node 1 (the delta, before any rebuild), and through node 2 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_registered_through_either_node_are_found_through_both() {
    use switchboard::client::Client;
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    // Rebuilt rarely: what registers after the first build travels in the delta.
    let (_tls, one, two) = two_nodes_with(&nats, "[discovery]\nfilter_refresh_secs = 3600\n");
    let dir = tempfile::tempdir().expect("temp dir");
    let (alice, bob, carol) = (
        dir.path().join("alice"),
        dir.path().join("bob"),
        dir.path().join("carol"),
    );
    register(&alice, ALICE, &format!("{},{}", one.addr, two.addr));
    register(&bob, BOB, &two.addr);
    let card = dir.path().join("contacts.vcf");
    std::fs::write(
        &card,
        format!(
            "BEGIN:VCARD\nVERSION:3.0\nFN:Bob\nTEL:{BOB}\nEND:VCARD\n\
             BEGIN:VCARD\nVERSION:3.0\nFN:Carol\nTEL:{CAROL}\nEND:VCARD\n"
        ),
    )
    .expect("vcard");
    ok(
        &alice,
        &["contacts", "import", card.to_str().expect("utf-8 path")],
    );
    assert_eq!(found_contacts(&alice), vec![BOB.to_string()]);

    // Both nodes serve the one filter the cluster built, once.
    let creds = switchboard::client::Home::new(Some(alice.clone()))
        .and_then(|h| h.load())
        .expect("Alice's home")
        .credentials;
    let fetch = |node: &ProcessNode| {
        let (addr, fp, creds) = (node.addr.clone(), node.fingerprint, creds.clone());
        async move {
            let client = Client::connect(&addr, &creds, Some(fp)).await.unwrap();
            client.fetch_filter(None).await.unwrap().expect("a filter")
        }
    };
    let (from_one, from_two) = (fetch(&one).await, fetch(&two).await);
    assert_eq!(from_one, from_two, "one filter for the cluster");
    let builds = [&one, &two]
        .iter()
        .map(|n| {
            n.log()
                .matches("built the discovery filter for the cluster")
                .count()
        })
        .sum::<usize>();
    assert_eq!(builds, 1, "the filter was built once, by one node");

    // Carol registers through node 2; Alice finds her through node 1 at once.
    register(&carol, CAROL, &two.addr);
    let mut found = found_contacts(&alice);
    found.sort();
    assert_eq!(found, vec![BOB.to_string(), CAROL.to_string()]);
    // And through node 2 (Bob's only node; his own card is found too).
    ok(
        &bob,
        &["contacts", "import", card.to_str().expect("utf-8 path")],
    );
    let mut found = found_contacts(&bob);
    found.sort();
    assert_eq!(found, vec![BOB.to_string(), CAROL.to_string()]);
}

/// A typing notice through node 1 reaches the recipient's app following on node 2
/// (handed over by the cluster, never stored).
#[test]
fn a_typing_notice_reaches_a_device_on_another_node() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (_tls, one, two) = two_nodes(&nats);
    let dir = tempfile::tempdir().expect("temp dir");
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    register(&alice, ALICE, &one.addr);
    register(&bob, BOB, &two.addr);
    let (mut follower, rx) = follow(&bob);
    // The first message proves the follower subscribed.
    send(&alice, BOB, "warm-up");
    assert_eq!(next_message(&rx).1["text"], "warm-up");
    let args = ["typing", BOB];
    let told = cli(&alice, &args, "");
    assert!(told.status.success(), "{}", show(&args, &told));
    assert!(
        stderr(&told).contains("told 1 connected device(s)"),
        "{}",
        show(&args, &told)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let typing = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, line) = rx
            .recv_timeout(left)
            .expect("the follower printed the notice");
        let value: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        if value["typing"].is_object() {
            break value;
        }
    };
    assert_eq!(typing["typing"]["from"], ALICE, "{typing}");
    assert_eq!(typing["typing"]["typing"], true, "{typing}");
    let _ = follower.kill();
    let _ = follower.wait();
}

/// How many discovery filters `nodes` built for the cluster so far.
fn filter_builds(nodes: &[&ProcessNode]) -> usize {
    nodes
        .iter()
        .map(|n| {
            n.log()
                .matches("built the discovery filter for the cluster")
                .count()
        })
        .sum()
}

/// Registrations after a build get the cluster a new filter at the next refresh,
/// built by one node; a number registered again (the same index entry) is rebuilt
/// once, and then the nodes stop building.
#[test]
fn the_cluster_rebuilds_its_filter_after_registrations_and_then_stops() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (_tls, one, two) = two_nodes_with(&nats, "[discovery]\nfilter_refresh_secs = 1\n");
    let dir = tempfile::tempdir().expect("temp dir");
    // Bounded waits: builds come within a few refreshes.
    let settle = |before: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = before;
        loop {
            std::thread::sleep(Duration::from_secs(3));
            let now = filter_builds(&[&one, &two]);
            if now == seen && now > before {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "builds never settled: {before} → {now}"
            );
            seen = now;
        }
    };
    let first = filter_builds(&[&one, &two]);
    register(&dir.path().join("alice"), ALICE, &one.addr);
    register(&dir.path().join("bob"), BOB, &two.addr);
    let after_registrations = settle(first);
    // Alice registers again on a new device: the same index entry, written again.
    register(&dir.path().join("alice-new"), ALICE, &two.addr);
    let after_again = settle(after_registrations);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        filter_builds(&[&one, &two]),
        after_again,
        "the nodes kept building a filter nothing changed"
    );
}

/// A group made through node 1 lives in the cluster: members on either node get
/// each message once, the sender hears how many devices have it, and a member
/// writing through node 2 reaches the others on both.
#[test]
fn a_group_made_through_one_node_is_served_by_both() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (_tls, one, two) = two_nodes(&nats);
    let dir = tempfile::tempdir().expect("temp dir");
    let (alice, bob, carol) = (
        dir.path().join("alice"),
        dir.path().join("bob"),
        dir.path().join("carol"),
    );
    register(&alice, ALICE, &one.addr);
    register(&bob, BOB, &two.addr);
    register(&carol, CAROL, &one.addr);
    ok(&alice, &["group", "create", "Family", BOB, CAROL]);
    // Each learns of the group from its first message.
    ok(&carol, &["recv"]);
    ok(&bob, &["recv"]);
    let info = ok(&bob, &["group", "info", "Family"]);
    assert!(info.contains(ALICE) && info.contains(CAROL), "{info}");

    ok(&alice, &["send", "--group", "Family", "dinner at 8"]);
    for member in [&bob, &carol] {
        let got = ok(member, &["recv"]);
        assert!(
            got.contains(&format!("[Family] {ALICE} dinner at 8")),
            "{got}"
        );
        // Once: read again, nothing new.
        assert!(!ok(member, &["recv"]).contains("dinner at 8"));
    }
    let json = ok(&alice, &["recv", "--json"]);
    assert!(
        json.contains(r#""delivered":2"#) && json.contains(r#""of":2"#),
        "{json}"
    );
    let history = ok(&alice, &["history", "--group", "Family"]);
    assert!(
        history.contains("dinner at 8  (delivered to 2 of 2)"),
        "{history}"
    );

    ok(&bob, &["send", "--group", "Family", "from node 2"]);
    for member in [&alice, &carol] {
        let got = ok(member, &["recv"]);
        assert!(
            got.contains(&format!("[Family] {BOB} from node 2")),
            "{got}"
        );
    }
    // A change through node 1 is the group node 2 serves.
    ok(&alice, &["group", "remove", "Family", CAROL]);
    ok(&bob, &["send", "--group", "Family", "not for carol"]);
    assert!(ok(&alice, &["recv"]).contains("not for carol"));
    let got = ok(&carol, &["recv"]);
    assert!(got.contains("removed you from Family"), "{got}");
    assert!(!got.contains("not for carol"), "{got}");
}

#[test]
fn cluster_mode_needs_the_shared_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("node.toml");
    std::fs::write(&file, "[cluster]\nnats = [\"nats://127.0.0.1:4222\"]\n").expect("write");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&file)
        .output()
        .expect("check-config");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cluster.nats") && err.contains("server.tls_cert"),
        "{err}"
    );
    std::fs::write(&file, "[cluster]\nnats = [\"localhost:4222\"]\n").expect("write");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&file)
        .output()
        .expect("check-config");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is not a NATS address"),
        "{err}"
    );
}

/// Each node caches who is registered, and hears through a watch on the cluster of
/// every change made through another: a device signed out (its number registered
/// again) through node 1 is refused by node 2 on the connection it already had,
/// and the new device is served there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_signed_out_through_one_node_is_refused_by_another() {
    use switchboard::client::{Client, ClientError};
    use switchboard::phone::Number;
    use switchboard::proto::{Channel, ErrorKind};
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (_tls, one, two) = two_nodes(&nats);
    let alice = Number::parse(ALICE, None).unwrap();
    let register = |creds: Credentials| {
        let (addr, fp, alice) = (one.addr.clone(), one.fingerprint, alice.clone());
        async move {
            let client = Client::connect(&addr, &creds, Some(fp)).await.unwrap();
            client
                .request_code(&alice, Channel::Sms, "en")
                .await
                .unwrap();
            client.verify_code(&alice, CODE).await.unwrap()
        }
    };
    let (old, _) = Credentials::generate_device().unwrap();
    let first = register(old.clone()).await;
    let on_two = Client::connect(&two.addr, &old, Some(two.fingerprint))
        .await
        .unwrap();
    // Served (and cached) by node 2.
    for _ in 0..3 {
        let me = on_two.whoami().await.unwrap();
        assert_eq!(me.device_id, first.device_id);
    }
    let (new, _) = Credentials::generate_device().unwrap();
    let second = register(new.clone()).await;
    assert_ne!(second.device_id, first.device_id);
    // Node 2 hears of it (bounded: the watch delivers in milliseconds).
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match on_two.whoami().await {
            Err(ClientError::Node(e)) => break e,
            Err(e) => panic!("node 2 failed otherwise: {e}"),
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "node 2 still serves the signed-out device\n{}",
                    two.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(
        matches!(refused.kind, ErrorKind::DeviceRemoved { .. }),
        "{refused:?}"
    );
    let fresh = Client::connect(&two.addr, &new, Some(two.fingerprint))
        .await
        .unwrap();
    assert_eq!(fresh.whoami().await.unwrap().device_id, second.device_id);
}

/// The NATS member config that README.md and the systemd unit point to is one
/// nats-server accepts.
#[test]
fn the_example_nats_config_is_valid() {
    let Some(server) = crate::cluster::nats_server() else {
        println!("skipped: no nats-server");
        return;
    };
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/nats-server.conf");
    let out = Command::new(server)
        .arg("-c")
        .arg(&conf)
        .arg("-t")
        .output()
        .expect("nats-server -t");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let unit = std::fs::read_to_string(conf.with_file_name("nats-server.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/nats-server -c /etc/nats/nats-server.conf\n"));
}

/// Two devices verify the same number with the same code at once, one through each
/// node: the code is consumed once, in the cluster, so exactly one registers, and
/// both nodes agree on which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_code_verified_through_two_nodes_at_once_registers_one_device() {
    use switchboard::client::Client;
    use switchboard::phone::Number;
    use switchboard::proto::Channel;
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (_tls, one, two) = two_nodes(&nats);
    let nodes = [one, two];
    let alice = Number::parse(ALICE, None).unwrap();
    // Several rounds, each a fresh code for the number and two racing devices.
    for round in 0..5 {
        let mut clients = Vec::new();
        for node in &nodes {
            let (creds, _) = Credentials::generate_device().unwrap();
            let client = Client::connect(&node.addr, &creds, Some(node.fingerprint))
                .await
                .unwrap();
            clients.push((client, creds));
        }
        clients[round % 2]
            .0
            .request_code(&alice, Channel::Sms, "en")
            .await
            .unwrap();
        let (a, b) = tokio::join!(
            clients[0].0.verify_code(&alice, CODE),
            clients[1].0.verify_code(&alice, CODE)
        );
        let winners: Vec<usize> = [a.is_ok(), b.is_ok()]
            .iter()
            .enumerate()
            .filter(|(_, ok)| **ok)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {a:?} / {b:?}");
        let (winner, loser) = (winners[0], 1 - winners[0]);
        // Each device asks through the other node too: the winner is Alice there,
        // the loser is nobody.
        for node in &nodes {
            let won = Client::connect(&node.addr, &clients[winner].1, Some(node.fingerprint))
                .await
                .unwrap();
            assert_eq!(won.whoami().await.unwrap().number, ALICE);
            let lost = Client::connect(&node.addr, &clients[loser].1, Some(node.fingerprint))
                .await
                .unwrap();
            assert!(lost.whoami().await.is_err(), "round {round}");
        }
    }
}

/// Two devices claim one-time keys of Bob's device at once, one through each node,
/// until none is left: no key is handed out twice, and every key Bob published is
/// handed out once (the claims are compare-and-set in the cluster's key bucket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_keys_claimed_through_two_nodes_are_never_handed_out_twice() {
    use switchboard::client::e2e::ONE_TIME_KEY_TARGET;
    use switchboard::phone::Number;
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (_tls, one, two) = two_nodes_with(
        &nats,
        "[messages]\nkey_claims_per_pair_per_hour = 1000\nkey_claims_per_account_per_hour = 1000\n",
    );
    let (_bob_dir, _bob_home) = registered_home(&one.addr, one.fingerprint, BOB).await;
    let (carol, alice) = (one.registered(CAROL).await, two.registered(ALICE).await);
    let bob = Number::parse(BOB, None).unwrap();
    let claim_all = |client: switchboard::client::Client| {
        let bob = bob.clone();
        async move {
            let mut keys = Vec::new();
            // Bounded: there are ONE_TIME_KEY_TARGET keys in all.
            for _ in 0..=ONE_TIME_KEY_TARGET {
                let bundles = client.fetch_bundles(&bob, true).await.unwrap();
                let bundle = &bundles.devices[0];
                assert!(bundle.fallback.is_some(), "sessions can always start");
                match &bundle.one_time_key {
                    Some(key) => keys.push(key.key),
                    None => break,
                }
            }
            keys
        }
    };
    let (through_one, through_two) = tokio::join!(claim_all(carol), claim_all(alice));
    assert!(
        !through_one.is_empty() && !through_two.is_empty(),
        "both nodes handed out keys: {} and {}",
        through_one.len(),
        through_two.len()
    );
    let mut all = std::collections::HashSet::new();
    for key in through_one.iter().chain(&through_two) {
        assert!(all.insert(*key), "a one-time key was handed out twice");
    }
    assert_eq!(
        all.len(),
        ONE_TIME_KEY_TARGET as usize,
        "every key handed out once"
    );
}

/// Quotas hold for the cluster, not per node: Alice's one device, connected through
/// both nodes, gets through the two of them no more lookups by number, discovery
/// evaluations, group changes or one-time-key claims than one node allows, and a
/// new device no more link joins from its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_are_counted_for_the_whole_cluster() {
    use switchboard::proto::ErrorKind;
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (_tls, config) = cluster_config(
        &nats,
        "[discovery]\ndaily_budget = 3\n[groups]\nchanges_per_account_hour = 2\n\
         [messages]\nkey_claims_per_pair_per_hour = 2\n\
         [accounts]\nlink_joins_per_address_hour = 2\n",
    );
    let one = InProcessNode::start(&config).await;
    let two = InProcessNode::start(&config).await;
    let (creds, _) = Credentials::generate_device().expect("device key");
    let alice_one = one.connect_as(&creds).await;
    crate::support::register(&alice_one, ALICE).await;
    let alice_two = two.connect_as(&creds).await;
    // A real client's home: it publishes one-time keys.
    let (_bob_dir, _bob_home) = registered_home(&two.addr, two.fingerprint, BOB).await;
    let limited = |what: &str, r: Result<(), ErrorKind>| match r {
        Err(ErrorKind::RateLimited { .. }) => {}
        other => panic!("{what}: {other:?}, not refused"),
    };
    fn unit<T: std::fmt::Debug>(
        r: Result<T, switchboard::client::ClientError>,
    ) -> Result<(), ErrorKind> {
        r.map(drop).map_err(|e| kind::<()>(Err(e)))
    }

    // Group changes: one through each node, then neither takes a third.
    unit(alice_one.create_group(&[number(BOB)], vec![]).await).expect("first group");
    unit(alice_two.create_group(&[number(BOB)], vec![]).await).expect("second group");
    limited(
        "a third group through node 1",
        unit(alice_one.create_group(&[number(BOB)], vec![]).await),
    );
    limited(
        "a third group through node 2",
        unit(alice_two.create_group(&[number(BOB)], vec![]).await),
    );

    // One-time keys of Bob: two claims by Alice, whichever node; the third bundle
    // comes with the fallback key alone.
    let claimed = |bundles: switchboard::proto::Bundles| {
        bundles
            .devices
            .iter()
            .filter(|b| b.one_time_key.is_some())
            .count()
    };
    let b1 = alice_one
        .fetch_bundles(&number(BOB), true)
        .await
        .expect("claim 1");
    let b2 = alice_two
        .fetch_bundles(&number(BOB), true)
        .await
        .expect("claim 2");
    let b3 = alice_one
        .fetch_bundles(&number(BOB), true)
        .await
        .expect("claim 3");
    assert_eq!((claimed(b1), claimed(b2), claimed(b3)), (1, 1, 0));

    // Lookups by number (Bob's, counted once a day) and evaluations share the
    // budget of 3: Bob, then Carol (unknown) through node 2, then one evaluation
    // through node 1 spends it, and either node refuses what comes next.
    assert_eq!(
        kind(alice_two.fetch_bundles(&number(CAROL), false).await),
        ErrorKind::UnknownRecipient
    );
    alice_one.evaluate(vec![[0; 32]]).await.map(drop).ok();
    limited(
        "a fourth number through node 2",
        unit(
            alice_two
                .fetch_bundles(&number("+14155550177"), false)
                .await,
        ),
    );
    limited(
        "an evaluation through node 1",
        unit(alice_one.evaluate(vec![[0; 32]]).await),
    );

    // Link joins from one address (a new device guessing at codes): one through
    // each node is judged (no such code), then neither takes a third.
    let (new_device, _) = Credentials::generate_device().expect("device key");
    let new_one = one.connect_as(&new_device).await;
    let new_two = two.connect_as(&new_device).await;
    for (what, via) in [("through node 1", &new_one), ("through node 2", &new_two)] {
        let judged = unit(via.link_join(4711, vec![0; 33]).await);
        assert!(
            !matches!(judged, Err(ErrorKind::RateLimited { .. })),
            "a first join {what}: {judged:?}"
        );
    }
    limited(
        "a third join through node 1",
        unit(new_one.link_join(4711, vec![0; 33]).await),
    );
    limited(
        "a third join through node 2",
        unit(new_two.link_join(4711, vec![0; 33]).await),
    );
    one.shutdown().await;
    two.shutdown().await;
}

/// An upload abandoned part-way (one segment stored in the cluster) is dropped
/// with its segment once `attachments.incomplete_ttl` passed, by one node's sweep,
/// not at the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_upload_leaves_the_cluster_after_the_incomplete_ttl() {
    use switchboard::client::attachment::CHUNK;
    use switchboard::cluster::blobs::SEGMENT;
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (_tls, config) = cluster_config(&nats, "");
    let soon = |c: &mut switchboard::config::Config| {
        c.attachments.incomplete_ttl = Duration::from_secs(6);
        c.messages.sweep_interval = Duration::from_millis(200);
    };
    let one = InProcessNode::start_with(&config, soon).await;
    let two = InProcessNode::start_with(&config, soon).await;
    let alice = one.registered(ALICE).await;
    let plain = vec![7u8; SEGMENT as usize + 3 * CHUNK];
    let id = break_off_upload(&alice, &plain, &[3; 32]).await;
    let objects = segment_objects(&nats).await;
    let records = nats
        .connect(0)
        .await
        .jetstream
        .get_key_value(switchboard::cluster::blobs::BUCKET)
        .await
        .expect("the attachment records");
    let record = format!("b.{}", hex::encode(id));
    let count = || segments_stored(&objects);
    // The segment lands (or, on a slow machine, the sweep was first: then the
    // rest of the upload is refused and nothing lands).
    let deadline = Instant::now() + Duration::from_secs(60);
    while count().await == 0 && records.get(&record).await.expect("read").is_some() {
        assert!(Instant::now() < deadline, "no segment stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    alice.close().await;
    while count().await > 0 || records.get(&record).await.expect("read").is_some() {
        assert!(Instant::now() < deadline, "the abandoned upload stayed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    one.shutdown().await;
    two.shutdown().await;
}

/// The object store of attachment segments on `nats`.
async fn segment_objects(nats: &NatsCluster) -> async_nats::jetstream::object_store::ObjectStore {
    nats.connect(0)
        .await
        .jetstream
        .get_object_store(switchboard::cluster::blobs::OBJECTS)
        .await
        .expect("the attachments' object store")
}

/// How many segments `objects` holds.
async fn segments_stored(objects: &async_nats::jetstream::object_store::ObjectStore) -> usize {
    use futures_util::StreamExt;
    objects.list().await.expect("list").count().await
}

/// A NATS cluster that wants a user and password and speaks TLS only (its
/// certificate from an authority of the test's): the nodes log in with
/// `cluster.user`/`password_file` and check the servers against `cluster.tls_ca`;
/// a message goes through one node to a device on the other. A node with a wrong
/// password is refused at once, saying what to check.
#[test]
fn nodes_log_in_to_a_nats_cluster_over_tls() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("authority");
    let server_key = KeyPair::generate().expect("key");
    let server = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&server_key, &ca, &ca_key)
        .expect("server certificate");
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("ca.pem"), ca.pem()).expect("write");
    std::fs::write(path("nats.pem"), server.pem()).expect("write");
    std::fs::write(path("nats.key"), server_key.serialize_pem()).expect("write");
    std::fs::write(path("password"), "s3cret-for-nats\n").expect("write");
    std::fs::write(path("wrong"), "not-it\n").expect("write");
    let (cert, key) = (path("nats.pem"), path("nats.key"));
    let args = [
        "--user",
        "switchboard",
        "--pass",
        "s3cret-for-nats",
        "--tls",
        "--tlscert",
        cert.to_str().expect("utf-8 path"),
        "--tlskey",
        key.to_str().expect("utf-8 path"),
    ];
    let Some(nats) = NatsCluster::start_with(3, &args) else {
        return;
    };
    let login = |password: &Path| {
        format!(
            "user = \"switchboard\"\npassword_file = {password:?}\ntls_ca = {:?}\n",
            path("ca.pem")
        )
    };
    let (_tls, config) = cluster_config(&nats, &login(&path("password")));
    let one = ProcessNode::start(&config);
    let two = ProcessNode::start(&config);
    let (alice, bob) = (path("alice"), path("bob"));
    register(&alice, ALICE, &one.addr);
    register(&bob, BOB, &two.addr);
    send(&alice, BOB, "over TLS, logged in");
    assert_eq!(texts_of(&bob), vec!["over TLS, logged in".to_string()]);

    let (_tls2, wrong) = cluster_config(&nats, &login(&path("wrong")));
    std::fs::write(path("wrong.toml"), wrong).expect("write");
    let err = serve_fails(&path("wrong.toml"), &path("wrong-data"));
    assert!(err.contains("refused the node"), "{err}");
    assert!(!err.contains("trying again"), "refused at once: {err}");
}

/// Starts `switchboard serve` with `config` and data in `data`, which must fail (a
/// node that serves is killed after a minute and the test fails): its stderr.
pub(crate) fn serve_fails(config: &Path, data: &Path) -> String {
    let mut node = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .arg("--data")
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let deadline = Instant::now() + Duration::from_secs(90);
    while node.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = node.kill();
            panic!("the node served with {}", config.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = node.wait_with_output().expect("output");
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Metrics in cluster mode: each node counts the deliveries acknowledged through
/// it, and its queue gauges show the cluster's queue stream, whichever node queued
/// what is in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_clusters_queues_and_each_nodes_deliveries() {
    use crate::support::{http_get, outgoing, parse_openmetrics, sample};
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (_tls, config) = cluster_config(
        &nats,
        "[metrics]\nenabled = true\nlisten = \"127.0.0.1:0\"\n",
    );
    let one = InProcessNode::start(&config).await;
    let two = InProcessNode::start(&config).await;
    let scrape = |node: &InProcessNode| {
        let url = node.metrics.clone().expect("metrics url");
        async move {
            tokio::task::spawn_blocking(move || parse_openmetrics(&http_get(&url).2))
                .await
                .expect("scrape")
        }
    };
    let alice = one.registered(ALICE).await;
    let bob = two.registered(BOB).await;
    const SENDS: usize = 3;
    for i in 0..SENDS {
        let id = switchboard::client::e2e::new_message_id();
        alice
            .send(outgoing(BOB, id, vec![i as u8; 8]))
            .await
            .expect("send");
    }
    let queued = sample(&scrape(&two).await, "switchboard_queue_items");
    assert_eq!(
        queued, SENDS as f64,
        "queued through node 1, seen by node 2"
    );

    let mut sub = bob.subscribe().await.expect("subscribe");
    let mut got = 0;
    while got < SENDS {
        let push = next_push(&mut sub).await;
        let seqs: Vec<u64> = push
            .items
            .iter()
            .filter(|d| matches!(d.item, switchboard::proto::Item::Message(_)))
            .map(|d| d.seq)
            .collect();
        got += seqs.len();
        if !seqs.is_empty() {
            // Each seq named twice, then once more in an ack of its own (before the
            // items are removed): still one delivery each.
            let twice: Vec<u64> = seqs.iter().chain(&seqs).copied().collect();
            sub.ack(twice).await.expect("ack");
            sub.ack(seqs.clone()).await.expect("ack again");
        }
    }
    // The acks are applied a moment after they are sent: looked at for a while.
    let mut delivered = 0.0;
    for _ in 0..100 {
        delivered = sample(&scrape(&two).await, "switchboard_messages_delivered_total");
        if delivered >= SENDS as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        delivered, SENDS as f64,
        "counted by the node Bob acked through"
    );
    let on_one = scrape(&one).await;
    assert_eq!(
        sample(&on_one, "switchboard_messages_delivered_total"),
        0.0,
        "not by the other"
    );
    // Acknowledged items are removed a moment after (`cluster.removal_delay_ms`).
    let mut left = f64::NAN;
    for _ in 0..100 {
        left = sample(&scrape(&one).await, "switchboard_queue_items");
        if left == SENDS as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, SENDS as f64, "what is left: Alice's receipts");
    one.shutdown().await;
    two.shutdown().await;
}

/// The messages of `sub`'s pushes until `n` arrived: (seq, its number, as
/// [`send_numbered`] sent it).
async fn messages_pushed(sub: &mut switchboard::client::Subscription, n: usize) -> Vec<(u64, u32)> {
    let mut got = Vec::new();
    while got.len() < n {
        for d in next_push(sub).await.items {
            if let switchboard::proto::Item::Message(m) = d.item {
                got.push((d.seq, numbered(&m.body)));
            }
        }
    }
    got
}

/// Acknowledged items are removed together a moment after their acks (one purge of
/// the device's queue below the lowest item it has not acknowledged): an item pushed
/// and not acknowledged stays however many after it are, and is pushed again; the
/// other devices' queues are untouched; a stream that finishes has removed all it
/// was told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_items_leave_together_and_an_unacknowledged_one_stays() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (_tls, config) = cluster_config(&nats, "");
    let one = InProcessNode::start(&config).await;
    let two = InProcessNode::start(&config).await;
    let alice = one.registered(ALICE).await;
    let bob = two.registered(BOB).await;
    let alice = &alice;
    let send = |i| async move { send_numbered(alice, BOB, i).await.expect("send") };
    for i in 0..4 {
        send(i).await;
    }
    let mut sub = bob.subscribe().await.expect("subscribe");
    assert_eq!(sub.queued, 4);
    let got = messages_pushed(&mut sub, 4).await;
    assert_eq!(
        got.iter().map(|m| m.1).collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "in the order sent"
    );
    // All but the first acknowledged, in two acks.
    sub.ack(vec![got[1].0]).await.expect("ack");
    sub.ack(vec![got[2].0, got[3].0]).await.expect("ack");
    // Two more, while the stream lives: acknowledged in one ack.
    send(4).await;
    send(5).await;
    let more = messages_pushed(&mut sub, 2).await;
    sub.ack(more.iter().map(|m| m.0).collect())
        .await
        .expect("ack");
    sub.finish().await.expect("finish");

    let mut sub = bob.subscribe().await.expect("subscribe again");
    assert_eq!(sub.queued, 1, "only the unacknowledged one is left");
    let again = messages_pushed(&mut sub, 1).await;
    assert_eq!(again, vec![got[0]], "the first, pushed again");
    // Now below everything the stream pushed: with the rest, in one purge.
    send(6).await;
    let last = messages_pushed(&mut sub, 1).await;
    assert_eq!(last.iter().map(|m| m.1).collect::<Vec<_>>(), [6]);
    sub.ack(vec![again[0].0, last[0].0]).await.expect("ack");
    sub.finish().await.expect("finish");
    let sub = bob.subscribe().await.expect("subscribe once more");
    assert_eq!(sub.queued, 0, "every acknowledged item is gone");
    sub.finish().await.expect("finish");

    // Alice's queue is her own: a receipt for each of the seven, none purged with
    // Bob's.
    let mut sub = alice.subscribe().await.expect("alice subscribes");
    assert_eq!(sub.queued, 7, "Alice's receipts");
    let mut receipts = 0;
    while receipts < 7 {
        let push = next_push(&mut sub).await;
        receipts += push
            .items
            .iter()
            .filter(|d| matches!(d.item, switchboard::proto::Item::Delivered(_)))
            .count();
    }
    assert_eq!(receipts, 7);
    sub.finish().await.expect("finish");
    one.shutdown().await;
    two.shutdown().await;
}

/// The admin commands of a cluster node see and change the whole cluster: counts,
/// accounts and queues made through the other node; deleting an account through
/// one node closes its device's connection on the other, and the number can
/// register again. What a node cannot do on a cluster is refused, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_of_a_cluster_node_see_and_change_the_whole_cluster() {
    use crate::admin::{admin, admin_ok, json};
    use switchboard::client::ClientError;
    use switchboard::proto::ErrorKind;
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (_tls, mut one, two) = two_nodes(&nats);
    let alice = one.registered(ALICE).await;
    let (bob_creds, _) = Credentials::generate_device().expect("key");
    let bob = two.registered_as(&bob_creds, BOB).await;
    for i in 0..3 {
        send_numbered(&alice, BOB, i).await.expect("send");
    }

    for (node, online) in [(&one, 1), (&two, 1)] {
        let stats = json(&admin_ok(&node.data_dir(), &["stats", "--json"]));
        assert_eq!(stats["accounts"], 2, "{stats}");
        assert_eq!(stats["devices"], 2, "{stats}");
        assert_eq!(stats["queued_messages"], 3, "{stats}");
        assert_eq!(stats["queued_receipts"], 0, "{stats}");
        assert_eq!(stats["online_devices"], online, "this node's own: {stats}");
        assert!(stats["queued_bytes"].as_u64().expect("bytes") > 3 * 32 * 1024);
        assert!(stats["oldest_queued_ms"].as_u64().is_some(), "{stats}");
    }
    let accounts = json(&admin_ok(&one.data_dir(), &["accounts", "--json"]));
    let numbers: Vec<&str> = accounts
        .as_array()
        .expect("list")
        .iter()
        .map(|a| a["number"].as_str().expect("number"))
        .collect();
    assert_eq!(numbers, [ALICE, BOB], "in number order");
    let account = json(&admin_ok(&one.data_dir(), &["account", BOB, "--json"]));
    let device = &account["devices"][0];
    assert_eq!(account["devices"].as_array().expect("devices").len(), 1);
    assert_eq!(
        (&device["primary"], &device["queued"]),
        (&serde_json::json!(true), &serde_json::json!(3)),
        "{account}"
    );
    assert!(device["queued_bytes"].as_u64().expect("bytes") > 3 * 32 * 1024);
    let out = admin(&one.data_dir(), &["account", CAROL], "");
    assert!(
        stderr(&out).contains("has no account on this cluster"),
        "{}",
        show(&["account", CAROL], &out)
    );
    let backup = one.dir.path().join("node.backup");
    let out = admin(
        &one.data_dir(),
        &["backup", backup.to_str().expect("path")],
        "",
    );
    assert!(
        !out.status.success() && stderr(&out).contains("nats stream backup"),
        "{}",
        show(&["backup"], &out)
    );
    assert!(!backup.exists(), "no backup file is left");

    // Bob's number as the cluster's discovery index knows it.
    let blinded = switchboard::discovery::blind(BOB).expect("blind");
    let (_, evaluated, _) = alice
        .evaluate(vec![blinded.element])
        .await
        .expect("evaluate");
    let bob_prf = blinded.finalize(BOB, &evaluated[0]).expect("finalize");
    assert_eq!(alice.resolve(vec![bob_prf]).await.expect("resolve"), [true]);

    // Deleted through node one; Bob is connected to node two.
    let deleted = admin_ok(&one.data_dir(), &["delete", BOB, "--yes"]);
    assert!(
        deleted.contains("deleted +14155550101: 1 device(s), 3 queued item(s)"),
        "{deleted}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while bob.is_alive() {
        assert!(
            Instant::now() < deadline,
            "node two never closed Bob's connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match bob.whoami().await {
        Err(ClientError::Removed(why)) => assert!(why.contains("deleted"), "{why}"),
        other => panic!("not told the account is gone: {other:?}"),
    }
    let stats = json(&admin_ok(&two.data_dir(), &["stats", "--json"]));
    assert_eq!(
        (&stats["accounts"], &stats["queued_messages"]),
        (&serde_json::json!(1), &serde_json::json!(0)),
        "{stats}"
    );
    let id = switchboard::client::e2e::new_message_id();
    assert_eq!(
        kind(alice.send(outgoing(BOB, id, vec![1; 10])).await),
        ErrorKind::UnknownRecipient
    );
    assert_eq!(
        alice.resolve(vec![bob_prf]).await.expect("resolve"),
        [false],
        "out of the discovery index"
    );
    // The number registers again, as a new account.
    let bob = two.registered(BOB).await;
    let row = json(&admin_ok(&one.data_dir(), &["account", BOB, "--json"]));
    assert_ne!(row["account_id"], account["account_id"], "{row}");
    bob.whoami().await.expect("the new Bob");

    // With no node running, a cluster node's data dir or config is refused, not
    // its own database read.
    one.stop();
    let config = one.dir.path().join("node.toml");
    let by_config = ["stats", "--config", config.to_str().expect("path")];
    for args in [&by_config[..], &["accounts"], &["delete", ALICE, "--yes"]] {
        let out = admin(&one.data_dir(), args, "");
        assert!(
            !out.status.success() && stderr(&out).contains("runs on a NATS cluster"),
            "{}",
            show(args, &out)
        );
    }
}
