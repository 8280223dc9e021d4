//! The Grafana dashboard and the Prometheus alert rules in `deploy/` query only metrics the
//! broker exports: every metric name in every PromQL expression is in
//! `govshare_broker::metrics::ALL`, except the names of metrics still to come (`FUTURE`, empty
//! today), which may appear only where the files say the metrics are not exported yet. A live broker
//! with a federation link (`/metrics`) then confirms each name is really served, with the right
//! type for the `_bucket`, `_sum` and `_count` series of histograms.
//!
//! The alert files are YAML; they are read here by a small hand parser that understands the
//! subset Prometheus rule files use (block mappings, sequences of rules, plain, quoted and block
//! scalars, simple flow mappings), so the tests need no YAML crate. `promtool check rules`
//! (tests/tests/prometheus.rs) checks the full syntax.

use anyhow::{bail, ensure, Context, Result};
use govshare_broker::metrics::ALL;
use govshare_tests::TestBroker;
use serde_json::Value as Json;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

/// Metrics that do not exist yet. They may be queried only in `FUTURE_ALERTS` and in a
/// dashboard row whose description says "not exported yet". Remove a name from here once the
/// broker exports it (it is then in `ALL`, and this list must not overlap `ALL`). Empty today:
/// the federation link metrics left it when federation landed, and the certificate-expiry gauge
/// (`govshare_certificate_expiry_seconds`) when the brokers started to export it.
const FUTURE: &[&str] = &[];

/// The only alert file that may use `FUTURE` metrics, left out of prometheus.yml's
/// `rule_files` until they are exported; every other alert is in `alerts.yml`. It exists only
/// while `FUTURE` has names (the certificate alerts it last held are in `alerts.yml` now).
const FUTURE_ALERTS: &str = "alerts-future.yml";

/// What `FUTURE_ALERTS` must say about its metrics.
const FUTURE_ALERTS_MARK: &str = "not exported yet";

/// What marks a dashboard row whose panels may use `FUTURE` metrics.
const FUTURE_ROW_MARK: &str = "not exported yet";

/// A made-up metric still to come, for the tests of the `FUTURE` mechanism itself (which must
/// keep working while `FUTURE` is empty).
const EXAMPLE_FUTURE: &[&str] = &["govshare_example_future_seconds"];

/// The suffixes of a histogram's (or summary's) series.
const SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// PromQL: metric names in an expression.

/// Every metric name (`govshare_*`, `process_*`) an expression mentions, as written (suffixes
/// kept). String literals (label values, regexes) are skipped, so `rule="govshare_x"` is no
/// reference; an identifier must start at a word boundary.
fn metric_refs(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            // Skip the string literal, honouring backslash escapes (not in raw `...` strings).
            i += 1;
            while i < b.len() && b[i] != c {
                if b[i] == b'\\' && c != b'`' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        let boundary = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        let rest = &expr[i..];
        let prefix = ["govshare_", "process_"]
            .into_iter()
            .find(|p| rest.starts_with(p));
        if let (true, Some(p)) = (boundary, prefix) {
            let allowed = |ch: u8| {
                ch.is_ascii_lowercase() || ch == b'_' || (p == "govshare_" && ch.is_ascii_digit())
            };
            let len = rest.bytes().take_while(|&ch| allowed(ch)).count();
            // A longer identifier with other characters (`process_X`, `govshare_a:b`) is not
            // a name we know how to check: report it whole so that it fails loudly.
            let full = rest
                .bytes()
                .take_while(|&ch| ch.is_ascii_alphanumeric() || ch == b'_' || ch == b':')
                .count();
            out.push(rest[..len.max(full)].to_string());
            i += full.max(1);
            continue;
        }
        // Step over the rest of an identifier, so that `xgovshare_y` is not matched inside.
        if c.is_ascii_alphanumeric() || c == b'_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            continue;
        }
        i += 1;
    }
    out
}

/// The metric a referenced series belongs to: the name itself when it is known, else the name
/// without a histogram suffix when that is known; unknown names are returned unchanged.
fn base_metric(name: &str) -> (String, Option<&'static str>) {
    base_metric_in(name, FUTURE)
}

