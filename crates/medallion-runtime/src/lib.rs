//! The runtime every Medallion service shares: settings from the environment,
//! telemetry, `/healthz` `/readyz` `/metrics`, and graceful shutdown
//! (stop pulling → flush and commit → ack → flush telemetry).
//!
//! A service's `main.rs` is one call to [`main`]; its library exposes
//! `Config::from_env` and `run(config, runtime)`, which tests call in-process.

pub mod backoff;
pub mod env;
pub mod failpoint;
mod health;
pub mod http;
pub mod metrics;
pub mod telemetry;

use std::future::Future;
use std::process::ExitCode;

pub use env::{ConfigErrors, EnvReader};

// Every Medallion binary allocates and frees batch-sized buffers (tens of MB)
// per micro-batch. glibc's malloc returns those to the kernel and then faults
// freshly zeroed pages back in for the next batch (≈10% of the transform's CPU
// in profiles); mimalloc keeps its segments and reuses them. Built without
// its transparent-huge-page advice (`no_thp`): with THP on, every fresh
// region faults in as a 2 MiB page the kernel zeroes whole, even for a
// small buffer — ~10% of the transform's CPU on a full backlog.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
pub use health::Health;
pub use prometheus;
pub use tokio_util::sync::CancellationToken;

/// What a running service gets from the runtime.
#[derive(Clone)]
pub struct Runtime {
    pub service: &'static str,
    pub health: Health,
    pub shutdown: CancellationToken,
    pub registry: prometheus::Registry,
    /// The address `serve_http` bound (the OS picks the port for `:0`).
    http_addr: tokio::sync::watch::Sender<Option<std::net::SocketAddr>>,
}

impl Runtime {
    pub fn new(service: &'static str) -> Self {
        Runtime {
            service,
            health: Health::new(),
            shutdown: CancellationToken::new(),
            registry: prometheus::Registry::new(),
            http_addr: tokio::sync::watch::Sender::new(None),
        }
    }

    /// Waits until the service serves HTTP; fails if it stops first.
    pub async fn wait_for_http(&self) -> anyhow::Result<std::net::SocketAddr> {
        let mut rx = self.http_addr.subscribe();
        let addr = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            rx.wait_for(|a| a.is_some()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("{} did not start serving HTTP within 60 s", self.service))?
        .map_err(|_| anyhow::anyhow!("{} stopped before serving HTTP", self.service))?;
        Ok(addr.expect("checked by wait_for"))
    }

    /// Serves the probes plus `routes` on `addr`; returns the bound address.
    pub async fn serve_http(
        &self,
        addr: std::net::SocketAddr,
        routes: axum::Router,
    ) -> std::io::Result<std::net::SocketAddr> {
        let router = http::probe_router(self.health.clone(), self.registry.clone()).merge(routes);
        let bound = http::serve(addr, router, self.shutdown.clone()).await?;
        self.http_addr.send_replace(Some(bound));
        Ok(bound)
    }
}

/// Installs the process-wide TLS crypto provider: both `ring` and `aws-lc-rs`
/// end up linked, and rustls refuses to guess between them.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The whole life of a service binary: read settings (reporting every invalid
/// one at once), start telemetry, run until SIGTERM/SIGINT, shut down in order.
pub fn main<C, L, R, F>(service: &'static str, load: L, run: R) -> ExitCode
where
    L: FnOnce(&mut EnvReader) -> C,
    R: FnOnce(C, Runtime) -> F,
    F: Future<Output = anyhow::Result<()>>,
{
    install_crypto_provider();
    let mut env = EnvReader::from_process();
    let telemetry_settings = telemetry::TelemetrySettings::from_env(service, &mut env);
    let config = load(&mut env);
    if let Err(errors) = env.finish() {
        eprintln!("{service}: invalid configuration: {errors}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{service}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let telemetry = telemetry::Telemetry::init(&telemetry_settings);
        let runtime = Runtime::new(service);
        shutdown_on_signals(runtime.shutdown.clone());
        let result = run(config, runtime).await;
        telemetry.shutdown().await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
                eprintln!("{service}: error: {}", chain.join(": "));
                tracing::error!(error = %chain.join(": "), "service stopped");
                ExitCode::FAILURE
            }
        }
    })
}

/// First SIGTERM/SIGINT starts a graceful shutdown; a second one exits at once.
pub fn shutdown_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        token.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without flushing");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
