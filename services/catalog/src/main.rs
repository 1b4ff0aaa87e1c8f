//! `medallion-catalog`: the governance plane. See the library docs.

fn main() -> std::process::ExitCode {
    medallion_runtime::main(
        "medallion-catalog",
        medallion_catalog::CatalogConfig::from_env,
        medallion_catalog::run,
    )
}
