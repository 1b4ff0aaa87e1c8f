//! Runs the real service binaries as a user would: separate processes with
//! their settings in the environment, logs in a file, killed on drop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use medallion_testkit::KillOnDrop;

/// The path of a workspace binary, built on first use if a narrower
/// `cargo test -p medallion-e2e` did not build it.
pub fn binary(name: &str) -> PathBuf {
    // A private copy of the binaries: several checkouts that share one
    // CARGO_TARGET_DIR overwrite each other's target/debug/<name>.
    if let Some(dir) = std::env::var_os("MEDALLION_E2E_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--bin", name])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --bin {name} failed");
    }
    path
}

/// A running service binary.
pub struct Service {
    pub name: &'static str,
    pub log: PathBuf,
    process: KillOnDrop,
}

impl Service {
    pub fn start(name: &'static str, vars: &BTreeMap<String, String>, logs: &Path) -> Service {
        Self::start_named(name, name, vars, logs)
    }

    /// Starts binary `name` logging to `<log_name>.log` (several replicas of
    /// one service, each with its own log).
    pub fn start_named(
        name: &'static str,
        log_name: &str,
        vars: &BTreeMap<String, String>,
        logs: &Path,
    ) -> Service {
        let log = match std::env::var("MEDALLION_E2E_LOGS") {
            Ok(d) => PathBuf::from(d).join(format!("{log_name}.log")),
            Err(_) => logs.join(format!("{log_name}.log")),
        };
        let file = std::fs::File::create(&log).expect("create log file");
        let mut cmd = Command::new(binary(name));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(vars)
            .env("MEDALLION_LOG_FORMAT", "json")
            .stdout(Stdio::from(file.try_clone().expect("clone log handle")))
            .stderr(Stdio::from(file));
        let process = KillOnDrop(cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}")));
        Service { name, log, process }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process has not exited (yet).
    pub fn is_running(&mut self) -> bool {
        matches!(self.process.0.try_wait(), Ok(None))
    }

    /// SIGTERM and wait: the graceful path (flush and commit, ack, flush telemetry).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.process.0.id().to_string()])
            .status();
        self.process.0.wait().expect("wait for service")
    }

