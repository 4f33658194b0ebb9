//! The `discovery` scenario.

use switchboard::client::contacts::Book;
use switchboard::store::Store;

use super::*;

/// The syncing member's number (a test number of the node).
const MEMBER: &str = "+14159990000";

pub async fn run(sizes: &[usize], contacts: usize) -> Result<()> {
    let mut figures = Vec::new();
    let mut notes = Vec::new();
    for &accounts in sizes {
        println!("discovery: {contacts} contacts against {accounts} accounts");
        let tmp = tempfile::tempdir().map_err(err)?;
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).map_err(err)?;
        let started = Instant::now();
        {
            let store = Store::open(&data.join("db")).map_err(err)?;
            register_accounts(&store, &numbers(accounts))?;
        }
        println!(
            "  registered {accounts} accounts in {:.1?}",
            started.elapsed()
        );
        let config = tmp.path().join("node.toml");
        std::fs::write(
            &config,
            format!(
                "[discovery]\ndaily_budget = 1000000\n[verification.test_numbers]\n\"{MEMBER}\" = \"{CODE}\"\n"
            ),
        )
        .map_err(err)?;
        let node = node_on(&data, Some(&config))?;
        let fp: Fingerprint = node.lines[1]
            .strip_prefix("fingerprint ")
            .ok_or("no fingerprint line")?
            .parse()
            .map_err(err)?;
        let (creds, _) = Credentials::generate_device().map_err(err)?;
        let client = Client::connect(&node.addr, &creds, Some(fp))
            .await
            .map_err(err)?;
        let me = Number::parse_e164(MEMBER).map_err(err)?;
        client
            .request_code(&me, switchboard::proto::Channel::Sms, "en")
            .await
            .map_err(err)?;
        client.verify_code(&me, CODE).await.map_err(err)?;
        // Let the node build its first filter (it does at start), so the sync
        // measures serving it, not building it.
        tokio::time::sleep(Duration::from_secs(2)).await;

        // The address book: one contact in ten is registered.
        let registered = numbers(accounts);
        let mut csv = String::from("Name,Phone\n");
        for i in 0..contacts {
            let number = if i % 10 == 0 {
                registered[(i * 7919) % accounts].to_string()
            } else {
                format!("+1212{:07}", 5_000_000 + i)
            };
            csv.push_str(&format!("Contact {i},{number}\n"));
        }
        let home =
            switchboard::client::db::HomeDb::open(&tmp.path().join("home"), None).map_err(err)?;
        Book::import_into(&home, &csv, None).map_err(err)?;
        let stats_before = client.connection().stats();
        let cpu_before = cpu_seconds(node.pid());
        let started = Instant::now();
        let report = Book::sync(&home, &client, |_, _| {}).await.map_err(err)?;
        let took = started.elapsed();
        let cpu = cpu_seconds(node.pid()) - cpu_before;
        let stats = client.connection().stats();
        let sent = stats.udp_tx.bytes - stats_before.udp_tx.bytes;
        let received = stats.udp_rx.bytes - stats_before.udp_rx.bytes;
        client.close().await;
        drop(node);
        if report.registered != contacts.div_ceil(10) {
            return Err(format!(
                "the sync found {} registered contacts, expected {}",
                report.registered,
                contacts.div_ceil(10)
            ));
        }

        // The bare limit in the same run: the OPRF's own work, one ristretto255
        // evaluation per contact, in this process.
        let key = switchboard::discovery::DiscoveryKey::generate(1).map_err(err)?;
        let blinded: Vec<_> = (0..contacts)
            .map(|i| switchboard::discovery::blind(&format!("+1212{:07}", 5_000_000 + i)))
            .collect::<std::result::Result<_, _>>()
            .map_err(err)?;
        let started = Instant::now();
        for b in &blinded {
            key.evaluate(&b.element).map_err(err)?;
        }
        let bare = started.elapsed().as_secs_f64();

        let label = |what: &str| format!("{what}, {accounts} accounts");
        figures.push(Figure {
            scenario: "discovery",
            metric: label("node CPU for the sync"),
            unit: "ms",
            node: cpu * 1e3,
            limit: Some(bare * 1e3),
        });
        figures.push(Figure {
            scenario: "discovery",
            metric: label("filter bytes per account"),
            unit: "B",
            node: report.filter_bytes as f64 / (accounts + 1) as f64,
            limit: None,
        });
        figures.push(Figure {
            scenario: "discovery",
            metric: label("bytes sent by the client"),
            unit: "KiB",
            node: sent as f64 / 1024.0,
            limit: None,
        });
        figures.push(Figure {
            scenario: "discovery",
            metric: label("bytes received by the client"),
            unit: "KiB",
            node: received as f64 / 1024.0,
            limit: Some(report.filter_bytes as f64 / 1024.0),
        });
        figures.push(Figure {
            scenario: "discovery",
            metric: label("sync wall time"),
            unit: "ms",
            node: took.as_secs_f64() * 1e3,
            limit: None,
        });
        notes.push(format!(
            "{accounts} accounts: {} contacts, {} evaluated, {} filter hits resolved, {} registered",
            report.contacts, report.evaluated, report.resolved, report.registered
        ));
    }
    notes.push(
        "limits: CPU = the same number of OPRF evaluations in-process (ristretto255 \
         alone); bytes received = the filter alone"
            .into(),
    );
    report(&figures, &notes);
    Ok(())
}
