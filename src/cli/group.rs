//! `switchboard group …`: groups of this account (membership on the node, the name
//! sealed under the group's key).

use anyhow::bail;
use switchboard::client::{Home, Messenger};
use switchboard::phone::Number;

use super::messaging::{contact, time};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create group NAME with MEMBERs (numbers or contact names); you are its admin.
    Create { name: String, members: Vec<String> },
    /// The groups this device knows.
    List {
        #[arg(long)]
        json: bool,
    },
    /// A group's members and their roles, as the node has them now.
    Info {
        group: String,
        #[arg(long)]
        json: bool,
    },
    /// Admins: add MEMBERs.
    Add { group: String, members: Vec<String> },
    /// Admins: remove MEMBER (the group gets a new key).
    Remove { group: String, member: String },
    /// Admins: make MEMBER an admin.
    Promote { group: String, member: String },
    /// Admins: rename the group.
    Rename { group: String, name: String },
    /// Leave the group.
    Leave { group: String },
}

/// The group meant by `which`: its id, or the name of a group this device knows.
pub(crate) async fn group_id(messenger: &Messenger, which: &str) -> anyhow::Result<u64> {
    if let Ok(id) = which.parse::<u64>() {
        return Ok(id);
    }
    let known = messenger.known_groups().await?;
    let named: Vec<_> = known.iter().filter(|g| g.name == which).collect();
    match named.as_slice() {
        [one] => Ok(one.group_id),
        [] => bail!("this device knows no group called {which:?} (`group list` shows them)"),
        many => bail!(
            "{} groups are called {which:?}; give the id instead ({})",
            many.len(),
            many.iter()
                .map(|g| g.group_id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub async fn run(home: Home, command: Command) -> anyhow::Result<()> {
    let reg = home.load()?;
    let messenger = Messenger::open(&home)?;
    let result = run_on(&messenger, &reg, command).await;
    for event in messenger.take_events() {
        if let switchboard::client::Event::Warning(w) = event {
            eprintln!("warning: {w}");
        }
    }
    messenger.close().await;
    result
}

async fn run_on(
    messenger: &Messenger,
    reg: &switchboard::client::Registration,
    command: Command,
) -> anyhow::Result<()> {
    let numbers = |who: &[String]| -> anyhow::Result<Vec<Number>> {
        who.iter()
            .map(|w| contact(messenger.db(), reg, w, None))
            .collect()
    };
    match command {
        Command::Create { name, members } => {
            if name.trim().is_empty() {
                bail!("a group needs a name");
            }
            let members = numbers(&members)?;
            let info = messenger.create_group(&name, &members).await?;
            println!(
                "created {name} (group {}) with {} members",
                info.group_id,
                info.members.len()
            );
        }
        Command::List { json } => {
            for g in messenger.known_groups().await? {
                if json {
                    let line = serde_json::json!({ "group": g.group_id, "name": g.name });
                    println!("{line}");
                } else {
                    println!("{:>6} {}", g.group_id, g.name);
                }
            }
        }
        Command::Info { group, json } => {
            let id = group_id(messenger, &group).await?;
            let (info, name) = messenger.group_info(id).await?;
            let name = name.unwrap_or_else(|| "(a name this device cannot read)".into());
            // Who this device gave its current sender key to (its view: the node
            // names the devices that lack it at the next message).
            let sender_key = messenger.sender_key(id).await?;
            let has_key = |number: &str| -> Vec<u32> {
                sender_key
                    .as_ref()
                    .and_then(|k| k.shared.get(number).cloned())
                    .unwrap_or_default()
            };
            if json {
                let members: Vec<_> = info
                    .members
                    .iter()
                    .map(|m| {
                        serde_json::json!({
                            "number": m.number,
                            "role": if m.admin { "admin" } else { "member" },
                            "joined_at": time(m.joined_at_ms),
                            "has_my_key": has_key(&m.number),
                        })
                    })
                    .collect();
                let line = serde_json::json!({
                    "group": info.group_id,
                    "name": name,
                    "version": info.version,
                    "members": members,
                    "sender_key": sender_key.as_ref().map(|k| serde_json::json!({
                        "session": k.session_id,
                        "since": time(k.created_at_ms),
                    })),
                });
                println!("{line}");
            } else {
                println!("{name} (group {}, version {})", info.group_id, info.version);
                for m in &info.members {
                    let role = if m.admin { "admin" } else { "member" };
                    let me = if m.number == reg.number.as_str() {
                        " (you)"
                    } else {
                        ""
                    };
                    let key = match has_key(&m.number) {
                        d if d.is_empty() => String::new(),
                        d => format!(", has your key (devices {d:?})"),
                    };
                    println!(
                        "  {} {role}{me}, joined {}{key}",
                        m.number,
                        time(m.joined_at_ms)
                    );
                }
                match &sender_key {
                    Some(k) => println!(
                        "your sender key: session {} since {}",
                        k.session_id,
                        time(k.created_at_ms)
                    ),
                    None => println!("your sender key: none yet (made with your first message)"),
                }
            }
        }
        Command::Add { group, members } => {
            let id = group_id(messenger, &group).await?;
            let info = messenger.add_to_group(id, &numbers(&members)?).await?;
            println!("{} members now", info.members.len());
        }
        Command::Remove { group, member } => {
            let id = group_id(messenger, &group).await?;
            let who = numbers(std::slice::from_ref(&member))?;
            let info = messenger.remove_from_group(id, &who[0]).await?;
            println!("removed {}; {} members now", who[0], info.members.len());
        }
        Command::Promote { group, member } => {
            let id = group_id(messenger, &group).await?;
            let who = numbers(std::slice::from_ref(&member))?;
            messenger.promote_in_group(id, &who[0]).await?;
            println!("{} is an admin now", who[0]);
        }
        Command::Rename { group, name } => {
            let id = group_id(messenger, &group).await?;
            messenger.rename_group(id, &name).await?;
            println!("renamed to {name}");
        }
        Command::Leave { group } => {
            let id = group_id(messenger, &group).await?;
            messenger.leave_group(id).await?;
            println!("you left group {id}");
        }
    }
    Ok(())
}