/// `base_metric`, with `future` as the metrics still to come.
fn base_metric_in(name: &str, future: &[&str]) -> (String, Option<&'static str>) {
    let known = |n: &str| ALL.contains(&n) || future.contains(&n);
    if known(name) {
        return (name.to_string(), None);
    }
    for suffix in SUFFIXES {
        if let Some(base) = name.strip_suffix(suffix) {
            if known(base) {
                return (base.to_string(), Some(suffix));
            }
        }
    }
    (name.to_string(), None)
}

// ---------------------------------------------------------------------------------------------
// The queries of the deploy files.

/// One PromQL expression found in a deploy file.
#[derive(Debug, Clone)]
struct PromQuery {
    /// Where: file and panel or rule, for messages.
    origin: String,
    /// The expression.
    expr: String,
    /// Whether it sits where `FUTURE` metrics are allowed.
    future_ok: bool,
}

/// Every query of the dashboard: panel targets (also inside collapsed rows) and the template
/// variables. A panel belongs to the row above it (by grid position).
fn dashboard_queries(dash: &Json) -> Result<Vec<PromQuery>> {
    let mut out = Vec::new();
    let mut top: Vec<&Json> = dash["panels"]
        .as_array()
        .context("dashboard has no panels array")?
        .iter()
        .collect();
    top.sort_by_key(|p| {
        (
            p["gridPos"]["y"].as_i64().unwrap_or(0),
            p["gridPos"]["x"].as_i64().unwrap_or(0),
        )
    });
    let mut row_future = false;
    let mut row_title = String::from("(no row)");
    let visit = |p: &Json, row_title: &str, future_ok: bool, out: &mut Vec<PromQuery>| {
        let title = p["title"].as_str().unwrap_or("(untitled)");
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push(PromQuery {
                    origin: format!(
                        "govshare.json, row {row_title:?}, panel {title:?} ({})",
                        t["refId"].as_str().unwrap_or("?")
                    ),
                    expr: expr.to_string(),
                    future_ok,
                });
            }
        }
    };
    for p in top {
        if p["type"] == "row" {
            row_title = p["title"].as_str().unwrap_or("(untitled row)").to_string();
            row_future = p["description"]
                .as_str()
                .is_some_and(|d| d.contains(FUTURE_ROW_MARK));
            // A collapsed row keeps its panels inside.
            for inner in p["panels"].as_array().into_iter().flatten() {
                visit(inner, &row_title, row_future, &mut out);
            }
        } else {
            visit(p, &row_title, row_future, &mut out);
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let name = v["name"].as_str().unwrap_or("?");
        let query = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .with_context(|| format!("variable {name} has no query"))?;
        for expr in [Some(query), v["definition"].as_str()]
            .into_iter()
            .flatten()
        {
            out.push(PromQuery {
                origin: format!("govshare.json, variable {name:?}"),
                expr: expr.to_string(),
                future_ok: false,
            });
        }
    }
    Ok(out)
}

/// One key of a YAML block, flattened: `labels.severity` → `warning`.
type Flat = BTreeMap<String, String>;

/// One alerting or recording rule of a rule file.
#[derive(Debug)]
struct Rule {
    /// 1-based line of its `- alert:` / `- record:`.
    line: usize,
    /// Its keys, flattened.
    keys: Flat,
}

impl Rule {
    fn name(&self) -> &str {
        self.keys
            .get("alert")
            .or_else(|| self.keys.get("record"))
            .map(String::as_str)
            .unwrap_or("?")
    }
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

/// A plain or quoted YAML scalar's value.
fn unquote(v: &str) -> Result<String> {
    let v = v.trim();
    if let Some(inner) = v.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .with_context(|| format!("unterminated double-quoted scalar {v:?}"))?;
        return Ok(inner.replace("\\\"", "\"").replace("\\\\", "\\"));
    }
    if let Some(inner) = v.strip_prefix('\'') {
        let inner = inner
            .strip_suffix('\'')
            .with_context(|| format!("unterminated single-quoted scalar {v:?}"))?;
        return Ok(inner.replace("''", "'"));
    }
    // A plain scalar ends at a comment.
    Ok(match v.find(" #") {
        Some(i) => v[..i].trim_end().to_string(),
        None => v.to_string(),
    })
}

