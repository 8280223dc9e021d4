//! A provider adapter: serves datasets over the broker's `Serve` stream, answering
//! equality-filter queries from a JSON-lines file, or by running a command per request.
//!
//! The command gets the query as one JSON object on stdin:
//! `{"exchange_id", "dataset_id", "consumer", "purpose", "filters": {"item": value, ...},
//! "fields": [...], "limit": N}` and writes rows as JSON lines (one object per row) on stdout.
//! A non-zero exit answers the request with an error carrying the last line of stderr.

use crate::proto::{
    broker_message, provider_message, value, ErrorStatus, ProviderAnswer, ProviderMessage,
    ProviderRequest, Row, ServeCredit, ServeHello, Value,
};
use crate::{Client, ClientError};
use serde_json::{Map, Number, Value as Json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Where answers come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Rows read once from a JSON-lines file.
    Rows(Arc<Vec<Map<String, Json>>>),
    /// A shell command run once per request.
    Exec(String),
}

/// Errors of the provider adapter.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The rows file could not be read or parsed.
    #[error("{path}: line {line}: {reason}")]
    Rows {
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The broker refused or ended the stream.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The stream broke.
    #[error("serving stream: {0}")]
    Stream(String),
}

/// Reads a JSON-lines file: one JSON object per line; blank lines are skipped.
pub fn load_rows(path: &Path) -> Result<Vec<Map<String, Json>>, ProviderError> {
    let text = std::fs::read_to_string(path).map_err(|e| ProviderError::Rows {
        path: path.to_path_buf(),
        line: 0,
        reason: e.to_string(),
    })?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Json>(line) {
            Ok(Json::Object(m)) => rows.push(m),
            Ok(_) => {
                return Err(ProviderError::Rows {
                    path: path.to_path_buf(),
                    line: i + 1,
                    reason: "each line must be a JSON object".into(),
                })
            }
            Err(e) => {
                return Err(ProviderError::Rows {
                    path: path.to_path_buf(),
                    line: i + 1,
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(rows)
}

/// A proto value as JSON.
pub fn value_to_json(v: &Value) -> Json {
    match &v.kind {
        None => Json::Null,
        Some(value::Kind::StringValue(s)) => Json::String(s.clone()),
        Some(value::Kind::IntValue(i)) => Json::Number((*i).into()),
        Some(value::Kind::DoubleValue(d)) => {
            Number::from_f64(*d).map(Json::Number).unwrap_or(Json::Null)
        }
        Some(value::Kind::BoolValue(b)) => Json::Bool(*b),
        Some(value::Kind::BytesValue(b)) => {
            Json::String(b.iter().map(|x| format!("{x:02x}")).collect())
        }
    }
}

/// A JSON value as a proto value (objects and arrays become their JSON text).
pub fn json_to_value(j: &Json) -> Value {
    let kind = match j {
        Json::Null => None,
        Json::Bool(b) => Some(value::Kind::BoolValue(*b)),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Some(value::Kind::IntValue(i)),
            None => n.as_f64().map(value::Kind::DoubleValue),
        },
        Json::String(s) => Some(value::Kind::StringValue(s.clone())),
        other => Some(value::Kind::StringValue(other.to_string())),
    };
    Value { kind }
}

/// Whether a row's JSON value equals a filter's value (numbers by value, text exactly;
/// a text filter also matches a number or flag written the same way).
fn equals(row_value: Option<&Json>, filter: &Value) -> bool {
    let want = value_to_json(filter);
    match (row_value, &want) {
        (None, Json::Null) => true,
        (None, _) => false,
        (Some(Json::Number(a)), Json::Number(b)) => a.as_f64() == b.as_f64(),
        (Some(a), Json::String(s)) if !a.is_string() => {
            let text = a.to_string();
            text == *s
        }
        (Some(a), b) => a == b,
    }
}

/// Answers a query from rows: equality filters (AND), the wanted items, the limit.
pub fn answer_from_rows(rows: &[Map<String, Json>], req: &ProviderRequest) -> (Vec<Row>, bool) {
    let query = req.query.clone().unwrap_or_default();
    let limit = if query.limit == 0 {
        usize::MAX
    } else {
        query.limit as usize
    };
    let mut out = Vec::new();
    let mut truncated = false;
    for r in rows {
        let hit = query
            .filters
            .iter()
            .all(|f| f.value.as_ref().is_some_and(|v| equals(r.get(&f.item), v)));
        if !hit {
            continue;
        }
        if out.len() == limit {
            truncated = true;
            break;
        }
        let fields: HashMap<String, Value> = r
            .iter()
            .filter(|(k, _)| query.fields.is_empty() || query.fields.contains(k))
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect();
        out.push(Row { fields });
    }
    (out, truncated)
}

/// The JSON a command gets on stdin for one request.
pub fn query_json(req: &ProviderRequest) -> Json {
    let query = req.query.clone().unwrap_or_default();
    let filters: Map<String, Json> = query
        .filters
        .iter()
        .map(|f| {
            (
                f.item.clone(),
                f.value.as_ref().map(value_to_json).unwrap_or(Json::Null),
            )
        })
        .collect();
    serde_json::json!({
        "exchange_id": req.exchange_id,
        "dataset_id": req.dataset_id,
        "consumer": req.consumer,
        "purpose": req.purpose,
        "filters": filters,
        "fields": query.fields,
        "limit": query.limit,
    })
}

/// Runs the command for one request.
async fn answer_by_exec(cmd: &str, req: &ProviderRequest) -> Result<(Vec<Row>, bool), ErrorStatus> {
    let internal = |m: String| ErrorStatus {
        code: tonic::Code::Internal as i32,
        message: m,
    };
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| internal(format!("cannot run the provider command: {e}")))?;
    let input = query_json(req).to_string();
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input is fine; ignore a broken pipe.
        let _ = stdin.write_all(input.as_bytes()).await;
    }
    let mut stdout = String::new();
    let mut stderr = String::new();
    let (mut so, mut se) = (child.stdout.take(), child.stderr.take());
    let read = async {
        if let Some(o) = so.as_mut() {
            let _ = o.read_to_string(&mut stdout).await;
        }
        if let Some(e) = se.as_mut() {
            let _ = e.read_to_string(&mut stderr).await;
        }
        child.wait().await
    };
    let status = read
        .await
        .map_err(|e| internal(format!("provider command: {e}")))?;
    if !status.success() {
        let last = stderr.lines().last().unwrap_or("no message").to_string();
        return Err(internal(format!(
            "provider command failed ({status}): {last}"
        )));
    }
    let mut rows = Vec::new();
    for (i, line) in stdout.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Json>(line) {
            Ok(Json::Object(m)) => rows.push(Row {
                fields: m
                    .iter()
                    .map(|(k, v)| (k.clone(), json_to_value(v)))
                    .collect(),
            }),
            _ => {
                return Err(internal(format!(
                    "provider command output line {} is not a JSON object",
                    i + 1
                )))
            }
        }
    }
    Ok((rows, false))
}

