//! Attachments end to end: files encrypted by the sender's client, streamed to the
//! node on streams of their own, stored as files, downloaded, checked and saved.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest;
use switchboard::client::attachment::{
    self, AttachmentError, CHUNK, DownloadState, TAG, ciphertext_len, seal_chunk,
};
use switchboard::client::content::Content;
use switchboard::client::messenger::{Conversation, MessengerError};
use switchboard::client::{ClientError, Event};
use switchboard::proto::{ErrorKind, Reply, Request, Response, frame};

use crate::support::*;

fn random_file(dir: &Path, name: &str, len: usize) -> (PathBuf, Vec<u8>) {
    use rand::RngExt;
    let mut bytes = vec![0u8; len];
    rand::rng().fill(&mut bytes[..]);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Whether any 16 bytes of `plain` appear anywhere under `dir`. Every 16-byte window
/// holds an 8-aligned 8-byte window of `plain`, so those are indexed and every
/// 8-byte window of every file is looked up; a hit is then checked for 16.
fn leaks(plain: &[u8], dir: &Path) -> Option<String> {
    let mut index: std::collections::HashMap<u64, Vec<usize>> = Default::default();
    for (i, w) in plain.chunks_exact(8).enumerate() {
        index
            .entry(u64::from_le_bytes(w.try_into().unwrap()))
            .or_default()
            .push(i * 8);
    }
    for file in all_files(dir) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        for q in 0..bytes.len().saturating_sub(7) {
            let w = u64::from_le_bytes(bytes[q..q + 8].try_into().unwrap());
            let Some(at) = index.get(&w) else { continue };
            for &p in at {
                // Extend to 16 bytes on either side.
                for shift in 0..=8usize {
                    let (Some(ps), Some(qs)) = (p.checked_sub(shift), q.checked_sub(shift)) else {
                        continue;
                    };
                    if ps + 16 <= plain.len()
                        && qs + 16 <= bytes.len()
                        && plain[ps..ps + 16] == bytes[qs..qs + 16]
                    {
                        return Some(format!("{} at {qs}", file.display()));
                    }
                }
            }
        }
    }
    None
}

/// The attachment of message `id` among `events`.
fn attachment_in(events: &[Event], id: [u8; 16]) -> attachment::Attachment {
    events
        .iter()
        .find_map(|e| match e {
            Event::Message(m) if m.id == id => match &m.content {
                Some(Content::Attachment(a)) => Some(a.clone()),
                _ => None,
            },
            _ => None,
        })
        .expect("the message with the attachment")
}

/// Alice's and Bob's homes on `node`, registered, with a message between them (so
/// each device has a session with the other).
fn alice_and_bob(node: &ProcessNode) -> (PathBuf, PathBuf) {
    let root = node.dir.path();
    let (alice, bob) = (root.join("alice"), root.join("bob"));
    node.register_cli(&alice, &[], ALICE);
    node.register_cli(&bob, &[], BOB);
    node.ok(&alice, &["send", BOB, "hello"]);
    node.ok(&bob, &["recv"]);
    (alice, bob)
}

