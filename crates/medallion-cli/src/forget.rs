//! `medallion forget`: asks the catalog to erase one data subject from a
//! product, then follows the request until the transform has applied it.
//! The catalog checks (admin only), audits with a digest and stores the
//! request; the transform does the erasing. This command only talks HTTP.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use medallion_bus::erasures::{Erasure, ErasureStatus};
use serde_json::{Value, json};

/// How often the request is read again while it is pending.
const POLL: Duration = Duration::from_millis(500);

#[derive(clap::Args)]
pub struct ForgetArgs {
    /// `<domain>.<product>`
    product: String,
    /// The data subject: `<column>=<value>`, a column of the product's schema
    /// and the subject's value as it appears in the raw records.
    #[arg(long, value_parser = parse_subject, value_name = "COLUMN=VALUE")]
    subject: Subject,
    /// Seconds to wait for the transform to apply the erasure; 0 returns as
    /// soon as the catalog has accepted the request, printing its id.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    wait: u64,
    /// Catalog base URL.
    #[arg(
        long,
        env = "MEDALLION_CATALOG_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    catalog: String,
    /// Bearer token with the admin role (`medallion up` prints one).
    #[arg(long, env = "MEDALLION_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub column: String,
    pub value: String,
}

/// `<column>=<value>`: split at the first `=`, so a value may hold `=`.
pub fn parse_subject(s: &str) -> Result<Subject, String> {
    const FORM: &str = "--subject takes <column>=<value>, e.g. --subject user_id=u-42";
    let Some((column, value)) = s.split_once('=') else {
        return Err(format!("no `=`: {FORM}"));
    };
    let column = column.trim();
    if column.is_empty() {
        return Err(format!("no column before `=`: {FORM}"));
    }
    if value.is_empty() {
        return Err(format!("no value after `=`: {FORM}"));
    }
    Ok(Subject {
        column: column.to_string(),
        value: value.to_string(),
    })
}

pub async fn run(args: ForgetArgs) -> anyhow::Result<()> {
    let (domain, name) = crate::split_product(&args.product)?;
    let base = args.catalog.trim_end_matches('/');
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let url = format!("{base}/v1/products/{domain}/{name}/forget");
    let resp = http
        .post(&url)
        .bearer_auth(&args.token)
        .json(&json!({"column": args.subject.column, "value": args.subject.value}))
        .send()
        .await
        .with_context(|| format!("sending the request to the catalog at {base}"))?;
    let accepted = answer(resp)
        .await
        .context("the catalog refused the request")?;
    let id = accepted["id"]
        .as_str()
        .context("the catalog's answer has no id")?
        .to_string();
    eprintln!(
        "erasure {id} accepted for {} (subject digest {}); medallion-transform applies it",
        args.product,
        accepted["digest"].as_str().unwrap_or("?")
    );
    if args.wait == 0 {
        println!("{id}");
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(args.wait);
    let status_url = format!("{url}/{id}");
    let mut progress: Option<String> = None;
    let mut last_error: Option<String>;
    loop {
        match poll(&http, &status_url, &args.token).await {
            Ok(e) => {
                last_error = None;
                if e.progress.is_some() && e.progress != progress {
                    eprintln!("{}", e.progress.as_deref().unwrap_or_default());
                    progress = e.progress.clone();
                }
                if e.status == ErasureStatus::Failed {
                    anyhow::bail!(
                        "erasure {id} was refused by medallion-transform: {}",
                        e.progress.as_deref().unwrap_or("no reason given")
                    );
                }
                if e.status == ErasureStatus::Done {
                    let outcome = e.outcome.unwrap_or_default();
                    println!("{}", serde_json::to_string(&outcome)?);
                    return Ok(());
                }
            }
            // Refused (401, 403, 404): waiting will not change the answer.
            Err(Poll::Refused(e)) => return Err(e.context(format!("following erasure {id}"))),
            // The catalog restarting or NATS away: keep trying until the deadline.
            Err(Poll::Transient(e)) => last_error = Some(format!("{e:#}")),
        }
        if Instant::now() >= deadline {
            let seen = last_error
                .map(|e| format!(" (last error reading it: {e})"))
                .unwrap_or_default();
            bail!(
                "erasure {id} of {} is still pending after {} s{seen}: the catalog accepted it and medallion-transform applies it (is medallion-transform running?); follow it with GET {status_url}",
                args.product,
                args.wait
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

enum Poll {
    Refused(anyhow::Error),
    Transient(anyhow::Error),
}

async fn poll(http: &reqwest::Client, url: &str, token: &str) -> Result<Erasure, Poll> {
    let resp = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| Poll::Transient(e.into()))?;
    let status = resp.status();
    match answer(resp).await {
        Ok(v) => serde_json::from_value(v)
            .context("the catalog's answer is not an erasure request")
            .map_err(Poll::Refused),
        Err(e) if status.is_client_error() => Err(Poll::Refused(e)),
        Err(e) => Err(Poll::Transient(e)),
    }
}

/// The JSON body of a successful answer, or the catalog's `error` message.
async fn answer(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(body);
    }
    let message = body["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| body.to_string());
    bail!("{status}: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_is_column_equals_value() {
        assert_eq!(
            parse_subject("user_id=u-42").unwrap(),
            Subject {
                column: "user_id".into(),
                value: "u-42".into()
            }
        );
        // Split at the first `=`: the value may hold more.
        assert_eq!(parse_subject("token=a=b").unwrap().value, "a=b");
        for bad in ["user_id", "=u-42", "user_id=", ""] {
            let e = parse_subject(bad).unwrap_err();
            assert!(
                e.contains("--subject") && e.contains("<column>=<value>"),
                "{bad:?}: {e}"
            );
        }
    }
}
