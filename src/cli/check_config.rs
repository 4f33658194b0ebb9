//! `switchboard check-config FILE`: validate a config file and print the effective
//! settings (defaults filled in, secrets masked).

use std::path::PathBuf;

use switchboard::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The config file to check.
    file: PathBuf,
    /// Print provider passwords and header values instead of asterisks.
    #[arg(long)]
    show_secrets: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::load(&args.file)?;
    println!(
        "# {}: valid. The settings a node would run with:",
        args.file.display()
    );
    print!("{}", config.to_toml(!args.show_secrets));
    Ok(())
}
