//! Private contact discovery: the CLI against a node process, and the budget through
//! the library.

use std::path::Path;

use switchboard::proto::ErrorKind;

use crate::support::*;

const VCARD: &str = "BEGIN:VCARD\r\nVERSION:3.0\r\nFN:Bob Builder\r\nTEL;TYPE=CELL:(415) 555-0101\r\n\
END:VCARD\r\nBEGIN:VCARD\r\nVERSION:3.0\r\nFN:Carol Singer\r\nitem1.TEL:+1 415 555 0102\r\n\
END:VCARD\r\nBEGIN:VCARD\r\nVERSION:2.1\r\nFN:Dave Stranger\r\nTEL;HOME:415-555-0177\r\n\
TEL;WORK:+44 20 7946 0958\r\nEND:VCARD\r\n";

/// The unregistered numbers of [`VCARD`], in every form they could be stored in.
const STRANGERS: [&str; 6] = [
    "4155550177",
    "+14155550177",
    "415-555-0177",
    "442079460958",
    "+442079460958",
    "2079460958",
];

fn run_ok(node: &ProcessNode, home: &Path, args: &[&str]) -> String {
    let out = node.cli(home, args, "");
    assert!(out.status.success(), "{}", show(args, &out));
    stdout(&out)
}

/// Every file under `dir`, as bytes.
fn all_bytes(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all_bytes(&path, out);
        } else {
            out.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
}

#[test]
fn sync_finds_exactly_the_registered_contacts_and_the_node_never_sees_the_others() {
    // The filter is rebuilt on a timer, not per request (an hour here): what registered
    // since its last build reaches clients as its delta.
    let mut node = ProcessNode::start(&config_text("[discovery]\nfilter_refresh_secs = 3600\n"));
    let root = node.dir.path().to_path_buf();
    for (who, number) in [("alice", ALICE), ("bob", BOB), ("carol", CAROL)] {
        node.register_cli(&root.join(who), &[], number);
    }
    let alice = root.join("alice");
    let card = root.join("contacts.vcf");
    std::fs::write(&card, VCARD).unwrap();
    let out = run_ok(
        &node,
        &alice,
        &["contacts", "import", card.to_str().unwrap()],
    );
    assert!(out.contains("read 4 numbers"), "{out}");
    assert!(out.contains("4 added"), "{out}");

    let out = run_ok(&node, &alice, &["contacts", "sync"]);
    assert!(out.contains("2 of 4 contacts are on the node"), "{out}");
    assert!(out.contains("4 numbers checked with the node"), "{out}");
    let listed = run_ok(&node, &alice, &["contacts", "list", "--json"]);
    let rows: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let on_node: Vec<(&str, &str)> = rows
        .iter()
        .filter(|r| r["registered"] == true)
        .map(|r| (r["name"].as_str().unwrap(), r["number"].as_str().unwrap()))
        .collect();
    assert_eq!(
        on_node,
        [("Bob Builder", BOB), ("Carol Singer", CAROL)],
        "{listed}"
    );
    assert_eq!(rows.len(), 4, "{listed}");
    let human = run_ok(&node, &alice, &["contacts", "list"]);
    assert!(
        human.contains("Bob Builder") && human.contains("on the node"),
        "{human}"
    );

    // A second sync evaluates nothing new and downloads no filter.
    let out = run_ok(&node, &alice, &["contacts", "sync"]);
    assert!(
        out.contains("0 numbers checked") && out.contains("filter unchanged"),
        "{out}"
    );

    // A contact's name works wherever a number does.
    run_ok(&node, &alice, &["send", "bob builder", "found you"]);
    let got = run_ok(&node, &root.join("bob"), &["recv"]);
    assert!(got.contains("found you"), "{got}");

    // The strangers' numbers appear nowhere on the node's side.
    assert!(node.stop());
    let mut files = Vec::new();
    all_bytes(&node.data_dir(), &mut files);
    files.push(("node.log".into(), node.log().into_bytes()));
    for (path, bytes) in &files {
        for stranger in STRANGERS {
            assert!(
                !bytes
                    .windows(stranger.len())
                    .any(|w| w == stranger.as_bytes()),
                "{stranger} is in {path}"
            );
        }
    }
    // (The registered numbers are, of course: the node stores its accounts.)
    assert!(
        files
            .iter()
            .any(|(_, b)| b.windows(12).any(|w| w == BOB.as_bytes()))
    );

    // A rotated key: the client notices and evaluates everything again.
    let out = node.cli(
        &alice,
        &[
            "admin",
            "rotate-discovery-key",
            "--data",
            node.data_dir().to_str().unwrap(),
        ],
        "",
    );
    assert!(out.status.success(), "{}", show(&["admin"], &out));
    assert!(stdout(&out).contains("version 2"), "{}", stdout(&out));
    node.spawn();
    let out = run_ok(&node, &alice, &["contacts", "sync"]);
    assert!(out.contains("2 of 4 contacts are on the node"), "{out}");
    assert!(out.contains("4 numbers checked with the node"), "{out}");
}

