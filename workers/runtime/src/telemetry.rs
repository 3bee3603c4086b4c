//! Logs and traces through `tracing`.
//!
//! Logs are human-readable by default and JSON lines when asked. Spans are exported over OTLP
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; when it
//! is not, no OpenTelemetry layer is installed and messages still carry a W3C `traceparent`, so
//! one transfer keeps one trace id across every worker either way.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::field::{Field, Visit};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::field::{MakeVisitor, RecordFields, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};
use twophase_messages::Envelope;
use uuid::Uuid;

/// Whether spans are exported (an OpenTelemetry layer is installed).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Keeps the span exporter alive; dropping it flushes the spans not yet sent.
#[derive(Debug)]
#[must_use = "dropping the guard stops span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("warning: spans not all exported at shutdown: {e}");
            }
        }
    }
}

/// What a process logs unless `RUST_LOG` says otherwise: a line for each step of each message.
pub const LOG_EVERY_STEP: &str = "info,sqlx=warn,rdkafka=warn";

/// What a process that reports in its own words logs unless `RUST_LOG` says otherwise:
/// warnings and errors only.
pub const LOG_WARNINGS: &str = "warn";

/// Installs the global subscriber for a process whose spans are exported as `service` (unless
/// `OTEL_SERVICE_NAME` names it), logging what `RUST_LOG` selects, else `default_log`.
pub fn init(json: bool, service: &str, default_log: &str) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_log));
    let provider = if export_configured() {
        Some(tracer_provider(service)?)
    } else {
        None
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("twophase"))
            .with_threads(false)
    });
    let result = tracing_subscriber::registry()
        .with(filter)
        .with(json.then(|| fmt::layer().json().with_writer(std::io::stderr)))
        // Colours on a terminal only: a log file gets plain text.
        .with((!json).then(|| text_layer(std::io::stderr, std::io::stderr().is_terminal())))
        .with(otel)
        .try_init();
    // A second init (tests starting several workers in one process) keeps the first.
    if result.is_ok() && provider.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
    }
    Ok(Telemetry { provider })
}

/// The human-readable log, written to `writer`, in colour if `ansi`.
fn text_layer<S, W>(writer: W, ansi: bool) -> fmt::Layer<S, LogFields, fmt::format::Format, W>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    W: for<'w> fmt::MakeWriter<'w> + 'static,
{
    fmt::layer()
        .fmt_fields(LogFields)
        .with_ansi(ansi)
        .with_writer(writer)
}

/// The fields of the human-readable log: as `tracing-subscriber` formats them, without the span
/// attributes meant for the trace exporter alone. `otel.*` names and kinds the exported span,
/// and `messaging.system`, `messaging.operation.type` and `messaging.consumer.group.name` are
/// the same on every line a worker writes; a line keeps the topic, partition, offset and ids
/// that tell one message from another. (They were nearly a third of each 600-odd-byte line.) The
/// exported spans and the JSON log keep every attribute.
#[derive(Debug, Clone, Copy, Default)]
struct LogFields;

impl LogFields {
    fn logged(field: &Field) -> bool {
        let name = field.name();
        !(name.starts_with("otel.")
            || matches!(
                name,
                "messaging.system" | "messaging.operation.type" | "messaging.consumer.group.name"
            ))
    }
}

impl<'writer> FormatFields<'writer> for LogFields {
    fn format_fields<R: RecordFields>(
        &self,
        writer: Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut visitor = Logged(DefaultFields::new().make_visitor(writer));
        fields.record(&mut visitor);
        visitor.0.finish()
    }
}

/// Passes on to the default field formatter only the fields [`LogFields`] logs. Numbers and
/// booleans reach `record_debug` through `Visit`'s defaults, as they do in the formatter's own
/// visitor; strings and errors it formats its own way, so they are passed on as they come.
struct Logged<V>(V);

impl<V: Visit> Visit for Logged<V> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if LogFields::logged(field) {
            self.0.record_str(field, value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if LogFields::logged(field) {
            self.0.record_error(field, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if LogFields::logged(field) {
            self.0.record_debug(field, value);
        }
    }
}

fn export_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The OTLP/HTTP protocol asked for by the standard variables; protobuf unless JSON is named.
fn protocol() -> anyhow::Result<Protocol> {
    let asked = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok().map(|v| (*name, v)));
    match asked {
        None => Ok(Protocol::HttpBinary),
        Some((name, value)) => protocol_named(name, &value),
    }
}

fn protocol_named(name: &str, value: &str) -> anyhow::Result<Protocol> {
    match value.trim().to_ascii_lowercase().as_str() {
        "http/protobuf" => Ok(Protocol::HttpBinary),
        "http/json" => Ok(Protocol::HttpJson),
        _ => anyhow::bail!(
            "{name}={value:?} is not supported: spans are exported over OTLP/HTTP, so set it to \
             http/protobuf or http/json and point OTEL_EXPORTER_OTLP_ENDPOINT at the \
             collector's HTTP port (usually 4318)"
        ),
    }
}

/// Refuses an `https` endpoint, which the exporter, built without TLS, would fail to reach on
/// every export without a word.
fn check_endpoints() -> anyhow::Result<()> {
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        if let Ok(value) = std::env::var(name) {
            check_endpoint(name, &value)?;
        }
    }
    Ok(())
}

