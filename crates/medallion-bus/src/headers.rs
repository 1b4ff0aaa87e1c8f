//! Header names on stage events. Values are ASCII; parsing is strict so a
//! foreign publisher cannot smuggle a bogus version into a consumer.

/// The Delta version this event announces.
pub const TABLE_VERSION: &str = "Medallion-Table-Version";
/// `layer.domain.table` of the committed table.
pub const TABLE: &str = "Medallion-Table";
/// `i/n`: this message is part i (1-based) of n for one commit.
pub const PART: &str = "Medallion-Part";
/// Rows in this part.
pub const ROWS: &str = "Medallion-Rows";
/// `append` or `overwrite` (a full refresh; consumers rebuild from the table).
pub const OPERATION: &str = "Medallion-Operation";
/// `table`: the rows did not fit the bus, read version N from the table.
pub const PAYLOAD: &str = "Medallion-Payload";
/// Comma-separated `traceparent`s of the inputs a commit carries.
pub const LINKS: &str = "Medallion-Links";
/// The W3C trace context of the batch span that produced the message.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// JetStream de-duplication id.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// Dead-letter headers: where the message came from and why it was parked.
pub const DLQ_STREAM: &str = "Medallion-Dlq-Stream";
pub const DLQ_SEQUENCE: &str = "Medallion-Dlq-Sequence";
pub const DLQ_SUBJECT: &str = "Medallion-Dlq-Subject";
pub const DLQ_REASON: &str = "Medallion-Dlq-Reason";
pub const DLQ_DELIVERIES: &str = "Medallion-Dlq-Deliveries";
/// The table (`layer.domain.table`) and version a stage read the message from.
pub const DLQ_TABLE: &str = "Medallion-Dlq-Table";
pub const DLQ_TABLE_VERSION: &str = "Medallion-Dlq-Table-Version";
