//! Runs the real service binaries as a user would: separate processes with
//! their settings in the environment, logs in a file, killed on drop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use medallion_testkit::KillOnDrop;

/// The path of a workspace binary, built on first use if a narrower
/// `cargo test -p medallion-e2e` did not build it.
pub fn binary(name: &str) -> PathBuf {
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
        let log = match std::env::var("MEDALLION_E2E_LOGS") {
            Ok(d) => PathBuf::from(d).join(format!("{name}.log")),
            Err(_) => logs.join(format!("{name}.log")),
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
