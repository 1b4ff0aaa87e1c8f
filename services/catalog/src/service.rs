use std::sync::Arc;

use anyhow::Context as _;
use medallion_bus::registry::{Registry, SpecSource, sync_specs};
use medallion_runtime::Runtime;
use medallion_spec::products::Products;
use tokio::sync::RwLock;
use tracing::info;

use crate::CatalogConfig;
use crate::api::{AppState, router};
use crate::audit::Audit;
use crate::seed::FolderSeed;

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
    let registry = Registry::open(&js, &config.streams)
        .await
        .context("opening the product registry")?;
    // Opened (created on first use) here rather than on the first request,
    // so a catalog that cannot reach the bucket fails at start, not mid-request.
    let erasures = medallion_bus::erasures::Erasures::open(&js, &config.streams)
        .await
        .context("opening the erasure requests bucket")?;
    let changed = registry.changes();
    let source = SpecSource::Registry(registry.clone(), changed.clone());
    let state = Arc::new(AppState {
        lake,
        products: RwLock::new(Products::new()),
        registry,
        source,
        seed: Arc::new(tokio::sync::Mutex::new(FolderSeed::new(
            config.products.clone(),
        ))),
        client: client.clone(),
        js: js.clone(),
        health: rt.health.clone(),
        quality: crate::quality::follow(js.clone()),
        dead_letters: crate::dead_letters::follow(js.clone()),
        verifier,
        audit: Audit::new(js),
        row_limit: config.row_limit,
        query_timeout: config.query_timeout,
        compact_target_bytes: config.compact_target_bytes,
        erasures,
        erasure_key: config.erasure_key.clone(),
        sql_slots: Default::default(),
        stream_limits: config.stream_limits,
    });
    state.seed_from_folder().await;
    state.sync().await;
    if config.kube_controller {
        start_kube_controller(&state, &rt).await?;
    }
    let addr = rt.serve_http(config.addr, router(state.clone())).await?;
    start_sql_ports(&config, &state, &rt).await?;
    info!(%addr, products = %config.products.display(), "catalog started");
    rt.health.set_started();
    let mut tick = tokio::time::interval(config.reload_interval);
    loop {
        tokio::select! {
            _ = rt.shutdown.cancelled() => break,
            _ = changed.notified() => state.sync().await,
            _ = tick.tick() => {
                state.seed_from_folder().await;
                state.sync().await;
            }
        }
    }
    medallion_bus::flush_for_shutdown(&client, std::time::Duration::from_secs(5)).await;
    Ok(())
}

/// The Postgres wire and Flight SQL endpoints, each on its own port when
/// configured. Bound here so a taken port fails the start.
async fn start_sql_ports(
    config: &CatalogConfig,
    state: &Arc<AppState>,
    rt: &Runtime,
) -> anyhow::Result<()> {
    let tls = match &config.sql_tls {
        Some((cert, key)) => Some(crate::sql_tls::SqlTls::load(cert, key)?),
        None => None,
    };
    if let Some(addr) = config.pg_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("MEDALLION_PG_ADDR: binding {addr}"))?;
        info!(addr = %listener.local_addr()?, tls = tls.is_some(), "postgres wire endpoint listening");
        tokio::spawn(crate::pg_wire::serve(
            state.clone(),
            listener,
            tls.clone(),
            rt.shutdown.clone(),
        ));
    }
    if let Some(addr) = config.flight_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("MEDALLION_FLIGHT_ADDR: binding {addr}"))?;
        info!(addr = %listener.local_addr()?, tls = tls.is_some(), "flight sql endpoint listening");
        tokio::spawn(crate::flight_sql::serve(
            state.clone(),
            listener,
            tls,
            rt.shutdown.clone(),
        ));
    }
    Ok(())
}

/// Starts the DataProduct controller in this process: the catalog is the
/// registry's only writer, so resources go through the same checks as
/// files and API calls, with no second writer to coordinate with.
async fn start_kube_controller(state: &Arc<AppState>, rt: &Runtime) -> anyhow::Result<()> {
    // kube's TLS needs a process-wide rustls provider (both ring and aws-lc
    // are linked; see STACK.md). Idempotent.
    medallion_runtime::install_crypto_provider();
    let client = kube::Client::try_default()
        .await
        .context("MEDALLION_KUBE_CONTROLLER=true but no Kubernetes configuration was found (in-cluster service account or KUBECONFIG)")?;
    let ctx = Arc::new(crate::kube::reconcile::Context {
        client,
        registry: state.registry.clone(),
        lake: state.lake.clone(),
        audit: state.audit.clone(),
        folder: state.seed.clone(),
        nats: state.client.clone(),
    });
    tokio::spawn(crate::kube::controller::run(
        ctx,
        rt.health.clone(),
        rt.shutdown.clone(),
    ));
    Ok(())
}

impl AppState {
    /// Re-reads the registry into the catalog's view.
    pub async fn sync(&self) {
        let mut p = self.products.write().await;
        sync_specs(&self.source, &mut p, |_| Ok(()), 0, &self.health).await;
    }

    async fn seed_from_folder(&self) {
        let rebuild = {
            let mut seed = self.seed.lock().await;
            seed.apply(&self.registry, &self.health, &self.audit).await
        };
        if !rebuild.is_empty() {
            self.sync().await;
        }
        for (d, p) in rebuild {
            self.start_full_refresh(&d, &p);
        }
    }
}
