//! Micro-benchmarks (divan): the frame codec and the store's append and ack, each
//! beside its bare counterpart (bincode alone, raw sled insert and remove).
//!
//! `cargo bench --bench micro`

use std::hint::black_box;

use switchboard::proto::{DeviceEnvelope, Outgoing, Request, frame};
use switchboard::store::records::CodeRecord;
use switchboard::store::{DeviceRef, Judgement, NewDevice, Store, VerifyOutcome};

fn main() {
    divan::main();
}

fn send_request() -> Request {
    Request::Send(Outgoing {
        expires_in_secs: 0,
        id: [7; 16],
        to: "+14155550101".into(),
        envelopes: vec![DeviceEnvelope {
            device_id: 1,
            body: vec![0xA5; 256],
        }],
    })
}

#[divan::bench]
fn frame_encode_send() -> Vec<u8> {
    frame::encode(black_box(&send_request())).unwrap_or_default()
}

#[divan::bench]
fn frame_decode_send(bencher: divan::Bencher) {
    let bytes = frame::encode(&send_request()).unwrap_or_default();
    bencher.bench(|| frame::decode::<Request>(black_box(&bytes), 1 << 20).is_ok());
}

/// The limit for the codec: plain bincode of the same value, no limit, no prefix.
#[divan::bench]
fn bare_bincode_decode_send(bencher: divan::Bencher) {
    let bytes =
        bincode::encode_to_vec(send_request(), bincode::config::standard()).unwrap_or_default();
    bencher.bench(|| {
        bincode::decode_from_slice::<Request, _>(black_box(&bytes), bincode::config::standard())
            .is_ok()
    });
}

fn register(store: &Store, number: &str, key: u8) -> DeviceRef {
    let code = CodeRecord {
        hash: [0; 32],
        sent_at_ms: 0,
        expires_at_ms: u64::MAX,
        tries_left: 5,
    };
    let _ = store.replace_code::<()>(number, |_| Ok(code.clone()));
    let device = NewDevice {
        key_id: [key; 32],
        public_key: vec![key; 44],
    };
    match store.verify_and_register::<()>(number, &device, 0, |_| Judgement::Accept) {
        Ok(VerifyOutcome::Registered { device, .. }) => device,
        other => panic!("registration for the benchmark failed: {other:?}"),
    }
}

/// A store in `dir` with Alice and Bob registered.
fn alice_and_bob(dir: &std::path::Path, power_loss_sync: bool) -> (Store, DeviceRef, DeviceRef) {
    let store = Store::open_with(dir, power_loss_sync).expect("store");
    let alice = register(&store, "+14155550100", 1);
    let bob = register(&store, "+14155550101", 2);
    (store, alice, bob)
}

/// Appends message `n` (256 bytes) from Alice to Bob.
fn append_one(store: &Store, alice: DeviceRef, bob: DeviceRef, n: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    let _ = store.append(
        alice,
        "+14155550100",
        id,
        vec![(bob, vec![0xA5; 256])],
        n,
        u64::MAX,
    );
    id
}

/// One message through a queue: append, drop its sent-id record (the sender has its
/// answer), read the page, acknowledge (with its receipt, which the sender then
/// acknowledges). No flush: that is the group commit's cost.
#[divan::bench(sample_count = 200, sample_size = 50)]
fn store_append_then_ack(bencher: divan::Bencher) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, alice, bob) = alice_and_bob(dir.path(), true);
    let mut n = 0u64;
    bencher.bench_local(|| {
        n += 1;
        let id = append_one(&store, alice, bob, n);
        let _ = store.forget_sent(alice, id, n);
        let page = store.queue_page(bob, None, 16).unwrap_or_default();
        let seqs: Vec<u64> = page.iter().map(|q| q.seq).collect();
        let _ = store.ack(bob, "+14155550101", &seqs, n);
        let receipts = store.queue_page(alice, None, 16).unwrap_or_default();
        let seqs: Vec<u64> = receipts.iter().map(|q| q.seq).collect();
        let _ = store.ack(alice, "+14155550100", &seqs, n);
    });
}

/// The limit: raw sled doing the same writes (two inserts, two removes, same sizes).
#[divan::bench(sample_count = 200, sample_size = 50)]
fn bare_sled_insert_then_remove(bencher: divan::Bencher) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sled::open(dir.path()).expect("sled");
    let tree = db.open_tree("queue").expect("tree");
    let value = vec![0xA5u8; 300];
    let receipt = vec![0x5Au8; 40];
    bencher.bench_local(|| {
        let a = db.generate_id().unwrap_or(0).to_be_bytes();
        let b = db.generate_id().unwrap_or(0).to_be_bytes();
        let _ = tree.insert(a, value.as_slice());
        let _ = tree.insert(b, receipt.as_slice());
        let _ = tree.remove(a);
        let _ = tree.remove(b);
    });
}

/// One group commit of one small write, with power-loss sync (`fdatasync` after sled's
/// flush): the floor of a lone sender's `Accepted` latency.
#[divan::bench(sample_count = 50, sample_size = 4)]
fn group_commit_with_fdatasync(bencher: divan::Bencher) {
    flush_after_insert(bencher, true);
}

/// The limit: sled's own flush alone (`sync_file_range`), which a power cut can undo.
#[divan::bench(sample_count = 50, sample_size = 4)]
fn group_commit_sled_flush_only(bencher: divan::Bencher) {
    flush_after_insert(bencher, false);
}

fn flush_after_insert(bencher: divan::Bencher, power_loss_sync: bool) {
    // On the target dir's disk, not a tmpfs /tmp, so the sync reaches a real device.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let (store, alice, bob) = alice_and_bob(dir.path(), power_loss_sync);
    let mut n = 0u64;
    bencher.bench_local(|| {
        n += 1;
        append_one(&store, alice, bob, n);
        let _ = store.flush_blocking();
    });
}

