//! Runs one parsed command against the broker and prints the outcome.

use std::process::ExitCode;
use std::time::Duration;

use govshare_client::enums::short_name;
use govshare_client::proto::{
    ApproveDemandRequest, DemandView, ExchangeRequest, ExchangeResult, ExchangeState,
    FileDemandRequest, GrantView, ListAuditRequest, ListDemandsRequest, ListGrantsRequest, Query,
    RegisterNodeRequest, SearchDatasetsRequest,
};
use govshare_client::{catalog_file, Client, ClientConfig, ClientError};
use serde_json::Value as Json;

use super::args::{
    AuditCmd, CatalogCmd, Cli, Command, DemandCmd, DlqCmd, ExchangeArgs, ExchangeCmd, GrantCmd,
    NodeCmd, ServeArgs,
};
use super::json;
use super::output::{self as out, note, print, print_ids, print_json, print_table};
use super::parse::timestamp_after;
use super::table::Table;

/// Extra time a `Request` call gets beyond the exchange's deadline, so that the broker can
/// answer `EXPIRED` before the call itself times out.
const REQUEST_MARGIN: Duration = Duration::from_secs(1);

/// Runs `cli` with a client already connected; the exit code is 1 when an exchange ended without rows.
pub(crate) async fn run(cli: Cli, client: Client) -> anyhow::Result<ExitCode> {
    let ctx = Ctx {
        client,
        format: OutputFormat::of(&cli),
        timeout: cli.timeout,
    };
    match cli.command {
        Command::Whoami => ctx.whoami().await?,
        Command::Node(cmd) => ctx.node(cmd).await?,
        Command::Catalog(cmd) => ctx.catalog(cmd).await?,
        Command::Demand(cmd) => ctx.demand(cmd).await?,
        Command::Grant(cmd) => ctx.grant(cmd).await?,
        Command::Audit(cmd) => ctx.audit(cmd).await?,
        Command::Exchange(cmd) => return ctx.exchange(cmd).await,
        Command::Dlq(cmd) => ctx.dlq(cmd).await?,
        Command::Status => ctx.status().await?,
        Command::Serve(a) => return ctx.serve(a).await,
    }
    Ok(ExitCode::SUCCESS)
}

/// The client config the global options describe.
pub(crate) fn client_config(cli: &Cli, identity_dir: std::path::PathBuf) -> ClientConfig {
    ClientConfig {
        broker_url: cli.broker.clone(),
        identity_dir,
        timeout: cli.timeout.unwrap_or(govshare_client::DEFAULT_TIMEOUT),
        tls_server_name: cli.tls_server_name.clone(),
        ..ClientConfig::default()
    }
}

/// How results are printed: tables and blocks, JSON (`--json`), or bare ids (`--quiet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutputFormat {
    Text,
    Json,
    Ids,
}

impl OutputFormat {
    fn of(cli: &Cli) -> Self {
        if cli.quiet {
            OutputFormat::Ids
        } else if cli.json {
            OutputFormat::Json
        } else {
            OutputFormat::Text
        }
    }
}

struct Ctx {
    client: Client,
    format: OutputFormat,
    timeout: Option<Duration>,
}

fn missing(what: &str) -> ClientError {
    ClientError::Protocol {
        reason: format!("the broker's answer has no {what}"),
    }
}

fn non_empty(s: Option<String>) -> String {
    s.unwrap_or_default()
}

impl Ctx {
    /// Prints one object: `json` in JSON mode, its `id` in ids mode, `text` otherwise.
    fn emit(&self, json: Json, text: impl FnOnce() -> String) -> anyhow::Result<()> {
        match self.format {
            OutputFormat::Json => print_json(&json),
            OutputFormat::Ids => print_ids(&json),
            OutputFormat::Text => print(&text()),
        }
    }

    /// Prints a list: a JSON array, one id per line, or a table (a note on stderr when empty).
    fn list(
        &self,
        items: Vec<Json>,
        table: impl FnOnce() -> Table,
        what: &str,
    ) -> anyhow::Result<()> {
        match self.format {
            OutputFormat::Json => print_json(&Json::Array(items)),
            OutputFormat::Ids => print_ids(&Json::Array(items)),
            OutputFormat::Text => print_table(&table(), what),
        }
    }

