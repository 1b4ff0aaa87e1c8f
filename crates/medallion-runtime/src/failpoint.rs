//! Fault injection for the reliability tests: `MEDALLION_FAIL_POINTS=name=action,...`
//! where action is `exit` (abrupt exit, as kill -9 would leave things),
//! `panic`, or `sleep(<ms>)`. Unset in production, where a check is one
//! lookup in an empty list.

use std::sync::OnceLock;

fn points() -> &'static Vec<(String, String)> {
    static POINTS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    POINTS.get_or_init(|| {
        std::env::var("MEDALLION_FAIL_POINTS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    })
}

/// Triggers the configured action for `name`, if any.
pub fn hit(name: &str) {
    let Some((_, action)) = points().iter().find(|(k, _)| k == name) else {
        return;
    };
    match action.as_str() {
        "exit" => {
            eprintln!("fail point {name}: exiting");
            std::process::exit(137);
        }
        "panic" => panic!("fail point {name}"),
        other => {
            if let Some(ms) = other
                .strip_prefix("sleep(")
                .and_then(|s| s.strip_suffix(')'))
                .and_then(|s| s.parse().ok())
            {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
    }
}
