//! `switchboard lock set|clear`: the registration lock of this device's account.

use anyhow::bail;
use switchboard::client::Home;

use super::register::read_line;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Require a PIN (asked for twice) to register this number on another device.
    Set,
    /// Remove the registration lock.
    Clear,
}

pub async fn run(home: Home, command: Command) -> anyhow::Result<()> {
    let reg = home.load()?;
    let pin = match command {
        Command::Set => {
            let Some(first) = read_line("new registration-lock PIN: ")? else {
                bail!("no PIN given");
            };
            let Some(second) = read_line("the same PIN again: ")? else {
                bail!("the PIN was not repeated");
            };
            if first != second {
                bail!("the two PINs differ; nothing was changed");
            }
            Some(first)
        }
        Command::Clear => None,
    };
    let client = reg.connect().await?;
    let result = match &pin {
        Some(p) => client.set_lock(p).await.map(Some),
        None => client.clear_lock().await.map(|()| None),
    };
    client.close().await;
    match result? {
        Some(days) => println!(
            "registration lock set: registering {} on another device now needs this PIN; \
             the lock lapses if your devices stay away for {days} days",
            reg.number.display_international()
        ),
        None => println!("registration lock cleared"),
    }
    Ok(())
}
