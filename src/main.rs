//! The pgshift command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "pgshift",
    version,
    about = "Move a live PostgreSQL database to another server with a sub-second write pause",
    long_about = "pgshift is a sidecar: applications connect to its proxy instead of the source server; \
it copies the data consistently, streams changes with logical replication, and at cutover \
repoints every client session to the target without the clients reconnecting."
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Start the sidecar: proxy, admin API and (with [migration]) the migration.
    Run {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Compare every table on source and target (row counts and checksums);
    /// exits 1 when any table differs.
    Verify {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Verify only this database (repeatable); default: migration.databases.
        #[arg(long = "database", short = 'd')]
        databases: Vec<String>,
        /// Print a JSON document instead of a table.
        #[arg(long)]
        json: bool,
        /// Compare row counts only, without checksums.
        #[arg(long)]
        counts_only: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgshift: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Run { config } => pgshift::run::run(&config).await.map_err(|e| e.to_string()),
            Command::Verify {
                config,
                databases,
                json,
                counts_only,
            } => {
                let mode = if counts_only {
                    pgshift::verify::VerifyMode::Counts
                } else {
                    pgshift::verify::VerifyMode::Checksums
                };
                pgshift::verify::run_cli(&config, databases, json, mode)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("pgshift: {e}");
            ExitCode::from(1)
        }
    }
}
