//! The audit trail: one JSON record per request on `medallion.audit.<action>`,
//! in a stream that refuses deletes and purges.

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at: DateTime<Utc>,
    pub user: String,
    pub action: String,
    pub target: String,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<usize>,
    /// The erasure request a record is about (`forget`, `get_erasure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erasure: Option<ErasureRef>,
    /// How a query or a log-in arrived, when not over HTTP: `postgres`,
    /// `flight-sql`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// An erasure request in the audit log: the subject appears only as its
/// digest, never as the value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErasureRef {
    pub id: String,
    pub column: String,
    pub digest: String,
}

impl AuditRecord {
    pub fn allowed(
        user: &str,
        action: &str,
        target: &str,
        version: Option<i64>,
        rows: Option<usize>,
    ) -> Self {
        AuditRecord {
            at: Utc::now(),
            user: user.into(),
            action: action.into(),
            target: target.into(),
            allowed: true,
            reason: None,
            version,
            rows,
            erasure: None,
            protocol: None,
        }
    }

    pub fn denied(user: &str, action: &str, target: &str, reason: &str) -> Self {
        AuditRecord {
            at: Utc::now(),
            user: user.into(),
            action: action.into(),
            target: target.into(),
            allowed: false,
            reason: Some(reason.into()),
            version: None,
            rows: None,
            erasure: None,
            protocol: None,
        }
    }

    /// Names the protocol a record's request came by.
    pub fn via(mut self, protocol: &str) -> Self {
        self.protocol = Some(protocol.into());
        self
    }
}

#[derive(Clone)]
pub struct Audit {
    js: jetstream::Context,
}

impl Audit {
    pub fn new(js: jetstream::Context) -> Self {
        Audit { js }
    }

    /// Appends a record and waits for JetStream to store it: a read is not
    /// answered before its audit record is durable.
    pub async fn record(&self, r: AuditRecord) {
        let subject = format!("medallion.audit.{}", r.action);
        let body = serde_json::to_vec(&r).unwrap_or_default();
        let stored = match self.js.publish(subject, body.into()).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = stored {
            tracing::error!(error = %e, user = %r.user, action = %r.action, "audit record not stored");
        }
    }

    /// The newest `limit` records matching `keep`, oldest first.
    pub async fn read(
        &self,
        limit: usize,
        keep: impl Fn(&AuditRecord) -> bool,
    ) -> Result<Vec<AuditRecord>, String> {
        let stream = self
            .js
            .get_stream(medallion_bus::streams::AUDIT_STREAM)
            .await
            .map_err(|e| e.to_string())?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: medallion_bus::streams::AUDIT_SUBJECTS.into(),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut info = stream.clone();
        let total = info.info().await.map_err(|e| e.to_string())?.state.messages;
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        let mut out = std::collections::VecDeque::new();
        let mut seen = 0u64;
        while seen < total {
            let Ok(Some(Ok(m))) =
                tokio::time::timeout(std::time::Duration::from_secs(5), messages.next()).await
            else {
                break;
            };
            seen += 1;
            if let Ok(r) = serde_json::from_slice::<AuditRecord>(&m.payload)
                && keep(&r)
            {
                out.push_back(r);
                if out.len() > limit {
                    out.pop_front();
                }
            }
        }
        Ok(out.into())
    }
}
