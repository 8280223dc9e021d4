//! A provider instance for tests: serves datasets over the real `Serve` stream and answers
//! each request through a closure.

use anyhow::{bail, Context, Result};
use govshare_client::proto::{
    broker_message, provider_message, value, ErrorStatus, ProviderAnswer, ProviderMessage,
    ProviderRequest, Row, ServeHello, Value,
};
use govshare_client::Client;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What the test provider does with one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Answer with these rows.
    Rows(Vec<Row>),
    /// Answer with an error status.
    Error(i32, String),
    /// Never answer (a hung provider).
    Hang,
}

/// The closure deciding each reply.
pub type Handler = Arc<dyn Fn(&ProviderRequest) -> Reply + Send + Sync>;

/// A running provider instance.
#[derive(Debug)]
pub struct TestProvider {
    task: JoinHandle<()>,
    /// Every request received, in order.
    pub seen: Arc<Mutex<Vec<ProviderRequest>>>,
}

/// The text of a request's first filter (the key a test provider answers for); "" when none.
pub fn filter_value(req: &ProviderRequest) -> String {
    req.query
        .as_ref()
        .and_then(|q| q.filters.first())
        .and_then(|f| f.value.as_ref())
        .and_then(|v| match &v.kind {
            Some(govshare_client::proto::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// A row from `(item, text)` pairs.
pub fn row(pairs: &[(&str, &str)]) -> Row {
    Row {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(value::Kind::StringValue(v.to_string())),
                    },
                )
            })
            .collect::<HashMap<_, _>>(),
    }
}

/// The text of a row's item, if it is text.
pub fn text(r: &Row, item: &str) -> Option<String> {
    match r.fields.get(item)?.kind.as_ref()? {
        value::Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

impl TestProvider {
    /// Opens a serving stream for `datasets` with `max_in_flight` credit, waits for the
    /// broker's ServeReady, then answers requests with `handler` until stopped.
    pub async fn start(
        client: &Client,
        datasets: &[&str],
        max_in_flight: u32,
        label: &str,
        handler: Handler,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel(max_in_flight as usize + 16);
        tx.send(ProviderMessage {
            body: Some(provider_message::Body::Hello(ServeHello {
                dataset_ids: datasets.iter().map(|s| s.to_string()).collect(),
                max_in_flight,
                instance: label.to_string(),
            })),
        })
        .await?;
        let mut inbound = client.serve(rx).await?;
        let first = inbound
            .message()
            .await?
            .context("stream ended before ServeReady")?;
        if !matches!(first.body, Some(broker_message::Body::Ready(_))) {
            bail!("expected ServeReady, got {first:?}");
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let Some(broker_message::Body::Request(req)) = m.body else {
                    continue;
                };
                if let Ok(mut s) = seen2.lock() {
                    s.push(req.clone());
                }
                let answer = match handler(&req) {
                    Reply::Hang => continue,
                    Reply::Rows(rows) => ProviderAnswer {
                        delivery_id: req.delivery_id.clone(),
                        rows,
                        error: None,
                        truncated: false,
                    },
                    Reply::Error(code, message) => ProviderAnswer {
                        delivery_id: req.delivery_id.clone(),
                        rows: Vec::new(),
                        error: Some(ErrorStatus { code, message }),
                        truncated: false,
                    },
                };
                let msg = ProviderMessage {
                    body: Some(provider_message::Body::Answer(answer)),
                };
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
        });
        Ok(Self { task, seen })
    }

    /// How many requests it has received.
    pub fn received(&self) -> usize {
        self.seen.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Waits until the broker ends the stream (or the broker goes away).
    pub async fn closed(self) {
        let _ = self.task.await;
    }

    /// Drops the connection abruptly, as a crashed instance would.
    pub fn kill(self) {
        self.task.abort();
    }
}
