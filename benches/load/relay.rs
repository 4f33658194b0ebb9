//! The `relay` scenario.

use super::*;

/// Results of one system (node or bare) at saturation and at half load.
pub(super) struct Run {
    pub(super) saturated: f64,
    pub(super) half_rate: f64,
    pub(super) latencies: Latencies,
    pub(super) cpu_per_message_us: f64,
    /// Cores used while saturated and at half load: (server, load generator).
    pub(super) saturated_cores: (f64, f64),
    pub(super) half_load_cores: (f64, f64),
    /// The saturated phase's sends (with warm-up and drain).
    pub(super) sends: String,
    /// The node's `switchboard_handoff_items_total` by outcome, over the whole run.
    pub(super) handoff: Vec<(String, f64)>,
    /// What went over the wire per delivered message while saturated.
    pub(super) wire: String,
    /// Delivery streams the node ended (0 in a good run).
    pub(super) streams_ended: u64,
    /// Messages delivered over the whole run, measured or not (set by
    /// [`relay_through`] once its receivers are done; 0 elsewhere).
    pub(super) seen: u64,
}

/// A load generator's connection to the system under test.
pub(super) trait Wire {
    fn quic(&self) -> &quinn::Connection;
}

impl Wire for Client {
    fn quic(&self) -> &quinn::Connection {
        self.connection()
    }
}

impl Wire for quinn::Connection {
    fn quic(&self) -> &quinn::Connection {
        self
    }
}

/// The generator's connections' statistics, summed: what the server sent is what
/// they received.
#[derive(Default, Clone, Copy)]
struct WireCount {
    server_datagrams: u64,
    client_datagrams: u64,
    server_acks: u64,
    server_stream_frames: u64,
    server_flow_frames: u64,
    client_acks: u64,
    /// STOP_SENDING, RESET_STREAM, PING, blocked and other control frames.
    other: u64,
}

impl WireCount {
    fn of<C: Wire>(clients: &[Arc<C>]) -> Self {
        let mut c = Self::default();
        for client in clients {
            let s = client.quic().stats();
            c.server_datagrams += s.udp_rx.datagrams;
            c.client_datagrams += s.udp_tx.datagrams;
            c.server_acks += s.frame_rx.acks;
            c.server_stream_frames += s.frame_rx.stream;
            c.server_flow_frames +=
                s.frame_rx.max_data + s.frame_rx.max_stream_data + s.frame_rx.max_streams_bidi;
            c.client_acks += s.frame_tx.acks;
            let f = s.frame_rx;
            c.other += f.ping
                + f.immediate_ack
                + f.ack_frequency
                + f.stream_data_blocked
                + f.data_blocked
                + f.streams_blocked_bidi
                + f.new_connection_id
                + f.reset_stream
                + f.stop_sending;
        }
        c
    }

    /// Per message delivered between `self` (earlier) and `later`.
    fn per_message(&self, later: &Self, messages: f64) -> String {
        let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / messages.max(1.0);
        format!(
            "per message: server sent {:.2} datagrams ({:.2} ACK, {:.2} STREAM, {:.2} flow-control frames, {:.2} other frames), received {:.2} ({:.2} ACK frames)",
            per(self.server_datagrams, later.server_datagrams),
            per(self.server_acks, later.server_acks),
            per(self.server_stream_frames, later.server_stream_frames),
            per(self.server_flow_frames, later.server_flow_frames),
            per(self.other, later.other),
            per(self.client_datagrams, later.client_datagrams),
            per(self.client_acks, later.client_acks),
        )
    }
}

