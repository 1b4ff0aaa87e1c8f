//! The catalog explorer in a real browser: the real pipeline fills
//! `finance.payments`, the real catalog binary serves the web UI, and
//! Chromium (driven by Playwright, `e2e/clients/web_explorer.py`) signs in
//! as analyst, auditor and admin and checks what each sees: granted
//! products and layers only, masked cells, readable refusals, search by
//! tag, the lineage picture, SQL answers and downloads, a revision diff,
//! the audit log; no console error, no request to another host. It also
//! measures page weight and render times, and saves screenshots.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use medallion_e2e::gold_payments;
use medallion_testkit::{NatsServer, eventually};

const SECRET: &str = "e2e-web-explorer-secret-0123456789abcdef";

fn token(sub: &str, roles: &[&str]) -> String {
    medallion_e2e::role_token(SECRET, sub, roles)
}

/// `SCREENSHOT_DIR`, or `web-explorer-screenshots` in the target directory.
fn screenshot_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SCREENSHOT_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/deps/<test> → target
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors()
        .nth(3)
        .map(|t| t.join("web-explorer-screenshots"))
        .unwrap_or_else(|| std::env::temp_dir().join("web-explorer-screenshots"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_explorer_shows_each_role_what_the_api_grants() {
    let nats = NatsServer::start();
    let root = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let lake = root.path().join("lake");
    std::fs::create_dir_all(&lake).unwrap();

    let names = medallion_e2e::PLATFORM;
    let mut vars = medallion_e2e::platform_vars(&nats.url(), &lake);
    vars[3].insert("MEDALLION_JWT_SECRET".into(), SECRET.into());
    let catalog_addr = vars[3]["MEDALLION_CATALOG_ADDR"].clone();
    let (mut services, js) =
        medallion_e2e::start_services(&names, &vars, logs.path(), nats.url()).await;

    let all = medallion_e2e::publish_sample_payments(&js, &lake).await;
    let mut by_country = BTreeMap::<&str, usize>::new();
    for (_, kept, country) in &all {
        if *kept {
            *by_country.entry(country).or_default() += 1;
        }
    }
    let silver_rows: usize = by_country.values().sum();
    eventually(
        Duration::from_secs(120),
        "gold holds every payment",
        || async { gold_payments(&lake).await == silver_rows as i64 },
    )
    .await;

    let shots = screenshot_dir();
    std::fs::create_dir_all(&shots).unwrap();
    let downloads = tempfile::tempdir().unwrap();
    let env: BTreeMap<&str, String> = [
        ("CATALOG_URL", format!("http://{catalog_addr}")),
        ("TOKEN_ADMIN", token("ada", &["admin"])),
        ("TOKEN_ANALYST", token("alan", &["analyst"])),
        ("TOKEN_AUDITOR", token("grace", &["auditor"])),
        ("EXPECT_SILVER_ROWS", silver_rows.to_string()),
        ("EXPECT_QUARANTINED", (all.len() - silver_rows).to_string()),
        (
            "EXPECT_BY_COUNTRY",
            by_country
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("SCREENSHOT_DIR", shots.display().to_string()),
        ("DOWNLOAD_DIR", downloads.path().display().to_string()),
    ]
    .into_iter()
    .collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/web_explorer.py");
    let out = Command::new("python3")
        .arg(script)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("web_explorer.py:\n{stdout}");
    println!("screenshots: {}", shots.display());
    assert!(
        out.status.success(),
        "web_explorer.py failed:\n{stdout}\n{}\n--- services ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        medallion_e2e::services_logs(&services)
    );

    for s in services.iter_mut() {
        assert!(s.is_running(), "a service exited:\n{}", s.logs());
    }
    medallion_e2e::stop_all(&mut services);
}