/// Alice sends Bob a 20 MiB file of random bytes with `send --file`; Bob's `recv`
/// saves it, and its SHA-256 is the original's; no 16 bytes of it are anywhere in
/// the node's data dir; once Bob's device has it, the node drops it.
#[test]
fn a_20_mib_file_through_the_cli_and_never_in_plain_on_the_node() {
    let node = ProcessNode::start(&config_text(""));
    let root = node.dir.path().to_path_buf();
    // Bob's device is known to Alice's (a session), so the node knows it waits for
    // one download.
    let (alice, bob) = alice_and_bob(&node);
    let (file, plain) = random_file(&root, "holiday.bin", 20 << 20);
    let id = node
        .ok(
            &alice,
            &[
                "send",
                BOB,
                "--file",
                file.to_str().unwrap(),
                "--caption",
                "the photos",
            ],
        )
        .trim()
        .to_string();
    assert_eq!(id.len(), 32, "{id}");
    // On the node: the ciphertext only.
    assert_eq!(
        leaks(&plain, &node.data_dir()),
        None,
        "plaintext on the node's disk"
    );
    // Nor its name, caption or type: they travel inside the end-to-end message.
    for secret in ["holiday.bin", "the photos", "application/octet-stream"] {
        for f in all_files(&node.data_dir()) {
            let bytes = std::fs::read(&f).unwrap_or_default();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret:?} in {}",
                f.display()
            );
        }
    }
    let blobs: Vec<_> = all_files(&node.data_dir().join("blobs"));
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    assert_eq!(
        std::fs::metadata(&blobs[0]).unwrap().len(),
        ciphertext_len(plain.len() as u64)
    );

    let saves = root.join("bob-saves");
    let out = node.cli(&bob, &["recv", "--save-dir", saves.to_str().unwrap()], "");
    assert!(out.status.success(), "{}", show(&["recv"], &out));
    assert!(
        stdout(&out).contains("[file: holiday.bin, 20.00 MiB] the photos"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("saved holiday.bin"),
        "{}",
        stderr(&out)
    );
    let saved = std::fs::read(saves.join("holiday.bin")).unwrap();
    assert_eq!(
        sha2::Sha256::digest(&saved),
        sha2::Sha256::digest(&plain),
        "the saved file is the original"
    );
    // Every device it was for has it: the node no longer does.
    assert!(all_files(&node.data_dir().join("blobs")).is_empty());
    let out = node.cli(&bob, &["attachment", "get", &id[..8]], "");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no attachment with that id"),
        "{}",
        stderr(&out)
    );
    // Alice's history shows the file.
    let history = node.ok(&alice, &["history", BOB]);
    assert!(
        history.contains("[file: holiday.bin, 20.00 MiB] the photos"),
        "{history}"
    );
}

/// `switchboard --home HOME ARGS...` on a terminal: run under util-linux `script`,
/// which gives it a pseudo-terminal. Returns what the terminal showed.
fn on_a_terminal(home: &Path, args: &[&str]) -> String {
    let mut command = format!("{BIN} --home {}", home.display());
    for a in args {
        command.push(' ');
        command.push_str(a);
    }
    let out = std::process::Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("util-linux `script` runs (it gives the CLI a terminal)");
    assert!(out.status.success(), "{}", show(args, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file over a few MiB shows a progress bar of bytes on a terminal, sent and
/// fetched with `attachment get`; piped, nothing but the answer is printed.
#[test]
fn a_big_transfer_shows_a_progress_bar_on_a_terminal() {
    let node = ProcessNode::start(&config_text(
        "[attachments]\ndelete_when_downloaded = false\n",
    ));
    let root = node.dir.path().to_path_buf();
    let (alice, bob) = alice_and_bob(&node);
    let (file, _) = random_file(&root, "big.bin", 6 << 20);
    let file = file.to_str().unwrap();
    let shown = on_a_terminal(&alice, &["send", BOB, "--file", file]);
    assert!(shown.contains("/6.00 MiB"), "no bar sending: {shown:?}");
    // The bar is cleared (`ESC [2K`) before the message id is printed.
    let id = shown
        .trim()
        .rsplit(['\n', '\r', 'K'])
        .next()
        .unwrap_or("")
        .to_string();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "the message id last: {shown:?}"
    );
    let saves = root.join("saves");
    node.ok(&bob, &["recv", "--save-dir", saves.to_str().unwrap()]);
    let shown = on_a_terminal(
        &bob,
        &[
            "attachment",
            "get",
            &id[..8],
            "--save-dir",
            saves.to_str().unwrap(),
        ],
    );
    assert!(shown.contains("/6.00 MiB"), "no bar fetching: {shown:?}");
    assert!(shown.contains("saved big.bin"), "{shown:?}");
    // Piped: no bar.
    let out = node.cli(&alice, &["send", BOB, "--file", file], "");
    assert!(out.status.success(), "{}", show(&["send"], &out));
    assert!(!stderr(&out).contains("MiB/"), "{}", stderr(&out));
    assert!(!stdout(&out).contains("MiB/"), "{}", stdout(&out));
}

/// With `delete_when_downloaded = false` the node keeps a file after every device
/// has it, and `attachment get` downloads it again, checked against its digest.
#[test]
fn attachment_get_downloads_again_while_the_node_keeps_it() {
    let node = ProcessNode::start(&config_text(
        "[attachments]\ndelete_when_downloaded = false\n",
    ));
    let root = node.dir.path().to_path_buf();
    let (alice, bob) = alice_and_bob(&node);
    let (file, plain) = random_file(&root, "voice.opus", 300 << 10);
    let id = node
        .ok(&alice, &["send", BOB, "--file", file.to_str().unwrap()])
        .trim()
        .to_string();
    let first = root.join("first");
    let got = node.ok(&bob, &["recv", "--save-dir", first.to_str().unwrap()]);
    assert!(got.contains("[file: voice.opus, 300.00 KiB]"), "{got}");
    assert_eq!(std::fs::read(first.join("voice.opus")).unwrap(), plain);
    assert_eq!(all_files(&node.data_dir().join("blobs")).len(), 1);

    let again = root.join("again");
    let out = node.cli(
        &bob,
        &[
            "attachment",
            "get",
            &id[..8],
            "--save-dir",
            again.to_str().unwrap(),
        ],
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        show(&["attachment", "get"], &out)
    );
    let path = PathBuf::from(stdout(&out).trim());
    assert_eq!(path.parent(), Some(again.as_path()), "{}", path.display());
    assert_eq!(std::fs::read(&path).unwrap(), plain);
    assert!(
        stderr(&out).contains("saved voice.opus"),
        "{}",
        stderr(&out)
    );
    // A backup says it leaves the kept file out, and where it is.
    let backup = root.join("node.backup");
    let out = std::process::Command::new(BIN)
        .args(["admin", "backup", backup.to_str().unwrap(), "--data"])
        .arg(node.data_dir())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&["admin", "backup"], &out));
    assert!(
        stdout(&out).contains("attachments NOT included: 1 file(s)"),
        "{}",
        stdout(&out)
    );
    // A message without a file is told so.
    let text_id = node
        .ok(&alice, &["send", BOB, "just words"])
        .trim()
        .to_string();
    node.ok(&bob, &["recv"]);
    let out = node.cli(&bob, &["attachment", "get", &text_id], "");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("has no attachment"),
        "{}",
        stderr(&out)
    );
}