    async fn whoami(&self) -> anyhow::Result<()> {
        let w = self.client.whoami().await?;
        self.emit(json::whoami(&w), || {
            let mut text = super::table::key_values(&[
                ("node", w.node_id.clone()),
                (
                    "role",
                    short_name::<govshare_client::proto::NodeRole>(w.role),
                ),
                ("broker", w.broker_id.clone()),
            ]);
            match &w.node {
                Some(n) => {
                    text.push('\n');
                    text.push_str(&out::node_block(n));
                }
                None => text.push_str("(not registered on this broker)\n"),
            }
            text
        })
    }

    async fn node(&self, cmd: NodeCmd) -> anyhow::Result<()> {
        match cmd {
            NodeCmd::Register {
                id,
                name,
                role,
                credit_code,
                contact,
            } => {
                let resp = self
                    .client
                    .register_node(RegisterNodeRequest {
                        id,
                        name,
                        role: govshare_client::proto::NodeRole::from(role) as i32,
                        credit_code: non_empty(credit_code),
                        contact: non_empty(contact),
                    })
                    .await?;
                for w in &resp.warnings {
                    note(&format!("warning: {w}"));
                }
                let n = resp.node.ok_or_else(|| missing("node"))?;
                self.emit(json::node(&n), || out::node_block(&n))
            }
            NodeCmd::List { region } => {
                let nodes = self.client.list_all_nodes(non_empty(region)).await?;
                self.list(
                    nodes.iter().map(json::node).collect(),
                    || out::nodes_table(&nodes),
                    "nodes",
                )
            }
            NodeCmd::Show { id } => {
                let n = self.client.get_node(id).await?;
                self.emit(json::node(&n), || out::node_block(&n))
            }
            NodeCmd::Suspend { id, reason } => {
                let n = self.client.suspend_node(id, non_empty(reason)).await?;
                self.emit(json::node(&n), || format!("suspended {}\n", n.id))
            }
            NodeCmd::Resume { id } => {
                let n = self.client.resume_node(id).await?;
                self.emit(json::node(&n), || format!("resumed {}\n", n.id))
            }
            NodeCmd::PinCert { id, cert, reason } => {
                let pem = std::fs::read_to_string(&cert)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", cert.display()))?;
                let n = self
                    .client
                    .pin_certificate(id, pem, non_empty(reason))
                    .await?;
                self.emit(json::node(&n), || {
                    format!(
                        "{}: only the certificate with sha256 {} is accepted now\n",
                        n.id, n.certificate_sha256
                    )
                })
            }
        }
    }

    async fn catalog(&self, cmd: CatalogCmd) -> anyhow::Result<()> {
        match cmd {
            CatalogCmd::Publish { file } => {
                let parsed = catalog_file::load(&file)?;
                for n in &parsed.notes {
                    note(&format!("note: {n}"));
                }
                let resp = self.client.publish_dataset(parsed.dataset).await?;
                let d = resp.dataset.ok_or_else(|| missing("dataset"))?;
                let mut j = json::dataset(&d);
                if let Json::Object(map) = &mut j {
                    map.insert("created".into(), Json::Bool(resp.created));
                }
                self.emit(j, || {
                    format!(
                        "published {} version {} ({})\n",
                        d.id,
                        d.version,
                        if resp.created { "new" } else { "updated" }
                    )
                })
            }
            CatalogCmd::Search {
                text,
                provider,
                region,
                tag,
                share_type,
                limit,
                all,
                include_withdrawn,
            } => {
                let limit = if all { None } else { Some(limit) };
                let page_size = limit.map_or(0, |l| u32::try_from(l.min(500)).unwrap_or(500));
                let mut req = SearchDatasetsRequest {
                    text: non_empty(text),
                    provider: non_empty(provider),
                    region_prefix: non_empty(region),
                    tag: non_empty(tag),
                    share_type: share_type.map_or(0, |s| s as i32),
                    include_withdrawn,
                    page_size,
                    page_token: String::new(),
                };
                let mut found = Vec::new();
                let mut more = false;
                loop {
                    let page = self.client.search_datasets(req.clone()).await?;
                    found.extend(page.datasets);
                    let next = page.next_page_token;
                    if let Some(l) = limit {
                        if found.len() >= l {
                            more = found.len() > l || !next.is_empty();
                            found.truncate(l);
                            break;
                        }
                    }
                    if next.is_empty() || next == req.page_token {
                        break;
                    }
                    req.page_token = next;
                }
                self.list(
                    found.iter().map(json::dataset).collect(),
                    || out::datasets_table(&found),
                    "datasets found",
                )?;
                if more {
                    note("(more datasets match; use --all or a larger --limit)");
                }
                Ok(())
            }
            CatalogCmd::Show { id } => {
                let d = self.client.get_dataset(id).await?;
                self.emit(json::dataset(&d), || out::dataset_block(&d))
            }
            CatalogCmd::Withdraw { id, reason } => {
                let d = self.client.withdraw_dataset(id, non_empty(reason)).await?;
                self.emit(json::dataset(&d), || format!("withdrew {}\n", d.id))
            }
        }
    }

