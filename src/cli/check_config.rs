//! `switchboard check-config FILE`: validate a config file and print the effective
//! settings (defaults filled in, secrets masked).

use std::path::PathBuf;

use switchboard::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The config file to check.
    file: PathBuf,
    /// Print gateway secrets (passwords, header and form values, JSON bodies, program
    /// arguments, URL user info and query strings) and test codes instead of asterisks.
    #[arg(long, conflicts_with = "quiet")]
    show_secrets: bool,
    /// Print nothing when the file is valid (for `ExecStartPre=`: the journal keeps
    /// what a service prints).
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::load(&args.file)?;
    if args.quiet {
        return Ok(());
    }
    println!(
        "# {}: valid. The settings a node would run with:",
        args.file.display()
    );
    print!("{}", config.to_toml(!args.show_secrets));
    Ok(())
}
