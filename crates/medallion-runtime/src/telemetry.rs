//! Tracing, OpenTelemetry export and log formatting, set up the same way in every service.
//!
//! Spans are exported over OTLP only when an endpoint is configured
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`); without one, trace context is still created
//! and propagated through NATS headers so a downstream service that does export
//! keeps the producer's trace. Export runs on the SDK's batch processor thread:
//! an unreachable collector costs dropped spans, never a slower pipeline.

use std::io::IsTerminal;
use std::sync::OnceLock;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Dispatch, Event, Metadata, Subscriber, span};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::env::EnvReader;

/// What telemetry needs from the environment.
#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    pub service: String,
    pub log_filter: String,
    pub log_format: LogFormat,
    pub sdk_disabled: bool,
    pub endpoint: Option<String>,
    pub protocol: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

impl TelemetrySettings {
    pub fn from_env(service: &str, env: &mut EnvReader) -> Self {
        let log_format = match env.string("MEDALLION_LOG_FORMAT").as_str() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            "auto" => {
                if std::io::stderr().is_terminal() {
                    LogFormat::Text
                } else {
                    LogFormat::Json
                }
            }
            other => {
                env.invalid(
                    "MEDALLION_LOG_FORMAT",
                    format!("`{other}` is not json, text or auto"),
                );
                LogFormat::Json
            }
        };
        let log_filter = env.string("MEDALLION_LOG");
        if let Err(e) = EnvFilter::try_new(with_quiet_dependencies(&log_filter)) {
            env.invalid(
                "MEDALLION_LOG",
                format!("`{log_filter}` is not a valid filter: {e}"),
            );
        }
        let protocol = env.string("OTEL_EXPORTER_OTLP_PROTOCOL");
        if !matches!(protocol.as_str(), "grpc" | "http/protobuf") {
            env.invalid(
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                format!("`{protocol}` is not supported; use grpc or http/protobuf"),
            );
        }
        TelemetrySettings {
            service: env
                .optional("OTEL_SERVICE_NAME")
                .unwrap_or_else(|| service.to_string()),
            log_filter,
            log_format,
            sdk_disabled: env.bool("OTEL_SDK_DISABLED"),
            endpoint: env
                .optional("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|| env.optional("OTEL_EXPORTER_OTLP_ENDPOINT")),
            protocol,
        }
    }
}

/// Delta and DataFusion log every file they touch at INFO; keep them at WARN
/// unless the operator asks for them by name. The Delta writer warns on every
/// file that it skips statistics for binary columns (every Bronze file), and
/// the kernel logs "table not found" as an ERROR before returning it as a
/// value we handle: those two only at ERROR / off. Its commit loop logs
/// "exceeded maximum commit attempts" as an ERROR for an append that lost
/// every race, which our writer then tries again; a commit that does fail is
/// returned to us and logged by the stage, so that module is off.
fn with_quiet_dependencies(filter: &str) -> String {
    let mut f = filter.to_string();
    for (noisy, level) in [
        ("deltalake", "warn"),
        ("deltalake_core", "error"),
        ("deltalake_core::kernel::transaction", "off"),
        ("datafusion", "warn"),
        ("async_nats", "warn"),
        ("h2", "warn"),
        ("tower", "warn"),
        ("hyper", "warn"),
        ("buoyant_kernel", "off"),
        // An unreachable collector is reported once, by us (see
        // `warn_if_unreachable`), not as an ERROR per failed export.
        ("opentelemetry_sdk", "off"),
        ("opentelemetry_otlp", "off"),
    ] {
        if !names(filter, noisy) {
            f.push_str(&format!(",{noisy}={level}"));
        }
    }
    f
}

/// Whether the operator's filter has a directive for `target` or a module
/// above it (`deltalake_core=debug` covers `deltalake_core::kernel`), so our
/// default for it must not override theirs.
fn names(filter: &str, target: &str) -> bool {
    filter.split(',').any(|directive| {
        let named = directive
            .split(['=', '['])
            .next()
            .unwrap_or_default()
            .trim();
        !named.is_empty()
            && (target == named
                || target
                    .strip_prefix(named)
                    .is_some_and(|rest| rest.starts_with("::")))
    })
}

/// Keeps the tracer provider alive; flush it with [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

static DISPATCH: OnceLock<Dispatch> = OnceLock::new();

impl Telemetry {
    /// Installs the global subscriber and propagator. Call once, inside the tokio runtime.
    pub fn init(settings: &TelemetrySettings) -> Telemetry {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        // One set of directives, two filters: the global one decides what
        // exists (spans of ours, events the log prints), the log's own keeps
        // its lines' span scope to the spans the log filter enables.
        let directives = with_quiet_dependencies(&settings.log_filter);
        let filter = EnvFilter::new(&directives);
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .event_format(LineFormat {
                json: settings.log_format == LogFormat::Json,
            });
        let provider = (!settings.sdk_disabled).then(|| build_provider(settings));
        let otel = provider
            .as_ref()
            .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("medallion")));
        let global = OurSpansLoggedEvents {
            events: EnvFilter::new(&directives),
        };
        if let Some(p) = &provider {
            opentelemetry::global::set_tracer_provider(p.clone());
        }
        if provider.is_some()
            && let Some(endpoint) = settings.endpoint.clone()
        {
            tokio::spawn(warn_if_unreachable(endpoint));
        }
        let subscriber = tracing_subscriber::registry()
            .with(global)
            .with(otel)
            .with(SpanFieldsLayer)
            .with(fmt.with_filter(filter));
        let dispatch = Dispatch::new(subscriber);
        let _ = DISPATCH.set(dispatch.clone());
        let _ = dispatch.try_init();
        Telemetry { provider }
    }

    /// Flushes spans still buffered (bounded by the exporter's timeout).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || {
                let _ = provider.force_flush();
                let _ = provider.shutdown();
            })
            .await;
        }
    }
}

/// The global filter: only our own spans exist (dependency spans are noise
/// in Jaeger), and only the events the log filter prints, so those are all a
/// span records as its events. Global on purpose: as a per-layer filter on
/// the OpenTelemetry layer, spans nested in our batch spans (`bronze.commit`,
/// `gold.commit`) were created but never exported. Without the event half,
/// every dependency's TRACE and DEBUG events were recorded into our spans
/// (hundreds per commit from delta-rs, some formatting whole expressions):
/// noise in Jaeger and CPU on the hot path.
struct OurSpansLoggedEvents {
    events: EnvFilter,
}

fn ours(m: &Metadata<'_>) -> bool {
    m.target().starts_with("medallion")
}

impl<S> Layer<S> for OurSpansLoggedEvents
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn register_callsite(&self, m: &'static Metadata<'static>) -> Interest {
        match (m.is_span(), ours(m)) {
            (true, true) => Interest::always(),
            (true, false) => Interest::never(),
            (false, _) => Layer::<S>::register_callsite(&self.events, m),
        }
    }

    fn enabled(&self, m: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        if m.is_span() {
            ours(m)
        } else {
            Layer::<S>::enabled(&self.events, m, ctx)
        }
    }

    // Our spans are kept whatever their level.
    fn max_level_hint(&self) -> Option<LevelFilter> {
        None
    }

    // The log filter's span-scoped directives (`[span{field}]=debug`) need
    // to see spans come and go.
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.events.on_new_span(attrs, id, ctx)
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        self.events.on_record(id, values, ctx)
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.events.on_enter(id, ctx)
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.events.on_exit(id, ctx)
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.events.on_close(id, ctx)
    }
}

/// One warning when the collector cannot be reached at start: spans are
/// dropped (the exporter's queue is bounded), the pipeline is unaffected.
async fn warn_if_unreachable(endpoint: String) {
    let Ok(url) = url::Url::parse(&endpoint) else {
        tracing::warn!(
            endpoint,
            "OTEL_EXPORTER_OTLP_ENDPOINT is not a URL; no spans are exported"
        );
        return;
    };
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return;
    };
    let connect = tokio::net::TcpStream::connect((host, port));
    match tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
        Ok(Ok(_)) => {}
        _ => tracing::warn!(
            endpoint,
            "the OTLP collector is not reachable; spans are dropped until it is (the pipeline is not affected)"
        ),
    }
}

fn build_provider(settings: &TelemetrySettings) -> SdkTracerProvider {
    let resource = Resource::builder()
        .with_service_name(settings.service.clone())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = &settings.endpoint {
        let exporter = if settings.protocol == "http/protobuf" {
            use opentelemetry_otlp::WithExportConfig;
            let traces = if endpoint.ends_with("/v1/traces") {
                endpoint.clone()
            } else {
                format!("{}/v1/traces", endpoint.trim_end_matches('/'))
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(traces)
                .build()
        } else {
            use opentelemetry_otlp::WithExportConfig;
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
        };
        match exporter {
            Ok(e) => builder = builder.with_batch_exporter(e),
            Err(e) => eprintln!(
                "tracing export disabled: cannot build the OTLP exporter for {endpoint}: {e}"
            ),
        }
    }
    builder.build()
}

/// Span fields as JSON values, kept on the span so every log line can carry them.
struct SpanFields(Map<String, Value>);

struct SpanFieldsLayer;

impl<S> Layer<S> for SpanFieldsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut fields = JsonVisitor(Map::new());
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields.0));
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            if let Some(SpanFields(map)) = ext.get_mut::<SpanFields>() {
                let mut v = JsonVisitor(std::mem::take(map));
                values.record(&mut v);
                *map = v.0;
            }
        }
    }
}

struct JsonVisitor(Map<String, Value>);

impl Visit for JsonVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().into(), Value::String(value.to_string()));
    }
}

/// One line per event: JSON (for collectors) or text (for people), both with
/// the enclosing spans' fields and the OpenTelemetry trace and span ids.
struct LineFormat {
    json: bool,
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut fields = JsonVisitor(Map::new());
        event.record(&mut fields);
        let message = fields
            .0
            .remove("message")
            .and_then(|m| m.as_str().map(str::to_string))
            .unwrap_or_default();
        let mut span_fields = Map::new();
        let mut span_name = None;
        let mut ids = None;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(SpanFields(f)) = span.extensions().get::<SpanFields>() {
                    span_fields.extend(f.clone());
                }
                span_name = Some(span.name());
            }
            if let (Some(leaf), Some(dispatch)) = (ctx.lookup_current(), DISPATCH.get()) {
                ids =
                    tracing_opentelemetry::get_otel_context(&leaf.id(), dispatch).and_then(|cx| {
                        let sc = cx.span().span_context().clone();
                        sc.is_valid()
                            .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
                    });
            }
        }
        let now = now_rfc3339();
        if self.json {
            let mut line = Map::new();
            line.insert("timestamp".into(), now.into());
            line.insert("level".into(), meta.level().as_str().into());
            line.insert("target".into(), meta.target().into());
            line.insert("message".into(), message.into());
            if let Some(name) = span_name {
                line.insert("span".into(), name.into());
            }
            if let Some((t, s)) = ids {
                line.insert("trace_id".into(), t.into());
                line.insert("span_id".into(), s.into());
            }
            for (k, v) in span_fields.into_iter().chain(fields.0) {
                line.entry(k).or_insert(v);
            }
            writeln!(w, "{}", Value::Object(line))
        } else {
            write!(w, "{now} {:>5} ", meta.level())?;
            if let Some(name) = span_name {
                write!(w, "{name}: ")?;
            }
            write!(w, "{message}")?;
            for (k, v) in span_fields.iter().chain(fields.0.iter()) {
                match v {
                    Value::String(s) => write!(w, " {k}={s}")?,
                    other => write!(w, " {k}={other}")?,
                }
            }
            if let Some((t, s)) = ids {
                write!(w, " trace_id={t} span_id={s}")?;
            }
            writeln!(w)
        }
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependency_logs_are_quiet_unless_named() {
        assert!(with_quiet_dependencies("info").contains("deltalake=warn"));
        assert!(with_quiet_dependencies("info").contains("buoyant_kernel=off"));
        assert!(!with_quiet_dependencies("info,deltalake=debug").contains("deltalake=warn"));
        assert!(
            with_quiet_dependencies("info").contains("deltalake_core::kernel::transaction=off")
        );
        let asked = with_quiet_dependencies("info,deltalake_core::kernel::transaction=debug");
        assert!(!asked.contains("transaction=off"), "{asked}");
        assert!(asked.contains("deltalake_core=error"), "{asked}");
        let whole = with_quiet_dependencies("info,deltalake_core=debug");
        assert!(!whole.contains("transaction=off"), "{whole}");
        assert!(!whole.contains("deltalake_core=error"), "{whole}");
        assert!(whole.contains("deltalake=warn"), "{whole}");
    }
}
