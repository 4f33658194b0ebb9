//! The `storage` scenario.

use switchboard::store::{DeviceRef, Store, layout};

use super::*;

const BATCH: usize = 1000;
const RECIPIENTS: u64 = 1000;

pub fn run(envelopes: usize, accounts: usize, size: usize, volumes: u64) -> Result<()> {
    println!(
        "storage: {envelopes} envelopes of {size} bytes, {accounts} accounts, {volumes} volumes"
    );
    let tmp = tempfile::tempdir().map_err(err)?;
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).map_err(err)?;
    let db_path = data.join("db");
    let store = Store::open(&db_path).map_err(err)?;

    // Accounts, through the registration transaction.
    let started = Instant::now();
    let nums = numbers(accounts.max(RECIPIENTS as usize + 1));
    register_accounts(&store, &nums)?;
    let accounts_took = started.elapsed();
    let after_accounts = switchboard::admin::dir_size(&db_path);

    let sender = DeviceRef {
        account_id: 1,
        device_id: 1,
    };
    let recipient = |i: usize| DeviceRef {
        account_id: 2 + (i as u64 % RECIPIENTS),
        device_id: 1,
    };
    let body = vec![0x3Cu8; size];
    let append = |round: u64| -> Result<(Duration, u64)> {
        let started = Instant::now();
        let mut live = 0u64;
        for chunk in 0..envelopes.div_ceil(BATCH) {
            let batch = chunk * BATCH..((chunk + 1) * BATCH).min(envelopes);
            for i in batch.clone() {
                store
                    .append(
                        sender,
                        "+14152000000",
                        message_id(round, i),
                        vec![(recipient(i), body.clone())],
                        1,
                        u64::MAX,
                    )
                    .map_err(err)?;
                // key 20 + value: time 8 + item (tag, ids, number, id, body)
                live += 20 + 8 + 1 + 1 + 1 + 13 + 16 + 3 + size as u64;
            }
            store.flush_blocking().map_err(err)?; // the group commit
            // The sender has its answers: the node drops their sent-id records
            // (not flushed; the next group commit carries the removals).
            for i in batch {
                store
                    .forget_sent(sender, message_id(round, i), 1)
                    .map_err(err)?;
            }
        }
        Ok((started.elapsed(), live))
    };
    let ack_all = || -> Result<Duration> {
        let started = Instant::now();
        for r in 0..RECIPIENTS {
            let device = DeviceRef {
                account_id: 2 + r,
                device_id: 1,
            };
            loop {
                let page = store.queue_page(device, None, 256).map_err(err)?;
                if page.is_empty() {
                    break;
                }
                let seqs: Vec<u64> = page.iter().map(|q| q.seq).collect();
                store.ack(device, "+14152000001", &seqs, 2).map_err(err)?;
            }
            // Receipts pile up in the sender's queue; it acknowledges them too.
            loop {
                let page = store.queue_page(sender, None, 256).map_err(err)?;
                if page.is_empty() {
                    break;
                }
                let seqs: Vec<u64> = page.iter().map(|q| q.seq).collect();
                store.ack(sender, "+14152000000", &seqs, 2).map_err(err)?;
            }
        }
        store.flush_blocking().map_err(err)?;
        Ok(started.elapsed())
    };

    let (append1, live) = append(1)?;
    let with_live = switchboard::admin::dir_size(&db_path);
    let queued_bytes = with_live.saturating_sub(after_accounts);
    let ack1 = ack_all()?;
    // The queue part (the data dir less its size with the accounts alone) after
    // each volume went through and was acknowledged.
    let mut emptied = vec![switchboard::admin::dir_size(&db_path).saturating_sub(after_accounts)];
    let mut later = (Duration::ZERO, Duration::ZERO);
    for round in 2..=volumes {
        let (append_took, _) = append(round)?;
        let ack_took = ack_all()?;
        later = (append_took, ack_took);
        emptied.push(switchboard::admin::dir_size(&db_path).saturating_sub(after_accounts));
    }
    // Leave 1M live envelopes for the open test.
    let (_, _) = append(volumes + 1)?;
    let with_live_again = switchboard::admin::dir_size(&db_path);
    // A clean shutdown's last write, as the node's.
    store.save_queue_totals().map_err(err)?;
    store.flush_blocking().map_err(err)?;
    drop(store);
    // sled lets go of its file lock within its 500 ms flush interval.
    std::thread::sleep(Duration::from_secs(1));

    // sled 0.34 writes its page-table snapshot only while it opens a database, so
    // an open replays every log write since the previous open: here, the whole
    // fill. A copy of the data dir as it is now lets sled alone replay the same log.
    let copy = tmp.path().join("copy");
    copy_dir(&db_path, &copy)?;

    // The node's first start after that clean shutdown (queue totals saved).
    let started = Instant::now();
    let node = node_on(&data, None)?;
    let open_took = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let open_rss = rss_bytes(node.pid());
    drop(node); // killed: what follows is a start after a crash
    // A start after a crash: no totals saved, so the node counts the queues; the
    // log since the previous open is short.
    let started = Instant::now();
    let node = node_on(&data, None)?;
    let crash_open_took = started.elapsed();
    drop(node);
    // The bare limits: sled alone opening the copy (the same replay as the node's
    // first start), then the data dir after the node's starts (a short replay).
    let started = Instant::now();
    let reopened = sled::open(&copy).map_err(err)?;
    let sled_first_open = started.elapsed();
    drop(reopened);
    std::fs::remove_dir_all(&copy).map_err(err)?;
    let started = Instant::now();
    let reopened = sled::open(&db_path).map_err(err)?;
    let sled_open_again = started.elapsed();
    drop(reopened);

    // Raw sled with the same keys, value sizes and group commit.
    let value_len = (live / envelopes.max(1) as u64) as usize - 20;
    let raw = raw_churn(&tmp.path().join("raw"), envelopes, value_len, volumes)?;

    let growth = |sizes: &[u64]| match sizes {
        [.., before, last] => *last as f64 / (*before).max(1) as f64,
        _ => 1.0,
    };
    let last = |sizes: &[u64]| sizes.last().copied().unwrap_or(0);
    let per_sec = |d: Duration| envelopes as f64 / d.as_secs_f64();
    let mib = |b: u64| b as f64 / 1048576.0;
    report(
        &[
            Figure {
                scenario: "storage",
                metric: "appends per second (group commit every 1000)".into(),
                unit: "1/s",
                node: per_sec(append1),
                limit: Some(per_sec(raw.append_took)),
            },
            Figure {
                scenario: "storage",
                metric: "acknowledgements per second (256 a batch)".into(),
                unit: "1/s",
                node: per_sec(ack1),
                limit: None,
            },
            Figure {
                scenario: "storage",
                metric: "queue bytes on disk per live envelope".into(),
                unit: "B",
                node: queued_bytes as f64 / envelopes.max(1) as f64,
                limit: Some(raw.filled as f64 / envelopes.max(1) as f64),
            },
            Figure {
                scenario: "storage",
                metric: "data dir / live bytes (queue part)".into(),
                unit: "x",
                node: queued_bytes as f64 / live.max(1) as f64,
                limit: Some(raw.filled as f64 / live.max(1) as f64),
            },
            Figure {
                scenario: "storage",
                metric: "queue part after all acknowledged".into(),
                unit: "MiB",
                node: mib(emptied[0]),
                limit: Some(mib(raw.emptied[0])),
            },
            Figure {
                scenario: "storage",
                metric: format!("queue part after volume {volumes}, acknowledged"),
                unit: "MiB",
                node: mib(last(&emptied)),
                limit: Some(mib(last(&raw.emptied))),
            },
            Figure {
                scenario: "storage",
                metric: format!("growth from volume {volumes}"),
                unit: "x",
                node: growth(&emptied),
                limit: Some(growth(&raw.emptied)),
            },
            Figure {
                scenario: "storage",
                metric: format!(
                    "open: node start with {accounts} accounts + {envelopes} queued"
                ),
                unit: "ms",
                node: open_took.as_secs_f64() * 1000.0,
                limit: Some(sled_first_open.as_secs_f64() * 1000.0),
            },
            Figure {
                scenario: "storage",
                metric: "open: restart after a crash (counts the queues)".into(),
                unit: "ms",
                node: crash_open_took.as_secs_f64() * 1000.0,
                limit: Some(sled_open_again.as_secs_f64() * 1000.0),
            },
            Figure {
                scenario: "storage",
                metric: "node RSS after opening".into(),
                unit: "MiB",
                node: open_rss / 1048576.0,
                limit: None,
            },
        ],
        &[
            format!(
                "accounts: {accounts} registered in {:.1}s ({:.0} MiB on disk)",
                accounts_took.as_secs_f64(),
                mib(after_accounts)
            ),
            format!(
                "data dir with accounts and {envelopes} live envelopes: {:.0} MiB; last volume append {:.1}s, ack {:.1}s; then filled again: {:.0} MiB",
                mib(with_live),
                later.0.as_secs_f64(),
                later.1.as_secs_f64(),
                mib(with_live_again)
            ),
            format!(
                "queue part after each volume (MiB): node {}; raw sled {}",
                sizes(&emptied),
                sizes(&raw.emptied)
            ),
            "live bytes: key + value of each queue entry; queue part: the data dir less its size with the accounts alone (so it holds the sent-id records too, each removed once its sender has the answer); limit: raw sled, same key and value sizes and flush cadence, the same churn (filled and emptied as often)".into(),
            "open: the first start after the fill and a clean shutdown (sled replays the whole log: it snapshots only at open), then a restart after the node was killed; limits: sled::open alone on a copy made before the first start, then on the data dir after the restarts".into(),
        ],
    );
    Ok(())
}

