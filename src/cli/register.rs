//! `switchboard register`: request a code, read it, verify it, save the device.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, bail};
use switchboard::client::e2e;
use switchboard::client::{Client, ClientError, Home, Registration};
use switchboard::phone::{Number, Region};
use switchboard::proto::{Channel, ErrorKind};
use switchboard::tls::{Credentials, Fingerprint};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Your phone number, as you would type it (`+1 415 555 0100`, `0044 20 7946 0958`).
    number: String,
    /// The node, as HOST:PORT; or several nodes of one deployment (sharing one
    /// certificate), separated by commas: the app moves to the next when one is down.
    #[arg(long)]
    server: String,
    /// Region for a number in national form (two letters: US, GB, DE...).
    #[arg(long)]
    region: Option<String>,
    /// Ask for a voice call instead of an SMS.
    #[arg(long)]
    voice: bool,
    /// The code, if you already have it; otherwise it is asked for.
    #[arg(long)]
    code: Option<String>,
    /// The registration-lock PIN, if the number has a lock; otherwise it is asked for
    /// when the node says the number is locked.
    #[arg(long)]
    pin: Option<String>,
    /// Pin the node's certificate up front (as printed by `switchboard serve`);
    /// otherwise the first connection's certificate is pinned.
    #[arg(long)]
    fingerprint: Option<String>,
}

pub async fn run(home: Home, args: Args) -> anyhow::Result<()> {
    // Everything is checked before anything is sent or stored.
    let region = args
        .region
        .as_deref()
        .map(str::parse::<Region>)
        .transpose()?;
    let number = Number::parse(&args.number, region)?;
    let pin = args
        .fingerprint
        .as_deref()
        .map(str::parse::<Fingerprint>)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let channel = if args.voice {
        Channel::Voice
    } else {
        Channel::Sms
    };

    // A fresh key for the new device; it is saved only once the node has accepted it.
    let (credentials, pem) = Credentials::generate_device()?;
    let client = Client::connect(&args.server, &credentials, pin).await?;
    let result = register(&client, &number, channel, args.code, args.pin).await;
    let fingerprint = client.fingerprint();
    let registered = match result {
        Ok(r) => r,
        Err(e) => {
            client.close().await;
            return Err(e);
        }
    };

    let reg = Registration {
        server: args.server,
        fingerprint,
        number: number.clone(),
        account_id: registered.account_id,
        device_id: registered.device_id,
        credentials,
    };
    home.save(&reg, &pem)
        .with_context(|| format!("saving the device in {}", home.dir().display()))?;
    // Publish the end-to-end keys at once, so others can write before this device is
    // next online. The home keeps its Olm identity across registrations.
    let published = async {
        let db = home.db()?;
        e2e::publish(&db, &client, (reg.account_id, reg.device_id), 0).await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    client.close().await;
    if let Err(e) = published {
        eprintln!(
            "warning: registered, but publishing the encryption keys failed ({e}); \
             they are published on the next `recv`"
        );
    }
    if home.passphrase().is_none() {
        eprintln!(
            "note: the device and encryption keys in {} are not encrypted (the files are \
             readable by you only); set SWITCHBOARD_PASSPHRASE or pass --passphrase-file \
             to encrypt them",
            home.dir().display()
        );
    }
    if registered.took_over {
        println!("{number} moved to this device; its other devices are signed out");
    }
    println!(
        "registered {} as device {} on {} ({})",
        number.display_international(),
        registered.device_id,
        reg.server,
        fingerprint
    );
    Ok(())
}

async fn register(
    client: &Client,
    number: &Number,
    channel: Channel,
    code: Option<String>,
    mut lock_pin: Option<String>,
) -> anyhow::Result<switchboard::proto::Registered> {
    let pin_given = lock_pin.is_some();
    // With a code in hand, it is tried first: a code is asked for only when none is
    // pending (an interrupted `register`, a wrong PIN, must not cost a new code and
    // its growing wait).
    let mut requested = code.is_none();
    if requested {
        ask_for_code(client, number, channel).await?;
    }
    let mut codes = CodeSource::new(code);
    // The node is the judge: the client keeps offering codes while the node answers
    // "wrong code", so a dead code is refused by the node with its reason.
    let mut last_refusal = None;
    loop {
        let Some(code) = codes.next()? else {
            match last_refusal {
                Some(e) => bail!("registration refused: {e}"),
                None => bail!("no code given: registration cancelled"),
            }
        };
        let verified = loop {
            let result = match &lock_pin {
                Some(p) => client.verify_code_with_pin(number, &code, p).await,
                None => client.verify_code(number, &code).await,
            };
            // A locked number: the code was right; the PIN is asked for (once per
            // wrong PIN, while tries are left), and the same code is sent again.
            if let Err(ClientError::Node(e)) = &result
                && let ErrorKind::RegistrationLocked { tries_left, .. } = e.kind
                && tries_left > 0
                && !pin_given
                && let Some(p) = read_line("registration-lock PIN: ")?
            {
                eprintln!("{e}");
                lock_pin = Some(p);
                continue;
            }
            break result;
        };
        match verified {
            Ok(registered) => return Ok(registered),
            Err(ClientError::Node(e))
                if !requested
                    && matches!(
                        e.kind,
                        ErrorKind::NoCodePending
                            | ErrorKind::CodeExpired
                            | ErrorKind::TooManyAttempts { .. }
                    ) =>
            {
                eprintln!(
                    "no usable code is pending for {} ({e})",
                    number.display_international()
                );
                ask_for_code(client, number, channel).await?;
                requested = true;
                // The code given is tried once more (a test number's code is fixed),
                // then the new one is asked for.
                codes.again_then_ask();
            }
            Err(ClientError::Node(e)) => match e.kind {
                ErrorKind::WrongCode { tries_left } if codes.can_ask_again(tries_left) => {
                    eprintln!("{e}");
                    last_refusal = Some(e);
                }
                ErrorKind::InvalidCode if codes.can_ask_again(1) => {
                    eprintln!("{e}");
                    last_refusal = Some(e);
                }
                _ => bail!("registration refused: {e}"),
            },
            Err(e) => return Err(e.into()),
        }
    }
}

/// Asks the node for a code and says where it went.
async fn ask_for_code(client: &Client, number: &Number, channel: Channel) -> anyhow::Result<()> {
    let sent = client.request_code(number, channel, &locale()).await?;
    eprintln!(
        "a code is on its way to {} by {}; it is valid for {} minutes",
        number.display_international(),
        match channel {
            Channel::Sms => "SMS",
            Channel::Voice => "voice call",
        },
        sent.expires_in_secs.div_ceil(60)
    );
    Ok(())
}

/// One trimmed line from stdin (after `prompt` on a terminal); `None` at its end.
pub fn read_line(prompt: &str) -> anyhow::Result<Option<String>> {
    if std::io::stdin().is_terminal() {
        eprint!("{prompt}");
        std::io::stderr().flush()?;
    }
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line)? == 0 {
        return Ok(None);
    }
    Ok(Some(line.trim().to_string()))
}

