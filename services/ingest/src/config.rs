use medallion_runtime::EnvReader;
use medallion_stage::StageSettings;

#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// What every stage reads (NATS, lake, specs — ingest needs only their
    /// partition counts —, batches, replica).
    pub stage: StageSettings,
}

impl IngestConfig {
    pub fn from_env(env: &mut EnvReader) -> Self {
        IngestConfig {
            stage: StageSettings::from_env(env, "medallion-ingest", "MEDALLION_INGEST_ADDR"),
        }
    }
}
