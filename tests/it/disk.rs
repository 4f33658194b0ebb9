//! A full disk: the node refuses new messages with a clear error, keeps delivering
//! and acknowledging what it holds, loses nothing, and takes messages again once
//! acknowledgements have freed space.
//!
//! The data dir is a 64 MiB tmpfs that the test mounts, which needs root (CI runs as
//! root). Without it the test says so and does nothing: a file-size limit would not
//! do, since free space is what the node watches.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use switchboard::client::Subscription;
use switchboard::proto::ErrorKind;

use crate::support::*;

/// A tmpfs mounted for the length of a test.
pub(crate) struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub(crate) fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(Tmpfs { dir })
    }

    pub(crate) fn path(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn free_bytes(path: &Path) -> u64 {
    fs2::available_space(path).expect("statvfs")
}

/// Receives and acknowledges everything queued; returns the message numbers in order
/// and the least free space seen while acknowledging.
async fn drain(node: &ProcessNode, sub: &mut Subscription) -> (Vec<u32>, u64) {
    let mut got = Vec::new();
    let mut least_free = u64::MAX;
    loop {
        let push = next_push(sub).await;
        got.extend(push_numbers(&push));
        if let Err(e) = sub.ack(push.items.iter().map(|d| d.seq).collect()).await {
            panic!("ack failed: {e}\nlog:\n{}", node.log());
        }
        least_free = least_free.min(free_bytes(&node.data_dir()));
        if push.backlog_end {
            return (got, least_free);
        }
    }
}

#[tokio::test]
async fn a_full_disk_refuses_sends_keeps_delivering_and_recovers() {
    let Some(fs) = Tmpfs::mount("64m") else {
        println!("skipped: mounting a tmpfs needs root");
        return;
    };
    let mut node = ProcessNode::start_with_data(
        &config_text("[storage]\nmin_free_bytes = 25165824\n"),
        Some(fs.path()),
    );
    let alice = node.registered(ALICE).await;
    let bob = node.registered(BOB).await;

    // Fill the disk until the node refuses.
    let mut accepted = 0u32;
    let refusal = loop {
        assert!(accepted < 2_000, "64 MiB never filled up");
        match send_numbered(&alice, BOB, accepted).await {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
    };
    let message = refusal.to_string();
    let refused_as = kind(Err::<(), _>(refusal));
    assert_eq!(
        refused_as,
        ErrorKind::StorageFull,
        "{message}\nlog:\n{}",
        node.log()
    );
    assert!(
        message.contains("storage full"),
        "unclear refusal: {message}"
    );
    assert!(accepted > 50, "refused too early: after {accepted} sends");
    // The node refused when free space was under the 24 MiB reserve; sled may give a
    // little back right after (its own segment cleaning), so allow some slack here.
    let free_when_full = free_bytes(&fs.path());
    assert!(
        free_when_full < 28 * 1024 * 1024,
        "refused with {free_when_full} bytes free"
    );
    // Still refused, and nothing changed by the refusal.
    assert_eq!(
        kind(send_numbered(&alice, BOB, accepted).await),
        ErrorKind::StorageFull
    );

    // Bob receives every accepted message, in order, and acknowledges them.
    let mut sub = bob.subscribe().await.unwrap();
    let (got, least_free) = drain(&node, &mut sub).await;
    assert_eq!(got, (0..accepted).collect::<Vec<_>>());
    sub.finish().await.unwrap();

    // The acknowledgements free space; sending works again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut again = 0;
    while again < 10 {
        match send_numbered(&alice, BOB, accepted + again).await {
            Ok(()) => again += 1,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(kind(Err::<(), _>(e)), ErrorKind::StorageFull);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!(
                "sending still refused 30 s after every message was acknowledged \
                 ({} bytes free): {e}",
                free_bytes(&fs.path())
            ),
        }
    }
    println!(
        "disk full after {accepted} sends of 32 KiB ({free_when_full} bytes free, \
         {least_free} at least while acknowledging); {} bytes free once all were \
         acknowledged and 10 more sent",
        free_bytes(&fs.path())
    );
    let mut sub = bob.subscribe().await.unwrap();
    assert_eq!(
        drain(&node, &mut sub).await.0,
        (accepted..accepted + 10).collect::<Vec<_>>()
    );
    sub.finish().await.unwrap();
    alice.close().await;
    bob.close().await;
    assert!(node.stop(), "node failed\nlog:\n{}", node.log());
    assert!(node.log().contains("storage full"));
}

/// With no reserve, the disk fills under the database itself: sled cannot write its
/// log, and from then on it fails every operation. The node notices, stops, and
/// exits with an error; its supervisor (systemd's `Restart=on-failure`; here, the
/// test) starts it again, and once space is back it serves, with every message it
/// acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_database_stops_the_node_and_a_restart_loses_nothing() {
    let Some(fs) = Tmpfs::mount("64m") else {
        println!("skipped: mounting a tmpfs needs root");
        return;
    };
    let mut node = ProcessNode::start_with_data(
        &config_text("[storage]\nmin_free_bytes = 0\n"),
        Some(fs.path()),
    );
    let alice = node.registered(ALICE).await;
    let (bob_key, _) = switchboard::tls::Credentials::generate_device().expect("device key");
    node.registered_as(&bob_key, BOB).await.close().await;
    // Ballast takes all but 12 MiB, so the database meets the end of the disk soon.
    let ballast = fs.dir.path().join("ballast");
    let keep = 12 * 1024 * 1024;
    let size = free_bytes(&fs.path()).saturating_sub(keep);
    std::fs::write(&ballast, vec![0u8; size as usize]).expect("ballast");

    // Bob is offline: every accepted message was written, and durable, first.
    let mut accepted = Vec::new();
    for i in 0..4000u32 {
        match send_numbered(&alice, BOB, i).await {
            Ok(()) => accepted.push(i),
            Err(_) => break,
        }
    }
    assert!(accepted.len() > 50, "only {} sends fit", accepted.len());
    assert!(accepted.len() < 4000, "the disk never filled");

    // The node stops by itself, with an error.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = node.exited() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the node kept running on a failed database\nlog:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "the node exited as if all was well");
    assert!(node.log().contains("the database failed"), "{}", node.log());

    // Space comes back; the supervisor's restarts (every 200 ms, bounded) bring the
    // node up.
    std::fs::remove_file(&ballast).expect("remove the ballast");
    let mut restarts = 0;
    while let Err(e) = node.try_spawn() {
        restarts += 1;
        assert!(restarts < 50, "the node never came back: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bob = switchboard::client::Client::connect(&node.addr, &bob_key, Some(node.fingerprint))
        .await
        .expect("connect");
    let mut sub = bob.subscribe().await.expect("subscribe");
    let (got, _) = drain(&node, &mut sub).await;
    sub.finish().await.expect("finish");
    assert_eq!(got, accepted, "acknowledged messages lost or reordered");
    // And it takes messages again (Alice registers again: her old connection died
    // with the old process).
    let alice = node.registered(ALICE).await;
    send_numbered(&alice, BOB, 9999)
        .await
        .expect("a send after the restart");
    println!(
        "sled met the end of the disk after {} sends of 32 KiB; back after {restarts} \
         failed restarts, all {} delivered",
        accepted.len(),
        got.len()
    );
    assert!(node.stop(), "node failed\nlog:\n{}", node.log());
}
