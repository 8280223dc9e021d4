//! Logs and traces: the process-wide `tracing` subscriber (text or JSON logs on stderr, as
//! `[log]` says) and, when `[log] otlp_endpoint` is set, OpenTelemetry export of the broker's
//! spans over OTLP/gRPC.
//!
//! The exported `exchange` and `hop` spans take the exchange's govshare trace id (the W3C trace
//! id that `traceparent` carries between brokers) as their OpenTelemetry trace id, so a
//! collector joins the spans of every broker on an exchange's path into one trace, and the trace
//! id a consumer gets back finds it. Only spans of the broker itself (`govshare_broker`, level
//! info and above) are exported; the log filter does not change what is exported.

use crate::config::{check_otlp_endpoint, LogSection};
use anyhow::{anyhow, Context as _};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use std::sync::atomic::{AtomicBool, Ordering};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// The standard OpenTelemetry variable; when set (and not empty) it overrides
/// `[log] otlp_endpoint`.
pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Whether spans are being exported: [`link_trace`] does nothing otherwise.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The OTLP endpoint in force: `OTEL_EXPORTER_OTLP_ENDPOINT` when set, else
/// `[log] otlp_endpoint`; empty means no export.
pub fn endpoint(cfg: &LogSection) -> String {
    match std::env::var(ENDPOINT_ENV) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => cfg.otlp_endpoint.clone(),
    }
}

/// Keeps the span exporter running; dropping it (or [`Guard::shutdown`]) exports the spans
/// still buffered and stops it. Drop it while the tokio runtime that [`init`] ran in is still
/// alive (the exporter's gRPC channel lives on it), and not on one of that runtime's threads
/// (flushing blocks).
#[must_use = "dropping the guard stops the span export"]
#[derive(Debug)]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
    endpoint: String,
}

impl Guard {
    /// The collector the spans go to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Exports the spans ended so far now, instead of at the next batch (blocks).
    pub fn flush(&self) -> anyhow::Result<()> {
        match &self.provider {
            Some(p) => p
                .force_flush()
                .map_err(|e| anyhow!("exporting spans to {}: {e}", self.endpoint)),
            None => Ok(()),
        }
    }