fn check_endpoint(name: &str, value: &str) -> anyhow::Result<()> {
    let https = value
        .trim()
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
    anyhow::ensure!(
        !https,
        "{name}={value:?} is not supported: spans are exported over plain HTTP, to an \
         OpenTelemetry Collector beside the workers that forwards them over TLS; point it at \
         that collector's HTTP port (usually http://127.0.0.1:4318)"
    );
    Ok(())
}

fn tracer_provider(service: &str) -> anyhow::Result<SdkTracerProvider> {
    check_endpoints()?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol()?)
        .build()
        .context("configuring the OTLP span exporter")?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Whether spans are exported: work done only for exported spans can be skipped otherwise.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Makes `span` continue the trace of a message that carried these headers. Call it before
/// the span is first entered; without export, or without a valid `traceparent`, it does
/// nothing (the span then starts a trace of its own).
pub fn continue_trace(span: &Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if !exporting() {
        return;
    }
    let Some(traceparent) = traceparent else {
        return;
    };
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        // Fails only if the span was already entered, which the callers never do.
        let _ = span.set_parent(parent);
    }
}

/// The trace id of `span` when it is exported, as 32 hex digits.
pub fn exported_trace_id(span: &Span) -> Option<String> {
    if !exporting() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// Sets the W3C `traceparent` and `tracestate` of a message published now, caused by `cause`
/// (or starting a chain of its own).
///
/// With export on, the current span is the message's parent, so the consumer's span hangs
/// under the span that published it. Without it, the message continues its cause's trace with
/// a new span id; with no cause trace at all, its trace id is its correlation id, if that is a
/// UUID (a message that starts a chain is correlated by its own transfer id).
pub fn set_trace(envelope: &mut Envelope, cause: Option<&Envelope>) {
    let correlation_id = envelope.correlation_id.clone();
    set_trace_of(envelope, cause, correlation_id.as_deref());
}

/// [`set_trace`] for a message of transfer `transfer_id`: with no cause trace, its trace id is
/// its transfer's, whatever correlation id a producer gave it, so that every message of one
/// transfer shares one trace.
pub fn set_trace_of(envelope: &mut Envelope, cause: Option<&Envelope>, transfer_id: Option<&str>) {
    let (traceparent, tracestate) = trace_headers(cause, transfer_id);
    envelope.traceparent = Some(traceparent);
    envelope.tracestate = tracestate;
}

/// The `traceparent` and `tracestate` [`set_trace_of`] gives a message of `transfer_id` published
/// now: for a message, or for work that will later publish in the transfer's trace.
pub fn trace_headers(
    cause: Option<&Envelope>,
    transfer_id: Option<&str>,
) -> (String, Option<String>) {
    if exporting() {
        let context = Span::current().context();
        if context.span().span_context().is_valid() {
            let mut carrier = HashMap::with_capacity(2);
            TraceContextPropagator::new().inject_context(&context, &mut carrier);
            if let Some(traceparent) = carrier.remove("traceparent") {
                return (traceparent, carrier.remove("tracestate"));
            }
        }
    }
    let trace_id = cause
        .and_then(|c| c.traceparent.as_deref())
        .and_then(trace_id_of)
        .or_else(|| {
            Uuid::parse_str(transfer_id?)
                .ok()
                .map(|u| u.simple().to_string())
        })
        .unwrap_or_else(|| Uuid::new_v4().simple().to_string());
    let span_id = &Uuid::new_v4().simple().to_string()[..16];
    (
        format!("00-{trace_id}-{span_id}-01"),
        cause.and_then(|c| c.tracestate.clone()),
    )
}

/// The trace id of a well-formed `traceparent`, if it has one.
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    parse_traceparent(traceparent).map(|(trace_id, _)| trace_id)
}

