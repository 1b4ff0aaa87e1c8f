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
    /// Keys the digest that names a data subject in erasure requests.
    pub erasure_key: Option<crate::forget_api::DigestKey>,
    pub pg_addr: Option<SocketAddr>,
    pub flight_addr: Option<SocketAddr>,
    /// Certificate chain and key (PEM) for the SQL ports.
    pub sql_tls: Option<(PathBuf, PathBuf)>,
    pub stream_limits: crate::sql_gate::StreamLimits,
}

impl CatalogConfig {
    pub fn from_env(env: &mut EnvReader) -> Self {
        let issuer = env.optional("MEDALLION_JWT_ISSUER");
        let audience = env.optional("MEDALLION_JWT_AUDIENCE");
        let secret = env.optional("MEDALLION_JWT_SECRET");
        // The digest of an erased subject is keyed with the catalog's own
        // signing secret. RS256 leaves the catalog no secret of its own, so
        // the PII key (a secret every deployment that hashes PII already
        // keeps) stands in; without either, erasure requests are refused.
        let erasure_key = secret
            .clone()
            .or_else(|| env.optional("MEDALLION_PII_KEY"))
            .filter(|k| !k.is_empty())
            .map(|k| crate::forget_api::DigestKey::new(k.into_bytes()));
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
        let pg_addr = env.parse(
            "MEDALLION_PG_ADDR",
            "a host:port address such as 0.0.0.0:5432",
        );
        let flight_addr = env.parse(
            "MEDALLION_FLIGHT_ADDR",
            "a host:port address such as 0.0.0.0:50051",
        );
        let sql_tls = match (
            env.existing_file("MEDALLION_SQL_TLS_CERT"),
            env.existing_file("MEDALLION_SQL_TLS_KEY"),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                env.invalid(
                    "MEDALLION_SQL_TLS_KEY",
                    "MEDALLION_SQL_TLS_CERT is set: give its private key (PEM) too",
                );
                None
            }
            (None, Some(_)) => {
                env.invalid(
                    "MEDALLION_SQL_TLS_CERT",
                    "MEDALLION_SQL_TLS_KEY is set: give its certificate chain (PEM) too",
                );
                None
            }
        };
        let query_timeout = env.duration("MEDALLION_QUERY_TIMEOUT");
        let stream_limits = crate::sql_gate::StreamLimits {
            rows: env.usize("MEDALLION_STREAM_ROW_LIMIT", 1),
            bytes: env.usize("MEDALLION_STREAM_BYTE_LIMIT", 1),
            timeout: query_timeout,
            per_role: env.usize("MEDALLION_QUERY_CONCURRENCY", 1),
        };
        CatalogConfig {
            pg_addr,
            flight_addr,
            sql_tls,
            stream_limits,
            nats: NatsSettings::from_env(env, "medallion-catalog"),
            lake: Lake::from_env(env),
            addr: env.socket_addr("MEDALLION_CATALOG_ADDR"),
            streams: StreamSettings::from_env(env),
            products: env
                .path("MEDALLION_PRODUCTS")
                .unwrap_or_else(|| PathBuf::from("./products")),
            verifier,
            row_limit: env.usize("MEDALLION_QUERY_ROW_LIMIT", 1),
            query_timeout,
            compact_target_bytes: env.usize("MEDALLION_COMPACT_TARGET_BYTES", 1 << 20) as u64,
            reload_interval: env.duration("MEDALLION_RELOAD_INTERVAL"),
            kube_controller: env.bool("MEDALLION_KUBE_CONTROLLER"),
            erasure_key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> CatalogConfig {
        let mut env = EnvReader::from_map(
            vars.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        let c = CatalogConfig::from_env(&mut env);
        env.finish().unwrap();
        c
    }

    #[test]
    fn the_subject_digest_is_keyed_with_the_jwt_secret_or_else_the_pii_key() {
        let digest = |c: &CatalogConfig| {
            c.erasure_key
                .as_ref()
                .map(|k| k.digest("shop", "orders", "email", "a@b"))
        };
        let secret = "catalog-secret-0123456789abcdef-0123";
        let hs = config(&[
            ("MEDALLION_JWT_SECRET", secret),
            ("MEDALLION_PII_KEY", "pii"),
        ]);
        let want = crate::forget_api::DigestKey::new(secret.into())
            .digest("shop", "orders", "email", "a@b");
        assert_eq!(digest(&hs), Some(want));
        let public = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/test_rsa_public.pem"
        );
        let rs = config(&[
            ("MEDALLION_JWT_PUBLIC_KEY", public),
            ("MEDALLION_PII_KEY", "pii"),
        ]);
        let want = crate::forget_api::DigestKey::new(b"pii".to_vec())
            .digest("shop", "orders", "email", "a@b");
        assert_eq!(digest(&rs), Some(want));
        assert_eq!(
            digest(&config(&[("MEDALLION_JWT_PUBLIC_KEY", public)])),
            None
        );
    }
}
