//! `medallion demo`: the payments product end to end on this machine.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use medallion_lake::Lake;
use medallion_lake::query::{Grant, list_local_tables, run_query, session};

use crate::local::{Platform, publish_all};

/// Deterministic demo payments: ndjson, 100 per message, with the faults a
/// real feed has (re-sent events, bad amounts, unknown currencies, garbage).
fn payments(n: usize) -> Vec<Vec<u8>> {
    let countries = ["FR", "DE", "US", "ES", "IT"];
    let currencies = ["EUR", "usd", " eur ", "USD", "EUR", "usd", "EUR", "EURO"];
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let id = if i % 50 == 49 { i - 1 } else { i };
            if i % 997 == 0 {
                return "{garbage".to_string();
            }
            let amount = if i % 101 == 0 { -5.0 } else { ((i * 37) % 20_000) as f64 / 100.0 + 1.0 };
            format!(
                r#"{{"event_id":"pay-{id}","ts":"2026-11-29T{:02}:{:02}:00Z","user_id":"user-{}","amount":{amount},"currency":"{}","country":"{}"}}"#,
                (id / 1000) % 24,
                id % 60,
                id % 500,
                currencies[id % currencies.len()],
                countries[id % countries.len()]
            )
        })
        .collect();
    lines
        .chunks(100)
        .map(|c| c.join("\n").into_bytes())
        .collect()
}

/// Publishes the demo events to a platform running elsewhere, retrying the
/// connection while it starts (compose starts everything at once).
pub async fn publish_only(nats: &str, events: usize) -> anyhow::Result<()> {
    let mut attempt = 0;
    let client = loop {
        match async_nats::connect(nats).await {
            Ok(c) => break c,
            Err(_) if attempt < 60 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("cannot reach NATS at {nats}: {e}")),
        }
    };
    let js = async_nats::jetstream::new(client);
    // The ingest stream exists once medallion-ingest has started.
    for _ in 0..60 {
        if js
            .get_stream(medallion_bus::streams::INGEST_STREAM)
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let n = publish_all(&js, "medallion.ingest.finance.payments", payments(events)).await?;
    println!(
        "published {n} message(s) with {events} payment events to medallion.ingest.finance.payments"
    );
    Ok(())
}

pub async fn run(
    nats: &str,
    lake: &str,
    products: &Path,
    events: usize,
    keep: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        products.join("payments.yaml").exists(),
        "the demo needs {}/payments.yaml (run it from the repository root, or pass --products)",
        products.display()
    );
    let platform = Platform::start(nats, lake, products).await?;
    println!(
        "medallion is up (NATS {}); publishing {events} payment events to medallion.ingest.finance.payments",
        platform.nats_url
    );
    let client = async_nats::connect(&platform.nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let started = Instant::now();
    publish_all(&js, "medallion.ingest.finance.payments", payments(events)).await?;
    println!(
        "published in {:.1}s; waiting for Silver and Gold",
        started.elapsed().as_secs_f64()
    );

    let lake_ref = Lake::from_location(lake)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = None;
    loop {
        let counts = counts(&lake_ref).await.unwrap_or_default();
        if last.as_ref() == Some(&counts) && counts.iter().all(|c| c.1 > 0) {
            break;
        }
        last = Some(counts);
        platform.check_running()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the pipeline did not settle in 5 minutes"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!(
        "settled {:.1}s after the first publish\n",
        started.elapsed().as_secs_f64()
    );
    for (table, rows) in last.unwrap_or_default() {
        println!("  {table:<45} {rows:>8} rows");
    }
    let grants: Vec<Grant> = list_local_tables(&lake_ref)
        .into_iter()
        .map(|table| Grant {
            table,
            masked: vec![],
        })
        .collect();
    let ctx = session(&lake_ref, &grants, None).await?;
    let sql = "SELECT country, sum(payments) AS payments, round(sum(revenue), 2) AS revenue \
               FROM gold.finance.revenue_by_country_hourly GROUP BY country ORDER BY country";
    println!("\n{sql}");
    println!(
        "{}",
        arrow::util::pretty::pretty_format_batches(&run_query(&ctx, sql, 100).await?)?
    );
    let sql = "SELECT errors, failed_expectations, count(*) AS n FROM silver.finance.payments__quarantine GROUP BY 1, 2 ORDER BY n DESC";
    println!("\n{sql}");
    println!(
        "{}",
        arrow::util::pretty::pretty_format_batches(&run_query(&ctx, sql, 20).await?)?
    );
    println!(
        "\nquery more with: medallion query \"SELECT * FROM silver.finance.payments LIMIT 5\""
    );
    if keep {
        println!("still running; Ctrl-C stops");
        platform.wait_for_ctrl_c().await
    } else {
        platform.stop().await.context("stopping the services")
    }
}

async fn counts(lake: &Lake) -> anyhow::Result<Vec<(String, usize)>> {
    let mut out = Vec::new();
    for t in [
        "bronze/finance/payments",
        "silver/finance/payments",
        "silver/finance/payments__quarantine",
        "gold/finance/revenue_by_country_hourly",
    ] {
        let parts: Vec<&str> = t.split('/').collect();
        let tref = medallion_spec::TableRef::new(
            medallion_spec::Layer::parse(parts[0]).expect("layer"),
            parts[1],
            parts[2],
        );
        let rows = match medallion_lake::open_at(lake, &tref, None).await? {
            Some(table) => {
                let files = medallion_lake::list_files(&tref, &table).await?;
                files.iter().map(|f| f.num_records.unwrap_or(0)).sum()
            }
            None => 0,
        };
        out.push((tref.sql_name(), rows));
    }
    Ok(out)
}
