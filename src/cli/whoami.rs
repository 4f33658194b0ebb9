//! `switchboard whoami`: ask the node who this device is.

use switchboard::client::Home;
use switchboard::phone::Number;

pub async fn run(home: Home) -> anyhow::Result<()> {
    let reg = home.load()?;
    let client = reg.connect().await?;
    let identity = client.whoami().await;
    client.close().await;
    let identity = identity?;
    let number = Number::parse_e164(&identity.number)?;
    println!("{number}");
    println!("number   {}", number.display_international());
    println!("device   {}", identity.device_id);
    println!("account  {}", identity.account_id);
    println!("server   {} ({})", reg.server, reg.fingerprint);
    Ok(())
}

/// `switchboard servers [LIST]`: prints the node addresses, or replaces them.
pub fn servers(home: Home, list: Option<String>) -> anyhow::Result<()> {
    let Some(list) = list else {
        let reg = home.load()?;
        println!("{} ({})", reg.server, reg.fingerprint);
        return Ok(());
    };
    let addrs: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    anyhow::ensure!(
        !addrs.is_empty(),
        "give at least one node address (host:port)"
    );
    for addr in &addrs {
        let port = addr.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
        anyhow::ensure!(
            matches!(port, Some(Ok(p)) if p != 0),
            "{addr:?} is not a node address (host:port)"
        );
    }
    home.set_servers(&addrs.join(","))?;
    println!("servers  {}", addrs.join(","));
    Ok(())
}
