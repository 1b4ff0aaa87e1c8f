use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use medallion_bus::{NatsSettings, StreamSettings};
use medallion_lake::Lake;
use medallion_runtime::EnvReader;

use crate::auth::Verifier;

#[derive(Debug, Clone)]
pub struct CatalogConfig {
    pub nats: NatsSettings,
    pub lake: Option<Lake>,
    pub addr: SocketAddr,
    pub streams: StreamSettings,
    pub products: PathBuf,
    pub verifier: Option<Verifier>,
    pub row_limit: usize,
    pub query_timeout: Duration,
    /// Files below half of this count as small in a table's health.
    pub compact_target_bytes: u64,
    pub reload_interval: Duration,
    /// Run the DataProduct controller (`MEDALLION_KUBE_CONTROLLER`).
    pub kube_controller: bool,
}

impl CatalogConfig {
    pub fn from_env(env: &mut EnvReader) -> Self {
        let issuer = env.optional("MEDALLION_JWT_ISSUER");
        let audience = env.optional("MEDALLION_JWT_AUDIENCE");
        let secret = env.optional("MEDALLION_JWT_SECRET");
        let public_key = env.existing_file("MEDALLION_JWT_PUBLIC_KEY");
        let verifier = match (secret, public_key) {
            (Some(_), Some(_)) => {
                env.invalid("MEDALLION_JWT_SECRET", "set either MEDALLION_JWT_SECRET (HS256) or MEDALLION_JWT_PUBLIC_KEY (RS256), not both");
                None
            }
            (Some(s), None) if s.len() < 32 => {
                env.invalid(
                    "MEDALLION_JWT_SECRET",
                    "must be at least 32 bytes; generate one with `openssl rand -hex 32`",
                );
                None
            }
            (Some(s), None) => Some(Verifier::hs256(
                s.as_bytes(),
                issuer.as_deref(),
                audience.as_deref(),
            )),
            (None, Some(path)) => match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|file| Verifier::rs256(&file, issuer.as_deref(), audience.as_deref()))
            {
                Ok(v) => Some(v),
                Err(e) => {
                    env.invalid(
                        "MEDALLION_JWT_PUBLIC_KEY",
                        format!("{}: {e}", path.display()),
                    );
                    None
                }
            },
            (None, None) => {
                env.invalid(
                    "MEDALLION_JWT_SECRET",
                    "the catalog always authenticates: set MEDALLION_JWT_SECRET (HS256) or MEDALLION_JWT_PUBLIC_KEY (RS256)",
                );
                None
            }
        };
        CatalogConfig {
            nats: NatsSettings::from_env(env, "medallion-catalog"),
            lake: Lake::from_env(env),
            addr: env.socket_addr("MEDALLION_CATALOG_ADDR"),
            streams: StreamSettings::from_env(env),
            products: env
                .path("MEDALLION_PRODUCTS")
                .unwrap_or_else(|| PathBuf::from("./products")),
            verifier,
            row_limit: env.usize("MEDALLION_QUERY_ROW_LIMIT", 1),
            query_timeout: env.duration("MEDALLION_QUERY_TIMEOUT"),
            compact_target_bytes: env.usize("MEDALLION_COMPACT_TARGET_BYTES", 1 << 20) as u64,
            reload_interval: env.duration("MEDALLION_RELOAD_INTERVAL"),
            kube_controller: env.bool("MEDALLION_KUBE_CONTROLLER"),
        }
    }
}
