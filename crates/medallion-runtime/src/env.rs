//! Every environment variable Medallion reads, in one place.
//!
//! Services read settings only through [`EnvReader`], which records every
//! invalid value instead of stopping at the first, and refuses `MEDALLION_*`
//! variables it does not know (a typo would otherwise be silently ignored).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// One documented setting.
#[derive(Debug, Clone, Copy)]
pub struct EnvVar {
    pub name: &'static str,
    pub default: Option<&'static str>,
    /// Services that read it (`all` for every service).
    pub used_by: &'static str,
    pub help: &'static str,
}

macro_rules! vars {
    ($( $name:literal, $default:expr, $used:literal, $help:literal; )*) => {
        pub const VARS: &[EnvVar] = &[ $( EnvVar { name: $name, default: $default, used_by: $used, help: $help }, )* ];
    };
}

vars! {
    "MEDALLION_LAKE", Some("./.medallion/lake"), "all", "Lake root: a directory, file:// or s3:// URI";
    "MEDALLION_PRODUCTS", Some("./products"), "catalog,ingest,transform,aggregate", "Folder of DataProduct YAML files registered at start and whenever a file changes";
    "MEDALLION_SPEC_SOURCE", Some("registry"), "ingest,transform,aggregate", "registry (the catalog's, hot-reloaded) or folder (read MEDALLION_PRODUCTS directly, no catalog)";
    "MEDALLION_CATALOG_ADDR", Some("127.0.0.1:8080"), "catalog", "Catalog HTTP API, health and metrics address";
    "MEDALLION_CATALOG_URL", Some("http://127.0.0.1:8080"), "cli", "Catalog base URL the CLI talks to";
    "MEDALLION_INGEST_ADDR", Some("127.0.0.1:9101"), "ingest", "Health and metrics address of ingest";
    "MEDALLION_TRANSFORM_ADDR", Some("127.0.0.1:9102"), "transform", "Health and metrics address of transform";
    "MEDALLION_AGGREGATE_ADDR", Some("127.0.0.1:9103"), "aggregate", "Health and metrics address of aggregate";
    "MEDALLION_BATCH_ROWS", Some("50000"), "ingest,transform,aggregate", "Most messages/rows per micro-batch";
    "MEDALLION_BATCH_BYTES", Some("33554432"), "ingest,transform,aggregate", "Most payload bytes per micro-batch";
    "MEDALLION_BATCH_WAIT", Some("250ms"), "ingest,transform,aggregate", "Longest wait to fill a micro-batch";
    "MEDALLION_ACK_WAIT", Some("60s"), "ingest,transform,aggregate", "JetStream ack wait before redelivery";
    "MEDALLION_MAX_DELIVER", Some("5"), "transform,aggregate", "Deliveries before a message is dead-lettered";
    "MEDALLION_RELOAD_INTERVAL", Some("2s"), "ingest,transform,aggregate", "How often specs are re-read and upstream tables checked for unannounced versions";
    "MEDALLION_DEDUPE_WINDOW", Some("2m"), "ingest", "How long JetStream remembers a Nats-Msg-Id";
    "MEDALLION_EVENT_MAX_AGE", Some("24h"), "ingest", "Retention of stage events (consumers fall back to tables)";
    "MEDALLION_INGEST_MAX_BYTES", Some("-1"), "ingest", "Ingest stream size limit; publishers are refused when full (-1: none)";
    "MEDALLION_MAINTENANCE_INTERVAL", Some("1m"), "ingest,transform,aggregate", "How often a stage looks after the tables it writes (compaction, checkpoints, Bronze expiry); 0s turns table maintenance off";
    "MEDALLION_VACUUM_INTERVAL", Some("1h"), "ingest,transform,aggregate", "How often files outside the time-travel retention are deleted";
    "MEDALLION_COMPACT_TARGET_BYTES", Some("134217728"), "ingest,transform,aggregate,catalog", "Compaction merges small files up to this size; files of half of it or more are left alone";
    "MEDALLION_COMPACT_FANOUT", Some("8"), "ingest,transform,aggregate", "Files of one size class merged at once, and how many wait before a merge (each row is rewritten about log_fanout(target / commit size) times)";
    "MEDALLION_CHECKPOINT_INTERVAL", Some("100"), "ingest,transform,aggregate", "A Delta checkpoint every this many commits (opening a table reads the checkpoint and fewer log entries than this)";
    "MEDALLION_TIME_TRAVEL", Some("7d"), "ingest,transform,aggregate", "Old versions stay readable at least this long (a product's spec.retention.time_travel overrides it); must exceed how far a stage may fall behind";
    "MEDALLION_LOG_RETENTION", Some("30d"), "ingest,transform,aggregate", "Delta log entries older than this are removed at checkpoints (never less than the time-travel retention)";
    "MEDALLION_ORPHAN_AGE", Some("1h"), "ingest,transform,aggregate", "Files no version references (a crash between writing and committing) are deleted once this old";
    "MEDALLION_REPLICA_ID", None, "ingest,transform,aggregate", "This replica's name among the stage's replicas (unique per process; the chart uses the pod name). Default: <hostname>-<pid>";
    "MEDALLION_LEASE_TTL", Some("6s"), "ingest,transform,aggregate", "How long a replica's leases on its units outlive its last renewal (renewed every third of it); the same on every replica";
    "MEDALLION_STREAM_REPLICAS", Some("1"), "ingest,transform,aggregate,catalog", "Replicas of every stream and of the registry (3 on a cluster)";
    "MEDALLION_DEDUPE_MEMORY", Some("268435456"), "transform", "Bytes of memory for one product's dedupe keys (~20-40 bytes each); beyond it they go to sorted runs on local disk that keep ~1.3 bytes per key in memory";
    "MEDALLION_DEDUPE_DIR", None, "transform", "Local directory for dedupe keys beyond MEDALLION_DEDUPE_MEMORY (a cache of their copies beside Silver; lost files are fetched again). Default: <temp dir>/medallion-keys";
    "MEDALLION_PII_KEY", None, "transform,catalog", "Secret key of the keyed hash of PII columns (required when a product hashes PII)";
    "MEDALLION_JWT_SECRET", None, "catalog,cli", "HS256 secret verifying catalog bearer tokens";
    "MEDALLION_JWT_PUBLIC_KEY", None, "catalog", "RS256 public key (PEM) or JWKS file verifying catalog bearer tokens";
    "MEDALLION_JWT_ISSUER", None, "catalog", "Required `iss` of catalog tokens, if set";
    "MEDALLION_JWT_AUDIENCE", None, "catalog", "Required `aud` of catalog tokens, if set";
    "MEDALLION_TOKEN", None, "cli", "Bearer token the CLI sends to the catalog";
    "MEDALLION_QUERY_ROW_LIMIT", Some("10000"), "catalog", "Most rows a query returns";
    "MEDALLION_QUERY_TIMEOUT", Some("30s"), "catalog", "Longest a query may run";
    "MEDALLION_PG_ADDR", None, "catalog", "Postgres wire protocol address (host:port) for BI tools and psql; off unless set. The password is a catalog JWT";
    "MEDALLION_FLIGHT_ADDR", None, "catalog", "Arrow Flight SQL address (host:port) for ADBC/JDBC clients; off unless set. Bearer or handshake with a catalog JWT";
    "MEDALLION_SQL_TLS_CERT", None, "catalog", "PEM certificate chain for TLS on the Postgres wire and Flight SQL ports (with MEDALLION_SQL_TLS_KEY)";
    "MEDALLION_SQL_TLS_KEY", None, "catalog", "PEM private key for MEDALLION_SQL_TLS_CERT";
    "MEDALLION_STREAM_ROW_LIMIT", Some("100000000"), "catalog", "Most rows one Postgres wire or Flight SQL answer may stream; past it the query fails with a message";
    "MEDALLION_STREAM_BYTE_LIMIT", Some("17179869184"), "catalog", "Most bytes (Arrow, in memory) one Postgres wire or Flight SQL answer may stream; past it the query fails with a message";
    "MEDALLION_QUERY_CONCURRENCY", Some("8"), "catalog", "Queries one role may run at once over any protocol; one more is refused with a message";
    "MEDALLION_KUBE_CONTROLLER", Some("false"), "catalog", "Watch DataProduct custom resources (in a cluster)";
    "MEDALLION_LOG", Some("info"), "all", "Log filter (tracing EnvFilter syntax). Dependencies (Delta Lake, DataFusion, the NATS and HTTP clients, the trace exporter) log only warnings and errors, some nothing, unless a directive names them: `info,deltalake_core=debug` brings Delta's back";
    "MEDALLION_LOG_FORMAT", Some("auto"), "all", "json, text, or auto (text on a terminal)";
    "MEDALLION_FAIL_POINTS", None, "all", "Test-only fault injection (see e2e/)";
    "MEDALLION_NATS_SERVER", Some("nats-server"), "tests", "nats-server binary the tests start";
    "NATS_URL", Some("nats://127.0.0.1:4222"), "all", "NATS server URL(s), comma-separated";
    "NATS_USER", None, "all", "NATS user (with NATS_PASSWORD)";
    "NATS_PASSWORD", None, "all", "NATS password";
    "NATS_TOKEN", None, "all", "NATS auth token";
    "NATS_NKEY", None, "all", "File holding an NKey seed";
    "NATS_CREDS", None, "all", "NATS .creds file (JWT + seed)";
    "NATS_CA", None, "all", "CA certificate (PEM) to verify the NATS server";
    "NATS_CERT", None, "all", "Client certificate (PEM) for NATS mutual TLS";
    "NATS_KEY", None, "all", "Client key (PEM) for NATS mutual TLS";
    "OTEL_EXPORTER_OTLP_ENDPOINT", None, "all", "OTLP collector (e.g. Jaeger) endpoint; traces are exported only when set";
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None, "all", "OTLP endpoint for traces only";
    "OTEL_EXPORTER_OTLP_PROTOCOL", Some("grpc"), "all", "grpc or http/protobuf";
    "OTEL_SERVICE_NAME", None, "all", "Service name in traces (defaults to the binary name)";
    "OTEL_RESOURCE_ATTRIBUTES", None, "all", "Extra resource attributes, key=value,...";
    "OTEL_TRACES_SAMPLER", Some("parentbased_always_on"), "all", "always_on, always_off, traceidratio, parentbased_*";
    "OTEL_TRACES_SAMPLER_ARG", None, "all", "Sampler ratio for traceidratio samplers";
    "OTEL_SDK_DISABLED", Some("false"), "all", "true turns tracing export off";
}

