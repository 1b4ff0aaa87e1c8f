//! `medallion-transform`: Bronze into Silver by each product's contract. See the library docs.

fn main() -> std::process::ExitCode {
    // A child checking whether a batch kills the process (see crash_check.rs).
    if let Some(code) = medallion_transform::crash_check::child_main_if_requested() {
        return code;
    }
    medallion_runtime::main(
        "medallion-transform",
        medallion_transform::TransformConfig::from_env,
        medallion_transform::run,
    )
}
