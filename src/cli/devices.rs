//! `switchboard devices link|join|list|unlink`: the devices of this account.

use std::io::{IsTerminal, Write};

use switchboard::client::Home;
use switchboard::client::link::{self, LinkCode};
use switchboard::tls::Fingerprint;

use super::messaging::time;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// On the primary: print a one-time link code (first line of stdout) and wait
    /// until a new device has joined with it, or it expired.
    Link,
    /// On a new device (a new, empty home): join the account whose primary printed
    /// CODE.
    Join(JoinArgs),
    /// The devices of this account.
    List {
        /// One JSON object per device, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Unlink device ID (from the primary: any linked device; from a linked device:
    /// itself). It is signed out at once and what was queued for it is dropped.
    Unlink { id: u32 },
}

#[derive(Debug, clap::Args)]
pub struct JoinArgs {
    /// The link code, as `devices link` printed it (NNNNNN-PPPPPP).
    code: String,
    /// The node, as HOST:PORT; or several nodes of one deployment (sharing one
    /// certificate), separated by commas: the app moves to the next when one is down.
    #[arg(long)]
    server: String,
    /// A name for this device, as the account's devices list it.
    #[arg(long, default_value = "linked device")]
    name: String,
    /// Pin the node's certificate up front; otherwise the first connection's is
    /// pinned (and checked against the primary's pin all the same).
    #[arg(long)]
    fingerprint: Option<String>,
}

pub async fn run(home: Home, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Link => link(home).await,
        Command::Join(args) => join(home, args).await,
        Command::List { json } => list(home, json).await,
        Command::Unlink { id } => unlink(home, id).await,
    }
}

async fn link(home: Home) -> anyhow::Result<()> {
    let server = home.load()?.server;
    let new = link::link_device(&home, |code, expires_in| {
        let mut out = std::io::stdout();
        // The code alone on the first line, for people and scripts; a QR code for a
        // phone's camera when a person is looking.
        let _ = writeln!(out, "{code}");
        if out.is_terminal()
            && let Ok(qr) = qrcode::QrCode::new(code.to_string().as_bytes())
        {
            let image = qr
                .render::<qrcode::render::unicode::Dense1x2>()
                .quiet_zone(true)
                .build();
            let _ = writeln!(out, "{image}");
        }
        let _ = out.flush();
        eprintln!(
            "on the new device, run: switchboard --home NEW_HOME devices join {code} --server \
             {server} --name NAME\nwaiting for it (the code expires in {} min)…",
            expires_in.div_ceil(60)
        );
    })
    .await?;
    println!("linked \"{}\" as device {}", new.name, new.device_id);
    match link::welcome(&home, new.device_id).await {
        Ok(sent) => eprintln!("sent the new device the recent history ({sent} messages)"),
        Err(e) => eprintln!(
            "warning: the device is linked, but sending it the recent history failed: {e}"
        ),
    }
    Ok(())
}

async fn join(home: Home, args: JoinArgs) -> anyhow::Result<()> {
    let code = LinkCode::parse(&args.code)?;
    let pin = args
        .fingerprint
        .as_deref()
        .map(str::parse::<Fingerprint>)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    eprintln!("joining; confirm on the primary device…");
    let reg = link::join_account(&home, code, &args.server, &args.name, pin).await?;
    println!(
        "linked to {} as device {} (\"{}\")",
        reg.number.display_international(),
        reg.device_id,
        args.name
    );
    Ok(())
}

async fn list(home: Home, json: bool) -> anyhow::Result<()> {
    let reg = home.load()?;
    let client = reg.connect().await?;
    let devices = client.list_devices().await;
    client.close().await;
    for d in devices? {
        let this = d.device_id == reg.device_id;
        if json {
            let line = serde_json::json!({
                "id": d.device_id,
                "name": if d.primary { "primary" } else { d.name.as_str() },
                "primary": d.primary,
                "linked_at": time(d.linked_at_ms),
                "last_seen": d.last_seen_ms.map(time),
                "this_device": this,
            });
            println!("{line}");
        } else {
            let name = if d.primary {
                "primary".to_string()
            } else {
                format!("\"{}\"", d.name)
            };
            println!(
                "{:>4} {}{} linked {}, last seen {}",
                d.device_id,
                name,
                if this { " (this device)" } else { "" },
                time(d.linked_at_ms),
                d.last_seen_ms.map_or("never".to_string(), time)
            );
        }
    }
    Ok(())
}

async fn unlink(home: Home, id: u32) -> anyhow::Result<()> {
    let reg = home.load()?;
    let client = reg.connect().await?;
    let result = client.unlink_device(id).await;
    client.close().await;
    result?;
    if id == reg.device_id {
        println!(
            "this device is unlinked from {}; its home ({}) can be removed",
            reg.number.display_international(),
            home.dir().display()
        );
    } else {
        println!("device {id} is unlinked");
    }
    Ok(())
}