pub fn lookup(name: &str) -> Option<&'static EnvVar> {
    VARS.iter().find(|v| v.name == name)
}

/// One invalid setting.
#[derive(Debug, Clone)]
pub struct SettingError {
    pub name: String,
    pub message: String,
}

/// Every invalid setting, reported together.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<SettingError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", e.name, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads settings from a snapshot of the environment.
pub struct EnvReader {
    vars: BTreeMap<String, String>,
    errors: Vec<SettingError>,
}

impl EnvReader {
    pub fn from_process() -> Self {
        Self::from_map(std::env::vars().collect())
    }

    pub fn from_map(vars: BTreeMap<String, String>) -> Self {
        let mut r = EnvReader {
            vars,
            errors: Vec::new(),
        };
        r.check_unknown();
        r
    }

    fn check_unknown(&mut self) {
        let unknown: Vec<String> = self
            .vars
            .keys()
            .filter(|k| k.starts_with("MEDALLION_") && lookup(k).is_none())
            .cloned()
            .collect();
        for name in unknown {
            let hint = closest(&name)
                .map(|c| format!("; did you mean {c}?"))
                .unwrap_or_default();
            self.errors.push(SettingError {
                message: format!("unknown setting{hint} (see docs/configuration.md)"),
                name,
            });
        }
    }

