//! The `attachments` scenario: one 100 MiB file up and down through the node
//! (encrypted by the client, streamed, written to the node's disk, read back and
//! decrypted), and 1,000 files of 100 KiB (8 at a time), beside bare quinn streams
//! moving the same bytes to and from a bare server in the same run; with the node's
//! RSS before and at its peak during the transfers.

use std::sync::atomic::{AtomicBool, Ordering};

use switchboard::client::attachment::{self, Attachment, DownloadState};

use super::*;

/// Samples a process's RSS every 20 ms until stopped; its peak.
struct RssPeak {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl RssPeak {
    fn start(pid: u32) -> RssPeak {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while !flag.load(Ordering::Acquire) {
                peak = peak.max(rss_bytes(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        RssPeak { stop, thread }
    }

    fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or(0.0)
    }
}

fn random_file(path: &std::path::Path, len: usize) -> Result<()> {
    use rand::RngExt;
    let mut bytes = vec![0u8; len];
    rand::rng().fill(&mut bytes[..]);
    std::fs::write(path, bytes).map_err(err)
}

pub async fn run(big_mib: usize, small: usize, small_kib: usize, concurrency: usize) -> Result<()> {
    let big = big_mib << 20;
    let small_len = small_kib << 10;
    println!(
        "attachments: one {big_mib} MiB file, {small} files of {small_kib} KiB ({concurrency} at a time)"
    );
    let nums = numbers(1);
    let (server, fp) = start_node(
        &nums,
        "[attachments]\nmax_bytes = 1099511627776\nmax_stored_bytes_per_account = 17592186044416\n\
         max_in_flight_bytes_per_account = 17592186044416\ndelete_when_downloaded = false",
    )?;
    let eps = endpoints(1)?;
    let (devices, _) = register_all(&server.addr, fp, &nums, &eps, 1).await?;
    let device = devices.first().ok_or("no device")?;
    let client = Arc::new(
        Client::connect_via(&eps[0], &server.addr, &device.creds, Some(fp))
            .await
            .map_err(err)?,
    );
    let dir = tempfile::tempdir().map_err(err)?;
    let big_path = dir.path().join("big.bin");
    random_file(&big_path, big)?;
    let key = [7u8; 32];

    // Warm up (buffers, caches), so RSS is measured from a steady state.
    let warm = dir.path().join("warm.bin");
    random_file(&warm, 8 << 20)?;
    let up = client
        .upload_file(&warm, &key, 0, None, &mut |_, _| {})
        .await
        .map_err(|f| f.error.to_string())?;
    download(&client, &key, &up, dir.path().join("warm.out")).await?;

    let pid = server.pid();
    let rss_before = rss_bytes(pid);
    let peak = RssPeak::start(pid);
    let started = Instant::now();
    let up = client
        .upload_file(&big_path, &key, 0, None, &mut |_, _| {})
        .await
        .map_err(|f| f.error.to_string())?;
    let upload_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    download(&client, &key, &up, dir.path().join("big.out")).await?;
    let download_s = started.elapsed().as_secs_f64();
    let rss_peak = peak.finish();
    let cipher = attachment::ciphertext_len(big as u64) as f64;

    // Small files, `concurrency` at a time.
    let mut paths = Vec::new();
    for i in 0..small {
        let p = dir.path().join(format!("s{i}.bin"));
        random_file(&p, small_len)?;
        paths.push(p);
    }
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for p in paths.clone() {
        let (client, gate) = (client.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(err)?;
            client
                .upload_file(&p, &key, 0, None, &mut |_, _| {})
                .await
                .map_err(|f| f.error.to_string())
        });
    }
    let mut uploads = Vec::new();
    while let Some(done) = tasks.join_next().await {
        uploads.push(done.map_err(err)??);
    }
    let small_up_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, up) in uploads.into_iter().enumerate() {
        let (client, gate) = (client.clone(), gate.clone());
        let out = dir.path().join(format!("s{i}.out"));
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(err)?;
            download(&client, &key, &up, out).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(err)??;
    }
    let small_down_s = started.elapsed().as_secs_f64();
    let small_cipher = attachment::ciphertext_len(small_len as u64) as f64 * small as f64;

    // The bare limit: the same ciphertext bytes over bare quinn streams.
    let (bare, cert) = start_bare()?;
    let conn = Arc::new(bare::connect(&eps[0], &bare.addr, &cert).await?);
    let started = Instant::now();
    bare::sink(&conn, cipher as u64).await?;
    let bare_up_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    bare::source(&conn, cipher as u64).await?;
    let bare_down_s = started.elapsed().as_secs_f64();
    let per = attachment::ciphertext_len(small_len as u64);
    let bare_small_up_s = bare_small(&conn, &gate, small, per, true).await?;
    let bare_small_down_s = bare_small(&conn, &gate, small, per, false).await?;

    let mib = |bytes: f64, s: f64| bytes / s / f64::from(1u32 << 20);
    println!("| transfer | switchboard MiB/s | bare quinn MiB/s | ratio |");
    println!("| --- | --- | --- | --- |");
    for (what, bytes, ours, theirs) in [
        (format!("{big_mib} MiB upload"), cipher, upload_s, bare_up_s),
        (
            format!("{big_mib} MiB download"),
            cipher,
            download_s,
            bare_down_s,
        ),
        (
            format!("{small} × {small_kib} KiB upload"),
            small_cipher,
            small_up_s,
            bare_small_up_s,
        ),
        (
            format!("{small} × {small_kib} KiB download"),
            small_cipher,
            small_down_s,
            bare_small_down_s,
        ),
    ] {
        println!(
            "| {what} | {:.1} | {:.1} | {:.2} |",
            mib(bytes, ours),
            mib(bytes, theirs),
            theirs / ours
        );
    }
    println!(
        "node RSS: {:.1} MiB before the {big_mib} MiB upload and download, {:.1} MiB at its peak \
         during them (+{:.1} MiB)",
        rss_before / 1048576.0,
        rss_peak / 1048576.0,
        (rss_peak - rss_before) / 1048576.0
    );
    drop(bare);
    drop(server);
    Ok(())
}

/// `n` bare transfers of `len` bytes (to the sink, or from the source), as many at a
/// time as `gate` lets; the seconds they took.
async fn bare_small(
    conn: &Arc<quinn::Connection>,
    gate: &Arc<Semaphore>,
    n: usize,
    len: u64,
    up: bool,
) -> Result<f64> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (conn, gate) = (conn.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(err)?;
            if up {
                bare::sink(&conn, len).await
            } else {
                bare::source(&conn, len).await
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(err)??;
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn download(
    client: &Client,
    key: &[u8; 32],
    up: &attachment::Uploaded,
    out: std::path::PathBuf,
) -> Result<()> {
    let att = Attachment {
        id: up.id,
        key: *key,
        size: up.size,
        digest: up.digest,
        name: String::new(),
        mime: String::new(),
        thumbnail: None,
        caption: String::new(),
    };
    let mut file = tokio::fs::File::create(&out).await.map_err(err)?;
    let mut state = DownloadState::default();
    client
        .download_into(&att, &mut file, &mut state, &mut |_, _| {})
        .await
        .map_err(err)?;
    if state.digest() != up.digest {
        return Err("a download came back different".into());
    }
    let _ = std::fs::remove_file(&out);
    Ok(())
}
