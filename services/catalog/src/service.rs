use std::sync::Arc;

use anyhow::Context as _;
use medallion_runtime::Runtime;
use medallion_spec::folder::Products;
use tokio::sync::RwLock;
use tracing::{error, info};

use crate::CatalogConfig;
use crate::api::{AppState, router};
use crate::audit::Audit;

pub async fn run(config: CatalogConfig, rt: Runtime) -> anyhow::Result<()> {
    let lake = config
        .lake
        .clone()
        .context("MEDALLION_LAKE is not usable")?;
    let verifier = config
        .verifier
        .clone()
        .context("no token verifier configured")?;
    let (client, js) = medallion_bus::connect_and_declare(&config.nats, &config.streams)
        .await
        .context("connecting to NATS and declaring the streams")?;
    let mut products = Products::new(config.products.clone());
    products.reload(|_| Ok(()), 0).await;
    let state = Arc::new(AppState {
        lake,
        products: RwLock::new(products),
        verifier,
        audit: Audit::new(js),
        row_limit: config.row_limit,
        query_timeout: config.query_timeout,
    });
    let addr = rt.serve_http(config.addr, router(state.clone())).await?;
    info!(%addr, "catalog started");
    rt.health.set_started();
    let mut tick = tokio::time::interval(config.reload_interval);
    loop {
        tokio::select! {
            _ = rt.shutdown.cancelled() => break,
            _ = tick.tick() => {
                let mut p = state.products.write().await;
                let changes = p.reload(|_| Ok(()), 0).await;
                for f in &changes.rejected {
                    error!(file = %f.display(), error = %p.problems.get(f).cloned().unwrap_or_default(), "product spec rejected; the last valid version stays registered");
                }
                if p.problems.is_empty() {
                    rt.health.clear_problem("specs");
                } else {
                    rt.health.set_problem("specs", p.problems.iter().map(|(f, e)| format!("{}: {e}", f.display())).collect::<Vec<_>>().join("; "));
                }
            }
        }
    }
    medallion_bus::flush_for_shutdown(&client, std::time::Duration::from_secs(5)).await;
    Ok(())
}
