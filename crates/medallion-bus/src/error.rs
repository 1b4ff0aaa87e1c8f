use thiserror::Error;

#[derive(Debug, Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("cannot declare stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("publish to {subject} failed: {message}")]
    Publish { subject: String, message: String },
    #[error("consumer {consumer} on {stream}: {message}")]
    Consumer {
        stream: String,
        consumer: String,
        message: String,
    },
    #[error("malformed event on {subject}: {message}")]
    MalformedEvent { subject: String, message: String },
    #[error("NATS setting {setting}: {message}")]
    Setting {
        setting: &'static str,
        message: String,
    },
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    #[error(transparent)]
    Nats(#[from] async_nats::Error),
}