/// Serves until the broker ends the stream; returns how many requests were answered.
pub async fn serve(
    client: &Client,
    dataset_ids: Vec<String>,
    max_in_flight: u32,
    instance: String,
    source: Source,
) -> Result<u64, ProviderError> {
    let (tx, rx) = mpsc::channel(max_in_flight as usize + 16);
    let hello = ProviderMessage {
        body: Some(provider_message::Body::Hello(ServeHello {
            dataset_ids,
            max_in_flight,
            instance,
        })),
    };
    tx.send(hello)
        .await
        .map_err(|_| ProviderError::Stream("closed before hello".into()))?;
    let mut inbound = client.serve(rx).await?;
    let mut answered = 0u64;
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(answered),
            Err(s) => return Err(ClientError::Status(s).into()),
        };
        let Some(broker_message::Body::Request(req)) = msg.body else {
            continue;
        };
        answered += 1;
        let (tx, source) = (tx.clone(), source.clone());
        tokio::spawn(async move {
            let outcome = match &source {
                Source::Rows(rows) => Ok(answer_from_rows(rows, &req)),
                Source::Exec(cmd) => {
                    let left = req
                        .deadline
                        .as_ref()
                        .map(|d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000)
                        .map(|d| d - now_ms())
                        .unwrap_or(30_000)
                        .max(1);
                    match tokio::time::timeout(
                        Duration::from_millis(left as u64),
                        answer_by_exec(cmd, &req),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => Err(ErrorStatus {
                            code: tonic::Code::DeadlineExceeded as i32,
                            message: "the provider command did not finish before the deadline"
                                .into(),
                        }),
                    }
                }
            };
            let answer = match outcome {
                Ok((rows, truncated)) => ProviderAnswer {
                    delivery_id: req.delivery_id,
                    rows,
                    error: None,
                    truncated,
                },
                Err(e) => ProviderAnswer {
                    delivery_id: req.delivery_id,
                    rows: Vec::new(),
                    error: Some(e),
                    truncated: false,
                },
            };
            let _ = tx
                .send(ProviderMessage {
                    body: Some(provider_message::Body::Answer(answer)),
                })
                .await;
        });
    }
}

