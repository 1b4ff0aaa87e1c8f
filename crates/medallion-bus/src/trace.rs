//! W3C trace context in NATS headers, through the globally installed OpenTelemetry propagator.

use async_nats::HeaderMap;
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the current span's context (`traceparent`, `tracestate`) into `headers`.
pub fn inject_current(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    inject(&cx, headers);
}

pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(cx, &mut HeaderInjector(headers))
    });
}

/// The remote context a producer put in `headers` (an empty context if none).
pub fn extract(headers: &HeaderMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// The context carried by a bare `traceparent` string.
pub fn extract_traceparent(traceparent: &str) -> Context {
    let mut h = HeaderMap::new();
    h.insert("traceparent", traceparent);
    extract(&h)
}

/// The `traceparent` of the current span, when it is being recorded.
pub fn current_traceparent() -> Option<String> {
    let mut h = HeaderMap::new();
    inject_current(&mut h);
    h.get("traceparent").map(|v| v.as_str().to_string())
}

/// The `traceparent` of `span`, if it has a valid context.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let mut h = HeaderMap::new();
    inject(&span.context(), &mut h);
    h.get("traceparent").map(|v| v.as_str().to_string())
}

/// Links `span` to each of `traceparents` (the contexts of the messages a
/// batch holds), so a trace view can go from the batch to every message.
pub fn link_all<'a>(span: &tracing::Span, traceparents: impl IntoIterator<Item = &'a str>) {
    use opentelemetry::trace::TraceContextExt;
    for tp in traceparents.into_iter().take(crate::event::MAX_LINKS) {
        let cx = extract_traceparent(tp);
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            span.add_link(sc);
        }
    }
}

/// Continues each producer's trace through this stage: one short span per
/// traced input, a child of the producer's context and linked to the batch
/// span (which links back to each of them). Returns the new spans'
/// `traceparent`s, for the event this stage publishes. At most `MAX_LINKS`.
pub fn continue_traces<'a>(
    name: &str,
    traceparents: impl IntoIterator<Item = &'a str>,
    batch: &tracing::Span,
) -> Vec<String> {
    use opentelemetry::trace::TraceContextExt;
    let batch_cx = batch.context().span().span_context().clone();
    let mut out = Vec::new();
    for tp in traceparents.into_iter().take(crate::event::MAX_LINKS) {
        let parent = extract_traceparent(tp);
        let parent_sc = parent.span().span_context().clone();
        if !parent_sc.is_valid() {
            continue;
        }
        let span = tracing::info_span!("message", otel.name = name, otel.kind = "consumer");
        let _ = span.set_parent(parent);
        if batch_cx.is_valid() {
            span.add_link(batch_cx.clone());
        }
        batch.add_link(parent_sc);
        if let Some(t) = traceparent_of(&span) {
            out.push(t);
        }
    }
    out
}