/// The node's cost per number in contact discovery: one `Evaluate` element (decode the
/// blinded point, multiply by the key, encode).
#[divan::bench]
fn discovery_evaluate_one(bencher: divan::Bencher) {
    let key = switchboard::discovery::DiscoveryKey::generate(1).expect("key");
    let blinded = switchboard::discovery::blind("+14155550101").expect("blind");
    bencher.bench_local(|| key.evaluate(divan::black_box(&blinded.element)));
}

/// The limit: the bare ristretto255 work inside an evaluation (decompress, one scalar
/// multiplication, compress), with curve25519-dalek alone.
#[divan::bench]
fn bare_ristretto_scalar_mul(bencher: divan::Bencher) {
    use curve25519_dalek::ristretto::CompressedRistretto;
    use curve25519_dalek::scalar::Scalar;
    let blinded = switchboard::discovery::blind("+14155550101").expect("blind");
    let scalar = Scalar::from_bytes_mod_order([7; 32]);
    bencher.bench_local(|| {
        CompressedRistretto(divan::black_box(blinded.element))
            .decompress()
            .map(|p| (p * scalar).compress())
    });
}

/// Building the membership filter of 100,000 accounts (sort, dedup, binary fuse).
#[divan::bench(sample_count = 20)]
fn discovery_filter_build_100k(bencher: divan::Bencher) {
    let keys = filter_keys(100_000);
    bencher.bench_local(|| switchboard::discovery::MembershipFilter::build(keys.clone()));
}

/// The limit: xorf's binary fuse filter alone, on the same (already unique) keys.
#[divan::bench(sample_count = 20)]
fn bare_xorf_build_100k(bencher: divan::Bencher) {
    let keys = filter_keys(100_000);
    bencher.bench_local(|| xorf::BinaryFuse8::try_from(&keys));
}

fn filter_keys(n: u64) -> Vec<u64> {
    // Distinct, well-spread keys, as PRF values are.
    (0..n)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5bd1_e995)
        .collect()
}

/// A home with 10,000 messages: 9,000 with one contact, the rest over 50 others.
fn home_with_history() -> (tempfile::TempDir, switchboard::client::db::HomeDb) {
    use switchboard::client::content::Content;
    use switchboard::client::history;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = switchboard::client::db::HomeDb::open(dir.path(), None).expect("home db");
    db.write(|tx| {
        for i in 0..10_000u32 {
            let peer = if i % 10 == 0 {
                format!("+1415555{:04}", 1000 + i % 500 / 10)
            } else {
                "+14155550101".to_string()
            };
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            let text = Content::Text(format!("message {i} of a long conversation"));
            history::add_received(tx, &peer, 1, &id, u64::from(i), Some(text), None)?;
        }
        Ok::<_, switchboard::client::db::DbError>(())
    })
    .expect("history");
    (dir, db)
}

/// What `switchboard chat` reads for its first screen, with 10,000 messages in 51
/// conversations: the conversation list (each one's newest message and unread count)
/// and the newest 500 messages of the top conversation, unsealed and decoded.
#[divan::bench(sample_count = 20)]
fn chat_first_screen_of_10000_messages(bencher: divan::Bencher) {
    use switchboard::client::history;
    let (_dir, db) = home_with_history();
    bencher.bench(|| {
        db.read(|tx| {
            let list = history::conversations(tx, |_| 0)?;
            let top = list
                .first()
                .map(|(e, _)| e.peer.clone())
                .unwrap_or_default();
            let page = history::page(tx, &top, None, 500)?;
            Ok::<_, switchboard::client::db::DbError>((list.len(), page.len()))
        })
        .expect("read")
    });
}

/// Its bare limit: the same queries in plain SQLite (the conversations' heads and
/// unread counts from the index, the top conversation's newest 500 rows), nothing
/// unsealed or decoded.
#[divan::bench(sample_count = 20)]
fn chat_first_screen_bare_sqlite(bencher: divan::Bencher) {
    let (dir, db) = home_with_history();
    drop(db);
    let conn = rusqlite::Connection::open(dir.path().join("home.db")).expect("sqlite");
    bencher.bench_local(|| {
        let mut heads = conn
            .prepare_cached(
                "SELECT conv, max(seq) AS last FROM message GROUP BY conv ORDER BY last DESC",
            )
            .expect("prepare");
        let heads: Vec<(Vec<u8>, i64)> = heads
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .filter_map(Result::ok)
            .collect();
        let mut read = 0usize;
        for (conv, last) in &heads {
            let row: Option<Vec<u8>> = conn
                .prepare_cached("SELECT value FROM message WHERE seq = ?1")
                .and_then(|mut s| s.query_row([last], |r| r.get(0)))
                .ok();
            let unread: i64 = conn
                .prepare_cached(
                    "SELECT count(*) FROM message WHERE conv = ?1 AND seq > 0 AND state >= 10",
                )
                .and_then(|mut s| s.query_row([conv], |r| r.get(0)))
                .unwrap_or(0);
            read += row.map_or(0, |r| r.len()) + usize::try_from(unread).unwrap_or(0);
        }
        let top = heads.first().map(|(c, _)| c.clone()).unwrap_or_default();
        let mut page = conn
            .prepare_cached(
                "SELECT seq, key, state, value FROM message WHERE conv = ?1 \
                 ORDER BY seq DESC LIMIT 500",
            )
            .expect("prepare");
        let rows = page
            .query_map([&top], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })
            .expect("query");
        read + rows.filter_map(Result::ok).count()
    });
}
