//! `switchboard devices link|join|list|unlink`: the devices of this account.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use switchboard::client::e2e::{self, LinkRecord, Olm};
use switchboard::client::link::{LinkCode, LinkError, LinkGrant, LinkRequest, Pake};
use switchboard::client::{Client, Home, Messenger, Registration};
use switchboard::phone::Number;
use switchboard::proto::Response;
use switchboard::tls::{Credentials, Fingerprint};

use super::messaging::time;

/// How often a waiting side asks the node what happened to the link.
const POLL: Duration = Duration::from_millis(250);

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
    /// The node, as HOST:PORT.
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

async fn connect(reg: &Registration) -> anyhow::Result<Client> {
    Ok(Client::connect(&reg.server, &reg.credentials, Some(reg.fingerprint)).await?)
}

async fn link(home: Home) -> anyhow::Result<()> {
    let reg = home.load()?;
    let db = home.db()?;
    let client = connect(&reg).await?;
    let result = link_on(&reg, &db, &client).await;
    client.close().await;
    let device_id = result?;
    // The new device's first history and the sessions with it come over the
    // messenger, which waits (briefly) for the device's keys.
    let messenger = Messenger::open(&home)?;
    match messenger.welcome_device(device_id).await {
        Ok(sent) => eprintln!("sent the new device the recent history ({sent} messages)"),
        Err(e) => eprintln!(
            "warning: the device is linked, but sending it the recent history failed: {e}"
        ),
    }
    messenger.close().await;
    Ok(())
}

async fn link_on(
    reg: &Registration,
    db: &switchboard::client::db::HomeDb,
    client: &Client,
) -> anyhow::Result<u32> {
    let mut code = LinkCode::new(100_000);
    let (mut pake, msg) = Pake::primary(&code);
    let (nameplate, expires_in) = client.link_open(msg).await?;
    code.nameplate = nameplate;
    pake.set_nameplate(nameplate);
    let mut out = std::io::stdout();
    writeln!(out, "{code}")?;
    if out.is_terminal()
        && let Ok(qr) = qrcode::QrCode::new(code.to_string().as_bytes())
    {
        let image = qr
            .render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build();
        writeln!(out, "{image}")?;
    }
    out.flush()?;
    eprintln!(
        "on the new device, run: switchboard --home NEW_HOME devices join {code} --server {} \
         --name NAME\nwaiting for it (the code expires in {} min)…",
        reg.server,
        expires_in.div_ceil(60)
    );
    let deadline = Instant::now() + Duration::from_secs(expires_in.into());
    let (pake_b, sealed) = loop {
        match client.link_poll(nameplate).await? {
            Response::LinkRequested { pake, sealed } => break (pake, sealed),
            Response::LinkAborted => {
                bail!("the link code expired or was given up; nothing was linked")
            }
            _ => {}
        }
        if Instant::now() > deadline {
            let _ = client.link_abort(nameplate).await;
            bail!("the link code expired: no device joined; nothing was linked");
        }
        tokio::time::sleep(POLL).await;
    };
    let opened = pake
        .finish(&pake_b)
        .and_then(|keys| keys.open_request(&sealed).map(|r| (keys, r)));
    let (keys, request) = match opened {
        Ok(x) => x,
        Err(e) => {
            let _ = client.link_abort(nameplate).await;
            if matches!(e, LinkError::WrongSecret) {
                bail!(
                    "someone joined with this code's nameplate but not its secret (a guess, or \
                     a typo): nothing was linked and the code is dead; run `devices link` again"
                );
            }
            return Err(e.into());
        }
    };
    let number = reg.number.to_string();
    let identity = request.identity();
    let (account, signature) = db.write(|tx| {
        let mut olm = Olm::new(tx);
        let account = olm.identity()?;
        let signature = olm.vouch(&number, &identity)?;
        olm.flush()?;
        Ok::<_, e2e::E2eError>((account, signature))
    })?;
    let grant = LinkGrant {
        number: number.clone(),
        account_curve25519: account.curve25519,
        account_ed25519: account.ed25519,
        signature: signature.to_vec(),
        fingerprint: reg.fingerprint.to_string(),
        primary_device: reg.device_id,
    };
    let device_id = client
        .link_grant(nameplate, &request.name, keys.seal_grant(&grant))
        .await?;
    println!("linked \"{}\" as device {device_id}", request.name);
    Ok(device_id)
}

