//! The `connections` scenario.

use super::*;

pub async fn run(devices: usize, endpoint_count: usize) -> Result<()> {
    println!("connections: {devices} devices over {endpoint_count} endpoints");
    let nums = numbers(devices);
    let (server, fp) = start_node(&nums, "")?;
    let eps = endpoints(endpoint_count)?;
    let (registered, took) = register_all(&server.addr, fp, &nums, &eps, 128).await?;
    let reg_rate = registered.len() as f64 / took.as_secs_f64();
    println!(
        "  registered {} devices in {:.1}s",
        registered.len(),
        took.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = server.pid();
    let base_rss = rss_bytes(pid);

    // Connect every device, 256 handshakes in flight; then each proves it is
    // authenticated with a whoami. A device whose handshake fails tries again, as a
    // real client would, up to CONNECT_TRIES times; one whose whoami fails connects
    // again the same way.
    const CONNECT_TRIES: usize = 3;
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    let registered = Arc::new(registered);
    let connect = {
        let (registered, eps, addr) = (registered.clone(), eps.clone(), server.addr.clone());
        move |i: usize| {
            let (registered, endpoint, addr) =
                (registered.clone(), eps[i % eps.len()].clone(), addr.clone());
            async move {
                let mut tries = 0;
                loop {
                    tries += 1;
                    match Client::connect_via(&endpoint, &addr, &registered[i].creds, Some(fp))
                        .await
                    {
                        Ok(c) => return Ok((c, tries)),
                        Err(e) if tries >= CONNECT_TRIES => return Err(err(e)),
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
        }
    };
    for i in 0..registered.len() {
        let (gate, connect) = (gate.clone(), connect.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(err)?;
            connect(i).await.map(|(c, tries)| (i, c, tries))
        });
    }
    let mut clients = Vec::with_capacity(devices);
    let (mut failed, mut retried) = (0usize, 0usize);
    while let Some(done) = tasks.join_next().await {
        match done.map_err(err)? {
            Ok((i, c, tries)) => {
                retried += tries - 1;
                clients.push((i, c));
            }
            Err(_) => failed += 1,
        }
    }
    let handshake_rate = clients.len() as f64 / started.elapsed().as_secs_f64();
    let mut authenticated = 0usize;
    let mut unproven = Vec::new();
    for (chunk_no, chunk) in clients.chunks(512).enumerate() {
        let answers = futures_all(chunk.iter().map(|(_, c)| c.whoami())).await;
        for (j, answer) in answers.iter().enumerate() {
            match answer {
                Ok(_) => authenticated += 1,
                Err(e) => {
                    eprintln!("  whoami failed: {e}");
                    unproven.push(chunk_no * 512 + j);
                }
            }
        }
    }
    for slot in unproven {
        if let Ok((c, more)) = connect(clients[slot].0).await
            && c.whoami().await.is_ok()
        {
            retried += more;
            authenticated += 1;
            clients[slot].1 = c;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = rss_bytes(pid);
    let per_conn = (rss - base_rss) / clients.len().max(1) as f64;
    println!(
        "  node: {} connected ({failed} failed after {CONNECT_TRIES} tries, {retried} retries), {authenticated} authenticated; RSS {:.0} MiB -> {:.0} MiB",
        clients.len(),
        base_rss / 1048576.0,
        rss / 1048576.0
    );
    for (_, c) in clients.drain(..) {
        c.connection().close(0u32.into(), b"done");
    }
    drop(server);

    // Bare quinn: the same number of plain connections.
    let (bare_server, cert) = start_bare()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bare_pid = bare_server.pid();
    let bare_base = rss_bytes(bare_pid);
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..devices {
        let gate = gate.clone();
        let endpoint = eps[i % eps.len()].clone();
        let (addr, cert) = (bare_server.addr.clone(), cert.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(err)?;
            bare::connect(&endpoint, &addr, &cert).await
        });
    }
    let mut bare_conns = Vec::with_capacity(devices);
    while let Some(done) = tasks.join_next().await {
        if let Ok(Ok(c)) = done {
            bare_conns.push(c);
        }
    }
    let bare_rate = bare_conns.len() as f64 / started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let bare_rss = rss_bytes(bare_pid);
    let bare_per_conn = (bare_rss - bare_base) / bare_conns.len().max(1) as f64;
    println!("  bare: {} connected", bare_conns.len());

    report(
        &[
            Figure {
                scenario: "connections",
                metric: format!("idle devices held ({devices} tried)"),
                unit: "count",
                node: authenticated as f64,
                limit: Some(bare_conns.len() as f64),
            },
            Figure {
                scenario: "connections",
                metric: "server memory per idle connection".into(),
                unit: "KiB",
                node: per_conn / 1024.0,
                limit: Some(bare_per_conn / 1024.0),
            },
            Figure {
                scenario: "connections",
                metric: "handshakes per second (mTLS for the node)".into(),
                unit: "1/s",
                node: handshake_rate,
                limit: Some(bare_rate),
            },
            Figure {
                scenario: "connections",
                metric: "registrations per second (setup)".into(),
                unit: "1/s",
                node: reg_rate,
                limit: None,
            },
        ],
        &["limit: bare quinn server, default transport config, server-only TLS".into()],
    );
    Ok(())
}

async fn futures_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut out = Vec::new();
    // Sequential polling of a bounded chunk; each future is one request.
    let futures: Vec<F> = futures.collect();
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if results[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => results[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.extend(results.into_iter().flatten());
    out
}