/// The trace id and span id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn parse_traceparent(value: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = value.trim().split('-').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if parts.len() < 4 || !hex(parts[0], 2) || parts[0] == "ff" || !hex(parts[3], 2) {
        return None;
    }
    // Version 00 has exactly four parts; later versions may append more.
    if parts[0] == "00" && parts.len() != 4 {
        return None;
    }
    let (trace, span) = (parts[1], parts[2]);
    // All zeros is the spec's invalid id.
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    if !hex(trace, 32) || !hex(span, 16) || zero(trace) || zero(span) {
        return None;
    }
    Some((trace.to_ascii_lowercase(), span.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn traceparents_are_parsed_strictly() {
        assert_eq!(
            parse_traceparent(TRACE),
            Some((
                "0af7651916cd43dd8448eb211c80319c".into(),
                "b7ad6b7169203331".into()
            ))
        );
        assert_eq!(
            trace_id_of(TRACE).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        for bad in [
            "",
            "00-abc-def-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319z-b7ad6b7169203331-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    fn envelope(transfer: &str) -> Envelope {
        Envelope::new("t", "/test", transfer)
    }

    #[test]
    fn without_export_a_message_continues_its_cause_with_a_new_span() {
        let mut cause = envelope("not-a-uuid");
        cause.traceparent = Some(TRACE.to_owned());
        cause.tracestate = Some("k=v".to_owned());
        let mut out = envelope("not-a-uuid");
        set_trace(&mut out, Some(&cause));
        let traceparent = out.traceparent.unwrap();
        assert_eq!(
            trace_id_of(&traceparent).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_ne!(traceparent, TRACE, "a new span id");
        assert_eq!(out.tracestate.as_deref(), Some("k=v"));
    }

    #[test]
    fn without_a_cause_trace_the_transfer_id_is_the_trace_id() {
        let transfer = Uuid::new_v4().to_string();
        let mut cause = envelope(&transfer);
        cause.traceparent = Some("garbage".to_owned());
        let (mut a, mut b) = (envelope(&transfer), envelope(&transfer));
        set_trace(&mut a, None);
        set_trace(&mut b, Some(&cause));
        let a = a.traceparent.unwrap();
        assert_eq!(
            trace_id_of(&a),
            Some(Uuid::parse_str(&transfer).unwrap().simple().to_string())
        );
        assert_eq!(trace_id_of(&b.traceparent.unwrap()), trace_id_of(&a));
        let mut c = envelope("not-a-uuid");
        set_trace(&mut c, None);
        let c = c.traceparent.unwrap();
        assert!(trace_id_of(&c).is_some(), "still a valid traceparent: {c}");
    }

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_lines_leave_out_the_exporters_attributes_and_keep_the_messages_own() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber =
            tracing_subscriber::registry().with(text_layer(move || writer.clone(), false));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "consume",
                otel.name = "process t.saga.replies",
                otel.kind = "consumer",
                messaging.system = "kafka",
                messaging.operation.type = "process",
                messaging.destination.name = "t.saga.replies",
                messaging.consumer.group.name = "t-coordinator",
                messaging.kafka.partition = 2,
                messaging.kafka.offset = 48603,
                transfer.id = tracing::field::Empty,
            );
            span.record("transfer.id", "ece51eb8");
            span.in_scope(|| {
                tracing::info!(status = "completed", retried = false, "transfer advanced")
            });
        });
        let line = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        for kept in [
            "consume{messaging.destination.name=\"t.saga.replies\" messaging.kafka.partition=2 \
             messaging.kafka.offset=48603 transfer.id=\"ece51eb8\"}",
            "transfer advanced status=\"completed\" retried=false",
        ] {
            assert!(line.contains(kept), "{kept} missing from {line}");
        }
        for left_out in ["otel.", "kafka\"", "process\"", "t-coordinator"] {
            assert!(!line.contains(left_out), "{left_out} in {line}");
        }
    }

    #[test]
    fn an_unsupported_protocol_is_refused_with_a_reason() {
        // Reading the process environment is racy across tests; only the parse is checked here.
        let error = protocol_named("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").unwrap_err();
        assert!(error.to_string().contains("4318"), "{error}");
        assert!(matches!(
            protocol_named("OTEL_EXPORTER_OTLP_PROTOCOL", "HTTP/JSON"),
            Ok(Protocol::HttpJson)
        ));
    }

    #[test]
    fn an_https_endpoint_is_refused_with_a_reason() {
        let name = "OTEL_EXPORTER_OTLP_ENDPOINT";
        for refused in ["https://collector:4318", " HTTPS://collector"] {
            let error = check_endpoint(name, refused).unwrap_err().to_string();
            assert!(error.contains("http://127.0.0.1:4318"), "{error}");
        }
        for taken in [
            "http://127.0.0.1:4318",
            "http://collector:4318/v1/traces",
            "https",
        ] {
            check_endpoint(name, taken).unwrap();
        }
    }
}
