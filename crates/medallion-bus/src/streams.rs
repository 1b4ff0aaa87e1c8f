//! The JetStream streams of the platform, declared idempotently by whichever
//! service starts first (the config is the same everywhere).

use std::time::Duration;

use async_nats::jetstream::{
    self,
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
    // Limits retention without age or count limits, discarding *new* messages
    // when full: a raw message leaves the bus only when ingest purges it after
    // its Bronze commit, so nothing unconsumed ever ages out, and a full stream
    // pushes back on publishers instead of dropping data. (Not work-queue
    // retention: ingest reads with an ordered consumer, which does not ack.)
    ensure(
        js,
        Config {
            name: INGEST_STREAM.into(),
            subjects: vec![INGEST_SUBJECTS.into()],
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::New,
            max_bytes: s.ingest_max_bytes,
            duplicate_window: s.duplicate_window,
            description: Some("Raw events published by producers, until Bronze has them".into()),
            ..base(s)
        },
    )
    .await?;
    for (name, layer) in [
        (BRONZE_STREAM, "bronze"),
        (SILVER_STREAM, "silver"),
        (GOLD_STREAM, "gold"),
    ] {
        ensure(
            js,
            Config {
                name: name.into(),
                subjects: vec![format!("medallion.{layer}.>")],
                max_age: s.event_max_age,
                duplicate_window: s.duplicate_window,
                description: Some(format!("Rows of each {layer} commit, as Arrow IPC")),
                ..base(s)
            },
        )
        .await?;
    }
    ensure(
        js,
        Config {
            name: QUALITY_STREAM.into(),
            subjects: vec![QUALITY_SUBJECTS.into()],
            max_age: Duration::from_secs(30 * 24 * 3600),
            description: Some("Per-batch quality counts from transform".into()),
            ..base(s)
        },
    )
    .await?;
    ensure(
        js,
        Config {
            name: DLQ_STREAM.into(),
            subjects: vec![DLQ_SUBJECTS.into()],
            description: Some(
                "Messages a stage could not process after repeated deliveries".into(),
            ),
            ..base(s)
        },
    )
    .await?;
    ensure(
        js,
        Config {
            name: AUDIT_STREAM.into(),
            subjects: vec![AUDIT_SUBJECTS.into()],
            deny_delete: true,
            deny_purge: true,
            description: Some("Every catalog read, denial and spec change".into()),
            ..base(s)
        },
    )
    .await?;
    Ok(())
}

fn base(s: &StreamSettings) -> Config {
    Config {
        storage: StorageType::File,
        num_replicas: s.replicas,
        allow_direct: true,
        ..Default::default()
    }
}

async fn ensure(js: &jetstream::Context, config: Config) -> Result<(), BusError> {
    // Services start together and declare the same streams at once; the
    // server's update-then-create can then race ("already in use"). The
    // configs are identical, so retrying settles it.
    let mut attempt = 0;
    loop {
        match js.create_or_update_stream(config.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if attempt < 5 => {
                attempt += 1;
                tracing::debug!(stream = %config.name, error = %e, attempt, "stream declaration raced; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
            }
            Err(e) => {
                return Err(BusError::Stream {
                    stream: config.name.clone(),
                    message: e.to_string(),
                });
            }
        }
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
