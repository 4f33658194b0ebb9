//! The `backlog` scenario.

use super::*;

pub async fn run(envelopes: usize, size: usize) -> Result<()> {
    println!("backlog: {envelopes} envelopes of {size} bytes for one offline device");
    let senders = 16usize;
    let nums = numbers(senders + 1);
    let extra = format!(
        "[messages]\nmax_queued_per_device = {}\nenvelopes_per_account_minute = 1000000000\n",
        envelopes * 2 + 1000
    );
    let (server, fp) = start_node(&nums, &extra)?;
    let eps = endpoints(4)?;
    let (devices, _) = register_all(&server.addr, fp, &nums, &eps, 32).await?;
    let (receiver, senders_devs) = devices.split_first().ok_or("no devices")?;
    let to = receiver.number.to_string();
    let device_id = receiver.device_id;

    // Fill the queue: 16 senders with 32 sends in flight each.
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, d) in senders_devs.iter().enumerate() {
        let client = Arc::new(
            Client::connect_via(&eps[i % eps.len()], &server.addr, &d.creds, Some(fp))
                .await
                .map_err(err)?,
        );
        for _ in 0..32 {
            let (client, next, to) = (client.clone(), next.clone(), to.clone());
            tasks.spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < envelopes as u64 {
                    let outgoing = Outgoing {
                        expires_in_secs: 0,
                        id: switchboard::client::e2e::new_message_id(),
                        to: to.clone(),
                        envelopes: vec![DeviceEnvelope {
                            device_id,
                            body: vec![0x5A; size],
                        }],
                    };
                    client.send(outgoing).await.map_err(err)?;
                }
                Ok::<_, String>(())
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(err)??;
    }
    let fill = started.elapsed();
    let cpu0 = cpu_seconds(server.pid());

    // The receiver connects and drains.
    let client = Client::connect_via(&eps[0], &server.addr, &receiver.creds, Some(fp))
        .await
        .map_err(err)?;
    let started = Instant::now();
    let mut sub = client.subscribe().await.map_err(err)?;
    let queued = sub.queued;
    let mut got = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    while got < envelopes && Instant::now() < deadline {
        let push = sub.next().await.map_err(err)?.ok_or("stream ended")?;
        got += push.items.len();
        sub.ack(push.items.iter().map(|d| d.seq).collect())
            .await
            .map_err(err)?;
    }
    let received = started.elapsed();
    sub.finish().await.map_err(err)?;
    let acked = started.elapsed();
    let cpu = cpu_seconds(server.pid()) - cpu0;
    println!(
        "  queued {queued}, received {got}; filled in {:.2}s ({:.0} durable sends/s)",
        fill.as_secs_f64(),
        envelopes as f64 / fill.as_secs_f64()
    );
    report(
        &[
            Figure {
                scenario: "backlog",
                metric: format!("time to receive {envelopes} queued envelopes"),
                unit: "ms",
                node: received.as_secs_f64() * 1000.0,
                limit: None,
            },
            Figure {
                scenario: "backlog",
                metric: "time until all are acknowledged and durable".into(),
                unit: "ms",
                node: acked.as_secs_f64() * 1000.0,
                limit: None,
            },
            Figure {
                scenario: "backlog",
                metric: "node CPU for the drain".into(),
                unit: "ms",
                node: cpu * 1000.0,
                limit: None,
            },
            Figure {
                scenario: "backlog",
                metric: "filling: durable sends per second (16x32 in flight)".into(),
                unit: "msg/s",
                node: envelopes as f64 / fill.as_secs_f64(),
                limit: None,
            },
        ],
        &[],
    );
    Ok(())
}
