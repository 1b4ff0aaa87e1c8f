//! `medallion-aggregate`: Silver into Gold, incrementally. See the library docs.

fn main() -> std::process::ExitCode {
    medallion_runtime::main(
        "medallion-aggregate",
        medallion_aggregate::AggregateConfig::from_env,
        medallion_aggregate::run,
    )
}
