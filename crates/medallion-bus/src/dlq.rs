//! Parking a dead letter in `MEDALLION_DLQ` exactly once.

use async_nats::HeaderMap;
use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;

/// Publishes `payload` on `subject` only if that subject is still empty.
/// The check is atomic on the server, so a stage that crashed after parking
/// and before its commit is refused a second copy however long ago the first
/// was. Returns whether this call parked it (false: it was already there).
pub async fn park_once(
    js: &jetstream::Context,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
) -> Result<bool, String> {
    let msg = PublishMessage::build()
        .payload(payload)
        .headers(headers)
        .expected_last_subject_sequence(0);
    let ack = js
        .send_publish(subject.clone(), msg)
        .await
        .map_err(|e| format!("cannot dead-letter to {subject}: {e}"))?
        .await;
    match ack {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
            tracing::info!(subject = %subject, "dead letter already parked; not parking it again");
            Ok(false)
        }
        Err(e) => Err(format!("cannot dead-letter to {subject}: {e}")),
    }
}

/// Header values are one line of printable ASCII (at most 1,000 characters).
pub fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                ' '
            }
        })
        .take(1000)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reasons_become_one_printable_line() {
        assert_eq!(super::one_line("a\nb\té"), "a b  ");
        assert_eq!(super::one_line(&"x".repeat(5000)).len(), 1000);
    }
}
