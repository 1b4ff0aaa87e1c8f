//! Object store backends beyond the local file system.

use std::sync::Once;

/// Registers the `s3://` and `s3a://` handlers with delta-rs (once per process).
///
/// Commits on S3 use conditional writes (`If-None-Match`), which S3 and most
/// S3-compatible stores now support, so concurrent writers cannot overwrite
/// each other's log entries without a DynamoDB lock table. Credentials and the
/// endpoint come from the standard `AWS_*` variables (see docs/deploy.md).
pub fn register_s3() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| deltalake::aws::register_handlers(None));
}