/// The hand-off counters from the node's metrics endpoint.
fn handoff_counts(url: &str) -> Vec<(String, f64)> {
    let Ok(mut response) = ureq::get(url).call() else {
        return Vec::new();
    };
    let Ok(text) = response.body_mut().read_to_string() else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("switchboard_handoff_items_total{outcome=\"")?;
            let (outcome, value) = rest.split_once("\"} ")?;
            Some((outcome.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

pub async fn run(
    pairs: usize,
    window: usize,
    duration: Duration,
    size: usize,
    devices: usize,
) -> Result<()> {
    let pairs = pairs.max(1);
    let devices = devices.clamp(1, 5);
    println!(
        "relay: {pairs} pairs of accounts with {devices} device(s) each, window {window}, \
         {size}-byte envelopes, {duration:?} per phase"
    );
    let node = node_run(pairs, window, duration, size, devices, None).await?;
    // The bare relay's latency is measured at the node's half load, the same
    // absolute rate, so the two latencies compare like with like.
    let bare = bare_run(pairs, window, duration, size, devices, node.half_rate).await?;
    let p = |v: &[u64], q| percentile(v, q) / 1000.0;
    let (what, per) = if devices > 1 {
        (
            format!("delivered envelopes/s, {pairs} pairs × {devices} devices, saturated"),
            "server CPU per delivered envelope",
        )
    } else {
        (
            format!("delivered messages/s, {pairs} pairs, saturated"),
            "server CPU per delivered message",
        )
    };
    let figures = vec![
        Figure {
            scenario: "relay",
            metric: what,
            unit: "msg/s",
            node: node.saturated,
            limit: Some(bare.saturated),
        },
        Figure {
            scenario: "relay",
            metric: "offered load for the latency phase".into(),
            unit: "msg/s",
            node: node.half_rate,
            limit: Some(bare.half_rate),
        },
        Figure {
            scenario: "relay",
            metric: "latency p50 at the node's half load".into(),
            unit: "µs",
            node: p(&node.latencies.sorted, 0.50),
            limit: Some(p(&bare.latencies.sorted, 0.50)),
        },
        Figure {
            scenario: "relay",
            metric: "latency p99 at the node's half load".into(),
            unit: "µs",
            node: p(&node.latencies.sorted, 0.99),
            limit: Some(p(&bare.latencies.sorted, 0.99)),
        },
        Figure {
            scenario: "relay",
            metric: "latency p99.9 at the node's half load".into(),
            unit: "µs",
            node: p(&node.latencies.sorted, 0.999),
            limit: Some(p(&bare.latencies.sorted, 0.999)),
        },
        Figure {
            scenario: "relay",
            metric: per.into(),
            unit: "µs",
            node: node.cpu_per_message_us,
            limit: Some(bare.cpu_per_message_us),
        },
    ];
    let mut notes = vec![
        "limit: bare quinn relay (same streams and frames, same UDP buffers and ACK frequency; no storage, no auth, no acks, no receipts)".to_string(),
        "switchboard answers a send once every recipient device acknowledged it or it is durable (group commit), and answers every delivery with a receipt".to_string(),
    ];
    if devices > 1 {
        notes.push(format!(
            "fan-out: every device sends; a send is one envelope per device of the partner account ({devices}); the bare relay sends one stream carrying the {devices} inbox ids, handed to each"
        ));
    }
    for (name, r) in [("switchboard", &node), ("bare quinn", &bare)] {
        notes.push(format!(
            "{name} saturated: cores used: server {:.2}, load generator {:.2}; {}",
            r.saturated_cores.0, r.saturated_cores.1, r.sends
        ));
        notes.push(format!("{name} saturated, {}", r.wire));
        let per_second: Vec<String> = r
            .latencies
            .p99_per_second
            .iter()
            .map(|ns| format!("{:.1}", ns / 1e6))
            .collect();
        notes.push(format!(
            "{name} at half load: p99 of each second (ms) [{}]; cores used: server {:.2}, load generator {:.2}",
            per_second.join(", "),
            r.half_load_cores.0,
            r.half_load_cores.1
        ));
    }
    if node.streams_ended > 0 {
        notes.push(format!(
            "the node ended {} delivery streams during the run",
            node.streams_ended
        ));
    }
    if !node.handoff.is_empty() {
        let counts: Vec<String> = node
            .handoff
            .iter()
            .map(|(outcome, n)| format!("{outcome} {n}"))
            .collect();
        notes.push(format!(
            "hand-off (messages and receipts held in memory), whole run: {}",
            counts.join(", ")
        ));
    }
    report(&figures, &notes);
    Ok(())
}

pub(super) async fn node_run(
    pairs: usize,
    window: usize,
    duration: Duration,
    size: usize,
    per_account: usize,
    half_rate: Option<f64>,
) -> Result<Run> {
    let nums = numbers(2 * pairs);
    let (server, fp) = start_node_lines(
        &nums,
        "[metrics]\nenabled = true\nlisten = \"127.0.0.1:0\"\n\
         [accounts]\nlink_joins_per_address_hour = 1000000\n\
         [messages]\nenvelopes_per_account_minute = 1000000000",
        2,
    )?;
    let metrics_url = server.lines[2]
        .strip_prefix("metrics on ")
        .ok_or("no metrics line")?
        .to_string();
    let eps = endpoints(4)?;
    let (primaries, took) = register_all(&server.addr, fp, &nums, &eps, 64).await?;
    println!(
        "  node: registered {} devices in {:.1}s",
        primaries.len(),
        took.as_secs_f64()
    );
    let devices = link_companions(&server.addr, fp, primaries, per_account, &eps).await?;
    let mut run = relay_through(
        std::slice::from_ref(&server.addr),
        &[server.pid()],
        fp,
        &devices,
        &eps,
        Shape {
            per_account,
            window,
            duration,
            half_rate,
            size,
        },
    )
    .await?;
    run.handoff = handoff_counts(&metrics_url);
    Ok(run)
}

/// What a relay run sends: devices per account, sends in flight per device, seconds
/// per phase, envelope bytes.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub(super) per_account: usize,
    pub(super) window: usize,
    pub(super) duration: Duration,
    pub(super) size: usize,
    /// Delivered envelopes/s offered in the latency phase (default: half the
    /// saturated rate).
    pub(super) half_rate: Option<f64>,
}

/// The relay's measurement through the nodes at `addrs` (processes `pids`): device
/// `i` connects to `addrs[i % addrs.len()]`, sends to its partner account (`i ^ 1`
/// by account) and acknowledges everything pushed to it.
pub(super) async fn relay_through(
    addrs: &[String],
    pids: &[u32],
    fp: Fingerprint,
    devices: &[Device],
    eps: &[quinn::Endpoint],
    shape: Shape,
) -> Result<Run> {
    let Shape {
        per_account,
        window,
        duration,
        size,
        half_rate,
    } = shape;
    let base = Instant::now();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let addr = &addrs[i % addrs.len()];
        let client = Client::connect_via(&eps[i % eps.len()], addr, &d.creds, Some(fp))
            .await
            .map_err(err)?;
        clients.push(Arc::new(client));
    }
    // Receivers: every device subscribes and acknowledges each push as it comes.
    // (Acknowledging all pushes already there in one `Ack`, with
    // `Subscription::ready`, made no difference we could measure: 0.38-0.46 of
    // bare quinn in four runs, 0.43 in a run of the same hour without it.)
    let mut receivers = tokio::task::JoinSet::new();
    for client in &clients {
        let mut sub = client.subscribe().await.map_err(err)?;
        let (tally, stop) = (tally.clone(), stop.clone());
        receivers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let first = match tokio::time::timeout(Duration::from_millis(500), sub.next()).await
                {
                    Ok(Ok(Some(first))) => first,
                    Err(_) => continue,
                    // The node ended the delivery stream (or the connection).
                    Ok(_) => {
                        tally.streams_ended.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                };
                let mut seqs = Vec::with_capacity(first.items.len());
                for d in &first.items {
                    seqs.push(d.seq);
                    if let Item::Message(m) = &d.item {
                        tally.record(latency_of(base, &m.body));
                    }
                }
                if !seqs.is_empty() && sub.ack(seqs).await.is_err() {
                    break;
                }
            }
        });
    }
    let send_one = {
        let devices: Arc<Vec<(String, u32)>> = Arc::new(
            devices
                .iter()
                .map(|d| (d.number.to_string(), d.device_id))
                .collect(),
        );
        move |client: Arc<Client>, me: usize| {
            let devices = devices.clone();
            async move {
                let partner = (me / per_account) ^ 1;
                let theirs = &devices[partner * per_account..(partner + 1) * per_account];
                let body = payload(base, size);
                let outgoing = Outgoing {
                    expires_in_secs: 0,
                    id: switchboard::client::e2e::new_message_id(),
                    to: theirs[0].0.clone(),
                    envelopes: theirs
                        .iter()
                        .map(|(_, device_id)| DeviceEnvelope {
                            device_id: *device_id,
                            body: body.clone(),
                        })
                        .collect(),
                };
                client.send(outgoing).await.is_ok()
            }
        }
    };
    let mut run = measure(
        &clients,
        &tally,
        window,
        duration,
        pids,
        Offered {
            half_rate,
            envelopes_per_send: per_account,
        },
        send_one,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    while receivers.join_next().await.is_some() {}
    run.seen = tally.seen.load(Ordering::Relaxed);
    Ok(run)
}

