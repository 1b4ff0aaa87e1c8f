//! The JetStream streams of the platform, declared idempotently by whichever
//! service starts first (the config is the same everywhere).

use std::time::Duration;

use async_nats::jetstream::{
    self,
    context::CreateStreamErrorKind,
    stream::{Config, DiscardPolicy, RetentionPolicy, StorageType},
};

use crate::BusError;

/// Core NATS request subject: payload `<domain>.<product>`; the transform
/// rebuilds that product's Silver from Bronze and replies with the outcome.
pub const REPLAY_SUBJECT: &str = "medallion.control.replay";
pub const INGEST_STREAM: &str = "MEDALLION_INGEST";
pub const INGEST_SUBJECTS: &str = "medallion.ingest.>";
pub const BRONZE_STREAM: &str = "MEDALLION_BRONZE";
pub const SILVER_STREAM: &str = "MEDALLION_SILVER";
pub const GOLD_STREAM: &str = "MEDALLION_GOLD";
pub const QUALITY_STREAM: &str = "MEDALLION_QUALITY";
pub const QUALITY_SUBJECTS: &str = "medallion.quality.>";
pub const DLQ_STREAM: &str = "MEDALLION_DLQ";
pub const DLQ_SUBJECTS: &str = "medallion.dlq.>";
pub const AUDIT_STREAM: &str = "MEDALLION_AUDIT";
pub const AUDIT_SUBJECTS: &str = "medallion.audit.>";

#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Replicas of every stream (1 on a single server, 3 on a cluster).
    pub replicas: usize,
    /// How long a `Nats-Msg-Id` is remembered for de-duplication on publish.
    pub duplicate_window: Duration,
    /// How long stage events are kept; consumers that fall further behind catch
    /// up from the tables themselves, so this bounds disk, not correctness.
    pub event_max_age: Duration,
    /// Upper bound of the ingest stream; when full, publishers get an error
    /// (back-pressure) instead of older unconsumed messages being dropped.
    pub ingest_max_bytes: i64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            event_max_age: Duration::from_secs(24 * 3600),
            ingest_max_bytes: -1,
        }
    }
}

/// Declares every stream the platform uses; existing ones are updated to match.
pub async fn ensure_streams(js: &jetstream::Context, s: &StreamSettings) -> Result<(), BusError> {
    let mut configs = Vec::new();
    // Limits retention without age or count limits, discarding *new* messages
    // when full: a raw message leaves the bus only when ingest purges it after
    // its Bronze commit, so nothing unconsumed ever ages out, and a full stream
    // pushes back on publishers instead of dropping data. (Not work-queue
    // retention: ingest reads with an ordered consumer, which does not ack.)
    configs.push(Config {
        name: INGEST_STREAM.into(),
        subjects: vec![INGEST_SUBJECTS.into()],
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::New,
        max_bytes: s.ingest_max_bytes,
        duplicate_window: s.duplicate_window,
        description: Some("Raw events published by producers, until Bronze has them".into()),
        subject_transform: Some(keyed_slots()),
        ..base(s)
    });
    for (name, layer) in [
        (BRONZE_STREAM, "bronze"),
        (SILVER_STREAM, "silver"),
        (GOLD_STREAM, "gold"),
    ] {
        configs.push(Config {
            name: name.into(),
            subjects: vec![format!("medallion.{layer}.>")],
            max_age: s.event_max_age,
            duplicate_window: s.duplicate_window,
            description: Some(format!("Rows of each {layer} commit, as Arrow IPC")),
            ..base(s)
        });
    }
    configs.push(Config {
        name: QUALITY_STREAM.into(),
        subjects: vec![QUALITY_SUBJECTS.into()],
        max_age: Duration::from_secs(30 * 24 * 3600),
        description: Some("Per-batch quality counts from transform".into()),
        ..base(s)
    });
    configs.push(Config {
        name: DLQ_STREAM.into(),
        subjects: vec![DLQ_SUBJECTS.into()],
        description: Some("Messages a stage could not process after repeated deliveries".into()),
        ..base(s)
    });
    configs.push(Config {
        name: AUDIT_STREAM.into(),
        subjects: vec![AUDIT_SUBJECTS.into()],
        deny_delete: true,
        deny_purge: true,
        description: Some("Every catalog read, denial and spec change".into()),
        ..base(s)
    });
    // Concurrently: on a cluster each R3 stream waits for its raft group,
    // seconds apiece right after the cluster forms.
    futures::future::try_join_all(configs.into_iter().map(|c| ensure(js, c))).await?;
    Ok(())
}

/// A keyed publish, `medallion.ingest.<domain>.<product>.<key>`, is stored
/// under one of [`medallion_spec::INGEST_SLOTS`] slots in place of its key
/// (the server hashes the key token), so a product's partitions can each
/// read their own subjects; the same key always lands in the same slot.
/// Plain publishes (four tokens) are stored as they are.
pub fn keyed_slots() -> jetstream::stream::SubjectTransform {
    jetstream::stream::SubjectTransform {
        source: "medallion.ingest.*.*.*".into(),
        destination: format!(
            "medallion.ingest.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{partition({},3)}}}}",
            medallion_spec::INGEST_SLOTS
        ),
    }
}