    fn error(&mut self, name: &str, message: String) {
        self.errors.push(SettingError {
            name: name.to_string(),
            message,
        });
    }

    fn raw(&self, name: &str) -> Option<String> {
        debug_assert!(lookup(name).is_some(), "{name} is not in the env registry");
        self.vars
            .get(name)
            .filter(|v| !v.trim().is_empty())
            .cloned()
            .or_else(|| lookup(name).and_then(|v| v.default).map(str::to_string))
    }

    /// The value, or the registered default; `None` if neither.
    pub fn optional(&mut self, name: &str) -> Option<String> {
        self.raw(name)
    }

    pub fn string(&mut self, name: &str) -> String {
        self.raw(name).unwrap_or_default()
    }

    pub fn path(&mut self, name: &str) -> Option<PathBuf> {
        self.raw(name).map(PathBuf::from)
    }

    pub fn existing_file(&mut self, name: &str) -> Option<PathBuf> {
        let p = self.path(name)?;
        if !p.is_file() {
            self.error(name, format!("file {} does not exist", p.display()));
            return None;
        }
        Some(p)
    }

    pub fn parse<T: std::str::FromStr>(&mut self, name: &str, what: &str) -> Option<T> {
        let raw = self.raw(name)?;
        match raw.trim().parse() {
            Ok(v) => Some(v),
            Err(_) => {
                self.error(name, format!("`{raw}` is not {what}"));
                None
            }
        }
    }