/// Flattens a block of `key: value` lines (one rule) into dotted keys. `lines` are (line
/// number, text) with the rule's leading `- ` already replaced by spaces.
fn flatten(lines: &[(usize, String)]) -> Result<Flat> {
    let mut flat = Flat::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let (no, line) = (&lines[i].0, &lines[i].1);
        i += 1;
        if is_blank_or_comment(line) {
            continue;
        }
        let ind = indent(line);
        while stack.last().is_some_and(|(d, _)| *d >= ind) {
            stack.pop();
        }
        let content = line.trim();
        let (key, rest) = match content.split_once(": ") {
            Some((k, r)) => (k.trim(), r.trim()),
            None => match content.strip_suffix(':') {
                Some(k) => (k.trim(), ""),
                None => bail!("line {no}: expected `key: value`, found {content:?}"),
            },
        };
        let path: Vec<&str> = stack.iter().map(|(_, k)| k.as_str()).chain([key]).collect();
        let path = path.join(".");
        // The lines that continue this value: more indented than the key, or blank.
        let cont_start = i;
        let mut cont = Vec::new();
        while i < lines.len() && (lines[i].1.trim().is_empty() || indent(&lines[i].1) > ind) {
            cont.push(lines[i].1.trim().to_string());
            i += 1;
        }
        while cont.last().is_some_and(|c| c.is_empty()) {
            cont.pop();
        }
        if rest.is_empty() {
            if cont.is_empty() {
                flat.insert(path, String::new());
            } else {
                // A nested mapping: parse its lines again at their own indentation.
                i = cont_start;
                stack.push((ind, key.to_string()));
            }
            continue;
        }
        let value = if rest.starts_with('|') || rest.starts_with('>') {
            let sep = if rest.starts_with('|') { "\n" } else { " " };
            cont.join(sep).trim().to_string()
        } else if rest.starts_with('{') && rest.ends_with('}') && cont.is_empty() {
            // A flow mapping: `{severity: warning, team: ops}`.
            for pair in rest[1..rest.len() - 1].split(',') {
                let (k, v) = pair
                    .split_once(':')
                    .with_context(|| format!("line {no}: cannot read flow mapping {rest:?}"))?;
                flat.insert(format!("{path}.{}", k.trim()), unquote(v)?);
            }
            continue;
        } else {
            let mut all = rest.to_string();
            for c in &cont {
                all.push(' ');
                all.push_str(c);
            }
            unquote(&all).with_context(|| format!("line {no}"))?
        };
        flat.insert(path, value);
    }
    Ok(flat)
}

/// The rules of a Prometheus rule file.
fn rules(text: &str) -> Result<Vec<Rule>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        if !(t.starts_with("- alert:") || t.starts_with("- record:")) {
            i += 1;
            continue;
        }
        let dash = indent(lines[i]);
        let start = i;
        let mut block = vec![(i + 1, format!("{}  {}", " ".repeat(dash), &t[2..]))];
        i += 1;
        while i < lines.len() && (is_blank_or_comment(lines[i]) || indent(lines[i]) > dash) {
            block.push((i + 1, lines[i].to_string()));
            i += 1;
        }
        let keys = flatten(&block).with_context(|| format!("rule at line {}", start + 1))?;
        out.push(Rule {
            line: start + 1,
            keys,
        });
    }
    // Every `expr:` of the file must have been read as some rule's expression.
    let exprs = lines
        .iter()
        .filter(|l| l.trim_start().starts_with("expr:"))
        .count();
    let read = out.iter().filter(|r| r.keys.contains_key("expr")).count();
    ensure!(
        exprs == read,
        "the file has {exprs} `expr:` lines but {read} rules with an expression were read"
    );
    Ok(out)
}

/// The alert rule files: every `alerts*.yml` in deploy/prometheus.
fn alert_files() -> Result<Vec<PathBuf>> {
    let dir = govshare_tests::deploy("prometheus");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("alerts") && n.ends_with(".yml"))
        })
        .collect();
    files.sort();
    ensure!(
        files.iter().any(|f| f.ends_with("alerts.yml")),
        "no deploy/prometheus/alerts.yml"
    );
    Ok(files)
}

fn alert_queries() -> Result<Vec<PromQuery>> {
    let mut out = Vec::new();
    for file in alert_files()? {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("?")
            .to_string();
        let text = read(&file)?;
        for r in rules(&text).with_context(|| format!("in {name}"))? {
            let expr = r
                .keys
                .get("expr")
                .with_context(|| format!("{name}:{}: rule {} has no expr", r.line, r.name()))?;
            out.push(PromQuery {
                origin: format!("{name}:{} rule {}", r.line, r.name()),
                expr: expr.clone(),
                future_ok: name == FUTURE_ALERTS,
            });
        }
    }
    Ok(out)
}

