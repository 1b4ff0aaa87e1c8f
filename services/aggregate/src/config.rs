use std::net::SocketAddr;
use std::time::Duration;

use medallion_bus::batching::BatchLimits;
use medallion_bus::registry::SpecOrigin;
use medallion_bus::{NatsSettings, StreamSettings};
use medallion_lake::Lake;
use medallion_runtime::EnvReader;

#[derive(Debug, Clone)]
pub struct AggregateConfig {
    pub nats: NatsSettings,
    pub lake: Option<Lake>,
    pub addr: SocketAddr,
    pub streams: StreamSettings,
    pub batch: BatchLimits,
    pub ack_wait: Duration,
    /// Where product specs come from (re-read on change and every `reload_interval`).
    pub specs: SpecOrigin,
    pub reload_interval: Duration,
    /// Attempts at a row that crashes the aggregation before it is dead-lettered.
    pub max_deliver: u32,
    /// This replica's name and lease time-to-live.
    pub ownership: medallion_stage::OwnershipSettings,
}

impl AggregateConfig {
    pub fn from_env(env: &mut EnvReader) -> Self {
        AggregateConfig {
            nats: NatsSettings::from_env(env, "medallion-aggregate"),
            lake: Lake::from_env(env),
            addr: env.socket_addr("MEDALLION_AGGREGATE_ADDR"),
            streams: StreamSettings::from_env(env),
            batch: BatchLimits::from_env(env),
            ack_wait: env.duration("MEDALLION_ACK_WAIT"),
            specs: SpecOrigin::from_env(env),
            reload_interval: env.duration("MEDALLION_RELOAD_INTERVAL"),
            max_deliver: env.usize("MEDALLION_MAX_DELIVER", 1).min(u32::MAX as usize) as u32,
            ownership: medallion_stage::OwnershipSettings::from_env(env),
        }
    }
}
