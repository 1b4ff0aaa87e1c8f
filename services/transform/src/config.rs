use std::net::SocketAddr;
use std::time::Duration;

use medallion_bus::batching::BatchLimits;
use medallion_bus::registry::SpecOrigin;
use medallion_bus::{NatsSettings, StreamSettings};
use medallion_lake::Lake;
use medallion_runtime::EnvReader;

#[derive(Debug, Clone)]
pub struct TransformConfig {
    pub nats: NatsSettings,
    pub lake: Option<Lake>,
    pub addr: SocketAddr,
    pub streams: StreamSettings,
    pub batch: BatchLimits,
    pub ack_wait: Duration,
    /// Where product specs come from (re-read on change and every `reload_interval`).
    pub specs: SpecOrigin,
    pub pii_key: Option<Vec<u8>>,
    /// How often specs are re-read and Bronze tables checked for versions no
    /// event announced (the safety net under the event fast path).
    pub reload_interval: Duration,
    /// Attempts at a message that crashes the transform before it is dead-lettered.
    pub max_deliver: u32,
    /// This replica's name and lease time-to-live.
    pub ownership: medallion_stage::OwnershipSettings,
}

impl TransformConfig {
    pub fn from_env(env: &mut EnvReader) -> Self {
        let pii_key = env.optional("MEDALLION_PII_KEY").map(String::into_bytes);
        if let Some(k) = &pii_key
            && k.len() < 16
        {
            env.invalid(
                "MEDALLION_PII_KEY",
                "must be at least 16 bytes; generate one with `openssl rand -hex 32`",
            );
        }
        TransformConfig {
            nats: NatsSettings::from_env(env, "medallion-transform"),
            lake: Lake::from_env(env),
            addr: env.socket_addr("MEDALLION_TRANSFORM_ADDR"),
            streams: StreamSettings::from_env(env),
            batch: BatchLimits::from_env(env),
            ack_wait: env.duration("MEDALLION_ACK_WAIT"),
            specs: SpecOrigin::from_env(env),
            pii_key,
            reload_interval: env.duration("MEDALLION_RELOAD_INTERVAL"),
            max_deliver: env.usize("MEDALLION_MAX_DELIVER", 1).min(u32::MAX as usize) as u32,
            ownership: medallion_stage::OwnershipSettings::from_env(env),
        }
    }
}