async fn bare_run(
    pairs: usize,
    window: usize,
    duration: Duration,
    size: usize,
    per_account: usize,
    half_rate: f64,
) -> Result<Run> {
    let (server, cert) = start_bare()?;
    let eps = endpoints(4)?;
    let base = Instant::now();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (clients, mut receivers) = bare_inboxes(
        2 * pairs * per_account,
        &eps,
        &server,
        &cert,
        base,
        &tally,
        &stop,
    )
    .await?;
    let send_one = move |conn: Arc<quinn::Connection>, me: usize| async move {
        if per_account == 1 {
            return bare::send(&conn, (me ^ 1) as u32, payload(base, size))
                .await
                .is_ok();
        }
        let partner = (me / per_account) ^ 1;
        let inboxes: Vec<u32> = (partner * per_account..(partner + 1) * per_account)
            .map(|i| i as u32)
            .collect();
        bare::send_many(&conn, &inboxes, payload(base, size))
            .await
            .is_ok()
    };
    let run = measure(
        &clients,
        &tally,
        window,
        duration,
        &[server.pid()],
        Offered {
            half_rate: Some(half_rate),
            envelopes_per_send: per_account,
        },
        send_one,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    while receivers.join_next().await.is_some() {}
    Ok(run)
}

/// `n` connections to the bare relay, each subscribed to its inbox (its index), with
/// a task per inbox recording each body's latency until `stop`.
pub(super) async fn bare_inboxes(
    n: usize,
    eps: &[quinn::Endpoint],
    server: &Server,
    cert: &[u8],
    base: Instant,
    tally: &Arc<Tally>,
    stop: &Arc<AtomicBool>,
) -> Result<(Vec<Arc<quinn::Connection>>, tokio::task::JoinSet<()>)> {
    let mut conns = Vec::new();
    let mut receivers = tokio::task::JoinSet::new();
    for i in 0..n {
        let conn = bare::connect(&eps[i % eps.len()], &server.addr, cert).await?;
        let mut inbox = bare::subscribe(&conn, i as u32).await?;
        let (tally, stop) = (tally.clone(), stop.clone());
        receivers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(Ok(Some(body))) = tokio::time::timeout(
                    Duration::from_millis(500),
                    switchboard::proto::frame::read::<Vec<u8>, _>(&mut inbox, 1 << 20),
                )
                .await
                else {
                    continue;
                };
                tally.record(latency_of(base, &body));
            }
        });
        conns.push(Arc::new(conn));
    }
    Ok((conns, receivers))
}