    async fn demand(&self, cmd: DemandCmd) -> anyhow::Result<()> {
        match cmd {
            DemandCmd::File {
                dataset,
                fields,
                purpose,
                legal_basis,
                days,
            } => {
                let resp = self
                    .client
                    .file_demand(FileDemandRequest {
                        dataset_id: dataset,
                        fields: clean_list(fields),
                        purpose,
                        legal_basis: non_empty(legal_basis),
                        period_days: days.unwrap_or(0),
                    })
                    .await?;
                let d = resp.demand.as_ref().ok_or_else(|| missing("demand"))?;
                self.emit(
                    json::demand_with_grant(Some(d), resp.grant.as_ref()),
                    || out::demand_outcome(Some(d), resp.grant.as_ref()),
                )
            }
            DemandCmd::List {
                incoming,
                overdue,
                all,
                state,
            } => {
                let view = if all {
                    DemandView::All
                } else if incoming {
                    DemandView::Incoming
                } else {
                    DemandView::Outgoing
                };
                let demands = self
                    .client
                    .list_all_demands(ListDemandsRequest {
                        view: view as i32,
                        overdue_only: overdue,
                        state: state.map_or(0, |s| s as i32),
                        ..Default::default()
                    })
                    .await?;
                self.list(
                    demands.iter().map(json::demand).collect(),
                    || out::demands_table(&demands),
                    "demands",
                )
            }
            DemandCmd::Show { id } => {
                let d = self.client.get_demand(id).await?;
                self.emit(json::demand(&d), || out::demand_block(&d))
            }
            DemandCmd::Approve {
                id,
                fields,
                days,
                quota,
                note: remark,
            } => {
                let resp = self
                    .client
                    .approve_demand(ApproveDemandRequest {
                        id,
                        fields: clean_list(fields),
                        period_days: days.unwrap_or(0),
                        daily_quota: quota.unwrap_or(0),
                        note: non_empty(remark),
                    })
                    .await?;
                if self.format == OutputFormat::Ids {
                    // What approval creates is the grant: `--quiet` prints its id.
                    let g = resp.grant.as_ref().ok_or_else(|| missing("grant"))?;
                    return print_ids(&json::grant(g));
                }
                self.emit(
                    json::demand_with_grant(resp.demand.as_ref(), resp.grant.as_ref()),
                    || out::demand_outcome(resp.demand.as_ref(), resp.grant.as_ref()),
                )
            }
            DemandCmd::Reject { id, reason } => {
                let d = self.client.reject_demand(id, reason).await?;
                self.emit(json::demand(&d), || out::demand_outcome(Some(&d), None))
            }
            DemandCmd::Withdraw { id } => {
                let d = self.client.withdraw_demand(id).await?;
                self.emit(json::demand(&d), || out::demand_outcome(Some(&d), None))
            }
        }
    }

