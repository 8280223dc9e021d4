//! OpenTelemetry export: with `[log] otlp_endpoint` set, the broker's `exchange` span reaches an
//! OTLP/gRPC collector (a fake one, in-process) with the exchange's trace id as its trace id.
//!
//! Across a cascade, the `hop` spans of the brokers on the way carry the same trace id.
//!
//! The global tracing subscriber can be set once per process, so this binary holds one test.

use anyhow::{ensure, Context, Result};
use govshare_broker::config::LogSection;
use govshare_broker::telemetry;
use govshare_client::proto::*;
use govshare_tests::cascade::{alive_rows, ask, cascade, granted, publish, Cascade};
use govshare_tests::provider::TestProvider;
use govshare_tests::{wait_until, TestBroker};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A received span and the `service.name` of its resource.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

/// A fake OTLP collector: keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(any_value::Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| string_attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        self.spans
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?
            .extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// The spans named `name` whose trace id is `trace_id` (hex).
    fn find(&self, name: &str, trace_id: &str) -> Vec<Received> {
        let want = hex_to_bytes(trace_id);
        self.spans
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|r| r.span.name == name && r.span.trace_id == want)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Collector {
    /// Name and attributes of every span of the trace `trace_id`, for failure messages.
    fn summary(&self, trace_id: &str) -> Vec<String> {
        let want = hex_to_bytes(trace_id);
        self.spans
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|r| r.span.trace_id == want)
                    .map(|r| {
                        let attrs: Vec<String> = r
                            .span
                            .attributes
                            .iter()
                            .filter_map(|kv| {
                                Some(format!(
                                    "{}={:?}",
                                    kv.key,
                                    kv.value.as_ref()?.value.as_ref()?
                                ))
                            })
                            .collect();
                        format!("{} [{}]", r.span.name, attrs.join(", "))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn hex_to_bytes(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exchange_span_is_exported_with_its_trace_id() -> Result<()> {
    // The config decides here, not the environment of whoever runs the tests.
    std::env::remove_var(telemetry::ENDPOINT_ENV);

    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // What main.rs does with [log]: install the subscriber and the exporter, once per process.
    let log = LogSection {
        otlp_endpoint: format!("http://{addr}"),
        otlp_service_name: "govshare-test-hub".into(),
        level: "warn".into(),
        ..LogSection::default()
    };
    let guard = Arc::new(telemetry::init(&log)?.context("an endpoint is set: expected a guard")?);
    ensure!(guard.endpoint() == format!("http://{addr}"));

    let broker = TestBroker::start_with("330000/hub", |c| c.log = log.clone()).await?;
    let hrss = broker.client_for("330000/hrss").await?;
    let civil = broker.client_for("330100/civil").await?;
    let ds = publish(&hrss, "deaths", ShareType::Unconditional).await?;
    granted(&civil, &ds).await?;
    let _provider = TestProvider::start(&hrss, &[&ds], 4, "p1", alive_rows()).await?;

    // One exchange whose trace id the broker assigns, one whose trace id the consumer brings.
    let assigned = civil.request(ask(&ds, "330102199001011234")).await?;
    ensure!(assigned.state() == ExchangeState::Answered, "{assigned:?}");
    let own = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = ask(&ds, "330102199001011234");
    req.trace_id = own.into();
    let brought = civil.request(req).await?;
    ensure!(brought.state() == ExchangeState::Answered, "{brought:?}");
    ensure!(brought.trace_id == own, "{brought:?}");

    // Spans go out in batches (every 5 s by default); flushing sends them now.
    let g = guard.clone();
    tokio::task::spawn_blocking(move || g.flush()).await??;

    for trace_id in [assigned.trace_id.as_str(), own] {
        ensure!(trace_id.len() == 32, "trace id {trace_id:?}");
        let spans = wait_until(
            Duration::from_secs(30),
            &format!("the collector to receive the exchange span of trace {trace_id}"),
            || async { Ok(Some(collector.find("exchange", trace_id)).filter(|v| !v.is_empty())) },
        )
        .await?;
        let r = &spans[0];
        ensure!(r.service == "govshare-test-hub", "{r:?}");
        ensure!(
            string_attr(&r.span.attributes, "trace_id").as_deref() == Some(trace_id),
            "the span carries the trace id as an attribute too: {r:?}"
        );
        ensure!(
            string_attr(&r.span.attributes, "dataset").as_deref() == Some(ds.as_str()),
            "{r:?}"
        );
        // The parent is the trace's virtual root: the trace id's low 8 bytes, as at every broker.
        ensure!(
            r.span.parent_span_id == hex_to_bytes(&trace_id[16..]),
            "{r:?}"
        );
        ensure!(r.span.span_id.len() == 8, "{r:?}");
    }

    broker.shutdown().await?;

    // Across three brokers (all in this process, so all exporting): the consumer's broker has
    // the exchange span, the hub (from 330000/hub) and the provider's broker (from its parent)
    // a hop span each, in one trace.
    let c = cascade().await?;
    let r = c.pension.request(ask(&c.ds, "440101199001011234")).await?;
    ensure!(r.state() == ExchangeState::Answered, "{r:?}");
    let g = guard.clone();
    tokio::task::spawn_blocking(move || g.flush()).await??;
    let trace_id = r.trace_id.clone();
    let froms = wait_until(
        Duration::from_secs(30),
        "the exchange span and the hop spans of the cascade",
        || async {
            let hops = collector.find("hop", &trace_id);
            let mut froms: Vec<String> = hops
                .iter()
                .filter_map(|h| string_attr(&h.span.attributes, "from"))
                .collect();
            froms.sort();
            froms.dedup();
            let done = !collector.find("exchange", &trace_id).is_empty()
                && froms.iter().any(|f| f == "330000/hub")
                && froms.len() >= 2;
            Ok(done.then_some(froms))
        },
    )
    .await
    .with_context(|| {
        format!(
            "spans of trace {trace_id}: {:?}",
            collector.summary(&trace_id)
        )
    })?;
    for h in collector.find("hop", &trace_id) {
        ensure!(
            h.span.parent_span_id == hex_to_bytes(&trace_id[16..]),
            "every hop hangs under the trace's virtual root: {h:?} (hops from {froms:?})"
        );
    }
    let Cascade { hub, zj, gd, .. } = c;
    for b in [zj, gd, hub] {
        b.shutdown().await?;
    }

    let g = Arc::try_unwrap(guard).map_err(|_| anyhow::anyhow!("guard still shared"))?;
    tokio::task::spawn_blocking(move || g.shutdown()).await??;
    Ok(())
}
