//! The pgshift command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pgshift::admin::client::{AdminClient, render_status};

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

/// How to reach a running pgshift's admin API.
#[derive(clap::Args, Clone)]
struct AdminArgs {
    /// Admin API URL [default: from --config's [admin].listen, else http://127.0.0.1:9432]
    #[arg(long)]
    admin: Option<String>,
    /// The configuration file, used to find the admin address and token.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Bearer token for the admin API's POST endpoints ([admin].token).
    #[arg(long, env = "PGSHIFT_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Start the sidecar: proxy, admin API and (with [migration]) the migration.
    Run {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check that a migration can run: servers, settings, privileges, databases, extensions, tables.
    #[command(long_about = pgshift::validate::CLI_HELP)]
    Validate {
        /// The TOML configuration file (needs a [migration] section).
        #[arg(long, short)]
        config: PathBuf,
        /// Print the report as a JSON document instead of a table.
        #[arg(long)]
        json: bool,
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
    /// Watch a whole online migration and cutover on two throwaway local
    /// clusters, under a write load, and print a report (needs the PostgreSQL
    /// server programs; everything started is removed on exit).
    Demo {
        /// Size of the sample data (pgbench scale; 1 ≈ 15 MB).
        #[arg(long, default_value_t = 10)]
        scale: u32,
        /// Concurrent client sessions of the write load.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Seconds to stream under load before cutting over.
        #[arg(long, default_value_t = 8)]
        stream_seconds: u64,
    },
    /// Show the state of a running pgshift: migration state, per-database
    /// copy and lag, proxy sessions, the last cutover's phases.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
        /// Refresh every N seconds until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
    },
    /// Start the cutover now (allowed in WaitingForCutoverTrigger).
    Cutover {
        #[command(flatten)]
        admin: AdminArgs,
        /// Follow the cutover to its end, printing each phase.
        #[arg(long)]
        wait: bool,
    },
    /// What to do about a schema change that stopped apply: `retry` it now
    /// (after changing the target), `skip` the replicated DDL command (made
    /// by hand, or not wanted), or `apply` the ready command of a table that
    /// no longer matches (`[migration] ddl = "stop"`).
    Ddl {
        #[command(flatten)]
        admin: AdminArgs,
        /// skip, retry or apply.
        #[arg(value_parser = ["skip", "retry", "apply"])]
        action: String,
        /// The database (default: the one where apply is stopped).
        #[arg(long, short = 'd')]
        database: Option<String>,
    },
    /// Go back to the source after a cutover (while the rollback window is
    /// open): the cutover protocol in reverse; clients keep their connections.
    Rollback {
        #[command(flatten)]
        admin: AdminArgs,
        /// Follow the rollback to its end, printing each phase.
        #[arg(long)]
        wait: bool,
    },
    /// End the rollback window: drops the reverse slots and publications on
    /// the target and what the source kept for a rollback; the migration is
    /// Succeeded / Completed.
    Complete {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Cancel the migration (before the point of no return): releases the
    /// slot and publication on the source and leaves the target as it is.
    Cancel {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

fn init_logging(format: LogFormat) {
    pgshift::logging::init(matches!(format, LogFormat::Json));
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
            Command::Run { config } => pgshift::run::run(&config).await.map_err(Into::into),
            Command::Demo {
                scale,
                clients,
                stream_seconds,
            } => pgshift::demo::run(pgshift::demo::DemoOptions {
                scale,
                clients,
                stream_for: std::time::Duration::from_secs(stream_seconds),
            })
            .await
            .map_err(Into::into),
            Command::Status { admin, json, watch } => status(admin, json, watch).await,
            Command::Cutover { admin, wait } => attempt(admin, wait, Attempt::Cutover).await,
            Command::Rollback { admin, wait } => attempt(admin, wait, Attempt::Rollback).await,
            Command::Complete { admin } => complete(admin).await,
            Command::Cancel { admin } => cancel(admin).await,
            Command::Ddl {
                admin,
                action,
                database,
            } => ddl(admin, &action, database.as_deref()).await,
            Command::Validate { config, json } => Ok(pgshift::validate::cli(&config, json).await),
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
                    .map_err(Into::into)
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

type CliResult = Result<u8, Box<dyn std::error::Error>>;

/// Builds the admin client from --admin / --config / --token.
fn admin_client(a: &AdminArgs) -> Result<AdminClient, Box<dyn std::error::Error>> {
    let mut url = a.admin.clone();
    let mut token = a.token.clone();
    if let Some(path) = &a.config {
        let cfg = pgshift::Config::load(path)?;
        if url.is_none() {
            url = Some(format!("http://{}", cfg.admin_listen));
        }
        if token.is_none() {
            token = cfg
                .file
                .admin
                .token
                .as_ref()
                .map(|t| t.expose().to_string());
        }
    }
    let url = url.unwrap_or_else(|| "http://127.0.0.1:9432".into());
    Ok(AdminClient::new(&url, token)?)
}

async fn status(a: AdminArgs, json: bool, watch: Option<u64>) -> CliResult {
    let client = admin_client(&a)?;
    loop {
        let doc = client.get("/status").await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            if watch.is_some() {
                // Clear the screen so the table refreshes in place.
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render_status(&doc));
        }
        match watch {
            Some(secs) => tokio::time::sleep(std::time::Duration::from_secs(secs.max(1))).await,
            None => return Ok(0),
        }
    }
}

#[derive(Clone, Copy)]
enum Attempt {
    Cutover,
    Rollback,
}

/// `pgshift cutover` and `pgshift rollback`: starts the attempt, and with
/// `--wait` follows it phase by phase.
async fn attempt(a: AdminArgs, wait: bool, kind: Attempt) -> CliResult {
    let (name, path, key, to, stay) = match kind {
        Attempt::Cutover => (
            "cutover",
            "/cutover",
            "last_cutover",
            "the target",
            "the source",
        ),
        Attempt::Rollback => (
            "rollback",
            "/rollback",
            "last_rollback",
            "the source",
            "the target",
        ),
    };
    let client = admin_client(&a)?;
    let started = client.post(path).await?;
    let id = started
        .get("id")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    println!("{name} {id} started");
    if !wait {
        return Ok(0);
    }
    let mut printed = 0usize;
    loop {
        let doc = client.get("/status").await?;
        let c = &doc[key];
        let same = c.get("id").and_then(|v| v.as_str()) == Some(id.as_str());
        if same {
            if let Some(phases) = c.get("phases").and_then(|p| p.as_array()) {
                for ph in phases.iter().skip(printed) {
                    println!(
                        "  {:<12} {:>8.3}s  {}",
                        ph["phase"].as_str().unwrap_or("?"),
                        ph["seconds"].as_f64().unwrap_or(0.0),
                        ph["outcome"].as_str().unwrap_or("")
                    );
                }
                printed = phases.len();
            }
            match c.get("outcome").and_then(|o| o.as_str()) {
                Some("succeeded") => {
                    println!("{name} succeeded: every session now runs on {to}");
                    return Ok(0);
                }
                Some(o) if o != "running" => {
                    println!(
                        "{name} {o}: {} (clients stay on {stay})",
                        c["reason"].as_str().unwrap_or("no reason recorded")
                    );
                    return Ok(1);
                }
                _ => {}
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn ddl(a: AdminArgs, action: &str, database: Option<&str>) -> CliResult {
    let client = admin_client(&a)?;
    let path = match database {
        Some(db) => format!("/ddl/{action}?database={}", url_encode(db)),
        None => format!("/ddl/{action}"),
    };
    let r = client.post(&path).await?;
    println!(
        "{}: {}",
        r.get("database").and_then(|d| d.as_str()).unwrap_or("-"),
        r.get("message").and_then(|m| m.as_str()).unwrap_or("done")
    );
    Ok(0)
}

/// Percent-encodes a query parameter's value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn complete(a: AdminArgs) -> CliResult {
    let client = admin_client(&a)?;
    let r = client.post("/complete").await?;
    println!(
        "{}",
        r.get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("rollback window ended")
    );
    Ok(0)
}

async fn cancel(a: AdminArgs) -> CliResult {
    let client = admin_client(&a)?;
    let r = client.post("/cancel").await?;
    println!(
        "{}",
        r.get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("migration canceled")
    );
    Ok(0)
}
