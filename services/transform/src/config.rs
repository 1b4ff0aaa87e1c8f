use medallion_runtime::EnvReader;
use medallion_stage::StageSettings;

#[derive(Debug, Clone)]
pub struct TransformConfig {
    /// What every stage reads (NATS, lake, specs, batches, replica).
    pub stage: StageSettings,
    pub pii_key: Option<Vec<u8>>,
    /// Attempts at a message that crashes the transform before it is dead-lettered.
    pub max_deliver: u32,
    /// Memory for one product's dedupe keys before they spill to disk.
    pub dedupe_memory: usize,
    /// Where spilled dedupe keys go (a cache of their copies beside Silver).
    pub dedupe_dir: std::path::PathBuf,
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
            dedupe_memory: env.usize("MEDALLION_DEDUPE_MEMORY", 16 << 10),
            dedupe_dir: env
                .path("MEDALLION_DEDUPE_DIR")
                .unwrap_or_else(|| std::env::temp_dir().join("medallion-keys")),
        }
    }
}