/// Three people register and one syncs at once: the two others are found, though
/// the filter was built before they registered (and the first sync's answer is not
/// kept past the next).
#[test]
fn contacts_who_registered_a_moment_ago_are_found_at_once() {
    let node = ProcessNode::start(&config_text("[discovery]\nfilter_refresh_secs = 3600\n"));
    let root = node.dir.path().to_path_buf();
    let alice = root.join("alice");
    node.register_cli(&alice, &[], ALICE);
    let card = root.join("contacts.vcf");
    std::fs::write(&card, VCARD).unwrap();
    run_ok(
        &node,
        &alice,
        &["contacts", "import", card.to_str().unwrap()],
    );
    let out = run_ok(&node, &alice, &["contacts", "sync"]);
    assert!(out.contains("0 of 4 contacts are on the node"), "{out}");
    node.register_cli(&root.join("bob"), &[], BOB);
    node.register_cli(&root.join("carol"), &[], CAROL);
    let out = run_ok(&node, &alice, &["contacts", "sync"]);
    assert!(out.contains("2 of 4 contacts are on the node"), "{out}");
    assert!(out.contains("filter unchanged"), "{out}");
}

#[test]
fn past_the_budget_the_node_says_when_to_retry() {
    let node = ProcessNode::start(&config_text("[discovery]\ndaily_budget = 3\n"));
    let alice = node.dir.path().join("alice");
    node.register_cli(&alice, &[], ALICE);
    let card = node.dir.path().join("contacts.vcf");
    std::fs::write(&card, VCARD).unwrap();
    run_ok(
        &node,
        &alice,
        &["contacts", "import", card.to_str().unwrap()],
    );
    let out = node.cli(&alice, &["contacts", "sync"], "");
    assert!(
        !out.status.success(),
        "{}",
        show(&["contacts", "sync"], &out)
    );
    let err = stderr(&out);
    assert!(
        err.contains("daily contact-discovery budget of 3 lookups is used up")
            && err.contains("refills at midnight UTC, in"),
        "{err}"
    );
}

#[tokio::test]
async fn sends_and_key_fetches_by_number_count_against_the_same_budget() {
    let node = InProcessNode::start(&config_text("[discovery]\ndaily_budget = 2\n")).await;
    let alice = node.registered(ALICE).await;
    let _bob = node.registered(BOB).await;
    // Two different numbers: the budget.
    alice
        .send(outgoing(BOB, [1; 16], b"1".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        kind(alice.fetch_bundles(&number(CAROL), false).await),
        ErrorKind::UnknownRecipient
    );
    // The same number again is free.
    alice
        .send(outgoing(BOB, [2; 16], b"2".to_vec()))
        .await
        .unwrap();
    // A third is refused, with when to retry.
    match kind(alice.fetch_bundles(&number("+14155550177"), false).await) {
        ErrorKind::RateLimited { retry_after_secs } => assert!(retry_after_secs <= 86_400),
        other => panic!("a third lookup got {other:?}"),
    }
    assert!(matches!(
        kind(alice.evaluate(vec![[0; 32]]).await),
        ErrorKind::RateLimited { .. }
    ));
    node.shutdown().await;
}

#[tokio::test]
async fn bad_discovery_requests_get_errors() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = node.registered(ALICE).await;
    let stranger = node.connect().await;
    assert_eq!(
        kind(stranger.fetch_filter(None).await),
        ErrorKind::Unauthenticated
    );
    assert_eq!(
        kind(alice.evaluate(vec![[0xff; 32]]).await),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind(alice.evaluate(vec![[1; 32]; 1025]).await),
        ErrorKind::Malformed
    );
    assert_eq!(
        kind(alice.resolve(vec![[1; 32]; 1025]).await),
        ErrorKind::Malformed
    );
    // A PRF value nobody could compute without the key resolves to nothing.
    assert_eq!(alice.resolve(vec![[7; 32]]).await.unwrap(), [false]);
    assert_eq!(
        alice.resolve_under(1, vec![[7; 32]]).await.unwrap(),
        [false]
    );
    // Values under a key the node does not use are an error, not a "no".
    assert_eq!(
        kind(alice.resolve_under(2, vec![[7; 32]]).await),
        ErrorKind::DiscoveryKeyChanged { key_version: 1 }
    );
    node.shutdown().await;
}

#[test]
fn a_broken_address_book_imports_what_is_valid_and_reports_the_rest() {
    let node = ProcessNode::start(&config_text(""));
    let alice = node.dir.path().join("alice");
    node.register_cli(&alice, &[], ALICE);
    let card = node.dir.path().join("broken.vcf");
    std::fs::write(
        &card,
        "BEGIN:VCARD\nVERSION:3.0\nFN:Good One\nTEL:(415) 555-0101\nX-WHATEVER;A=b:c\nEND:VCARD\n\
         garbage without a colon\n\
         BEGIN:VCARD\nFN:Bad Number\nTEL:12\nEND:VCARD\n\
         BEGIN:VCARD\nFN:Half\nTEL:+44 20 7946 0958\n",
    )
    .unwrap();
    let out = run_ok(
        &node,
        &alice,
        &["contacts", "import", card.to_str().unwrap()],
    );
    assert!(out.contains("read 2 numbers"), "{out}");
    assert!(out.contains("1 added"), "{out}");
    assert!(out.contains("3 skipped"), "{out}");
    assert!(out.contains("not a vCard property"), "{out}");
    assert!(out.contains("Bad Number: \"12\""), "{out}");
    assert!(out.contains("without END:VCARD"), "{out}");
    let listed = run_ok(&node, &alice, &["contacts", "list", "--json"]);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(listed.contains(BOB), "{listed}");
    // Bytes that are not text at all import nothing and crash nothing.
    let junk = node.dir.path().join("junk.csv");
    std::fs::write(&junk, [0xff, 0xfe, 0x00, 0x01, 0x80, b'\n', 0xc3]).unwrap();
    let out = run_ok(
        &node,
        &alice,
        &["contacts", "import", junk.to_str().unwrap()],
    );
    assert!(out.contains("read 0 numbers"), "{out}");
}