fn base(s: &StreamSettings) -> Config {
    Config {
        storage: StorageType::File,
        num_replicas: s.replicas,
        allow_direct: true,
        ..Default::default()
    }
}

/// How long a service waits at start for a JetStream cluster that cannot yet
/// place the streams (a Helm install starts the services and the NATS pods
/// together; a cluster elects its meta leader and learns its peers first).
pub(crate) const CLUSTER_WAIT: Duration = Duration::from_secs(120);

async fn ensure(js: &jetstream::Context, config: Config) -> Result<(), BusError> {
    let started = std::time::Instant::now();
    let mut attempt: u32 = 0;
    loop {
        match js.create_or_update_stream(config.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                attempt += 1;
                let forming = cluster_not_ready(e.kind());
                // Services start together and declare the same streams at
                // once; the server's update-then-create can then race
                // ("already in use"). The configs are identical, so a few
                // quick retries settle it; a forming cluster gets longer.
                let retry = if forming {
                    started.elapsed() < CLUSTER_WAIT
                } else {
                    attempt <= 5
                };
                if !retry {
                    return Err(BusError::Stream {
                        stream: config.name.clone(),
                        message: e.to_string(),
                    });
                }
                let wait = Duration::from_millis(50 * u64::from(attempt.min(100)))
                    .min(Duration::from_secs(2));
                if forming {
                    tracing::warn!(stream = %config.name, error = %e, attempt, "JetStream cannot place the stream yet; waiting for the cluster");
                } else {
                    tracing::debug!(stream = %config.name, error = %e, attempt, "stream declaration raced; retrying");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Opens a declared stream at start (see [`while_cluster_settles`]).
pub async fn open_stream(
    js: &jetstream::Context,
    name: &str,
) -> Result<jetstream::stream::Stream, BusError> {
    while_cluster_settles(name, || js.get_stream(name))
        .await
        .map_err(|e| BusError::Stream {
            stream: name.to_string(),
            message: e.to_string(),
        })
}

/// Runs a start-up request until it succeeds or [`CLUSTER_WAIT`] has passed.
/// Right after a cluster forms (or loses a node) a request on a replicated
/// stream or consumer can time out while its raft group elects a leader.
pub(crate) async fn while_cluster_settles<T, E, F, Fut>(what: &str, mut request: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let started = std::time::Instant::now();
    let mut attempt: u32 = 0;
    loop {
        match request().await {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() < CLUSTER_WAIT => {
                attempt += 1;
                tracing::warn!(what, error = %e, attempt, "JetStream request failed at start; retrying");
                tokio::time::sleep(retry_wait(attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// 100 ms more per attempt, at most 2 s.
fn retry_wait(attempt: u32) -> Duration {
    Duration::from_millis(100 * u64::from(attempt.min(20)))
}

/// Errors of a JetStream that is up but not yet able to place a stream: no
/// meta leader yet, or fewer known peers than replicas.
fn cluster_not_ready(kind: CreateStreamErrorKind) -> bool {
    use async_nats::jetstream::ErrorCode;
    match kind {
        CreateStreamErrorKind::JetStreamUnavailable | CreateStreamErrorKind::TimedOut => true,
        CreateStreamErrorKind::JetStream(e) => [
            ErrorCode::CLUSTER_NO_PEERS,
            ErrorCode::CLUSTER_NOT_AVAILABLE,
            ErrorCode::CLUSTER_NOT_ACTIVE,
            ErrorCode::CLUSTER_NOT_LEADER,
            ErrorCode::INSUFFICIENT_RESOURCES,
        ]
        .contains(&e.error_code()),
        _ => false,
    }
}

impl StreamSettings {
    pub fn from_env(env: &mut medallion_runtime::EnvReader) -> Self {
        StreamSettings {
            replicas: env.usize("MEDALLION_STREAM_REPLICAS", 1),
            duplicate_window: env.duration("MEDALLION_DEDUPE_WINDOW"),
            event_max_age: env.duration("MEDALLION_EVENT_MAX_AGE"),
            ingest_max_bytes: env.i64("MEDALLION_INGEST_MAX_BYTES"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_publishes_are_stored_by_slot() {
        let t = keyed_slots();
        assert_eq!(
            t.destination,
            "medallion.ingest.{{wildcard(1)}}.{{wildcard(2)}}.{{partition(32,3)}}"
        );
    }

    #[test]
    fn a_forming_cluster_is_waited_for_and_a_bad_config_is_not() {
        assert!(cluster_not_ready(
            CreateStreamErrorKind::JetStreamUnavailable
        ));
        assert!(cluster_not_ready(CreateStreamErrorKind::TimedOut));
        assert!(!cluster_not_ready(CreateStreamErrorKind::InvalidStreamName));
        assert!(!cluster_not_ready(
            CreateStreamErrorKind::DomainAndExternalSet
        ));
    }
}