    async fn grant(&self, cmd: GrantCmd) -> anyhow::Result<()> {
        match cmd {
            GrantCmd::List {
                issued,
                all,
                include_inactive,
                dataset,
            } => {
                let view = if all {
                    GrantView::All
                } else if issued {
                    GrantView::Issued
                } else {
                    GrantView::Held
                };
                let grants = self
                    .client
                    .list_all_grants(ListGrantsRequest {
                        view: view as i32,
                        include_inactive,
                        dataset_id: non_empty(dataset),
                        ..Default::default()
                    })
                    .await?;
                self.list(
                    grants.iter().map(json::grant).collect(),
                    || out::grants_table(&grants),
                    "grants",
                )
            }
            GrantCmd::Show { id } => {
                let g = self.client.get_grant(id).await?;
                self.emit(json::grant(&g), || out::grant_block(&g))
            }
            GrantCmd::Revoke { id, reason } => {
                let g = self.client.revoke_grant(id, non_empty(reason)).await?;
                self.emit(json::grant(&g), || format!("revoked {}\n", g.id))
            }
        }
    }

    async fn audit(&self, cmd: AuditCmd) -> anyhow::Result<()> {
        let AuditCmd::List {
            dataset,
            grant,
            exchange,
            since,
        } = cmd;
        let entries = self
            .client
            .list_all_audit(ListAuditRequest {
                dataset_id: non_empty(dataset),
                grant_id: non_empty(grant),
                exchange_id: non_empty(exchange),
                since,
                ..Default::default()
            })
            .await?;
        self.list(
            entries.iter().map(json::audit).collect(),
            || out::audit_table(&entries),
            "audit entries",
        )
    }

    fn exchange_request(&self, a: ExchangeArgs, deadline: Option<Duration>) -> ExchangeRequest {
        ExchangeRequest {
            dataset_id: a.dataset,
            grant_id: non_empty(a.grant),
            query: Some(Query {
                filters: a.filters,
                fields: clean_list(a.fields),
                limit: a.limit.unwrap_or(0),
            }),
            idempotency_key: non_empty(a.idempotency_key),
            deadline: deadline.map(timestamp_after),
            trace_id: non_empty(a.trace_id),
        }
    }

