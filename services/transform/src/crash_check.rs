//! Crash check: the transform of a batch run in a child process, so that a
//! record that kills the process outright (abort, stack overflow, a segfault
//! in native code, the OOM killer) kills the child instead, and can be found
//! and dead-lettered like a record that panics.
//!
//! Children cost a process start and a spec compile each, so the service only
//! checks after the attempts ledger (`medallion_bus::attempts`) shows that an
//! earlier process started on the same Bronze versions and never got past
//! them. A kill -9 by an operator looks the same and costs one check that
//! passes; a poison record costs one crash of the service, then a bisection
//! over children while the service stays up.
//!
//! The child is the service's own binary (`medallion-transform crash-check
//! <bronze version>`), reading the product document and the Bronze rows as
//! Arrow IPC on stdin; the environment (PII key, fail points) is inherited.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use medallion_spec::{Contract, DataProduct};

use crate::dedupe::{KeyHashSet, KeySet};
use crate::pipeline::transform;
use crate::poison;

/// The first argument that makes the binary a crash-check child.
pub const ARG: &str = "crash-check";
const BINARY: &str = "medallion-transform";
const PII_KEY_VAR: &str = "MEDALLION_PII_KEY";

pub struct CrashCheck {
    exe: PathBuf,
    document: Vec<u8>,
    pii_key: Option<Vec<u8>>,
    timeout: Duration,
}

/// The transform binary: this process when it is the service; next to the
/// test executable when the service runs inside a test (cargo puts test
/// binaries in `deps/`, beside the service binary's directory).
pub fn locate() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    if me.file_stem().is_some_and(|s| s == BINARY) {
        return Some(me);
    }
    let dir = me.parent()?;
    [dir, dir.parent()?]
        .iter()
        .map(|d: &&Path| d.join(BINARY))
        .find(|p| p.is_file())
}

impl CrashCheck {
    pub fn new(
        exe: PathBuf,
        contract: &Contract,
        pii_key: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let document = serde_json::to_vec(&contract.product).map_err(|e| e.to_string())?;
        Ok(CrashCheck {
            exe,
            document,
            pii_key: pii_key.map(<[u8]>::to_vec),
            timeout,
        })
    }

    /// Transforms `batch` in a child: `Ok` when the child finishes (a `fail`
    /// expectation is a result, not a crash), otherwise how it died.
    pub fn run(&self, version: i64, batch: &RecordBatch) -> Result<(), String> {
        let mut input = Vec::with_capacity(4 + self.document.len() + batch.get_array_memory_size());
        input.extend_from_slice(&(self.document.len() as u32).to_le_bytes());
        input.extend_from_slice(&self.document);
        {
            let mut w = StreamWriter::try_new(&mut input, &batch.schema())
                .map_err(|e| format!("crash check: cannot encode the batch: {e}"))?;
            w.write(batch)
                .and_then(|_| w.finish())
                .map_err(|e| format!("crash check: cannot encode the batch: {e}"))?;
        }
        let mut command = Command::new(&self.exe);
        command.env_remove(PII_KEY_VAR);
        if let Some(k) = &self.pii_key {
            use std::os::unix::ffi::OsStringExt as _;
            command.env(PII_KEY_VAR, std::ffi::OsString::from_vec(k.clone()));
        }
        let mut child = command
            .arg(ARG)
            .arg(version.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("crash check: cannot start {}: {e}", self.exe.display()))?;
        let mut stdin = child.stdin.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        // Both pipes are drained off this thread: a child that dies early
        // must not leave the writer blocked, nor a chatty one the reader.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if started.elapsed() > self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(format!("crash check: waiting for the child: {e}")),
            }
        };
        let _ = writer.join();
        let said = reader.join().unwrap_or_default();
        let Some(status) = status else {
            return Err(format!(
                "transform did not finish within {:?} (killed)",
                self.timeout
            ));
        };
        if status.success() {
            return Ok(());
        }
        Err(death(status, &said))
    }
}

/// One line on how the child ended, with the last thing it said.
fn death(status: std::process::ExitStatus, said: &str) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    let how = match (status.code(), status.signal()) {
        (Some(PANICKED), _) => "transform panicked".to_string(),
        (Some(c), _) => format!("transform exited with code {c}"),
        (None, Some(sig)) => format!("transform killed by signal {sig} ({})", signal_name(sig)),
        (None, None) => "transform ended abnormally".to_string(),
    };
    match said.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(last) => format!("{how}: {}", last.trim()),
        None => how,
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL, e.g. the OOM killer",
        11 => "SIGSEGV",
        _ => "signal",
    }
}

/// Exit code of a child whose transform panicked.
const PANICKED: i32 = 101;

/// Runs the crash-check child when the arguments ask for it; the service's
/// `main` calls this first.
pub fn child_main_if_requested() -> Option<ExitCode> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some(ARG) {
        return None;
    }
    let version = args.next().and_then(|v| v.parse().ok()).unwrap_or(-1);
    Some(match child(version) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(PANICKED as u8)
        }
    })
}

fn child(version: i64) -> Result<(), String> {
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| e.to_string())?;
    let n = u32::from_le_bytes(input.get(..4).ok_or("no input")?.try_into().unwrap()) as usize;
    let document = input.get(4..4 + n).ok_or("truncated document")?;
    let product: DataProduct = serde_json::from_slice(document).map_err(|e| e.to_string())?;
    let contract = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(Contract::compile(product))
        .map_err(|e| e.to_string())?;
    let pii_key = std::env::var_os(PII_KEY_VAR).map(|k| {
        use std::os::unix::ffi::OsStringExt as _;
        k.into_vec()
    });
    let reader = StreamReader::try_new(&input[4 + n..], None).map_err(|e| e.to_string())?;
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        let keys = KeySet::default();
        poison::guarded(|| {
            poison::inject(&batch);
            // The outcome is irrelevant: only whether the process survives it.
            let _ = transform(
                &contract,
                pii_key.as_deref(),
                &batch,
                version,
                &keys,
                &KeyHashSet::default(),
                0,
            );
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;
    use std::process::ExitStatus;

    use super::death;

    #[test]
    fn says_how_the_child_died_and_its_last_words() {
        // Raw wait statuses: a signal in the low bits, an exit code shifted by 8.
        assert_eq!(
            death(
                ExitStatus::from_raw(6),
                "reading\nfail point x: aborting\n\n"
            ),
            "transform killed by signal 6 (SIGABRT): fail point x: aborting"
        );
        assert_eq!(
            death(ExitStatus::from_raw(101 << 8), "index out of bounds"),
            "transform panicked: index out of bounds"
        );
        assert_eq!(
            death(ExitStatus::from_raw(3 << 8), ""),
            "transform exited with code 3"
        );
    }
}