async fn join(home: Home, args: JoinArgs) -> anyhow::Result<()> {
    if let Ok(reg) = home.load() {
        bail!(
            "this home ({}) is device {} of {} already: a new device joins with a new home \
             (--home NEW_DIR)",
            home.dir().display(),
            reg.device_id,
            reg.number
        );
    }
    let code = LinkCode::parse(&args.code)?;
    let pin = args
        .fingerprint
        .as_deref()
        .map(str::parse::<Fingerprint>)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let (credentials, pem) = Credentials::generate_device()?;
    let client = Client::connect(&args.server, &credentials, pin).await?;
    let result = join_on(&home, &args, code, credentials, &pem, &client).await;
    client.close().await;
    let reg = result?;
    println!(
        "linked to {} as device {} (\"{}\")",
        reg.number.display_international(),
        reg.device_id,
        args.name
    );
    Ok(())
}

async fn join_on(
    home: &Home,
    args: &JoinArgs,
    code: LinkCode,
    credentials: Credentials,
    pem: &switchboard::tls::PemPair,
    client: &Client,
) -> anyhow::Result<Registration> {
    let db = home.db()?;
    let identity = e2e::identity(&db)?;
    let (pake, msg) = Pake::joiner(&code);
    let offer = client.link_join(code.nameplate, msg).await?;
    let keys = pake.finish(&offer)?;
    let request = LinkRequest {
        name: args.name.clone(),
        curve25519: identity.curve25519,
        ed25519: identity.ed25519,
    };
    client
        .link_request(code.nameplate, keys.seal_request(&request))
        .await?;
    eprintln!("waiting for the primary device to confirm…");
    let (registered, sealed) = loop {
        match client.link_poll(code.nameplate).await? {
            Response::LinkComplete { registered, sealed } => break (registered, sealed),
            Response::LinkAborted => bail!(
                "the primary gave the link up (the code's secret part did not match, or it \
                 expired): nothing was linked; run `devices link` on the primary again"
            ),
            _ => tokio::time::sleep(POLL).await,
        }
    };
    let grant = keys.open_grant(&sealed)?;
    let account = switchboard::proto::IdentityKeys {
        curve25519: grant.account_curve25519,
        ed25519: grant.account_ed25519,
    };
    let signature: [u8; 64] = grant
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("the primary's grant carries no valid signature"))?;
    if grant.number != registered.number
        || !account.vouches_for(&grant.number, &identity, &signature)
    {
        bail!("the primary's grant does not vouch for this device: refusing to link");
    }
    if grant.fingerprint != client.fingerprint().to_string() {
        bail!(
            "this node's certificate ({}) is not the one your primary device pinned ({}): \
             someone may be in between; nothing was saved",
            client.fingerprint(),
            grant.fingerprint
        );
    }
    let number = Number::parse_e164(&registered.number).context("the account's number")?;
    let reg = Registration {
        server: args.server.clone(),
        fingerprint: client.fingerprint(),
        number,
        account_id: registered.account_id,
        device_id: registered.device_id,
        credentials,
    };
    let link = LinkRecord {
        number: grant.number.clone(),
        account_curve25519: account.curve25519,
        account_ed25519: account.ed25519,
        signature: signature.to_vec(),
    };
    db.write(|tx| {
        let mut olm = Olm::new(tx);
        olm.set_link(link.clone())?;
        olm.note_identity(&grant.number, &account)?;
        olm.flush()
    })?;
    home.save(&reg, pem)
        .with_context(|| format!("saving the device in {}", home.dir().display()))?;
    e2e::publish(&db, client, (reg.account_id, reg.device_id), 0)
        .await
        .context("publishing this device's keys")?;
    Ok(reg)
}

async fn list(home: Home, json: bool) -> anyhow::Result<()> {
    let reg = home.load()?;
    let client = connect(&reg).await?;
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
    let client = connect(&reg).await?;
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
