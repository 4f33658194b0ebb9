//! `reconnect`: devices that come back. Each loop connects, asks `WhoAmI` (the node
//! authenticates the device by its TLS key) and closes, again and again. Three
//! phases in one run: with a `Connector` per device (TLS session resumed), with a
//! fresh configuration each time (full handshake: certificates and signatures both
//! ways), and bare quinn against the bare server (full, then resumed), each a
//! connect and one request round trip.

use std::sync::atomic::AtomicUsize;

use switchboard::client::Connector;

use super::*;

/// Runs `loops` copies of `attempt` for `duration`; returns reconnects per second
/// and failures.
async fn measure<F, Fut>(loops: usize, duration: Duration, attempt: F) -> (f64, usize)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let attempt = Arc::new(attempt);
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..loops {
        let (attempt, done, failed) = (attempt.clone(), done.clone(), failed.clone());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(10), attempt(i)).await {
                    Ok(Ok(())) => done.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    (rate, failed.load(Ordering::Relaxed))
}

pub async fn run(devices: usize, concurrency: usize, duration: Duration) -> Result<()> {
    println!(
        "reconnect: {devices} devices, {concurrency} reconnect loops, {}s per phase",
        duration.as_secs()
    );
    let nums = numbers(devices);
    let (server, fp) = start_node(&nums, "")?;
    let eps = endpoints(4)?;
    let (registered, _) = register_all(&server.addr, fp, &nums, &eps, 32).await?;
    let registered = Arc::new(registered);
    let addr = server.addr.clone();
    let eps = Arc::new(eps);

    // Resumed: one connector per device, warmed with one full handshake.
    let connectors: Arc<Vec<Connector>> = Arc::new(
        registered
            .iter()
            .map(|d| Connector::new(&addr, &d.creds, Some(fp)))
            .collect::<std::result::Result<_, _>>()
            .map_err(err)?,
    );
    for (i, c) in connectors.iter().enumerate() {
        let client = c.connect_via(&eps[i % eps.len()]).await.map_err(err)?;
        client.whoami().await.map_err(err)?;
        client.connection().close(0u32.into(), b"");
    }
    let warm: u64 = connectors.iter().map(Connector::full_handshakes).sum();
    let cpu0 = cpu_seconds(server.pid());
    let (resumed, resumed_failed) = {
        let (connectors, eps) = (connectors.clone(), eps.clone());
        measure(concurrency, duration, move |i| {
            let (connectors, eps) = (connectors.clone(), eps.clone());
            async move {
                let d = i % connectors.len();
                let client = connectors[d]
                    .connect_via(&eps[d % eps.len()])
                    .await
                    .map_err(err)?;
                client.whoami().await.map_err(err)?;
                client.connection().close(0u32.into(), b"");
                Ok(())
            }
        })
        .await
    };
    let resumed_cpu = cpu_seconds(server.pid()) - cpu0;
    let full_during_resumed = connectors
        .iter()
        .map(Connector::full_handshakes)
        .sum::<u64>()
        - warm;

    // Full: a fresh TLS configuration every time.
    let cpu0 = cpu_seconds(server.pid());
    let (full, full_failed) = {
        let (registered, eps, addr) = (registered.clone(), eps.clone(), addr.clone());
        measure(concurrency, duration, move |i| {
            let (registered, eps, addr) = (registered.clone(), eps.clone(), addr.clone());
            async move {
                let d = i % registered.len();
                let client =
                    Client::connect_via(&eps[d % eps.len()], &addr, &registered[d].creds, Some(fp))
                        .await
                        .map_err(err)?;
                client.whoami().await.map_err(err)?;
                client.connection().close(0u32.into(), b"");
                Ok(())
            }
        })
        .await
    };
    let full_cpu = cpu_seconds(server.pid()) - cpu0;
    drop(server);

    // Bare quinn: a connect and one request round trip, full and resumed.
    let (bare_server, cert) = start_bare()?;
    let bare_addr = bare_server.addr.clone();
    let cert = Arc::new(cert);
    let cpu0 = cpu_seconds(bare_server.pid());
    let (bare_full, _) = {
        let (eps, bare_addr, cert) = (eps.clone(), bare_addr.clone(), cert.clone());
        measure(concurrency, duration, move |i| {
            let (eps, bare_addr, cert) = (eps.clone(), bare_addr.clone(), cert.clone());
            async move {
                let config = bare::client_config(&cert)?;
                let conn = bare::connect_with(&eps[i % eps.len()], &bare_addr, config).await?;
                bare::send(&conn, u32::MAX, vec![1]).await?;
                conn.close(0u32.into(), b"");
                Ok(())
            }
        })
        .await
    };
    let bare_full_cpu = cpu_seconds(bare_server.pid()) - cpu0;
    let configs: Arc<Vec<quinn::ClientConfig>> = Arc::new(
        (0..devices)
            .map(|_| bare::client_config(&cert))
            .collect::<Result<_>>()?,
    );
    let cpu0 = cpu_seconds(bare_server.pid());
    let (bare_resumed, _) = {
        let (eps, bare_addr, configs) = (eps.clone(), bare_addr.clone(), configs.clone());
        measure(concurrency, duration, move |i| {
            let (eps, bare_addr, configs) = (eps.clone(), bare_addr.clone(), configs.clone());
            async move {
                let d = i % configs.len();
                let conn =
                    bare::connect_with(&eps[d % eps.len()], &bare_addr, configs[d].clone()).await?;
                bare::send(&conn, u32::MAX, vec![1]).await?;
                conn.close(0u32.into(), b"");
                Ok(())
            }
        })
        .await
    };
    let bare_resumed_cpu = cpu_seconds(bare_server.pid()) - cpu0;
    drop(bare_server);

    let per = |cpu: f64, rate: f64| cpu * 1e6 / (rate * duration.as_secs_f64()).max(1.0);
    report(
        &[
            Figure {
                scenario: "reconnect",
                metric: "resumed: connect + WhoAmI + close per second".into(),
                unit: "1/s",
                node: resumed,
                limit: Some(bare_resumed),
            },
            Figure {
                scenario: "reconnect",
                metric: "full handshake: connect + WhoAmI + close per second".into(),
                unit: "1/s",
                node: full,
                limit: Some(bare_full),
            },
            Figure {
                scenario: "reconnect",
                metric: "node CPU per resumed reconnect".into(),
                unit: "us",
                node: per(resumed_cpu, resumed),
                limit: Some(per(bare_resumed_cpu, bare_resumed)),
            },
            Figure {
                scenario: "reconnect",
                metric: "node CPU per full reconnect".into(),
                unit: "us",
                node: per(full_cpu, full),
                limit: Some(per(bare_full_cpu, bare_full)),
            },
        ],
        &[
            format!(
                "resumed phase: {full_during_resumed} of its connects needed a full handshake; \
                 failures: resumed {resumed_failed}, full {full_failed}"
            ),
            "limit: bare quinn (same TLS 1.3 and transport settings, server authentication \
             only) connecting and making one request round trip; resumed limit reuses one \
             client configuration per device as the Connector does"
                .into(),
        ],
    );
    Ok(())
}
