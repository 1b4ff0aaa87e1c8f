//! Fault injection for the reliability tests: `MEDALLION_FAIL_POINTS=name=action,...`
//! where action is `exit` (abrupt exit, as kill -9 would leave things),
//! `panic`, or `sleep(<ms>)`. Points named `*.panic_on` take a marker
//! instead (`transform.decode.panic_on=POISON`): [`panic_on`] panics whenever
//! the data it is shown contains the marker, so a test can plant records that
//! crash a stage every time they are processed; `*.abort_on` points abort
//! the process instead ([`abort_on`]). Unset in production, where a
//! check is one lookup in an empty list.

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

/// The value configured for `name`, if any.
pub fn value(name: &str) -> Option<&'static str> {
    points()
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// Panics when `name` is configured with a marker and `data` contains it:
/// the "poison message" a stage cannot process, however often it retries.
pub fn panic_on(name: &str, data: &[u8]) {
    let Some(marker) = value(name) else {
        return;
    };
    if contains(data, marker.as_bytes()) {
        panic!("fail point {name}: record contains {marker}");
    }
}

/// Aborts the process when `name` is configured with a marker and `data`
/// contains it: the record that kills a stage outright (as a stack overflow,
/// a segfault in native code or the OOM killer would), where no unwinding
/// handler gets a say.
pub fn abort_on(name: &str, data: &[u8]) {
    let Some(marker) = value(name) else {
        return;
    };
    if contains(data, marker.as_bytes()) {
        eprintln!("fail point {name}: record contains {marker}; aborting");
        std::process::abort();
    }
}

/// Whether `name` is configured at all (lets callers skip preparing data).
pub fn is_set(name: &str) -> bool {
    !points().is_empty() && value(name).is_some()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_a_marker_anywhere() {
        assert!(super::contains(b"abcPOISONdef", b"POISON"));
        assert!(!super::contains(b"abcPOISdef", b"POISON"));
        assert!(!super::contains(b"abc", b""));
    }
}