/// Links `per_account - 1` devices to each primary (through the node's link requests;
/// the sealed payloads are opaque to the node, so the generator sends placeholders).
/// Returns every device, account by account, primary first.
pub(super) async fn link_companions(
    addr: &str,
    fp: Fingerprint,
    primaries: Vec<Device>,
    per_account: usize,
    eps: &[quinn::Endpoint],
) -> Result<Vec<Device>> {
    if per_account <= 1 {
        return Ok(primaries);
    }
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, primary) in primaries.into_iter().enumerate() {
        let (gate, addr, endpoint) = (gate.clone(), addr.to_string(), eps[i % eps.len()].clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(err)?;
            let owner = Client::connect_via(&endpoint, &addr, &primary.creds, Some(fp))
                .await
                .map_err(err)?;
            let mut account = Vec::with_capacity(per_account);
            for _ in 1..per_account {
                let (nameplate, _) = owner.link_open(vec![1; 33]).await.map_err(err)?;
                let (creds, _) = Credentials::generate_device().map_err(err)?;
                let joiner = Client::connect_via(&endpoint, &addr, &creds, Some(fp))
                    .await
                    .map_err(err)?;
                joiner
                    .link_join(nameplate, vec![2; 33])
                    .await
                    .map_err(err)?;
                joiner
                    .link_request(nameplate, vec![3; 64])
                    .await
                    .map_err(err)?;
                owner.link_poll(nameplate).await.map_err(err)?;
                let device_id = owner
                    .link_grant(nameplate, "bench", vec![4; 64])
                    .await
                    .map_err(err)?;
                joiner.link_poll(nameplate).await.map_err(err)?;
                joiner.close().await;
                account.push(Device {
                    number: primary.number.clone(),
                    creds,
                    device_id,
                });
            }
            owner.close().await;
            account.insert(0, primary);
            Ok::<_, String>((i, account))
        });
    }
    let mut accounts = Vec::new();
    while let Some(done) = tasks.join_next().await {
        accounts.push(done.map_err(err)??);
    }
    accounts.sort_by_key(|(i, _)| *i);
    let devices: Vec<Device> = accounts.into_iter().flat_map(|(_, a)| a).collect();
    println!(
        "  node: linked {} more devices in {:.1}s",
        devices.len() - devices.len() / per_account,
        started.elapsed().as_secs_f64()
    );
    Ok(devices)
}

