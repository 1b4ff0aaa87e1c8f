//! Erasure requests (`medallion forget`, GDPR): an admin asks for every row of
//! one data subject to be removed from a product's tables. The catalog only
//! checks, records and reports the request (bucket `medallion_erasures`);
//! the transform applies it and writes the outcome back.
//!
//! The subject's value is in the stored request only, and only while it is
//! pending. Everything else — the audit log, the answers, the logs — names
//! the subject by a keyed digest, so an auditor can tell two requests for the
//! same subject apart from others without the value being kept anywhere.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use medallion_bus::erasures::{Erasure, ErasureStatus};
use serde_json::{Map, Value, json};
use sha2::Sha256;

use crate::api::{ApiError, ApiResult, AppState, caller, require_admin};
use crate::audit::{AuditRecord, ErasureRef};
use crate::auth::Caller;

/// Hex characters of the digest that are kept: 128 bits tell subjects apart
/// and are short enough to read in an audit record.
const DIGEST_HEX_LEN: usize = 32;

/// The secret that keys subject digests. Never printed.
#[derive(Clone)]
pub struct DigestKey(Vec<u8>);

impl DigestKey {
    pub fn new(key: Vec<u8>) -> Self {
        DigestKey(key)
    }

    /// `hex(HMAC-SHA256(key, "<domain>.<product>\n<column>\n<value>"))`,
    /// first 32 characters. Keyed, so a value cannot be found again by
    /// hashing guesses without the key. The same key may verify HS256
    /// tokens: a JWT signing input (`base64.base64`) has no newline and this
    /// input always does, so no digest is ever a token signature.
    pub fn digest(&self, domain: &str, product: &str, column: &str, value: &str) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts keys of any length");
        mac.update(format!("{domain}.{product}\n{column}\n{value}").as_bytes());
        let mut out = hex::encode(mac.finalize().into_bytes());
        out.truncate(DIGEST_HEX_LEN);
        out
    }
}

impl std::fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DigestKey(<redacted>)")
    }
}

/// The stored request as answered: never with the value.
fn public_view(e: &Erasure) -> Value {
    let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("value");
    }
    v
}

fn erasure_ref(e: &Erasure) -> ErasureRef {
    ErasureRef {
        id: e.id.clone(),
        column: e.column.clone(),
        digest: e.digest.clone(),
    }
}

/// A request refused as it stands (400): audited as a denial. `reason` must
/// never hold the subject's value.
async fn refuse(s: &AppState, c: &Caller, target: &str, reason: String) -> ApiError {
    s.audit
        .record(AuditRecord::denied(&c.user, "forget", target, &reason))
        .await;
    ApiError(StatusCode::BAD_REQUEST, reason)
}

fn unavailable(e: impl ToString) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// `column` and `value` from the body. Read as untyped JSON first: serde's
/// type errors quote the offending value ("invalid type: integer `42`"),
/// and that value may be the subject's, which must not reach the answer or
/// the audit log.
fn parse_body(body: &[u8]) -> Result<(String, String), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        format!("the body is not JSON ({e}); send {{\"column\": \"...\", \"value\": \"...\"}}")
    })?;
    let Value::Object(mut o) = v else {
        return Err(
            "the body must be a JSON object {\"column\": \"...\", \"value\": \"...\"}".into(),
        );
    };
    let column = take_string(&mut o, "column")?;
    let value = take_string(&mut o, "value")?;
    // Not named back: a misplaced value could be a field name.
    if !o.is_empty() {
        return Err(
            "unknown field(s): the body holds only {\"column\": \"...\", \"value\": \"...\"}"
                .into(),
        );
    }
    if column.is_empty() {
        return Err("column: must name a column of the product's schema".into());
    }
    if value.is_empty() {
        return Err("value: must not be empty (the subject's value, as in the raw records)".into());
    }
    Ok((column, value))
}

