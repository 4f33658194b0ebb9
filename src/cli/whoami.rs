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