/// What the latency phase offers: `half_rate` delivered envelopes/s (default: half the
/// saturated rate), a send delivering `envelopes_per_send`.
pub(super) struct Offered {
    pub(super) half_rate: Option<f64>,
    pub(super) envelopes_per_send: usize,
}

/// Saturation phase, then a latency phase at `half_rate` (default: half the
/// measured saturation); both bounded by `duration`.
pub(super) async fn measure<C, F, Fut>(
    clients: &[Arc<C>],
    tally: &Arc<Tally>,
    window: usize,
    duration: Duration,
    pids: &[u32],
    offered: Offered,
    send_one: F,
) -> Run
where
    C: Wire + Send + Sync + 'static,
    F: Fn(Arc<C>, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    // Saturation.
    let phase_stop = Arc::new(AtomicBool::new(false));
    let sends = Arc::new(Sends::default());
    let senders = spawn_senders(
        clients,
        &phase_stop,
        Pace::Saturate { window },
        &sends,
        send_one.clone(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await; // warm-up
    let me = std::process::id();
    let (cpu0, generator0, wall0) = (servers_cpu(pids), cpu_seconds(me), Instant::now());
    let wire0 = WireCount::of(clients);
    let (saturated, _) = tally.phase(duration).await;
    let wire = wire0.per_message(
        &WireCount::of(clients),
        saturated * wall0.elapsed().as_secs_f64(),
    );
    let cpu = servers_cpu(pids) - cpu0;
    let wall = wall0.elapsed().as_secs_f64();
    let saturated_cores = (cpu / wall, (cpu_seconds(me) - generator0) / wall);
    let delivered = saturated * duration.as_secs_f64();
    phase_stop.store(true, Ordering::Relaxed);
    drain(senders).await;
    // The latency phase starts on empty queues: a node that accepted faster than it
    // delivered first delivers what it holds.
    tally.settle().await;

    // Half load, open loop.
    let Offered {
        half_rate,
        envelopes_per_send,
    } = offered;
    let half_rate = half_rate.unwrap_or(saturated / 2.0);
    // `half_rate` counts delivered envelopes; a send delivers `envelopes_per_send`.
    let per_device = (half_rate / clients.len() as f64 / envelopes_per_send.max(1) as f64).max(0.1);
    let interval = Duration::from_secs_f64(1.0 / per_device);
    let phase_stop = Arc::new(AtomicBool::new(false));
    let senders = spawn_senders(
        clients,
        &phase_stop,
        Pace::Rate {
            interval,
            window: window * 4,
        },
        &Arc::new(Sends::default()),
        send_one,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (server0, generator0, wall0) = (servers_cpu(pids), cpu_seconds(me), Instant::now());
    let (_, latencies) = tally.phase(duration).await;
    let wall = wall0.elapsed().as_secs_f64();
    let half_load_cores = (
        (servers_cpu(pids) - server0) / wall,
        (cpu_seconds(me) - generator0) / wall,
    );
    phase_stop.store(true, Ordering::Relaxed);
    drain(senders).await;
    Run {
        streams_ended: tally.streams_ended.load(Ordering::Relaxed),
        seen: 0,
        wire,
        sends: sends.summary(),
        handoff: Vec::new(),
        saturated,
        half_rate,
        latencies,
        half_load_cores,
        saturated_cores,
        cpu_per_message_us: if delivered > 0.0 {
            cpu / delivered * 1e6
        } else {
            0.0
        },
    }
}

/// CPU seconds of the servers `pids`, together.
pub(super) fn servers_cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|&pid| cpu_seconds(pid)).sum()
}

async fn drain(mut set: tokio::task::JoinSet<()>) {
    // Bounded: senders check the stop flag between sends, each send times out.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(None) = tokio::time::timeout(Duration::from_secs(1), set.join_next()).await {
            return;
        }
    }
    set.abort_all();
}