    /// Exports the buffered spans and stops the exporter (blocks until done or timed out).
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        match self.provider.take() {
            Some(p) => {
                EXPORTING.store(false, Ordering::Relaxed);
                p.shutdown()
                    .map_err(|e| anyhow!("flushing spans to {}: {e}", self.endpoint))
            }
            None => Ok(()),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// Installs the global `tracing` subscriber: logs on stderr filtered by `RUST_LOG` or
/// `[log] level`, as `[log] format`; and, when an OTLP endpoint is configured (see [`endpoint`]),
/// a batch exporter of the broker's spans to it. Call once per process, inside the tokio
/// runtime when exporting; keep the returned guard until exit. Fails if a global subscriber is
/// already set, or if the endpoint is not usable.
pub fn init(cfg: &LogSection) -> anyhow::Result<Option<Guard>> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if cfg.format == "json" {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let endpoint = endpoint(cfg);
    let (otel, guard) = if endpoint.is_empty() {
        (None, None)
    } else {
        let what = if endpoint == cfg.otlp_endpoint {
            "[log] otlp_endpoint"
        } else {
            ENDPOINT_ENV
        };
        check_otlp_endpoint(&endpoint, what)?;
        let provider = provider(cfg, &endpoint)?;
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("govshare-broker"))
            .with_filter(Targets::new().with_target("govshare_broker", tracing::Level::INFO));
        let guard = Guard {
            provider: Some(provider),
            endpoint,
        };
        (Some(layer), Some(guard))
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .context("cannot install the tracing subscriber: one is already set")?;
    if let Some(g) = &guard {
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!(endpoint = %g.endpoint, service = %cfg.otlp_service_name, ratio = cfg.otlp_sample_ratio, "exporting spans over OTLP/gRPC");
    }
    Ok(guard)
}

/// The tracer provider: an OTLP/gRPC exporter behind the SDK's batch processor, sampling by
/// trace id.
fn provider(cfg: &LogSection, endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig as _;
    // The exporter's gRPC channel spawns its worker on the current tokio runtime.
    tokio::runtime::Handle::try_current()
        .map_err(|_| anyhow!("OTLP export needs a tokio runtime: call telemetry::init in one"))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .with_context(|| format!("cannot set up the OTLP exporter to {endpoint}"))?;
    // By trace id, not by parent: every broker on an exchange's path decides alike.
    let sampler = if cfg.otlp_sample_ratio >= 1.0 {
        Sampler::AlwaysOn
    } else {
        Sampler::TraceIdRatioBased(cfg.otlp_sample_ratio)
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(cfg.otlp_service_name.clone())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(resource)
        .build())
}

/// The OpenTelemetry context whose trace id is the govshare `trace_id` (32 hex digits): a remote
/// parent span whose id is the trace id's low 8 bytes, the same at every broker, so that the
/// spans of all brokers on the path are siblings in one trace. `None` for a malformed id.
pub fn parent_context(trace_id: &str) -> Option<opentelemetry::Context> {
    if trace_id.len() != 32 {
        return None;
    }
    let tid = TraceId::from_hex(trace_id).ok()?;
    if tid == TraceId::INVALID {
        return None;
    }
    let bytes = tid.to_bytes();
    let mut low = [0u8; 8];
    low.copy_from_slice(&bytes[8..]);
    let sid = match SpanId::from_bytes(low) {
        SpanId::INVALID => SpanId::from_bytes([0, 0, 0, 0, 0, 0, 0, 1]),
        s => s,
    };
    let sc = SpanContext::new(tid, sid, TraceFlags::SAMPLED, true, TraceState::default());
    Some(opentelemetry::Context::new().with_remote_span_context(sc))
}

/// Gives `span` the exchange's govshare trace id as its OpenTelemetry trace id (see
/// [`parent_context`]). Call before the span is first entered. Does nothing unless spans are
/// being exported, or when the trace id is malformed.
pub fn link_trace(span: &tracing::Span, trace_id: &str) {
    if !EXPORTING.load(Ordering::Relaxed) {
        return;
    }
    if let Some(cx) = parent_context(trace_id) {
        if let Err(e) = span.set_parent(cx) {
            tracing::debug!(error = %e, "span not linked to its trace id");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_context_carries_the_trace_id() {
        let cx = parent_context("4bf92f3577b34da6a3ce929d0e0e4736").expect("valid");
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote());
        assert_eq!(
            sc.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex")
        );
        assert_eq!(
            sc.span_id(),
            SpanId::from_hex("a3ce929d0e0e4736").expect("hex")
        );
        let zero_low = parent_context("4bf92f3577b34da60000000000000000").expect("valid");
        assert!(zero_low.span().span_context().is_valid());
        assert!(parent_context("").is_none());
        assert!(parent_context("00000000000000000000000000000000").is_none());
        assert!(parent_context("not hex at all, but 32 chars....").is_none());
        assert!(parent_context("4bf92f3577b34da6a3ce929d0e0e47").is_none());
    }

    #[test]
    fn link_trace_is_a_no_op_when_off() {
        // No subscriber, no export: nothing happens and nothing fails.
        let span = tracing::info_span!("exchange");
        link_trace(&span, "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn otlp_settings_are_validated() {
        let mut log = LogSection::default();
        assert!(log.validate_otlp().is_ok());
        log.otlp_endpoint = "http://127.0.0.1:4317".into();
        assert!(log.validate_otlp().is_ok());
        for bad in [
            "127.0.0.1:4317",
            "https://collector:4317",
            "http://",
            "grpc://x:1",
        ] {
            log.otlp_endpoint = bad.into();
            assert!(log.validate_otlp().is_err(), "{bad}");
        }
        log.otlp_endpoint = String::new();
        log.otlp_sample_ratio = 1.5;
        assert!(log.validate_otlp().is_err());
        log.otlp_sample_ratio = 0.25;
        log.otlp_service_name = " ".into();
        assert!(log.validate_otlp().is_err());
    }

    #[test]
    fn template_documents_and_round_trips_otlp() -> Result<(), Box<dyn std::error::Error>> {
        let mut cfg = crate::Config::default();
        let text = cfg.render_template();
        assert!(text.contains("otlp_endpoint = \"\""), "{text}");
        assert!(text.contains("otlp_sample_ratio = 1.0"), "{text}");
        cfg.log.otlp_endpoint = "http://127.0.0.1:4317".into();
        cfg.log.otlp_service_name = "hub \"a\"".into();
        cfg.log.otlp_sample_ratio = 0.125;
        let parsed: crate::Config = toml::from_str(&cfg.render_template())?;
        parsed.validate()?;
        assert_eq!(parsed.log.otlp_endpoint, "http://127.0.0.1:4317");
        assert_eq!(parsed.log.otlp_service_name, "hub \"a\"");
        assert_eq!(parsed.log.otlp_sample_ratio, 0.125);
        Ok(())
    }
}
