//! `medallion load`: publishes events to a product's ingest subject with
//! many JetStream publishes in flight, at a target rate or flat out, and
//! reports what NATS acknowledged: events and bytes per second and the
//! publish → ack latency. Benchmarks use it so they measure the platform,
//! not a publisher loop; users point it at their own deployment.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

#[derive(clap::Args)]
pub struct LoadArgs {
    /// `<domain>.<product>`
    pub product: String,
    /// Events to cycle through, one per line (default: generated
    /// payments valid for the shipped finance.payments spec).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Events per message.
    #[arg(long, default_value_t = 100)]
    pub per_message: usize,
    /// Events per second (default: as fast as NATS acknowledges).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Events to publish in all.
    #[arg(long)]
    pub events: Option<u64>,
    /// Publish for this long.
    #[arg(long, value_parser = crate::parse_duration)]
    pub duration: Option<Duration>,
    /// Publishes awaiting their acknowledgement at once.
    #[arg(long, default_value_t = 256)]
    pub in_flight: usize,
    /// Publish to this JetStream subject instead of the product's ingest
    /// subject (e.g. a plain stream, to measure NATS alone).
    #[arg(long)]
    pub subject: Option<String>,
}

/// What NATS acknowledged.
#[derive(Debug, serde::Serialize)]
pub struct LoadReport {
    pub subject: String,
    pub messages: u64,
    pub events: u64,
    pub bytes: u64,
    /// When the first publish went out (Unix seconds): a harness times what
    /// follows (the commits downstream) from here, as `seconds` does.
    pub started_at: f64,
    pub seconds: f64,
    pub events_per_s: f64,
    pub messages_per_s: f64,
    pub mb_per_s: f64,
    pub ack_ms_p50: f64,
    pub ack_ms_p99: f64,
    pub ack_ms_max: f64,
    pub errors: u64,
    /// CPU seconds this process spent from its first publish to its last
    /// acknowledgement (not reading the file): what it took from a machine
    /// it shares with the platform it measures.
    pub cpu_s: f64,
}

/// Where the events come from.
enum Source {
    /// A file's bytes and the (start, end) of each non-empty line in it.
    Lines {
        text: Bytes,
        lines: Vec<(usize, usize)>,
    },
    /// Payments valid for the shipped `finance.payments` spec, each with an
    /// id of this run, so Silver keeps every one.
    Payments { run: String },
}

impl Source {
    fn from_text(text: Bytes) -> Source {
        let mut lines = Vec::new();
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', &text).chain(std::iter::once(text.len())) {
            if end > start {
                lines.push((start, end));
            }
            start = end + 1;
        }
        Source::Lines { text, lines }
    }

    fn message(&self, first: u64, n: usize) -> Bytes {
        if let Source::Lines { text, lines } = self {
            // Lines that follow each other in the file, one newline apart, are
            // already the message: a slice of the file, no copy while
            // publishing (the publisher shares the machine it measures).
            let i = (first % lines.len() as u64) as usize;
            if let Some(run) = lines.get(i..i + n)
                && run.windows(2).all(|w| w[1].0 == w[0].1 + 1)
            {
                return text.slice(run[0].0..run[n - 1].1);
            }
        }
        let mut out = Vec::with_capacity(n * 160);
        for i in first..first + n as u64 {
            if i > first {
                out.push(b'\n');
            }
            match self {
                Source::Lines { text, lines } => {
                    let (s, e) = lines[(i % lines.len() as u64) as usize];
                    out.extend_from_slice(&text[s..e])
                }
                Source::Payments { run } => {
                    const COUNTRIES: [&str; 5] = ["FR", "DE", "US", "ES", "IT"];
                    const CURRENCIES: [&str; 2] = ["EUR", "USD"];
                    let line = format!(
                        r#"{{"event_id":"load-{run}-{i}","ts":"2026-11-29T{:02}:{:02}:00Z","user_id":"user-{}","amount":{}.{:02},"currency":"{}","country":"{}"}}"#,
                        (i / 3600) % 24,
                        (i / 60) % 60,
                        i % 10_000,
                        1 + i % 500,
                        i % 100,
                        CURRENCIES[(i % 2) as usize],
                        COUNTRIES[(i % 5) as usize],
                    );
                    out.extend_from_slice(line.as_bytes());
                }
            }
        }
        Bytes::from(out)
    }
}