/// Round trips of the sizes where chunking could go wrong; a tampered chunk and a
/// wrong id are refused; a file over the limit is refused before any byte goes; a
/// second file over the account's quota too.
#[tokio::test(flavor = "multi_thread")]
async fn round_trips_tampering_wrong_ids_limits_and_quotas() {
    let node = InProcessNode::start(&config_text(
        "[attachments]\nmax_bytes = 1048576\nmax_stored_bytes_per_account = 1048576\n",
    ))
    .await;
    let (a_dir, _, alice) = person(&node, ALICE).await;
    let (_b, _, bob) = person(&node, BOB).await;
    let bob_conv = Conversation::With(number(BOB));
    alice.send_text(&number(BOB), "hi").await.unwrap();
    receive_backlog(&bob).await;
    let saves = a_dir.path().join("saves");
    for (i, len) in [0, 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]
        .into_iter()
        .enumerate()
    {
        let (path, plain) = random_file(a_dir.path(), &format!("f{i}.bin"), len);
        let id = alice
            .send_file(&bob_conv, &path, "", &mut |_, _| {})
            .await
            .unwrap();
        let att = attachment_in(&receive_backlog(&bob).await, id);
        assert_eq!(att.size, len as u64);
        let got = bob
            .save_attachment(&att, &saves, &mut |_, _| {})
            .await
            .unwrap();
        assert_eq!(std::fs::read(&got).unwrap(), plain, "size {len}");
    }
    // A file the node keeps (unknown recipients: a group-like 0) to tamper with.
    let (path, _) = random_file(a_dir.path(), "t.bin", 2 * CHUNK);
    let client = alice.client().await.unwrap();
    let key = [5u8; 32];
    let up = client
        .upload_file(&path, &key, 0, None, &mut |_, _| {})
        .await
        .unwrap();
    let blob = node.dir.path().join("data/blobs").join(hex::encode(up.id));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[CHUNK + TAG + 3] ^= 0x40;
    std::fs::write(&blob, &bytes).unwrap();
    let att = attachment::Attachment {
        id: up.id,
        key,
        size: up.size,
        digest: up.digest,
        name: "t.bin".into(),
        mime: "application/octet-stream".into(),
        thumbnail: None,
        caption: String::new(),
    };
    let tampered = bob.save_attachment(&att, &saves, &mut |_, _| {}).await;
    assert!(
        matches!(
            tampered,
            Err(MessengerError::Attachment(AttachmentError::Tampered {
                chunk: 1
            }))
        ),
        "{tampered:?}"
    );
    assert!(
        !saves.join("t.bin").exists(),
        "nothing half-checked is saved"
    );
    // A wrong id: nothing there.
    let wrong = attachment::Attachment {
        id: [0xee; 16],
        ..att.clone()
    };
    let refused = bob.save_attachment(&wrong, &saves, &mut |_, _| {}).await;
    assert!(
        matches!(&refused, Err(MessengerError::Attachment(AttachmentError::Client(ClientError::Node(e)))) if e.kind == ErrorKind::NoAttachment),
        "{refused:?}"
    );
    // Over the limit: refused at the first frame, no byte stored.
    let (big, _) = random_file(a_dir.path(), "big.bin", 1 << 20);
    let before = all_files(&node.dir.path().join("data/blobs")).len();
    let too_big = alice.send_file(&bob_conv, &big, "", &mut |_, _| {}).await;
    match too_big {
        Err(MessengerError::Attachment(AttachmentError::Client(ClientError::Node(e)))) => {
            assert!(
                matches!(e.kind, ErrorKind::AttachmentTooLarge { max: 1_048_576 }),
                "{e:?}"
            );
            assert!(e.message.contains("at most 1048576 bytes"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(all_files(&node.dir.path().join("data/blobs")).len(), before);
    // The quota: the tampered file (2 chunks) is still stored; 900 KiB more is over.
    let (more, _) = random_file(a_dir.path(), "more.bin", 900 * 1024);
    let over = alice.send_file(&bob_conv, &more, "", &mut |_, _| {}).await;
    assert!(
        matches!(&over, Err(MessengerError::Attachment(AttachmentError::Client(ClientError::Node(e)))) if matches!(e.kind, ErrorKind::AttachmentQuota { .. })),
        "{over:?}"
    );
    alice.close().await;
    bob.close().await;
    node.shutdown().await;
}

/// An upload broken off in the middle resumes from what the node has on disk; the
/// node refuses bytes past the promised size; a half upload is never downloadable.
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_upload_resumes_and_a_half_one_is_never_offered() {
    let node = InProcessNode::start(&config_text("")).await;
    let (a_dir, _, alice) = person(&node, ALICE).await;
    let (path, plain) = random_file(a_dir.path(), "r.bin", 5 * CHUNK + 100);
    let key = [9u8; 32];
    let total = ciphertext_len(plain.len() as u64);
    // By hand: the first two chunks, then the connection goes.
    let raw = alice.client().await.unwrap();
    let (mut send, _recv, id, offset) = begin_upload(&raw, total, None).await;
    assert_eq!(offset, 0);
    for i in 0..2u64 {
        let start = i as usize * CHUNK;
        send.write_all(&seal_chunk(&key, i, false, &plain[start..start + CHUNK]))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    raw.connection().close(0u32.into(), b"gone");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Half an upload is not downloadable.
    let bob = node.registered(BOB).await;
    let (_, mut recv) = {
        let (mut s, r) = bob.connection().open_bi().await.unwrap();
        frame::write(&mut s, &Request::Download { id, offset: 0 })
            .await
            .unwrap();
        s.finish().unwrap();
        (s, r)
    };
    match frame::read::<Reply, _>(&mut recv, 1 << 20).await.unwrap() {
        Some(Reply::Err(e)) => assert_eq!(e.kind, ErrorKind::NoAttachment),
        other => panic!("a half upload offered: {other:?}"),
    }
    // The resume starts where the node's disk ends.
    let client = alice.client().await.unwrap();
    let (mut send, mut recv, same, offset) = begin_upload(&client, total, Some(id)).await;
    assert_eq!(same, id);
    assert_eq!(offset, 2 * (CHUNK + TAG) as u64);
    // More than promised: refused.
    let _ = send.write_all(&vec![0u8; total as usize]).await;
    let _ = send.finish();
    match frame::read::<Reply, _>(&mut recv, 1 << 20).await {
        Ok(Some(Reply::Err(e))) => assert!(e.message.contains("more than"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    // The client's upload of the file, resumed, completes and reads back.
    let up = client
        .upload_file(&path, &key, 0, Some(id), &mut |_, _| {})
        .await
        .unwrap();
    assert_eq!(up.id, id);
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
    assert_eq!(up.digest, <[u8; 32]>::from(sha2::Sha256::digest(&plain)));
    let out_path = a_dir.path().join("back.bin");
    let mut out = tokio::fs::File::create(&out_path).await.unwrap();
    let mut state = DownloadState::default();
    client
        .download_into(&att, &mut out, &mut state, &mut |_, _| {})
        .await
        .unwrap();
    drop(out);
    assert_eq!(state.digest(), up.digest);
    assert_eq!(std::fs::read(&out_path).unwrap(), plain);
    alice.close().await;
    node.shutdown().await;
}

/// A download broken off in the middle (its connection closed after two chunks)
/// resumes on a new connection from the first chunk it lacks: no chunk is fetched
/// twice, and what is saved is the file.
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_download_resumes_where_it_stopped() {
    let node = InProcessNode::start(&config_text("")).await;
    let (a_dir, _, alice) = person(&node, ALICE).await;
    let (b_dir, _, bob) = person(&node, BOB).await;
    alice.send_text(&number(BOB), "hi").await.unwrap();
    receive_backlog(&bob).await;
    let (path, plain) = random_file(a_dir.path(), "long.bin", 6 * CHUNK + 7);
    let id = alice
        .send_file(&Conversation::With(number(BOB)), &path, "", &mut |_, _| {})
        .await
        .unwrap();
    let att = attachment_in(&receive_backlog(&bob).await, id);
    let first = bob.client().await.unwrap().connection().clone();
    let sealed = (CHUNK + TAG) as u64;
    let mut seen = Vec::new();
    let mut broke = false;
    let saved = bob
        .save_attachment(&att, &b_dir.path().join("saves"), &mut |done, _| {
            seen.push(done);
            if !broke && done >= 2 * sealed {
                broke = true;
                first.close(0u32.into(), b"broken off by the test");
            }
        })
        .await
        .unwrap();
    assert!(broke);
    assert!(
        first.close_reason().is_some(),
        "the first connection is gone"
    );
    assert_ne!(
        bob.client().await.unwrap().connection().stable_id(),
        first.stable_id(),
        "the rest came on a new connection"
    );
    let want: Vec<u64> = (1..=7u64)
        .map(|i| (i * sealed).min(ciphertext_len(plain.len() as u64)))
        .collect();
    assert_eq!(seen, want, "every chunk once, in order");
    assert_eq!(std::fs::read(&saved).unwrap(), plain);
    alice.close().await;
    bob.close().await;
    node.shutdown().await;
}

/// Transfers run side by side, each on its own stream; the bytes one account may
/// have in flight are bounded (`attachments.max_in_flight_bytes_per_account`) and
/// given back when a transfer ends; one upload cannot run on two streams at once.
#[tokio::test(flavor = "multi_thread")]
async fn parallel_transfers_and_the_in_flight_quota() {
    let node = InProcessNode::start(&config_text(
        "[attachments]\nmax_bytes = 1048576\nmax_in_flight_bytes_per_account = 1048576\n",
    ))
    .await;
    let (a_dir, _, alice) = person(&node, ALICE).await;
    let client = alice.client().await.unwrap();
    let open = |size: u64, resume: Option<[u8; 16]>| {
        let conn = client.connection().clone();
        async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            frame::write(
                &mut send,
                &Request::Upload {
                    size,
                    downloads: 0,
                    resume,
                },
            )
            .await
            .unwrap();
            let reply = frame::read::<Reply, _>(&mut recv, 1 << 20).await.unwrap();
            (send, recv, reply)
        }
    };
    // 600 KiB held open, then 600 KiB more: over the 1 MiB in flight.
    let (mut held, _held_recv, reply) = open(600 << 10, None).await;
    let held_id = match reply {
        Some(Reply::Ok(Response::UploadReady { id, offset: 0 })) => id,
        other => panic!("{other:?}"),
    };
    match open(600 << 10, None).await.2 {
        Some(Reply::Err(e)) => {
            assert_eq!(e.kind, ErrorKind::AttachmentQuota { max: 1 << 20 });
            assert!(
                e.message.contains("max_in_flight_bytes_per_account"),
                "{}",
                e.message
            );
        }
        other => panic!("a second 600 KiB in flight: {other:?}"),
    }
    // The same upload resumed on a second stream while the first still runs.
    match open(600 << 10, Some(held_id)).await.2 {
        Some(Reply::Err(e)) => {
            assert!(
                e.message.contains("already going on another stream"),
                "{e:?}"
            );
        }
        other => panic!("one upload on two streams: {other:?}"),
    }
    // The first one broken off gives its share back.
    held.reset(0u32.into()).unwrap();
    let mut back = false;
    for _ in 0..100 {
        if let Some(Reply::Ok(Response::UploadReady { .. })) = open(600 << 10, None).await.2 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the in-flight bytes were never given back");

    // Four files up at once on one connection, then down at once: each whole.
    let files: Vec<(PathBuf, Vec<u8>)> = (0..4)
        .map(|i| random_file(a_dir.path(), &format!("p{i}.bin"), 2 * CHUNK + 1000 * i))
        .collect();
    let key = [3u8; 32];
    let ups = futures_util::future::join_all(files.iter().map(|(path, _)| {
        let client = &client;
        async move {
            client
                .upload_file(path, &key, 0, None, &mut |_, _| {})
                .await
                .unwrap()
        }
    }))
    .await;
    let mut ids: Vec<[u8; 16]> = ups.iter().map(|u| u.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "each upload its own id");
    let downs = futures_util::future::join_all(ups.iter().enumerate().map(|(i, up)| {
        let client = &client;
        let out_path = a_dir.path().join(format!("back{i}.bin"));
        async move {
            let att = attachment::Attachment {
                id: up.id,
                key,
                size: up.size,
                digest: up.digest,
                name: String::new(),
                mime: String::new(),
                thumbnail: None,
                caption: String::new(),
            };
            let mut out = tokio::fs::File::create(&out_path).await.unwrap();
            let mut state = DownloadState::default();
            client
                .download_into(&att, &mut out, &mut state, &mut |_, _| {})
                .await
                .unwrap();
            drop(out);
            assert_eq!(state.digest(), up.digest);
            std::fs::read(&out_path).unwrap()
        }
    }))
    .await;
    for ((_, plain), got) in files.iter().zip(&downs) {
        assert_eq!(got, plain);
    }
    alice.close().await;
    node.shutdown().await;
}

/// Unfinished uploads and whole blobs past the TTL are swept, files and records.
#[tokio::test(flavor = "multi_thread")]
async fn the_sweeper_drops_old_blobs_and_abandoned_uploads() {
    let node = InProcessNode::start_with(&config_text(""), |c| {
        c.messages.ttl = Duration::from_millis(1500);
        c.messages.sweep_interval = Duration::from_millis(200);
        c.attachments.incomplete_ttl = Duration::from_millis(500);
    })
    .await;
    let (a_dir, _, alice) = person(&node, ALICE).await;
    let (path, _) = random_file(a_dir.path(), "old.bin", 3 * CHUNK);
    let client = alice.client().await.unwrap();
    client
        .upload_file(&path, &[1; 32], 0, None, &mut |_, _| {})
        .await
        .unwrap();
    // And one left half done.
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    frame::write(
        &mut send,
        &Request::Upload {
            size: 1000,
            downloads: 0,
            resume: None,
        },
    )
    .await
    .unwrap();
    let _ = frame::read::<Reply, _>(&mut recv, 1 << 20).await.unwrap();
    send.write_all(&[7; 100]).await.unwrap();
    let _ = send.reset(0u32.into());
    let blobs = node.dir.path().join("data/blobs");
    let mut files = all_files(&blobs).len();
    assert!(files >= 1);
    for _ in 0..100 {
        files = all_files(&blobs).len();
        if files == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(files, 0, "{:?}", all_files(&blobs));
    alice.close().await;
    node.shutdown().await;
}

/// SIGKILL of the node in the middle of an upload: the client's upload resumes once
/// the node is back (or restarts cleanly), and what arrives is the file.
#[test]
fn a_sigkill_mid_upload_resumes() {
    let mut node = ProcessNode::start(&config_text(""));
    let root = node.dir.path().to_path_buf();
    let (alice, bob) = alice_and_bob(&node);
    let (file, plain) = random_file(&root, "big.bin", 48 << 20);
    let sending = std::process::Command::new(BIN)
        .args([
            "--home",
            alice.to_str().unwrap(),
            "send",
            BOB,
            "--file",
            file.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the node once part of the upload is on its disk.
    let partial = node.data_dir().join("blobs/partial");
    for _ in 0..600 {
        let written: u64 = std::fs::read_dir(&partial)
            .map(|d| {
                d.flatten()
                    .map(|e| e.metadata().map_or(0, |m| m.len()))
                    .sum()
            })
            .unwrap_or(0);
        if written > 8 << 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    node.crash_and_restart();
    let out = sending.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "send: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let saves = root.join("saves");
    let got = node.cli(&bob, &["recv", "--save-dir", saves.to_str().unwrap()], "");
    assert!(got.status.success(), "{}", show(&["recv"], &got));
    assert_eq!(std::fs::read(saves.join("big.bin")).unwrap(), plain);
    assert!(all_files(&node.data_dir().join("blobs/partial")).is_empty());
}

/// The node's memory stays flat while 200 MiB go up and come back down.
#[test]
fn the_nodes_memory_stays_flat_during_a_200_mib_transfer() {
    let node = ProcessNode::start(&config_text("[attachments]\nmax_bytes = 268435456\n"));
    let root = node.dir.path().to_path_buf();
    let (alice, bob) = alice_and_bob(&node);
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let pid = node.pid().unwrap();
    // The steady state: after a first transfer has warmed up buffers and caches.
    let (warm, _) = random_file(&root, "warm.bin", 32 << 20);
    node.ok(&alice, &["send", BOB, "--file", warm.to_str().unwrap()]);
    let saves = root.join("saves");
    node.ok(&bob, &["recv", "--save-dir", saves.to_str().unwrap()]);
    let (file, plain) = random_file(&root, "huge.bin", 200 << 20);
    let before = rss(pid);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peak = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                peak = peak.max(rss(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    node.ok(&alice, &["send", BOB, "--file", file.to_str().unwrap()]);
    let after_upload = rss(pid);
    node.ok(&bob, &["recv", "--save-dir", saves.to_str().unwrap()]);
    eprintln!(
        "node RSS after the upload {after_upload}, after the download {}",
        rss(pid)
    );
    done.store(true, std::sync::atomic::Ordering::Release);
    let peak = peak.join().unwrap();
    let saved = std::fs::read(saves.join("huge.bin")).unwrap();
    assert!(saved == plain, "the file came back changed");
    let grew = peak.saturating_sub(before);
    eprintln!("node RSS {before} before, peak {peak} during: grew {grew} bytes");
    assert!(
        grew < 24 << 20,
        "the node's RSS grew by {grew} bytes during a 200 MiB transfer"
    );
}

/// A disk without room for an attachment refuses it before any byte is sent, with a
/// clear error, and keeps what it holds.
#[test]
fn a_full_disk_refuses_an_attachment_before_any_byte() {
    let Some(fs) = crate::disk::Tmpfs::mount("96m") else {
        println!("skipped: mounting a tmpfs needs root");
        return;
    };
    let node = ProcessNode::start_with_data(
        &config_text("[storage]\nmin_free_bytes = 16777216\n"),
        Some(fs.path()),
    );
    let root = node.dir.path().to_path_buf();
    let (alice, bob) = alice_and_bob(&node);
    let (first, _) = random_file(&root, "first.bin", 40 << 20);
    node.ok(&alice, &["send", BOB, "--file", first.to_str().unwrap()]);
    let (second, _) = random_file(&root, "second.bin", 40 << 20);
    let out = node.cli(
        &alice,
        &["send", BOB, "--file", second.to_str().unwrap()],
        "",
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("storage full"), "{}", stderr(&out));
    // Nothing of it was taken; the first is still there and reaches Bob.
    assert!(all_files(&fs.path().join("blobs/partial")).is_empty());
    let saves = root.join("saves");
    let got = node.cli(&bob, &["recv", "--save-dir", saves.to_str().unwrap()], "");
    assert!(got.status.success(), "{}", show(&["recv"], &got));
    assert_eq!(
        std::fs::read(saves.join("first.bin")).unwrap(),
        std::fs::read(&first).unwrap()
    );
}