/// The client message id of envelope `i` of fill `round`.
fn message_id(round: u64, i: usize) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&round.to_be_bytes());
    id[8..].copy_from_slice(&(i as u64).to_be_bytes());
    id
}

/// Sizes in MiB, comma-separated.
fn sizes(bytes: &[u64]) -> String {
    let mib: Vec<String> = bytes
        .iter()
        .map(|b| format!("{:.0}", *b as f64 / 1048576.0))
        .collect();
    mib.join(", ")
}

/// Data dir sizes of raw sled through the same churn as the node's queues.
struct RawChurn {
    append_took: Duration,
    /// With every envelope live.
    filled: u64,
    /// After each volume, all removed.
    emptied: Vec<u64>,
}

/// Raw sled in `dir`: `envelopes` queue entries (the node's key layout, values of
/// `value_len` bytes) inserted with a flush every BATCH, all removed (flushing every
/// BATCH, like the acknowledgements), `volumes` times.
fn raw_churn(dir: &Path, envelopes: usize, value_len: usize, volumes: u64) -> Result<RawChurn> {
    let db = sled::open(dir).map_err(err)?;
    let tree = db.open_tree("queue").map_err(err)?;
    let value = vec![0x3Cu8; value_len];
    let fill = || -> Result<()> {
        for chunk in 0..envelopes.div_ceil(BATCH) {
            for i in chunk * BATCH..((chunk + 1) * BATCH).min(envelopes) {
                let recipient = layout::device(2 + (i as u64 % RECIPIENTS), 1);
                let seq = db.generate_id().map_err(err)?;
                tree.insert(layout::queue(recipient, seq), value.as_slice())
                    .map_err(err)?;
            }
            db.flush().map_err(err)?;
        }
        Ok(())
    };
    let remove_all = || -> Result<()> {
        let mut removed = 0;
        for key in tree.iter().keys() {
            tree.remove(key.map_err(err)?).map_err(err)?;
            removed += 1;
            if removed % BATCH == 0 {
                db.flush().map_err(err)?;
            }
        }
        db.flush().map_err(err)?;
        Ok(())
    };
    let started = Instant::now();
    fill()?;
    let append_took = started.elapsed();
    let filled = switchboard::admin::dir_size(dir);
    remove_all()?;
    let mut emptied = vec![switchboard::admin::dir_size(dir)];
    for _ in 2..=volumes {
        fill()?;
        remove_all()?;
        emptied.push(switchboard::admin::dir_size(dir));
    }
    Ok(RawChurn {
        append_took,
        filled,
        emptied,
    })
}
