//! `medallion-ingest`: raw messages from NATS into Bronze. See the library docs.

fn main() -> std::process::ExitCode {
    medallion_runtime::main(
        "medallion-ingest",
        medallion_ingest::IngestConfig::from_env,
        medallion_ingest::run,
    )
}
