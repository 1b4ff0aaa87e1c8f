//! BI access as users reach it: the real pipeline fills `finance.payments`,
//! the real catalog binary serves its Postgres wire and Flight SQL ports
//! over TLS (a certificate made here with openssl), and real clients —
//! psql, psycopg 3, the ADBC Flight SQL driver, Polars — connect with
//! catalog tokens. The clients' checks live in `e2e/clients/*.py` (roles,
//! masks, refusals, timeouts, audit, equality with the HTTP API); this test
//! starts the platform, runs them and fails with their output.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use medallion_e2e::{Service, gold_payments};
use medallion_testkit::{NatsServer, eventually, free_port};

const SECRET: &str = "e2e-bi-access-secret-0123456789abcdef-0123";

fn token(sub: &str, roles: &[&str]) -> String {
    medallion_e2e::role_token(SECRET, sub, roles)
}

/// A self-signed certificate for localhost and 127.0.0.1.
fn certificate(dir: &Path) -> (String, String) {
    let (cert, key) = (dir.join("sql.crt"), dir.join("sql.key"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert.display().to_string(), key.display().to_string())
}

fn run_client(script: &str, env: &BTreeMap<&str, String>, services: &[Service]) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/").to_string() + script;
    let out = Command::new("python3")
        .arg(&path)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{script}:\n{stdout}");
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}\n--- services ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        medallion_e2e::services_logs(services)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bi_clients_read_gold_under_the_same_rules() {
    let nats = NatsServer::start();
    let root = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let lake = root.path().join("lake");
    std::fs::create_dir_all(&lake).unwrap();
    let (cert, key) = certificate(root.path());

    let names = medallion_e2e::PLATFORM;
    let mut vars = medallion_e2e::platform_vars(&nats.url(), &lake);
    let (pg_port, flight_port) = (free_port(), free_port());
    for (k, v) in [
        ("MEDALLION_JWT_SECRET", SECRET.to_string()),
        ("MEDALLION_PG_ADDR", format!("127.0.0.1:{pg_port}")),
        ("MEDALLION_FLIGHT_ADDR", format!("127.0.0.1:{flight_port}")),
        ("MEDALLION_SQL_TLS_CERT", cert.clone()),
        ("MEDALLION_SQL_TLS_KEY", key),
        ("MEDALLION_QUERY_TIMEOUT", "20s".into()),
    ] {
        vars[3].insert(k.into(), v);
    }
    let catalog_addr = vars[3]["MEDALLION_CATALOG_ADDR"].clone();
    let (mut services, js) =
        medallion_e2e::start_services(&names, &vars, logs.path(), nats.url()).await;

    // 8 of the 200 are quarantined.
    medallion_e2e::publish_sample_payments(&js, &lake).await;
    let silver_rows = 192;
    eventually(
        Duration::from_secs(120),
        "gold holds every payment",
        || async { gold_payments(&lake).await == silver_rows },
    )
    .await;

    let env: BTreeMap<&str, String> = [
        ("PG_PORT", pg_port.to_string()),
        ("FLIGHT_URI", format!("grpc+tls://localhost:{flight_port}")),
        ("TLS_ROOT_CERT", cert),
        ("CATALOG_URL", format!("http://{catalog_addr}")),
        ("TOKEN_ADMIN", token("ada", &["admin"])),
        ("TOKEN_ANALYST", token("alan", &["analyst"])),
        ("TOKEN_AUDITOR", token("grace", &["auditor"])),
        ("EXPECT_SILVER_ROWS", silver_rows.to_string()),
    ]
    .into_iter()
    .collect();
    run_client("pg_client.py", &env, &services);
    run_client("flight_sql_client.py", &env, &services);

    for s in services.iter_mut() {
        assert!(s.is_running(), "a service exited:\n{}", s.logs());
    }
    medallion_e2e::stop_all(&mut services);
}
