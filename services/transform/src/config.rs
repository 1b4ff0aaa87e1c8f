use medallion_runtime::EnvReader;
use medallion_stage::StageSettings;

#[derive(Debug, Clone)]
pub struct TransformConfig {
    /// What every stage reads (NATS, lake, specs, batches, replica).
    pub stage: StageSettings,
    pub pii_key: Option<Vec<u8>>,
    /// Attempts at a message that crashes the transform before it is dead-lettered.
    pub max_deliver: u32,
}
impl TransformConfig {
    pub fn from_env(env: &mut EnvReader) -> Self {
        let pii_key = env.optional("MEDALLION_PII_KEY").map(String::into_bytes);
        if let Some(k) = &pii_key
            && k.len() < 16
        {
            env.invalid(
                "MEDALLION_PII_KEY",
                "must be at least 16 bytes; generate one with `openssl rand -hex 32`",
            );
        }
        TransformConfig {
            stage: StageSettings::from_env(env, "medallion-transform", "MEDALLION_TRANSFORM_ADDR"),
            pii_key,
            max_deliver: env.usize("MEDALLION_MAX_DELIVER", 1).min(u32::MAX as usize) as u32,
        }
    }
}
