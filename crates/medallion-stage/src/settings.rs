//! What every pipeline stage reads from the environment and connects to
//! before it starts: one place, so the three stages cannot drift apart in
//! how they reach NATS, the lake, the specs and each other.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use medallion_bus::batching::BatchLimits;
use medallion_bus::ownership::Owners;
use medallion_bus::registry::{SpecOrigin, SpecSource};
use medallion_bus::{NatsSettings, StreamSettings};
use medallion_lake::Lake;
use medallion_runtime::metrics::PipelineMetrics;
use medallion_runtime::{EnvReader, Runtime};

use crate::OwnershipSettings;
use crate::maintenance::MaintenanceSettings;
use crate::runner::StageDeps;

#[derive(Debug, Clone)]
pub struct StageSettings {
    pub nats: NatsSettings,
    /// `None` only when the setting was invalid (then `from_env` reported it).
    pub lake: Option<Lake>,
    /// Health, readiness and metrics.
    pub addr: SocketAddr,
    pub streams: StreamSettings,
    pub batch: BatchLimits,
    pub ack_wait: Duration,
    /// Where product specs come from (re-read on change and every `reload_interval`).
    pub specs: SpecOrigin,
    /// How often specs are re-read and upstream tables checked for versions
    /// no event announced (the safety net under the event fast path).
    pub reload_interval: Duration,
    /// This replica's name and lease time-to-live.
    pub ownership: OwnershipSettings,
    /// Compaction, checkpoints, vacuum and retention of the tables it writes.
    pub maintenance: MaintenanceSettings,
}

impl StageSettings {
    /// `service` names the NATS connection; `addr_var` is the stage's
    /// `MEDALLION_<STAGE>_ADDR`.
    pub fn from_env(env: &mut EnvReader, service: &str, addr_var: &str) -> Self {
        StageSettings {
            nats: NatsSettings::from_env(env, service),
            lake: Lake::from_env(env),
            addr: env.socket_addr(addr_var),
            streams: StreamSettings::from_env(env),
            batch: BatchLimits::from_env(env),
            ack_wait: env.duration("MEDALLION_ACK_WAIT"),
            specs: SpecOrigin::from_env(env),
            reload_interval: env.duration("MEDALLION_RELOAD_INTERVAL"),
            ownership: OwnershipSettings::from_env(env),
            maintenance: MaintenanceSettings::from_env(env),
        }
    }

    /// Checks the lake is writable, connects to NATS and declares the
    /// streams, serves health and metrics, opens the specs and the owners
    /// bucket — each failure named for the operator.
    pub async fn connect(&self, stage: &'static str, rt: &Runtime) -> anyhow::Result<Connected> {
        let lake = self.lake.clone().context("MEDALLION_LAKE is not usable")?;
        lake.check_writable().await?;
        let (client, js) = medallion_bus::connect_and_declare(&self.nats, &self.streams)
            .await
            .context("connecting to NATS and declaring the streams")?;
        let metrics = PipelineMetrics::register(&rt.registry)?;
        let addr = rt.serve_http(self.addr, axum::Router::new()).await?;
        let source = SpecSource::open(&self.specs, &js, &self.streams)
            .await
            .context("opening the product registry")?;
        let owners = Owners::open(&js, &self.streams, self.ownership.ttl)
            .await
            .context("opening the owners bucket")?;
        tracing::info!(stage, %addr, lake = %lake.root(), nats = %self.nats.url, specs = ?self.specs, replica = %self.ownership.replica, "stage connected");
        Ok(Connected {
            lake,
            client,
            js,
            metrics,
            addr,
            source,
            owners,
        })
    }
}

/// A stage's connections, ready to run.
pub struct Connected {
    pub lake: Lake,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub metrics: PipelineMetrics,
    /// Where health and metrics are served.
    pub addr: SocketAddr,
    pub source: SpecSource,
    pub owners: Owners,
}

impl Connected {
    /// What the stage runner needs ([`crate::runner::run`]).
    pub fn into_deps(self, settings: &StageSettings, rt: Runtime) -> StageDeps {
        StageDeps {
            lake: self.lake,
            js: self.js,
            client: self.client,
            source: self.source,
            owners: self.owners,
            ownership: settings.ownership.clone(),
            batch: settings.batch,
            ack_wait: settings.ack_wait,
            reload_interval: settings.reload_interval,
            maintenance: settings.maintenance.clone(),
            rt,
            metrics: self.metrics,
        }
    }
}