    pub fn usize(&mut self, name: &str, min: usize) -> usize {
        match self.parse::<usize>(name, "a whole number") {
            Some(v) if v >= min => v,
            Some(v) => {
                self.error(name, format!("{v} is too small; use at least {min}"));
                min
            }
            None => min,
        }
    }

    pub fn i64(&mut self, name: &str) -> i64 {
        self.parse::<i64>(name, "a whole number").unwrap_or(-1)
    }

    pub fn duration(&mut self, name: &str) -> Duration {
        let Some(raw) = self.raw(name) else {
            return Duration::ZERO;
        };
        match parse_duration(&raw) {
            Some(d) => d,
            None => {
                self.error(
                    name,
                    format!("`{raw}` is not a duration; write e.g. 250ms, 30s, 5m or 1h"),
                );
                Duration::ZERO
            }
        }
    }

    pub fn bool(&mut self, name: &str) -> bool {
        match self
            .raw(name)
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => false,
            Some("1" | "true" | "yes" | "on") => true,
            Some("0" | "false" | "no" | "off") => false,
            Some(other) => {
                let other = other.to_string();
                self.error(name, format!("`{other}` is not true or false"));
                false
            }
        }
    }

    pub fn socket_addr(&mut self, name: &str) -> std::net::SocketAddr {
        self.parse(name, "a host:port address such as 127.0.0.1:8080")
            .unwrap_or_else(|| ([127, 0, 0, 1], 0).into())
    }

    /// Adds a problem found while interpreting settings together.
    pub fn invalid(&mut self, name: &str, message: impl Into<String>) {
        self.error(name, message.into());
    }

    /// All problems at once, or Ok.
    pub fn finish(self) -> Result<(), ConfigErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(self.errors))
        }
    }
}

pub use medallion_spec::types::parse_duration;

fn closest(name: &str) -> Option<&'static str> {
    VARS.iter()
        .map(|v| (edit_distance(name, v.name), v.name))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, n)| n)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The settings reference as Markdown (docs/configuration.md is generated from this).
pub fn markdown_reference() -> String {
    let mut out = String::from("| variable | default | used by | meaning |\n|---|---|---|---|\n");
    for v in VARS {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            v.name,
            v.default
                .map(|d| format!("`{d}`"))
                .unwrap_or_else(|| "—".into()),
            v.used_by,
            v.help
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(pairs: &[(&str, &str)]) -> EnvReader {
        EnvReader::from_map(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let mut r = reader(&[
            ("MEDALLION_BATCH_ROWS", "lots"),
            ("MEDALLION_BATCH_WAIT", "soon"),
            ("MEDALLION_LAKES", "/tmp"),
        ]);
        r.usize("MEDALLION_BATCH_ROWS", 1);
        r.duration("MEDALLION_BATCH_WAIT");
        let err = r.finish().unwrap_err().to_string();
        assert!(
            err.contains("MEDALLION_BATCH_ROWS: `lots` is not a whole number"),
            "{err}"
        );
        assert!(
            err.contains("MEDALLION_BATCH_WAIT: `soon` is not a duration"),
            "{err}"
        );
        assert!(
            err.contains("MEDALLION_LAKES: unknown setting; did you mean MEDALLION_LAKE?"),
            "{err}"
        );
    }

    #[test]
    fn defaults_apply() {
        let mut r = reader(&[]);
        assert_eq!(
            r.duration("MEDALLION_BATCH_WAIT"),
            Duration::from_millis(250)
        );
        assert_eq!(r.string("NATS_URL"), "nats://127.0.0.1:4222");
        assert!(r.finish().is_ok());
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = VARS.iter().map(|v| v.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), VARS.len());
    }
}
