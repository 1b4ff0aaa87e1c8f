use std::net::SocketAddr;

use medallion_bus::batching::BatchLimits;
use medallion_bus::{NatsSettings, StreamSettings};
use medallion_lake::Lake;
use medallion_runtime::EnvReader;

#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub nats: NatsSettings,
    /// `None` only when the setting was invalid (then `from_env` reported it).
    pub lake: Option<Lake>,
    pub addr: SocketAddr,
    pub streams: StreamSettings,
    pub batch: BatchLimits,
    /// Where product specs come from: ingest needs only their partition counts.
    pub specs: medallion_bus::registry::SpecOrigin,
    /// How often specs and the stream's subjects are looked at again.
    pub reload_interval: std::time::Duration,
    /// This replica's name and lease time-to-live.
    pub ownership: medallion_stage::OwnershipSettings,
}

impl IngestConfig {
    pub fn from_env(env: &mut EnvReader) -> Self {
        IngestConfig {
            nats: NatsSettings::from_env(env, "medallion-ingest"),
            lake: Lake::from_env(env),
            addr: env.socket_addr("MEDALLION_INGEST_ADDR"),
            streams: StreamSettings::from_env(env),
            batch: BatchLimits::from_env(env),
            specs: medallion_bus::registry::SpecOrigin::from_env(env),
            reload_interval: env.duration("MEDALLION_RELOAD_INTERVAL"),
            ownership: medallion_stage::OwnershipSettings::from_env(env),
        }
    }
}