    /// Sends a signal by name (`STOP` pauses the process, `CONT` resumes it).
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{name}"), &self.process.0.id().to_string()])
            .status();
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.process.0.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// The three pipeline services, in the order their settings come from
/// [`lake_fault_vars`].
pub const PIPELINE: [&str; 3] = [
    "medallion-ingest",
    "medallion-transform",
    "medallion-aggregate",
];

/// Settings of the three pipeline services for tests that break the lake:
/// small batches, a short ack wait so redeliveries come within the test, no
/// telemetry export.
pub fn lake_fault_vars(nats_url: &str, lake: &Path) -> Vec<BTreeMap<String, String>> {
    [
        "MEDALLION_INGEST_ADDR",
        "MEDALLION_TRANSFORM_ADDR",
        "MEDALLION_AGGREGATE_ADDR",
    ]
    .iter()
    .map(|a| {
        let mut v = pipeline_vars(nats_url, lake, a);
        v.insert("MEDALLION_BATCH_ROWS".into(), "500".into());
        v.insert("MEDALLION_ACK_WAIT".into(), "5s".into());
        v.insert("OTEL_SDK_DISABLED".into(), "true".into());
        v
    })
    .collect()
}

/// The settings every pipeline service gets in these tests: specs from the
/// repository's `products/` folder (no catalog), short batch waits, and its
/// health/metrics address on a free port.
pub fn pipeline_vars(nats_url: &str, lake: &Path, addr_var: &str) -> BTreeMap<String, String> {
    [
        ("NATS_URL", nats_url.to_string()),
        ("MEDALLION_LAKE", lake.display().to_string()),
        (
            "MEDALLION_PRODUCTS",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../products").to_string(),
        ),
        ("MEDALLION_SPEC_SOURCE", "folder".to_string()),
        (
            "MEDALLION_PII_KEY",
            "e2e-test-pii-key-0123456789".to_string(),
        ),
        ("MEDALLION_BATCH_WAIT", "50ms".to_string()),
        ("MEDALLION_RELOAD_INTERVAL", "500ms".to_string()),
        (
            addr_var,
            format!("127.0.0.1:{}", medallion_testkit::free_port()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The four services of a whole platform, in the order they start.
pub const PLATFORM: [&str; 4] = [
    "medallion-ingest",
    "medallion-transform",
    "medallion-aggregate",
    "medallion-catalog",
];

/// [`pipeline_vars`] for each of [`PLATFORM`], telemetry off; the catalog's
/// last, for the caller to add its secret and ports.
pub fn platform_vars(nats_url: &str, lake: &Path) -> Vec<BTreeMap<String, String>> {
    [
        "MEDALLION_INGEST_ADDR",
        "MEDALLION_TRANSFORM_ADDR",
        "MEDALLION_AGGREGATE_ADDR",
        "MEDALLION_CATALOG_ADDR",
    ]
    .iter()
    .map(|a| {
        let mut v = pipeline_vars(nats_url, lake, a);
        v.insert("OTEL_SDK_DISABLED".into(), "true".into());
        v
    })
    .collect()
}

/// Every service's log, headed by its name: the context of a failed wait.
pub fn services_logs(services: &[Service]) -> String {
    services
        .iter()
        .map(|s| format!("--- {} ---\n{}", s.name, s.logs()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// SIGTERM every service; each must exit cleanly (its log is in the failure).
pub fn stop_all(services: &mut [Service]) {
    for s in services {
        assert!(
            s.stop().success(),
            "{} did not stop cleanly:\n{}",
            s.name,
            s.logs()
        );
    }
}

/// Starts each service with its settings, then connects to NATS and waits
/// until the services have declared the streams.
pub async fn start_services(
    names: &[&'static str],
    vars: &[BTreeMap<String, String>],
    logs: &Path,
    nats_url: String,
) -> (Vec<Service>, async_nats::jetstream::Context) {
    let services: Vec<Service> = names
        .iter()
        .zip(vars)
        .map(|(n, v)| Service::start(n, v, logs))
        .collect();
    let js = streams_declared(nats_url, &services).await;
    (services, js)
}

/// Connects to NATS and waits until the services have declared the streams.
pub async fn streams_declared(
    nats_url: String,
    services: &[Service],
) -> async_nats::jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(nats_url)
        .await
        .expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while js.get_stream("MEDALLION_INGEST").await.is_err() {
        // The services' logs say why (e.g. a cluster that cannot place replicas).
        assert!(
            std::time::Instant::now() < deadline,
            "the services did not declare the streams within 90 s:\n{}",
            services_logs(services)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    js
}

/// One ndjson message of `n` payment events numbered from `first`, ids
/// `<prefix><i>`, spread over three countries and three hours.
pub fn payments_message(prefix: &str, first: usize, n: usize) -> Vec<u8> {
    (first..first + n)
        .map(|i| {
            format!(
                r#"{{"event_id":"{prefix}{i}","ts":"2026-11-29T1{}:00:00Z","user_id":"u{}","amount":{},"currency":"EUR","country":"{}"}}"#,
                i % 3,
                i % 9,
                i % 30 + 1,
                ["FR", "DE", "US"][i % 3]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

/// A plain HTTP/1.1 GET (enough for probes, /metrics and the catalog API):
/// the status code and the body; `None` when nothing answers.
pub async fn http_get(url: &str, bearer: Option<&str>) -> Option<(u16, String)> {
    let addr = url.trim_start_matches("http://");
    let (host, path) = addr.split_once('/').unwrap_or((addr, ""));
    let auth = bearer.map(|t| format!("Bearer {t}"));
    http_request(
        host,
        "GET",
        &format!("/{path}"),
        auth.as_deref(),
        "text/plain",
        b"",
    )
    .await
}

/// A service's `/readyz`: status and body (`0` when nothing answers).
pub async fn readyz(addr: &str) -> (u16, String) {
    http_get(&format!("http://{addr}/readyz"), None)
        .await
        .unwrap_or((0, String::new()))
}

/// The sum of metric `name`'s samples on a service's `/metrics` with all of
/// `labels` (0 when nothing answers).
pub async fn metric(addr: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let Some((_, body)) = http_get(&format!("http://{addr}/metrics"), None).await else {
        return 0.0;
    };
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// Any HTTP/1.1 request, the path sent exactly as given (no normalisation
/// of `..` or percent-escapes, unlike an HTTP client library), with an
/// optional `Authorization` header value and body: the status and the body;
/// `None` when nothing answers.
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let auth = authorization
        .map(|t| format!("Authorization: {t}\r\n"))
        .unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    s.write_all(&request).await.ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    let out = String::from_utf8_lossy(&out).to_string();
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Every row of `layer.domain.table` in the lake at `lake` (empty if the
/// table does not exist or cannot be read right now).
pub async fn read_table(lake: &Path, table: &str) -> Vec<arrow::array::RecordBatch> {
    let lake = medallion_lake::Lake::from_location(&lake.display().to_string()).expect("lake");
    let t = medallion_spec::TableRef::parse(table).expect("layer.domain.table");
    match medallion_lake::open_at(&lake, &t, None).await {
        Ok(Some(table)) => medallion_lake::read_all(&t, &table)
            .await
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Payments counted in the demo product's Gold table (0 before it exists).
pub async fn gold_payments(lake: &Path) -> i64 {
    use arrow::array::AsArray;
    read_table(lake, "gold.finance.revenue_by_country_hourly")
        .await
        .iter()
        .map(|b| {
            b.column(b.schema().index_of("payments").expect("payments column"))
                .as_primitive::<arrow::datatypes::Int64Type>()
                .values()
                .iter()
                .sum::<i64>()
        })
        .sum()
}

pub fn row_count(b: &[arrow::array::RecordBatch]) -> usize {
    b.iter().map(|b| b.num_rows()).sum()
}

/// Publishes until JetStream stores the message (a stage being killed or the
/// server restarting only delays it), retrying every 100 ms.
pub async fn publish_until_stored(
    js: &async_nats::jetstream::Context,
    subject: &str,
    headers: async_nats::HeaderMap,
    body: Vec<u8>,
) {
    loop {
        let stored = match js
            .publish_with_headers(subject.to_string(), headers.clone(), body.clone().into())
            .await
        {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if stored {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The values of a string column, failing on the first one seen twice (a
/// row that landed twice).
pub fn unique_values(
    batches: &[arrow::array::RecordBatch],
    column: &str,
) -> std::collections::HashSet<String> {
    use arrow::array::{Array, AsArray};
    let mut seen = std::collections::HashSet::new();
    for b in batches {
        let col = b
            .column(b.schema().index_of(column).expect("column exists"))
            .as_string::<i32>();
        for i in 0..col.len() {
            assert!(
                seen.insert(col.value(i).to_string()),
                "duplicate {} in {column}",
                col.value(i)
            );
        }
    }
    seen
}

/// A catalog bearer token: `claims` signed HS256 with `secret` (the
/// catalog's `MEDALLION_JWT_SECRET`).
pub fn hs256(secret: &str, claims: &serde_json::Value) -> String {
    use base64::Engine as _;
    use hmac::Mac as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let input = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key");
    mac.update(input.as_bytes());
    format!("{input}.{}", b64(&mac.finalize().into_bytes()))
}

/// Payment `i` of the sample the BI and explorer tests share: its ndjson
/// line, whether it passes finance.payments' expectations (every 25th has
/// amount 0 and is quarantined), and its country (FR or DE).
pub fn sample_payment(i: usize) -> (String, bool, &'static str) {
    let amount = if i % 25 == 0 { 0 } else { i % 50 + 1 };
    let country = ["FR", "DE"][i % 2];
    (
        format!(
            r#"{{"event_id":"p{i}","ts":"2026-11-29T0{}:00:00Z","user_id":"user-{}","amount":{amount},"currency":"EUR","country":"{country}"}}"#,
            i % 3,
            i % 7
        ),
        amount > 0,
        country,
    )
}

/// Publishes sample payments 0..200 to finance.payments in two messages,
/// the second once the first is in Silver (so Silver has an older version
/// to travel to); returns them.
pub async fn publish_sample_payments(
    js: &async_nats::jetstream::Context,
    lake: &Path,
) -> Vec<(String, bool, &'static str)> {
    let all: Vec<_> = (0..200).map(sample_payment).collect();
    for (n, chunk) in all.chunks(100).enumerate() {
        let body: Vec<&str> = chunk.iter().map(|(l, _, _)| l.as_str()).collect();
        js.publish("medallion.ingest.finance.payments", body.join("\n").into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        if n == 0 {
            medallion_testkit::eventually(
                std::time::Duration::from_secs(120),
                "the first half in silver",
                || async { row_count(&read_table(lake, "silver.finance.payments").await) > 0 },
            )
            .await;
        }
    }
    all
}

/// A catalog token for `sub` with `roles`, valid for an hour, signed with
/// `secret`.
pub fn role_token(secret: &str, sub: &str, roles: &[&str]) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        + 3600;
    hs256(
        secret,
        &serde_json::json!({"sub": sub, "roles": roles, "exp": exp}),
    )
}