fn spawn_senders<C, F, Fut>(
    clients: &[Arc<C>],
    stop: &Arc<AtomicBool>,
    pace: Pace,
    sends: &Arc<Sends>,
    send_one: F,
) -> tokio::task::JoinSet<()>
where
    C: Send + Sync + 'static,
    F: Fn(Arc<C>, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for (me, client) in clients.iter().enumerate() {
        match pace {
            Pace::Saturate { window } => {
                for _ in 0..window {
                    let (client, stop, send_one, sends) = (
                        client.clone(),
                        stop.clone(),
                        send_one.clone(),
                        sends.clone(),
                    );
                    set.spawn(async move {
                        while !stop.load(Ordering::Relaxed) {
                            let started = Instant::now();
                            let sent = tokio::time::timeout(
                                Duration::from_secs(10),
                                send_one(client.clone(), me),
                            )
                            .await;
                            sends.record(started.elapsed(), matches!(sent, Ok(true)));
                            if !matches!(sent, Ok(true)) {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    });
                }
            }
            Pace::Rate { interval, window } => {
                let (client, stop, send_one) = (client.clone(), stop.clone(), send_one.clone());
                set.spawn(async move {
                    let gate = Arc::new(Semaphore::new(window));
                    // Spread the devices' ticks over one interval.
                    let offset = interval.mul_f64((me % 97) as f64 / 97.0);
                    tokio::time::sleep(offset).await;
                    let mut ticks = tokio::time::interval(interval);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    while !stop.load(Ordering::Relaxed) {
                        ticks.tick().await;
                        let Ok(permit) = gate.clone().try_acquire_owned() else {
                            continue;
                        };
                        let (client, send_one) = (client.clone(), send_one.clone());
                        tokio::spawn(async move {
                            let _ =
                                tokio::time::timeout(Duration::from_secs(10), send_one(client, me))
                                    .await;
                            drop(permit);
                        });
                    }
                });
            }
        }
    }
    set
}