pub async fn run(nats: &str, a: LoadArgs) -> anyhow::Result<LoadReport> {
    let (domain, name) = crate::split_product(&a.product)?;
    let subject = a
        .subject
        .clone()
        .unwrap_or_else(|| medallion_spec::ingest_subject(domain, name));
    if a.events.is_none() && a.duration.is_none() {
        bail!("say how much to publish: --events N or --duration 60s");
    }
    if a.rate.is_some_and(|r| !(r > 0.0)) {
        bail!("--rate must be a positive number of events per second");
    }
    let source = match &a.file {
        Some(f) => {
            let text = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let source = Source::from_text(Bytes::from(text));
            if matches!(&source, Source::Lines { lines, .. } if lines.is_empty()) {
                bail!("{} has no events (one per line)", f.display());
            }
            source
        }
        None => Source::Payments {
            run: format!("{:x}", std::process::id() as u64 ^ now_nanos()),
        },
    };
    let client = async_nats::connect(nats)
        .await
        .with_context(|| format!("connecting to NATS at {nats}"))?;
    let js = jetstream::new(client);
    let run_id = format!("{:016x}", now_nanos());
    let per_message = a.per_message.max(1);
    let in_flight = a.in_flight.max(1);

    let started = Instant::now();
    let started_at = now_nanos() as f64 / 1e9;
    let cpu_before = own_cpu_seconds();
    let mut pending = FuturesUnordered::new();
    let mut t = Tally::default();
    let mut sent_events = 0u64;
    let mut last_progress = Instant::now();
    loop {
        let done = a.events.is_some_and(|n| sent_events >= n)
            || a.duration.is_some_and(|d| started.elapsed() >= d);
        if done {
            break;
        }
        let n = a.events.map_or(per_message as u64, |total| {
            (total - sent_events).min(per_message as u64)
        }) as usize;
        // Paced by the schedule, not by sleeps between messages: a slow ack
        // does not lower the rate asked for, and latency counts from when a
        // message was due (a publisher that fell behind shows in it).
        let at = match a.rate {
            Some(rate) => {
                let due = started + Duration::from_secs_f64(sent_events as f64 / rate);
                let sleep = tokio::time::sleep_until(due.into());
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        biased;
                        Some(done) = pending.next(), if !pending.is_empty() => t.record(done),
                        _ = &mut sleep => break,
                    }
                }
                due
            }
            None => Instant::now(),
        };
        let body = source.message(sent_events, n);
        let size = body.len() as u64;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            format!("{run_id}-{}", sent_events / per_message as u64).as_str(),
        );
        match js
            .publish_with_headers(subject.clone(), headers, body)
            .await
        {
            // A task per publish: its ack is timed the moment it arrives,
            // whatever this loop is doing then.
            Ok(ack) => pending.push(tokio::spawn(async move {
                let acked = ack.await;
                Acked {
                    latency: at.elapsed(),
                    events: n as u64,
                    bytes: size,
                    error: acked.err().map(|e| e.to_string()),
                }
            })),
            Err(e) => {
                t.errors += 1;
                tracing::warn!(error = %e, "publish failed");
            }
        }
        sent_events += n as u64;
        while pending.len() >= in_flight {
            if let Some(done) = pending.next().await {
                t.record(done);
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            eprintln!(
                "{:>6.1}s  {} events acknowledged ({:.0}/s), {} errors",
                started.elapsed().as_secs_f64(),
                t.events,
                t.events as f64 / started.elapsed().as_secs_f64(),
                t.errors
            );
        }
    }
    while let Some(done) = pending.next().await {
        t.record(done);
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_s = own_cpu_seconds() - cpu_before;
    let Tally {
        events: acked_events,
        messages: acked_messages,
        bytes,
        errors,
        mut latencies_us,
    } = t;
    latencies_us.sort_unstable();
    let q = |f: f64| -> f64 {
        if latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((latencies_us.len() as f64 * f).ceil() as usize).clamp(1, latencies_us.len()) - 1;
        latencies_us[i] as f64 / 1000.0
    };
    Ok(LoadReport {
        subject,
        messages: acked_messages,
        events: acked_events,
        bytes,
        started_at,
        seconds,
        events_per_s: acked_events as f64 / seconds,
        messages_per_s: acked_messages as f64 / seconds,
        mb_per_s: bytes as f64 / seconds / 1e6,
        ack_ms_p50: q(0.5),
        ack_ms_p99: q(0.99),
        ack_ms_max: q(1.0),
        errors,
        cpu_s,
    })
}

