//! `medallion`: run the platform locally, publish, replay, query, forget.

mod demo;
mod forget;
mod load;
mod local;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use medallion_lake::Lake;
use medallion_lake::query::{Grant, list_local_tables, run_query, session};

#[derive(Parser)]
#[command(
    name = "medallion",
    version,
    about = "Medallion: Bronze → Silver → Gold on NATS and Delta Lake"
)]
struct Cli {
    /// NATS server URL.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    nats: String,
    /// Lake root (directory, file:// or s3:// URI).
    #[arg(
        long,
        env = "MEDALLION_LAKE",
        default_value = "./.medallion/lake",
        global = true
    )]
    lake: String,
    /// Folder of DataProduct YAML files.
    #[arg(
        long,
        env = "MEDALLION_PRODUCTS",
        default_value = "./products",
        global = true
    )]
    products: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run nats-server (unless one answers at --nats) and ingest, transform
    /// and aggregate in this process until Ctrl-C.
    Up,
    /// `up`, then publish demo payments, wait for Gold, and print it.
    Demo {
        /// Payment events to publish.
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        /// Keep running after the demo (like `up`).
        #[arg(long)]
        keep: bool,
        /// Only publish the demo events to the NATS at --nats (services
        /// running elsewhere, e.g. docker compose), then exit.
        #[arg(long, conflicts_with = "keep")]
        publish_only: bool,
    },
    /// Publish raw events to medallion.ingest.<domain>.<product>: each line of
    /// the input is one message (or N lines per message with --lines).
    Publish {
        /// `<domain>.<product>`
        product: String,
        /// Input file; `-` or absent reads stdin.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Lines per message (ndjson/csv products take many records per message).
        #[arg(long, default_value_t = 1)]
        lines: usize,
        /// Publish the whole input as one message (json products).
        #[arg(long, conflicts_with = "lines")]
        whole: bool,
    },
    /// Load-test a deployment: publish events with many JetStream publishes
    /// in flight, at --rate or flat out, and print what NATS acknowledged
    /// (events/s, MB/s, publish → ack latency) as JSON.
    Load(load::LoadArgs),
    /// Rebuild Silver (and then Gold) of a product from Bronze with its current spec.
    Replay {
        /// `<domain>.<product>`
        product: String,
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Run read-only SQL over the lake's tables (`bronze|silver|gold.<domain>.<table>`).
    Query {
        sql: String,
        /// Read every table at this Delta version (time travel).
        #[arg(long)]
        version: Option<i64>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Erase a data subject from a product (GDPR): ask the catalog (admin
    /// token), then wait while medallion-transform removes the subject's rows
    /// from every layer and print what was removed as JSON.
    Forget(forget::ForgetArgs),
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    medallion_spec::types::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration like 30s or 10m"))
}

fn main() -> std::process::ExitCode {
    medallion_runtime::install_crypto_provider();
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("MEDALLION_LOG")
                .unwrap_or_else(|_| "warn,deltalake_core=error,buoyant_kernel=off".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("medallion: {}", chain.join(": "));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up => {
            let platform = local::Platform::start(&cli.nats, &cli.lake, &cli.products).await?;
            println!(
                "medallion is up: NATS {} · lake {} · products {}",
                platform.nats_url,
                cli.lake,
                cli.products.display()
            );
            println!(
                "catalog: http://{}   admin token (valid 30 days, for this run's secret):\n  export MEDALLION_TOKEN={}",
                platform.catalog_addr, platform.admin_token
            );
            // The token rides in the fragment, which the browser never sends;
            // the page moves it to sessionStorage and out of the address bar.
            println!(
                "explorer: http://{}/#token={}",
                platform.catalog_addr, platform.admin_token
            );
            println!(
                "publish with: medallion publish <domain>.<product> --file events.ndjson   (Ctrl-C stops)"
            );
            platform.wait_for_ctrl_c().await
        }
        Command::Demo {
            events,
            keep,
            publish_only,
        } => {
            if publish_only {
                demo::publish_only(&cli.nats, events).await
            } else {
                demo::run(&cli.nats, &cli.lake, &cli.products, events, keep).await
            }
        }
        Command::Publish {
            product,
            file,
            lines,
            whole,
        } => {
            let (domain, name) = split_product(&product)?;
            let text = match file.as_ref().filter(|f| f.as_os_str() != "-") {
                Some(f) => std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
                None => {
                    use std::io::Read;
                    let mut buf = Vec::new();
                    std::io::stdin().read_to_end(&mut buf)?;
                    buf
                }
            };
            let client = async_nats::connect(&cli.nats)
                .await
                .with_context(|| format!("connecting to NATS at {}", cli.nats))?;
            let js = async_nats::jetstream::new(client);
            let subject = medallion_spec::ingest_subject(domain, name);
            let messages: Vec<Vec<u8>> = if whole {
                vec![text]
            } else {
                let all: Vec<&[u8]> = text
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .collect();
                all.chunks(lines.max(1)).map(|c| c.join(&b'\n')).collect()
            };
            let n = local::publish_all(&js, &subject, messages).await?;
            println!("published {n} message(s) to {subject}");
            Ok(())
        }
        Command::Load(args) => {
            let report = load::run(&cli.nats, args).await?;
            println!("{}", serde_json::to_string(&report)?);
            if report.errors > 0 {
                bail!("{} publishes were not acknowledged", report.errors);
            }
            Ok(())
        }
        Command::Replay { product, timeout } => {
            split_product(&product)?;
            let client = async_nats::connect(&cli.nats)
                .await
                .with_context(|| format!("connecting to NATS at {}", cli.nats))?;
            let req = client.request(
                medallion_transform::REPLAY_SUBJECT,
                Bytes::from(product.clone()),
            );
            let reply = tokio::time::timeout(timeout, req)
                .await
                .context("no answer from medallion-transform in time (is it running?)")?
                .context("no medallion-transform answered the replay request (is it running?)")?;
            let text = String::from_utf8_lossy(&reply.payload).to_string();
            println!("{text}");
            if text.starts_with("ok") {
                Ok(())
            } else {
                bail!("replay failed")
            }
        }
        Command::Query {
            sql,
            version,
            limit,
        } => {
            let lake = Lake::from_location(&cli.lake)?;
            let grants: Vec<Grant> = list_local_tables(&lake)
                .into_iter()
                .map(|table| Grant {
                    table,
                    masked: Vec::new(),
                })
                .collect();
            let ctx = session(&lake, &grants, version).await?;
            let batches = run_query(&ctx, &sql, limit).await?;
            println!("{}", arrow::util::pretty::pretty_format_batches(&batches)?);
            Ok(())
        }
        Command::Forget(args) => forget::run(args).await,
    }
}

fn split_product(p: &str) -> anyhow::Result<(&str, &str)> {
    match p.split_once('.') {
        Some((d, n)) if medallion_spec::is_valid_name(d) && medallion_spec::is_valid_name(n) => {
            Ok((d, n))
        }
        _ => {
            bail!("{p:?} is not <domain>.<product> (lower snake_case names, e.g. finance.payments)")
        }
    }
}
