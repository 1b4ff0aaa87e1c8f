//! `medallion-transform`: Bronze into Silver by each product's contract. See the library docs.

fn main() -> std::process::ExitCode {
    medallion_runtime::main(
        "medallion-transform",
        medallion_transform::TransformConfig::from_env,
        medallion_transform::run,
    )
}
