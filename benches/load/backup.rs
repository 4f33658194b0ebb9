//! The `backup` scenario.

use std::io::Write;

use switchboard::store::{DeviceRef, Store};

use super::*;

pub fn run(envelopes: usize, accounts: usize, size: usize) -> Result<()> {
    println!("backup: {envelopes} queued envelopes of {size} bytes, {accounts} accounts");
    let tmp = tempfile::tempdir().map_err(err)?;
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).map_err(err)?;
    let db_path = data.join("db");
    {
        let store = Store::open(&db_path).map_err(err)?;
        let nums = numbers(accounts.max(2));
        register_accounts(&store, &nums)?;
        let sender = DeviceRef {
            account_id: 1,
            device_id: 1,
        };
        let body = vec![0x3Cu8; size];
        for i in 0..envelopes {
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&(i as u64).to_be_bytes());
            let to = DeviceRef {
                account_id: 2 + (i as u64 % (accounts.max(2) as u64 - 1)),
                device_id: 1,
            };
            store
                .append(
                    sender,
                    "+14152000000",
                    id,
                    vec![(to, body.clone())],
                    1,
                    u64::MAX,
                )
                .map_err(err)?;
        }
        store.flush_blocking().map_err(err)?;
    }

    // Both read the same files; whichever runs first warms the page cache, so
    // the node's snapshot goes first (the raw limit gets the warm cache).
    // The node's snapshot: the code `admin backup` runs while writes wait.
    let backup_file = tmp.path().join("node.backup");
    let store = Store::open(&db_path).map_err(err)?;
    let started = Instant::now();
    let summary = {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&backup_file).map_err(err)?);
        let s = store.write_backup(&mut out, &[], |_| {}).map_err(err)?;
        out.flush().map_err(err)?;
        s
    };
    let snapshot = started.elapsed();
    drop(store);

    // Bare limit: raw sled, every tree iterated into a buffered file.
    let bare_file = tmp.path().join("bare.out");
    let db = sled::open(&db_path).map_err(err)?;
    let started = Instant::now();
    let (bare_entries, bare_bytes) = {
        let mut out = std::io::BufWriter::with_capacity(
            256 * 1024,
            std::fs::File::create(&bare_file).map_err(err)?,
        );
        let (mut n, mut bytes) = (0u64, 0u64);
        for name in db.tree_names() {
            let tree = db.open_tree(&name).map_err(err)?;
            for entry in tree.iter() {
                let (k, v) = entry.map_err(err)?;
                out.write_all(&k).map_err(err)?;
                out.write_all(&v).map_err(err)?;
                n += 1;
                bytes += (k.len() + v.len()) as u64;
            }
        }
        out.flush().map_err(err)?;
        (n, bytes)
    };
    let bare_iterate = started.elapsed();
    drop(db);

    // End to end: `switchboard admin backup` against the running release node.
    let node = node_on(&data, None)?;
    let cli_file = tmp.path().join("cli.backup");
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["admin", "backup"])
        .arg(&cli_file)
        .arg("--data")
        .arg(&data)
        .output()
        .map_err(err)?;
    let cli_backup = started.elapsed();
    if !out.status.success() {
        return Err(format!(
            "admin backup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    drop(node);

    // Restore, against raw sled inserting the same entries in batches.
    let restored = tmp.path().join("restored");
    let started = Instant::now();
    let input = std::io::BufReader::new(std::fs::File::open(&backup_file).map_err(err)?);
    switchboard::store::backup::restore(input, &restored, |_| {}).map_err(err)?;
    let restore = started.elapsed();
    let started = Instant::now();
    {
        let src = sled::open(&db_path).map_err(err)?;
        let dst = sled::open(tmp.path().join("bare-restored")).map_err(err)?;
        for name in src.tree_names() {
            let from = src.open_tree(&name).map_err(err)?;
            let to = dst.open_tree(&name).map_err(err)?;
            let mut batch = sled::Batch::default();
            let mut pending = 0;
            for entry in from.iter() {
                let (k, v) = entry.map_err(err)?;
                batch.insert(k, v);
                pending += 1;
                if pending == 4096 {
                    to.apply_batch(std::mem::take(&mut batch)).map_err(err)?;
                    pending = 0;
                }
            }
            to.apply_batch(batch).map_err(err)?;
        }
        dst.flush().map_err(err)?;
    }
    // Raw copy includes reading the source; the restore reads the backup file.
    let bare_restore = started.elapsed();

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "entries: {} (raw sled {bare_entries}), live key+value bytes {}, backup file {} bytes",
        summary.entries, bare_bytes, summary.bytes
    );
    report(
        &[
            Figure {
                scenario: "backup",
                metric: "snapshot time (writes wait this long)".into(),
                unit: "ms",
                node: ms(snapshot),
                limit: Some(ms(bare_iterate)),
            },
            Figure {
                scenario: "backup",
                metric: "`admin backup` on the running node, end to end".into(),
                unit: "ms",
                node: ms(cli_backup),
                limit: Some(ms(bare_iterate)),
            },
            Figure {
                scenario: "backup",
                metric: "restore into an empty data dir".into(),
                unit: "ms",
                node: ms(restore),
                limit: Some(ms(bare_restore)),
            },
        ],
        &[
            "limit for the snapshot: raw sled iterating every tree into a buffered file".into(),
            "limit for the restore: raw sled copying every tree into a new database in \
             4096-entry batches"
                .into(),
        ],
    );
    Ok(())
}