fn dashboard() -> Result<Json> {
    let path = govshare_tests::deploy("grafana/govshare.json");
    serde_json::from_str(&read(&path)?).with_context(|| format!("{} is not JSON", path.display()))
}

/// Every query of the dashboard and the alert files.
fn all_queries() -> Result<Vec<PromQuery>> {
    let mut q = dashboard_queries(&dashboard()?)?;
    q.extend(alert_queries()?);
    Ok(q)
}

/// The problems with the metric names of `queries`: unknown metrics, and `FUTURE` metrics
/// outside the places that may use them.
fn check_names(queries: &[PromQuery]) -> Vec<String> {
    check_names_in(queries, FUTURE)
}

/// `check_names`, with `future` as the metrics still to come.
fn check_names_in(queries: &[PromQuery], future: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    for q in queries {
        for name in metric_refs(&q.expr) {
            let (base, _) = base_metric_in(&name, future);
            if ALL.contains(&base.as_str()) {
                continue;
            }
            if future.contains(&base.as_str()) {
                if !q.future_ok {
                    problems.push(format!(
                        "{}: {name} is not exported yet (FUTURE); it may be used only in \
                         {FUTURE_ALERTS} or the dashboard row marked {FUTURE_ROW_MARK:?}",
                        q.origin
                    ));
                }
                continue;
            }
            problems.push(format!(
                "{}: {name} is not a metric the broker exports (govshare_broker::metrics::ALL); \
                 expr: {}",
                q.origin, q.expr
            ));
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn metric_refs_reads_promql() {
    let e = r#"histogram_quantile(0.9, sum by (le) (rate(govshare_exchange_stage_seconds_bucket{stage="end_to_end", broker=~"$broker", x="govshare_fake"}[$__rate_interval]))) / xgovshare_y + process_open_fds"#;
    assert_eq!(
        metric_refs(e),
        ["govshare_exchange_stage_seconds_bucket", "process_open_fds"]
    );
    assert_eq!(
        metric_refs("label_values(govshare_uptime_seconds, broker)"),
        ["govshare_uptime_seconds"]
    );
    assert_eq!(
        metric_refs(
            r#"sum(rate(govshare_a_total{r='it\'s govshare_b'}[5m])) and on() govshare_c2"#
        ),
        ["govshare_a_total", "govshare_c2"]
    );
    assert_eq!(metric_refs("process_Cpu"), ["process_Cpu"]);
    assert_eq!(
        base_metric("govshare_storage_flush_seconds_bucket"),
        (
            "govshare_storage_flush_seconds".to_string(),
            Some("_bucket")
        )
    );
    assert_eq!(
        base_metric("govshare_exchanges_total"),
        ("govshare_exchanges_total".to_string(), None)
    );
}

#[test]
fn the_name_check_refuses_unknown_and_misplaced_metrics() {
    let q = |expr: &str, future_ok: bool| PromQuery {
        origin: "self-test".into(),
        expr: expr.into(),
        future_ok,
    };
    assert!(check_names(&[q("rate(govshare_exchanges_total[5m])", false)]).is_empty());
    assert!(check_names(&[q("govshare_storage_flush_seconds_count", false)]).is_empty());
    let bad = check_names(&[q("rate(govshare_exchange_totals[5m])", false)]);
    assert!(
        bad.len() == 1 && bad[0].contains("govshare_exchange_totals"),
        "{bad:?}"
    );
    assert_eq!(
        check_names(&[q("process_cpu_second_total", false)]).len(),
        1
    );
    // A metric still to come: refused where the files do not say so, allowed where they do,
    // and unknown (refused everywhere) once it is not listed as to come.
    let future = "govshare_example_future_seconds < 86400";
    let misplaced = check_names_in(&[q(future, false)], EXAMPLE_FUTURE);
    assert!(
        misplaced.len() == 1 && misplaced[0].contains("not exported yet"),
        "{misplaced:?}"
    );
    assert!(check_names_in(&[q(future, true)], EXAMPLE_FUTURE).is_empty());
    assert_eq!(check_names(&[q(future, true)]).len(), 1);
    assert_eq!(
        base_metric_in("govshare_example_future_seconds_count", EXAMPLE_FUTURE),
        (
            "govshare_example_future_seconds".to_string(),
            Some("_count")
        )
    );
    // Exported metrics are fine anywhere, the ones that once were to come included.
    assert!(check_names(&[q("govshare_link_up == 0", false)]).is_empty());
    assert!(check_names(&[q("govshare_certificate_expiry_seconds < 86400", false)]).is_empty());
}

#[test]
fn yaml_reader_reads_rule_files() -> Result<()> {
    let text = r#"
groups:
  - name: g
    rules:
      - alert: A
        expr: |
          sum(rate(govshare_x_total[5m]))
            > 1
        for: 5m
        labels:
          severity: warning   # a comment
        annotations:
          summary: "it's \"A\""
          description: >-
            two
            lines
      - alert: B
        expr: 'up == 0'
        labels: {severity: critical, team: ops}
      - record: job:x:rate5m
        expr: rate(x[5m])
"#;
    let r = rules(text)?;
    ensure!(r.len() == 3, "{r:?}");
    ensure!(r[0].keys["expr"] == "sum(rate(govshare_x_total[5m]))\n> 1");
    ensure!(r[0].keys["for"] == "5m" && r[0].keys["labels.severity"] == "warning");
    ensure!(r[0].keys["annotations.summary"] == "it's \"A\"");
    ensure!(r[0].keys["annotations.description"] == "two lines");
    ensure!(r[1].name() == "B" && r[1].keys["expr"] == "up == 0");
    ensure!(r[1].keys["labels.severity"] == "critical" && r[1].keys["labels.team"] == "ops");
    ensure!(r[2].name() == "job:x:rate5m");
    ensure!(rules("      - alert: X\n        expr: a\n  expr: b\n").is_err());
    Ok(())
}

#[test]
fn dashboards_and_alerts_query_only_exported_metrics() -> Result<()> {
    let overlap: Vec<_> = FUTURE.iter().filter(|f| ALL.contains(f)).collect();
    ensure!(
        overlap.is_empty(),
        "{overlap:?} are exported now: remove them from FUTURE in tests/tests/dashboards.rs"
    );
    let queries = all_queries()?;
    // Places for metrics still to come exist only while some are to come.
    if FUTURE.is_empty() {
        let waiting: Vec<&str> = queries
            .iter()
            .filter(|q| q.future_ok)
            .map(|q| q.origin.as_str())
            .collect();
        ensure!(
            waiting.is_empty(),
            "no metric is to come (FUTURE is empty), but these queries sit where metrics not \
             exported yet go ({FUTURE_ALERTS} or a row marked {FUTURE_ROW_MARK:?}): {waiting:?}"
        );
        let stale = govshare_tests::deploy("prometheus").join(FUTURE_ALERTS);
        ensure!(
            !stale.exists(),
            "{} exists, but FUTURE is empty: move its rules into alerts.yml",
            stale.display()
        );
    }
    let from_dashboard = queries
        .iter()
        .filter(|q| q.origin.starts_with("govshare.json"))
        .count();
    ensure!(
        from_dashboard >= 30,
        "only {from_dashboard} dashboard queries were found: is the dashboard parsed right?"
    );
    let from_alerts = queries.len() - from_dashboard;
    ensure!(
        from_alerts >= 7,
        "only {from_alerts} alert expressions were found"
    );
    for q in &queries {
        ensure!(
            !metric_refs(&q.expr).is_empty() || q.expr.contains("up{"),
            "{}: no metric found in {:?}",
            q.origin,
            q.expr
        );
    }
    let problems = check_names(&queries);
    ensure!(
        problems.is_empty(),
        "{} metric references in deploy/ are wrong:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
    Ok(())
}

#[test]
fn the_dashboard_shows_every_exported_metric() -> Result<()> {
    let used: HashSet<String> = dashboard_queries(&dashboard()?)?
        .iter()
        .flat_map(|q| metric_refs(&q.expr))
        .map(|n| base_metric(&n).0)
        .collect();
    let missing: Vec<_> = ALL.iter().filter(|m| !used.contains(**m)).collect();
    ensure!(
        missing.is_empty(),
        "no panel of deploy/grafana/govshare.json shows {missing:?}: add one"
    );
    // The federation row shows each link metric per peer.
    let d = dashboard()?;
    let link_exprs: Vec<String> = dashboard_queries(&d)?
        .into_iter()
        .filter(|q| q.origin.contains("row \"Federation links\""))
        .map(|q| q.expr)
        .collect();
    for (metric, by) in [
        ("govshare_link_up", &["peer"][..]),
        ("govshare_link_frames_total", &["peer", "direction"][..]),
        ("govshare_link_outbox", &["peer"][..]),
        ("govshare_link_rtt_seconds", &["peer"][..]),
        ("govshare_link_reconnects_total", &["peer"][..]),
    ] {
        let e = link_exprs
            .iter()
            .find(|e| metric_refs(e).iter().any(|n| n == metric))
            .with_context(|| format!("the federation row does not show {metric}"))?;
        // Either the series as they are (every label kept), or summed by the labels.
        let kept = !e.contains("sum") || by.iter().all(|l| e.contains(l));
        ensure!(
            kept,
            "the federation row's {metric} panel loses a label of {by:?}: {e}"
        );
    }
    // The certificate expiry panel shows each broker's certificates one by one, in days.
    let cert = dashboard_queries(&d)?
        .into_iter()
        .find(|q| {
            metric_refs(&q.expr)
                .iter()
                .any(|n| n == "govshare_certificate_expiry_seconds")
        })
        .context("no panel shows govshare_certificate_expiry_seconds")?;
    ensure!(
        cert.origin.contains("panel \"Certificate expiry\"")
            && cert.expr.contains("/ 86400")
            && !cert.expr.contains("sum")
            && !cert.expr.contains(" by ("),
        "{}: show days left per broker and certificate: {}",
        cert.origin,
        cert.expr
    );
    Ok(())
}

#[test]
fn the_dashboard_is_well_formed() -> Result<()> {
    let d = dashboard()?;
    let schema = d["schemaVersion"].as_i64().context("schemaVersion")?;
    ensure!((36..=41).contains(&schema), "schemaVersion {schema}");
    ensure!(d["uid"].is_string() && d["title"].is_string());
    let vars = d["templating"]["list"].as_array().context("templating")?;
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    let ds = var("datasource").context("no `datasource` variable")?;
    ensure!(
        ds["type"] == "datasource" && ds["query"] == "prometheus",
        "datasource variable: {ds}"
    );
    let broker = var("broker").context("no `broker` variable")?;
    ensure!(broker["type"] == "query", "broker variable: {broker}");
    ensure!(
        broker["definition"] == "label_values(govshare_uptime_seconds, broker)"
            && broker["query"]["query"] == broker["definition"],
        "broker variable: {broker}"
    );
    ensure!(broker["datasource"]["uid"] == "${datasource}");

    let mut ids = HashSet::new();
    let mut cells: Vec<(String, [i64; 4])> = Vec::new();
    let mut rows = Vec::new();
    let mut stack: Vec<&Json> = d["panels"].as_array().context("panels")?.iter().collect();
    while let Some(p) = stack.pop() {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        let id = p["id"]
            .as_i64()
            .with_context(|| format!("{title}: no id"))?;
        ensure!(ids.insert(id), "panel id {id} is used twice ({title})");
        let g = &p["gridPos"];
        let pos = ["x", "y", "w", "h"].map(|k| g[k].as_i64().unwrap_or(-1));
        ensure!(
            pos.iter().all(|v| *v >= 0) && pos[0] + pos[2] <= 24,
            "{title}: bad gridPos {g}"
        );
        if p["type"] == "row" {
            rows.push((title.clone(), p["description"].as_str().unwrap_or("")));
            stack.extend(p["panels"].as_array().into_iter().flatten());
        } else {
            ensure!(
                p["datasource"]["uid"] == "${datasource}",
                "{title}: datasource must be the ${{datasource}} variable, is {}",
                p["datasource"]
            );
            let targets = p["targets"].as_array().context("targets")?;
            ensure!(!targets.is_empty(), "{title}: no queries");
            for t in targets {
                ensure!(
                    t["datasource"]["uid"] == "${datasource}",
                    "{title}: a target's datasource is {}",
                    t["datasource"]
                );
                ensure!(t["expr"].is_string(), "{title}: a target without expr");
            }
            ensure!(
                p["description"].as_str().is_some_and(|s| !s.is_empty()),
                "{title}: describe the panel"
            );
        }
        for (other, q) in &cells {
            let overlap = pos[0] < q[0] + q[2]
                && q[0] < pos[0] + pos[2]
                && pos[1] < q[1] + q[3]
                && q[1] < pos[1] + pos[3];
            ensure!(!overlap, "panels {title:?} and {other:?} overlap");
        }
        cells.push((title, pos));
    }
    for want in [
        "Overview",
        "Exchanges and latency",
        "Queues and DLQ",
        "Grants and demands",
        "Federation links",
        "Storage",
        "Process",
    ] {
        ensure!(
            rows.iter().any(|(t, _)| t == want),
            "no row {want:?}: {rows:?}"
        );
    }
    // The link metrics are exported: the federation row is no longer a row of metrics to come.
    ensure!(
        !rows
            .iter()
            .any(|(t, d)| t == "Federation links" && d.contains(FUTURE_ROW_MARK)),
        "the federation row says {FUTURE_ROW_MARK:?}, but its metrics are exported"
    );
    // Latency percentiles per stage.
    let exprs: Vec<String> = dashboard_queries(&d)?.into_iter().map(|q| q.expr).collect();
    for stage in ["accept", "queue_wait", "provider", "end_to_end"] {
        for q in ["0.5", "0.9", "0.99"] {
            ensure!(
                exprs
                    .iter()
                    .any(|e| e.contains(&format!("histogram_quantile({q},"))
                        && e.contains("govshare_exchange_stage_seconds_bucket")
                        && e.contains(&format!("stage=\"{stage}\""))),
                "no p{q} of stage {stage}"
            );
        }
    }
    Ok(())
}

#[test]
fn every_alert_rule_is_complete() -> Result<()> {
    let mut names = BTreeSet::new();
    for file in alert_files()? {
        let text = read(&file)?;
        let fname = file.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        if fname == FUTURE_ALERTS {
            ensure!(
                text.contains(FUTURE_ALERTS_MARK),
                "{fname} must say that its metrics are {FUTURE_ALERTS_MARK:?}"
            );
        }
        let rs = rules(&text).with_context(|| format!("in {fname}"))?;
        ensure!(!rs.is_empty(), "{fname} has no rules");
        for r in rs {
            let at = format!("{fname}:{} {}", r.line, r.name());
            ensure!(r.keys.contains_key("alert"), "{at}: not an alerting rule");
            ensure!(
                names.insert(r.name().to_string()),
                "{at}: the name is used twice"
            );
            // Only alerts.yml is loaded (prometheus.yml): a rule elsewhere must wait for a
            // metric still to come.
            let waits = r.keys.get("expr").is_some_and(|e| {
                metric_refs(e)
                    .iter()
                    .any(|n| FUTURE.contains(&base_metric(n).0.as_str()))
            });
            ensure!(
                fname == "alerts.yml" || (fname == FUTURE_ALERTS && waits),
                "{at}: its metrics are exported; it belongs in alerts.yml"
            );
            ensure!(
                r.keys.get("for").is_some_and(|f| !f.is_empty()),
                "{at}: no `for:`"
            );
            let sev = r.keys.get("labels.severity").map(String::as_str);
            ensure!(
                matches!(sev, Some("critical" | "warning" | "info")),
                "{at}: severity label is {sev:?}"
            );
            for a in ["annotations.summary", "annotations.description"] {
                ensure!(r.keys.get(a).is_some_and(|s| s.len() > 10), "{at}: no {a}");
            }
        }
    }
    for want in [
        "GovshareQueueBacklogGrowing",
        "GovshareDeadLettersGrowing",
        "GovshareLinkDown",
        "GovshareLinkFlapping",
        "GovshareDenialSpike",
        "GovshareDemandsOverdue",
        "GovshareFlushLatencyHigh",
        "GovshareCertificateExpiringSoon",
        "GovshareCertificateExpiryImminent",
    ] {
        ensure!(names.contains(want), "no alert {want}: {names:?}");
    }
    // The scrape config names each target's broker.
    let prom = read(&govshare_tests::deploy("prometheus/prometheus.yml"))?;
    let targets = prom
        .lines()
        .filter(|l| l.trim_start().starts_with("- targets:"))
        .count();
    let brokers = prom
        .lines()
        .filter(|l| l.trim_start().starts_with("broker:"))
        .count();
    ensure!(
        targets >= 3 && targets == brokers,
        "prometheus.yml: {targets} targets, {brokers} broker labels"
    );
    ensure!(prom.contains("scrape_interval: 15s"));
    ensure!(prom.lines().any(|l| l.trim() == "- alerts.yml"));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The live check: the names are served, with histogram suffixes only on histograms.

#[tokio::test]
async fn every_queried_metric_is_served_by_a_live_broker() -> Result<()> {
    let mut broker = TestBroker::start_with("330000/hub", |c| {
        c.metrics.listen = "127.0.0.1:0".into();
        c.metrics.per_dataset = true;
    })
    .await?;
    // A child broker linked to it, so that the link metrics exist. Brokers in one process share
    // one recorder: the broker's /metrics shows both ends of the link (peer `330100/hub` on the
    // parent, peer `parent` on the child). It pings every second (so that the round-trip time
    // appears soon) and retries within a second (so that it reconnects soon).
    let child = TestBroker::start_child("330100/hub", &broker, &[], |c| {
        c.federation.ping_secs = 1;
        c.federation.max_backoff_secs = 1;
    })
    .await?;
    let link_up = |base: String| async move {
        govshare_tests::wait_until(
            std::time::Duration::from_secs(30),
            "the link to be up at both ends",
            || {
                let base = base.clone();
                async move {
                    let (_, text) = govshare_tests::http_get(&base, "/metrics").await?;
                    let up = |peer: &str| {
                        text.lines()
                            .any(|l| l == format!("govshare_link_up{{peer=\"{peer}\"}} 1"))
                    };
                    Ok((up("330100/hub") && up("parent")).then_some(()))
                }
            },
        )
        .await
    };
    link_up(broker.metrics_url().context("metrics port")?).await?;
    // The parent stops and starts again: the child opens its link again, a reconnect. The
    // metrics port is picked again on a restart.
    broker.stop_now().await?;
    broker.start_again().await?;
    let base = broker.metrics_url().context("metrics port")?;
    link_up(base.clone()).await?;
    govshare_tests::wait_until(
        std::time::Duration::from_secs(30),
        "the child's reconnect and a link round-trip time",
        || {
            let base = base.clone();
            async move {
                let (_, text) = govshare_tests::http_get(&base, "/metrics").await?;
                let has = |prefix: &str| text.lines().any(|l| l.starts_with(prefix));
                Ok((has("govshare_link_reconnects_total{peer=\"parent\"}")
                    && has("govshare_link_rtt_seconds{"))
                .then_some(()))
            }
        },
    )
    .await?;
    // A little load, so that every histogram and labelled series has been recorded.
    let load = govshare_tests::load::AliveLoad::start(&broker).await?;
    let (civil, ask) = (&load.civil, govshare_tests::load::AliveLoad::ask);
    for _ in 0..3 {
        civil.request(ask(vec![])).await?;
    }
    ensure!(
        civil.request(ask(vec!["salary".into()])).await.is_err(),
        "an item outside the grant was allowed"
    );

    let (code, text) = govshare_tests::http_get(&base, "/metrics").await?;
    ensure!(code == 200, "/metrics answered {code}");
    let mut types = BTreeMap::new();
    let mut sampled = HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(n), Some(t)) = (it.next(), it.next()) {
                types.insert(n.to_string(), t.to_string());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            sampled.insert(line[..end].to_string());
        }
    }
    let mut problems = Vec::new();
    for q in all_queries()? {
        for name in metric_refs(&q.expr) {
            let (base_name, suffix) = base_metric(&name);
            if FUTURE.contains(&base_name.as_str()) {
                continue;
            }
            let kind = types.get(&base_name).map(String::as_str);
            match (suffix, kind) {
                (_, None) => problems.push(format!(
                    "{}: {base_name} has no `# TYPE` line in /metrics",
                    q.origin
                )),
                (Some("_bucket"), Some(k)) if k != "histogram" => problems.push(format!(
                    "{}: {name} queried, but {base_name} is a {k}, not a histogram",
                    q.origin
                )),
                (Some(_), Some(k)) if k != "histogram" && k != "summary" => problems.push(format!(
                    "{}: {name} queried, but {base_name} is a {k}",
                    q.origin
                )),
                _ => {}
            }
            if !sampled.contains(&name) {
                problems.push(format!(
                    "{}: /metrics has no sample of {name} after a small load",
                    q.origin
                ));
            }
        }
    }
    problems.sort();
    problems.dedup();
    ensure!(
        problems.is_empty(),
        "{} problems:\n  {}\n--- /metrics ---\n{text}",
        problems.len(),
        problems.join("\n  ")
    );
    child.shutdown().await?;
    broker.shutdown().await
}
