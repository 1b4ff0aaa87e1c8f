use medallion_runtime::EnvReader;
use medallion_stage::StageSettings;

#[derive(Debug, Clone)]
pub struct AggregateConfig {
    /// What every stage reads (NATS, lake, specs, batches, replica).
    pub stage: StageSettings,
    /// Attempts at a row that crashes the aggregation before it is dead-lettered.
    pub max_deliver: u32,
}

impl AggregateConfig {
    pub fn from_env(env: &mut EnvReader) -> Self {
        AggregateConfig {
            stage: StageSettings::from_env(env, "medallion-aggregate", "MEDALLION_AGGREGATE_ADDR"),
            max_deliver: env.usize("MEDALLION_MAX_DELIVER", 1).min(u32::MAX as usize) as u32,
        }
    }
}