/// Where codes come from: `--code`, the terminal, or lines on stdin.
struct CodeSource {
    given: Option<String>,
    used_given: bool,
    /// Once the given code is used, read more (it was given for a code that was no
    /// longer pending).
    ask_after_given: bool,
    terminal: bool,
}

impl CodeSource {
    fn new(given: Option<String>) -> CodeSource {
        CodeSource {
            given,
            used_given: false,
            ask_after_given: false,
            terminal: std::io::stdin().is_terminal(),
        }
    }

    /// Whether to read another code after a refusal. A person at a terminal is not
    /// asked again once the code is dead; piped input is read to its end.
    fn can_ask_again(&self, tries_left: u32) -> bool {
        (self.given.is_none() || self.ask_after_given) && (tries_left > 0 || !self.terminal)
    }

    /// Offers the given code once more, then reads codes as if none was given.
    fn again_then_ask(&mut self) {
        if self.given.is_some() && self.used_given {
            self.used_given = false;
            self.ask_after_given = true;
        }
    }

    fn next(&mut self) -> anyhow::Result<Option<String>> {
        if let Some(code) = &self.given {
            if self.used_given && self.ask_after_given {
                self.given = None;
                return self.next();
            }
            if self.used_given {
                return Ok(None);
            }
            self.used_given = true;
            return Ok(Some(code.trim().to_string()));
        }
        if self.terminal {
            eprint!("enter the 6-digit code: ");
            std::io::stderr().flush()?;
        }
        let mut line = String::new();
        loop {
            line.clear();
            if std::io::stdin().lock().read_line(&mut line)? == 0 {
                return Ok(None);
            }
            let code: String = line
                .chars()
                .filter(|c| !c.is_whitespace() && *c != '-')
                .collect();
            if !code.is_empty() {
                return Ok(Some(code));
            }
        }
    }
}

/// The user's language from the environment (`LANG=de_CH.UTF-8` → `de-CH`).
fn locale() -> String {
    std::env::var("LC_ALL")
        .or_else(|_| std::env::var("LANG"))
        .ok()
        .and_then(|l| l.split('.').next().map(|s| s.replace('_', "-")))
        .filter(|l| !l.is_empty() && l != "C" && l != "POSIX")
        .unwrap_or_else(|| "en".to_string())
}