fn take_string(o: &mut Map<String, Value>, field: &str) -> Result<String, String> {
    match o.remove(field) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(format!("{field}: missing")),
        // Numbers are refused rather than converted: "42" and 42.0 would not
        // name the same records, and the caller should say which it means.
        Some(_) => Err(format!(
            "{field}: must be a string (write numbers as text, e.g. \"42\")"
        )),
    }
}

#[utoipa::path(post, path = "/v1/products/{domain}/{product}/forget", tag = "erasures",
    params(("domain" = String, Path), ("product" = String, Path)),
    request_body(content = String, description = "{\"column\": \"<a column of the product's schema>\", \"value\": \"<the subject's value>\"}", content_type = "application/json"),
    responses((status = 202, description = "Accepted: {id, product, column, digest, status: pending}; the transform applies it, follow it with GET .../forget/{id}"),
              (status = 400, description = "The body, `column` or `value` is not usable (the field named)"),
              (status = 403, description = "Needs admin"),
              (status = 404, description = "No such product"),
              (status = 503, description = "NATS unavailable, or no key for the subject digest")),
    security(("bearer" = [])))]
pub(crate) async fn forget(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((d, p)): Path<(String, String)>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let target = format!("{d}.{p}");
    // Who and whether an admin before the body is read: a caller without
    // the role learns nothing about products or columns.
    let c = caller(&s, &headers, "forget", &target).await?;
    require_admin(&s, &c, "forget", &target, "an erasure request").await?;
    crate::specs_api::named_like_a_product(&d, &p)?;
    let contract = s
        .products
        .read()
        .await
        .contracts
        .get(&(d.clone(), p.clone()))
        .cloned()
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no product {target}")))?;
    let (column, value) = match parse_body(&body) {
        Ok(cv) => cv,
        Err(reason) => return Err(refuse(&s, &c, &target, reason).await),
    };
    let columns: Vec<&str> = contract
        .product
        .spec
        .schema
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    if !columns.contains(&column.as_str()) {
        let reason = format!(
            "column: {column:?} is not a column of {target}; its columns are {}",
            columns.join(", ")
        );
        return Err(refuse(&s, &c, &target, reason).await);
    }
    let Some(key) = &s.erasure_key else {
        let reason = "no key for the subject digest: the catalog keys it with MEDALLION_JWT_SECRET, or MEDALLION_PII_KEY when tokens are RS256; set one".to_string();
        s.audit
            .record(AuditRecord::denied(&c.user, "forget", &target, &reason))
            .await;
        return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, reason));
    };
    let e = Erasure {
        id: uuid::Uuid::new_v4().to_string(),
        digest: key.digest(&d, &p, &column, &value),
        domain: d,
        product: p,
        column,
        value: Some(value),
        requested_by: c.user.clone(),
        // Fixed width, so the bucket's text order is time order.
        requested_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        status: ErasureStatus::Pending,
        progress: None,
        outcome: None,
        finished_at: None,
        claimed_by: None,
        claimed_at_ms: None,
    };
    s.erasures.create(&e).await.map_err(unavailable)?;
    // Audited once stored: the record then names a request that exists.
    let mut record = AuditRecord::allowed(&c.user, "forget", &target, None, None);
    record.erasure = Some(erasure_ref(&e));
    s.audit.record(record).await;
    tracing::info!(product = %target, id = %e.id, column = %e.column, digest = %e.digest, by = %c.user, "erasure requested");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "id": e.id,
            "product": target,
            "column": e.column,
            "digest": e.digest,
            "status": "pending",
        })),
    ))
}

#[utoipa::path(get, path = "/v1/products/{domain}/{product}/forget/{id}", tag = "erasures",
    params(("domain" = String, Path), ("product" = String, Path), ("id" = String, Path, description = "The id the request was answered with")),
    responses((status = 200, description = "The request as stored, without the value: status (pending, done), progress, outcome (rows removed per table, bytes rewritten, files and log entries deleted, millis), finished_at"),
              (status = 403, description = "Needs admin"),
              (status = 404, description = "No such request")),
    security(("bearer" = [])))]
