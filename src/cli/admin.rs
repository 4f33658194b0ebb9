//! `switchboard admin`: operator commands on a node's data dir.

use std::path::PathBuf;

use anyhow::Context;
use switchboard::store::Store;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Re-key the contact-discovery index: a new OPRF key, the index rebuilt under it.
    /// Clients notice the new key version and run discovery again. Run it while the
    /// node is stopped (sled lets one process open a data dir).
    RotateDiscoveryKey {
        /// The node's data dir.
        #[arg(long, default_value = "switchboard-data")]
        data: PathBuf,
    },
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::RotateDiscoveryKey { data } => {
            let db = data.join("db");
            if !db.exists() {
                anyhow::bail!("{} holds no node database", data.display());
            }
            let store = Store::open(&db).with_context(|| {
                format!(
                    "opening {} (is the node still running? stop it first)",
                    db.display()
                )
            })?;
            let accounts = store.account_count();
            let version = store.rotate_discovery_key()?;
            println!(
                "discovery key rotated to version {version}; the index of {accounts} accounts \
                 was rebuilt under it"
            );
            Ok(())
        }
    }
}
