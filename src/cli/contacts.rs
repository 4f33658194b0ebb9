//! `switchboard contacts import|sync|list`: the address book and private contact
//! discovery.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use switchboard::client::Home;
use switchboard::client::contacts::Book;
use switchboard::client::messenger::{cached_profile_in, shown_name};
use switchboard::phone::{Number, Region};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Add the contacts of a vCard (.vcf) or CSV file (Google, Outlook, phones).
    Import {
        file: PathBuf,
        /// Region for numbers in national form (two letters: US, GB, DE...); by
        /// default the region of your own number.
        #[arg(long)]
        region: Option<String>,
    },
    /// Find out which contacts are on the node, without showing it your address book.
    Sync,
    /// Show every contact, and whether the last sync found it on the node.
    List {
        /// One JSON object a line: `name`, `number` (E.164), `registered`.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(home: Home, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Import { file, region } => import(&home, &file, region.as_deref()),
        Command::Sync => sync(&home).await,
        Command::List { json } => list(&home, json),
    }
}

fn import(home: &Home, file: &PathBuf, region: Option<&str>) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    // Old phones write Latin-1; anything that is not UTF-8 is read as that.
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => e.into_bytes().iter().map(|&b| b as char).collect(),
    };
    let region = match region {
        Some(r) => Some(r.parse::<Region>()?),
        None => home.number().ok().and_then(|n| n.region()),
    };
    let report = Book::import_into(&home.db()?, &text, region)?;
    println!(
        "read {} numbers from {}: {} added, {} already in your contacts, {} skipped",
        report.read,
        file.display(),
        report.added,
        report.duplicates,
        report.skipped.len()
    );
    for why in &report.skipped {
        println!("  skipped: {why}");
    }
    if region.is_none() {
        println!(
            "  (numbers without a country code need --region, or a registered number to \
             take the region from)"
        );
    }
    Ok(())
}

async fn sync(home: &Home) -> anyhow::Result<()> {
    let reg = home.load()?;
    let db = home.db()?;
    let book = Book::load(&db)?;
    if book.contacts.is_empty() {
        println!("no contacts yet: add some with `switchboard contacts import FILE`");
        return Ok(());
    }
    let client = reg.connect().await?;
    let bar = std::io::stderr().is_terminal() && book.contacts.len() >= 100;
    let result = Book::sync(&db, &client, |done, total| {
        if bar && total > 0 {
            progress_bar(done, total);
        }
    })
    .await;
    client.close().await;
    if bar {
        eprintln!();
    }
    let report = result?;
    println!(
        "{} of {} contacts are on the node ({} numbers checked with the node, the rest \
         from the cache; filter {})",
        report.registered,
        report.contacts,
        report.evaluated,
        if report.filter_downloaded {
            format!("downloaded, {} bytes", report.filter_bytes)
        } else {
            "unchanged".to_string()
        }
    );
    if let Some(left) = report.budget_left {
        println!("{left} lookups left in today's discovery budget");
    }
    Ok(())
}

fn progress_bar(done: usize, total: usize) {
    const WIDTH: usize = 30;
    let filled = done * WIDTH / total;
    let mut err = std::io::stderr();
    let _ = write!(
        err,
        "\r[{}{}] {done}/{total} contacts",
        "#".repeat(filled),
        " ".repeat(WIDTH - filled)
    );
    let _ = err.flush();
}

fn list(home: &Home, json: bool) -> anyhow::Result<()> {
    let db = home.db()?;
    let book = Book::load(&db)?;
    let mut out = std::io::stdout().lock();
    for c in &book.contacts {
        // Their profile name beside the address-book name, once they gave their key.
        let known = cached_profile_in(&db, &c.number)?;
        let name = shown_name(Some(&c.name), known.as_ref()).unwrap_or_else(|| c.name.clone());
        if json {
            let line = serde_json::json!({
                "name": c.name,
                "number": c.number,
                "registered": c.registered,
                "profile_name": known.as_ref().map(|k| k.profile.name.clone()),
                "previous_profile_name": known.as_ref().and_then(|k| k.previous_name.clone()),
            });
            writeln!(out, "{line}")?;
        } else {
            let shown = Number::parse_e164(&c.number)
                .map(|n| n.display_international())
                .unwrap_or_else(|_| c.number.clone());
            let state = match c.registered {
                Some(true) => "on the node",
                Some(false) => "-",
                None => "not synced yet",
            };
            writeln!(out, "{name:<30} {shown:<20} {state}")?;
        }
    }
    if book.contacts.is_empty() && !json {
        writeln!(
            out,
            "no contacts yet: add some with `switchboard contacts import FILE`"
        )?;
    }
    Ok(())
}