pub(crate) async fn get_erasure(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((d, p, id)): Path<(String, String, String)>,
) -> ApiResult {
    let target = format!("{d}.{p}");
    let c = caller(&s, &headers, "get_erasure", &target).await?;
    require_admin(&s, &c, "get_erasure", &target, "an erasure request").await?;
    let not_found = || {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no erasure request {id} for {target}"),
        )
    };
    // Only names that can be a key: `*` and `>` are wildcards in the bucket.
    crate::specs_api::named_like_a_product(&d, &p)?;
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(not_found());
    }
    let (_, e) = s
        .erasures
        .get(&d, &p, &id)
        .await
        .map_err(unavailable)?
        .ok_or_else(not_found)?;
    let mut record = AuditRecord::allowed(&c.user, "get_erasure", &target, None, None);
    record.erasure = Some(erasure_ref(&e));
    s.audit.record(record).await;
    Ok(Json(public_view(&e)))
}

#[utoipa::path(get, path = "/v1/erasures", tag = "erasures",
    responses((status = 200, description = "Every erasure request, newest first, without values"),
              (status = 403, description = "Needs admin")),
    security(("bearer" = [])))]
pub(crate) async fn list_erasures(State(s): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult {
    let c = caller(&s, &headers, "list_erasures", "*").await?;
    require_admin(&s, &c, "list_erasures", "*", "an erasure request").await?;
    let all = s.erasures.list(None).await.map_err(unavailable)?;
    let out: Vec<Value> = all.iter().rev().map(|(_, e)| public_view(e)).collect();
    s.audit
        .record(AuditRecord::allowed(
            &c.user,
            "list_erasures",
            "*",
            None,
            Some(out.len()),
        ))
        .await;
    Ok(Json(json!({ "erasures": out })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_keyed_stable_and_short() {
        let k = DigestKey::new(b"k1".to_vec());
        let a = k.digest("shop", "orders", "email", "alice@example.com");
        assert_eq!(a.len(), DIGEST_HEX_LEN);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, k.digest("shop", "orders", "email", "alice@example.com"));
        assert_ne!(a, k.digest("shop", "orders", "email", "bob@example.com"));
        assert_ne!(a, k.digest("shop", "returns", "email", "alice@example.com"));
        assert_ne!(
            a,
            DigestKey::new(b"k2".to_vec()).digest("shop", "orders", "email", "alice@example.com")
        );
        assert!(!format!("{k:?}").contains("k1"));
    }

    #[test]
    fn a_refused_body_never_quotes_the_value() {
        let cases: [(&[u8], &str); 6] = [
            (br#"{"column": "email", "value": 4242}"#, "value"),
            (br#"{"column": "email", "value": ""}"#, "value"),
            (br#"{"column": "email"}"#, "value"),
            (br#"{"column": 4242, "value": "x"}"#, "column"),
            (br#"[4242]"#, "object"),
            (
                br#"{"column": "email", "value": "x", "4242x": 1}"#,
                "unknown",
            ),
        ];
        for (body, names) in cases {
            let e = parse_body(body).unwrap_err();
            assert!(e.contains(names), "{e}");
            assert!(!e.contains("4242"), "{e}");
        }
        assert_eq!(
            parse_body(br#"{"column": "email", "value": "a@b"}"#).unwrap(),
            ("email".to_string(), "a@b".to_string())
        );
    }

    #[test]
    fn the_answered_request_has_no_value() {
        let e = Erasure {
            id: "i".into(),
            domain: "shop".into(),
            product: "orders".into(),
            column: "email".into(),
            value: Some("alice@example.com".into()),
            digest: "d".into(),
            requested_by: "ada".into(),
            requested_at: "2026-12-07T00:00:00.000000Z".into(),
            status: ErasureStatus::Pending,
            progress: None,
            outcome: None,
            finished_at: None,
            claimed_by: None,
            claimed_at_ms: None,
        };
        let v = public_view(&e);
        assert!(!v.to_string().contains("alice"), "{v}");
        assert_eq!(v["status"], "pending");
        assert_eq!(v["digest"], "d");
    }
}