/// One publish as NATS answered it.
struct Acked {
    latency: Duration,
    events: u64,
    bytes: u64,
    error: Option<String>,
}

#[derive(Default)]
struct Tally {
    events: u64,
    messages: u64,
    bytes: u64,
    errors: u64,
    latencies_us: Vec<u32>,
}

impl Tally {
    fn record(&mut self, a: Result<Acked, tokio::task::JoinError>) {
        let a = a.unwrap_or_else(|e| Acked {
            latency: Duration::ZERO,
            events: 0,
            bytes: 0,
            error: Some(e.to_string()),
        });
        match a.error {
            None => {
                self.latencies_us
                    .push(a.latency.as_micros().min(u32::MAX as u128) as u32);
                self.events += a.events;
                self.messages += 1;
                self.bytes += a.bytes;
            }
            Some(e) => {
                self.errors += 1;
                tracing::warn!(error = %e, "publish not acknowledged");
            }
        }
    }
}

fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(u.ru_utime) + s(u.ru_stime)
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_payments_are_valid_json_with_ids_unique_in_the_run() {
        let s = Source::Payments { run: "r".into() };
        let body = s.message(10, 50);
        let lines: Vec<serde_json::Value> = body
            .split(|b| *b == b'\n')
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 50);
        let ids: std::collections::HashSet<&str> = lines
            .iter()
            .map(|l| l["event_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 50);
        assert!(ids.contains("load-r-10") && ids.contains("load-r-59"));
    }

    #[test]
    fn file_lines_are_cycled() {
        let s = Source::from_text(Bytes::from_static(b"a\nb\n\nc\n"));
        assert_eq!(&s.message(2, 4)[..], b"c\na\nb\nc");
        assert_eq!(&s.message(5, 2)[..], b"c\na");
    }

    #[test]
    fn adjacent_lines_are_sent_as_a_slice_of_the_file() {
        let text = Bytes::from_static(b"l0\nl1\nl2\n\nl3\r\nl4");
        let s = Source::from_text(text.clone());
        let within = |b: &Bytes| {
            let p = b.as_ptr() as usize;
            p >= text.as_ptr() as usize && p + b.len() <= text.as_ptr() as usize + text.len()
        };
        let m = s.message(0, 3);
        assert_eq!(&m[..], b"l0\nl1\nl2");
        assert!(within(&m), "three adjacent lines are a slice");
        // An empty line between them: copied, without it.
        let m = s.message(2, 2);
        assert_eq!(&m[..], b"l2\nl3\r");
        assert!(!within(&m));
        // Wrapping round the end of the file: copied.
        assert_eq!(&s.message(4, 2)[..], b"l4\nl0");
        // A line keeps its carriage return either way, as it always did.
        assert_eq!(&s.message(3, 2)[..], b"l3\r\nl4");
    }
}