/// Asks the broker for more in-flight room on an open stream (for callers of the raw API).
pub fn credit(add: u32) -> ProviderMessage {
    ProviderMessage {
        body: Some(provider_message::Body::Credit(ServeCredit { add })),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Filter, Query};

    fn req(filters: &[(&str, Value)], fields: &[&str], limit: u32) -> ProviderRequest {
        ProviderRequest {
            query: Some(Query {
                filters: filters
                    .iter()
                    .map(|(k, v)| Filter {
                        item: k.to_string(),
                        value: Some(v.clone()),
                    })
                    .collect(),
                fields: fields.iter().map(|s| s.to_string()).collect(),
                limit,
            }),
            ..Default::default()
        }
    }

    fn s(x: &str) -> Value {
        json_to_value(&Json::String(x.into()))
    }

    #[test]
    fn equality_filters_fields_and_limit() -> Result<(), Box<dyn std::error::Error>> {
        let rows: Vec<Map<String, Json>> = [
            r#"{"id_number":"1","status":"PAID","month":"2026-10","amount":120}"#,
            r#"{"id_number":"1","status":"PAID","month":"2026-11","amount":120}"#,
            r#"{"id_number":"2","status":"STOPPED","month":"2026-11","amount":0}"#,
        ]
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()?;
        let (r, t) = answer_from_rows(&rows, &req(&[("id_number", s("1"))], &["status"], 0));
        assert_eq!(r.len(), 2);
        assert!(!t);
        assert_eq!(r[0].fields.len(), 1);
        let (r, t) = answer_from_rows(&rows, &req(&[("id_number", s("1"))], &[], 1));
        assert_eq!(r.len(), 1);
        assert!(t);
        assert_eq!(r[0].fields.len(), 4);
        // A number compares by value, from a typed or a text filter.
        let int = Value {
            kind: Some(value::Kind::IntValue(0)),
        };
        assert_eq!(
            answer_from_rows(&rows, &req(&[("amount", int)], &[], 0))
                .0
                .len(),
            1
        );
        assert_eq!(
            answer_from_rows(&rows, &req(&[("amount", s("120"))], &[], 0))
                .0
                .len(),
            2
        );
        let (r, _) = answer_from_rows(
            &rows,
            &req(&[("id_number", s("1")), ("month", s("2026-11"))], &[], 0),
        );
        assert_eq!(r.len(), 1);
        assert!(
            answer_from_rows(&rows, &req(&[("id_number", s("9"))], &[], 0))
                .0
                .is_empty()
        );
        Ok(())
    }

    #[test]
    fn rows_file_errors_name_the_line() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("rows.jsonl");
        std::fs::write(&p, "{\"a\":1}\n\n[1,2]\n")?;
        let e = load_rows(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("line 3"), "{e}");
        std::fs::write(&p, "{\"a\":1}\n{\"b\":2}\n")?;
        assert_eq!(load_rows(&p)?.len(), 2);
        Ok(())
    }

    #[tokio::test]
    async fn exec_reads_the_query_and_writes_rows() {
        let r = req(&[("id_number", s("7"))], &["status"], 0);
        let cmd = r#"read q; echo "{\"status\":\"ok\",\"echo\":$q}""#;
        let out = answer_by_exec(cmd, &r).await;
        let (rows, _) = out.unwrap_or_default();
        assert_eq!(rows.len(), 1);
        assert!(rows[0].fields.contains_key("echo"));
        let failing = answer_by_exec("echo broken >&2; exit 3", &r).await;
        assert!(failing.err().is_some_and(|e| e.message.contains("broken")));
    }
}