    /// Prints an exchange's state or result; exit status 1 when it ended without rows.
    fn show_exchange(
        &self,
        r: &ExchangeResult,
        order: &[String],
        trail: bool,
    ) -> anyhow::Result<ExitCode> {
        self.emit(json::exchange(r), || out::exchange_block(r, order, trail))?;
        if json::is_failure(r.state) {
            let why = r
                .error
                .as_ref()
                .map(|e| {
                    format!(
                        ": {}: {}",
                        govshare_client::code_name_i32(e.code),
                        e.message
                    )
                })
                .unwrap_or_default();
            note(&format!(
                "error: exchange {} ended {}{why}",
                r.exchange_id,
                short_name::<ExchangeState>(r.state)
            ));
            return Ok(ExitCode::FAILURE);
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn exchange(&self, cmd: ExchangeCmd) -> anyhow::Result<ExitCode> {
        match cmd {
            ExchangeCmd::Request(a) => {
                let wait = self.timeout.unwrap_or(govshare_client::DEFAULT_TIMEOUT);
                let order = clean_list(a.fields.clone());
                let req = self.exchange_request(a, Some(wait));
                let r = self
                    .client
                    .with_timeout(wait + REQUEST_MARGIN)
                    .request(req)
                    .await?;
                self.show_exchange(&r, &order, false)
            }
            ExchangeCmd::Submit(a) => {
                let req = self.exchange_request(a, self.timeout);
                let s = self.client.submit(req).await?;
                if s.duplicate {
                    note("note: the idempotency key matched an earlier exchange; this is its id");
                }
                self.emit(json::submitted(&s), || format!("{}\n", s.exchange_id))?;
                Ok(ExitCode::SUCCESS)
            }
            ExchangeCmd::Get { id, wait, trail } => {
                let r = self.client.get_exchange(id, wait).await?;
                if trail && !r.trail.is_empty() {
                    // Verified before it is shown: a trail that does not verify is an error.
                    let n = self.client.verify_trail(&r).await?;
                    note(&format!(
                        "hop trail: {n} receipts, every signature verified"
                    ));
                }
                self.show_exchange(&r, &[], trail)
            }
            ExchangeCmd::Ack { ids } => {
                let asked = ids.len();
                let resp = self.client.ack(ids).await?;
                self.emit(serde_json::json!({ "acked": resp.acked }), || {
                    format!("acknowledged {} of {asked}\n", resp.acked)
                })?;
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    async fn dlq(&self, cmd: DlqCmd) -> anyhow::Result<()> {
        match cmd {
            DlqCmd::List { dataset } => {
                let letters = self
                    .client
                    .list_all_dead_letters(non_empty(dataset))
                    .await?;
                self.list(
                    letters.iter().map(json::dead_letter).collect(),
                    || out::dead_letters_table(&letters),
                    "dead letters",
                )
            }
            DlqCmd::Replay { id } => {
                let resp = self.client.replay_dead_letter(id).await?;
                self.emit(
                    serde_json::json!({ "id": resp.exchange_id, "exchange_id": resp.exchange_id }),
                    || format!("replayed {}\n", resp.exchange_id),
                )
            }
            DlqCmd::Purge { dataset } => {
                let resp = self.client.purge_dead_letters(non_empty(dataset)).await?;
                self.emit(serde_json::json!({ "purged": resp.purged }), || {
                    format!("purged {} dead letters\n", resp.purged)
                })
            }
        }
    }

    async fn status(&self) -> anyhow::Result<()> {
        let s = self.client.broker_status().await?;
        let queues = self.client.list_queues().await?.queues;
        self.emit(json::broker_status(&s, &queues), || {
            out::status_block(&s, &queues)
        })
    }
}

/// Trims items of a comma-separated list and drops empty ones (`a, b,` is `a`, `b`).
fn clean_list(items: Vec<String>) -> Vec<String> {
    items
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Ctx {
    /// `serve`: answers pushed requests until Ctrl-C (or the stream ends, with --once).
    async fn serve(&self, a: ServeArgs) -> anyhow::Result<ExitCode> {
        use govshare_client::provider::{self, Source};
        let (source, what) = match (&a.from_file, &a.exec) {
            (Some(path), _) => {
                let rows = provider::load_rows(path)?;
                let what = format!("{} rows from {}", rows.len(), path.display());
                (Source::Rows(std::sync::Arc::new(rows)), what)
            }
            (None, Some(cmd)) => (Source::Exec(cmd.clone()), format!("command `{cmd}`")),
            (None, None) => anyhow::bail!("give --from-file FILE or --exec CMD"),
        };
        let label = a
            .instance
            .clone()
            .unwrap_or_else(|| format!("govshare-serve-{}", std::process::id()));
        let datasets = if a.datasets.is_empty() {
            "all your datasets".to_string()
        } else {
            a.datasets.join(", ")
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            note(&format!(
                "serving {datasets} with {what} via {} (Ctrl-C to stop)",
                self.client.broker_url()
            ));
            let served = tokio::select! {
                r = provider::serve(&self.client, a.datasets.clone(), a.max_in_flight, label.clone(), source.clone()) => r,
                _ = tokio::signal::ctrl_c() => {
                    note("stopped");
                    return Ok(ExitCode::SUCCESS);
                }
            };
            let why = match served {
                Ok(n) => {
                    backoff = Duration::from_millis(200);
                    format!("the broker ended the stream after {n} requests")
                }
                Err(e) => {
                    if a.once {
                        return Err(e.into());
                    }
                    e.to_string()
                }
            };
            if a.once {
                note(&why);
                return Ok(ExitCode::SUCCESS);
            }
            note(&format!(
                "{why}; reconnecting in {} ms",
                backoff.as_millis()
            ));
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;
    use govshare_client::enums::ProtoEnum;

    #[test]
    fn lists_are_trimmed() {
        assert_eq!(
            clean_list(vec![" a".into(), "b ".into(), "".into()]),
            ["a", "b"]
        );
    }

    #[test]
    fn parse_module_is_reachable() {
        assert!(parse::parse_duration("1s").is_ok());
        assert!(ExchangeState::parse_name("answered").is_ok());
    }
}
