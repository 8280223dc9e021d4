//! Exchanges through the real `govshare` binary: a provider runs `govshare serve` over the
//! example JSON-lines file (or a command), a consumer requests and submits, sees masked items,
//! and an admin works the dead-letter queue.

use anyhow::{ensure, Context, Result};
use govshare_client::proto::NodeRole;
use govshare_tests::{bin_path, example, govshare_cli, CliOutput, TestBroker};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::process::Stdio;

const PENSION: &str = "330000/hrss/pension-status";

async fn ok(broker: &TestBroker, identity: &Path, args: &[&str]) -> Result<CliOutput> {
    govshare_cli(broker, identity, args)
        .await?
        .ok()
        .with_context(|| format!("govshare {}", args.join(" ")))
}

async fn json(broker: &TestBroker, identity: &Path, args: &[&str]) -> Result<Json> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    ok(broker, identity, &all).await?.json()
}

/// Two departments, the pension example published, and a grant on four items.
async fn granted(broker: &TestBroker) -> Result<(PathBuf, PathBuf)> {
    let admin = broker.admin_dir();
    let hrss = broker.issue("330000/hrss", NodeRole::Department)?;
    let civil = broker.issue("330100/civil", NodeRole::Department)?;
    for (id, name) in [
        ("330000/hrss", "浙江省人力资源和社会保障厅"),
        ("330100/civil", "杭州市民政局"),
    ] {
        ok(
            broker,
            &admin,
            &["node", "register", "--id", id, "--name", name],
        )
        .await?;
    }
    let file = example("pension-status.json");
    ok(
        broker,
        &hrss,
        &["catalog", "publish", file.to_str().context("path")?],
    )
    .await?;
    let d = ok(
        broker,
        &civil,
        &[
            "-q",
            "demand",
            "file",
            "--dataset",
            PENSION,
            "--fields",
            "id_number,name,status",
            "--purpose",
            "assistance eligibility",
        ],
    )
    .await?;
    ok(broker, &hrss, &["demand", "approve", d.stdout.trim()]).await?;
    Ok((hrss, civil))
}

/// `govshare serve` as a child process, killed when dropped.
fn serve(broker: &TestBroker, identity: &Path, how: &[&str]) -> Result<tokio::process::Child> {
    Ok(tokio::process::Command::new(bin_path("govshare")?)
        .arg("--broker")
        .arg(broker.url())
        .arg("--identity")
        .arg(identity)
        .args(["serve", "--dataset", PENSION])
        .args(how)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?)
}

#[tokio::test]
async fn serve_from_file_request_submit_get_with_masking() -> Result<()> {
    let broker = TestBroker::start().await?;
    let (hrss, civil) = granted(&broker).await?;
    let rows = example("pension-rows.jsonl");
    let _provider = serve(
        &broker,
        &hrss,
        &["--from-file", rows.to_str().context("path")?],
    )?;

    // Sync: waits in the queue until the provider is connected, then answers.
    let r = json(
        &broker,
        &civil,
        &[
            "--timeout",
            "20s",
            "exchange",
            "request",
            "--dataset",
            PENSION,
            "--where",
            "id_number=330102199001011234",
        ],
    )
    .await?;
    ensure!(r["state"] == "ANSWERED", "{r}");
    let rows_out = r["rows"].as_array().context("rows")?;
    ensure!(!rows_out.is_empty());
    for row in rows_out {
        ensure!(
            row["id_number"] == "330102********1234",
            "keep:6,4 masking: {row}"
        );
        ensure!(row["name"] == "张*", "name masking: {row}");
        ensure!(
            row.get("month").is_none(),
            "month is outside the grant: {row}"
        );
    }
    let masked: Vec<&str> = r["masked_fields"]
        .as_array()
        .context("masked")?
        .iter()
        .filter_map(Json::as_str)
        .collect();
    ensure!(masked == ["id_number", "name"], "{masked:?}");

    // The table form shows the same masked values.
    let table = ok(
        &broker,
        &civil,
        &[
            "exchange",
            "request",
            "--dataset",
            PENSION,
            "--where",
            "id_number=330102199001011234",
        ],
    )
    .await?;
    ensure!(
        table.stdout.contains("330102********1234") && table.stdout.contains("张*"),
        "{}",
        table.stdout
    );

    // Async: submit prints the id; get --wait shows the result.
    let x = ok(
        &broker,
        &civil,
        &[
            "-q",
            "exchange",
            "submit",
            "--dataset",
            PENSION,
            "--where",
            "id_number=330106195807153321",
            "--fields",
            "status",
        ],
    )
    .await?;
    let id = x.stdout.trim().to_string();
    ensure!(
        id.len() == 36,
        "submit -q prints the exchange id: {:?}",
        x.stdout
    );
    let got = json(&broker, &civil, &["exchange", "get", &id, "--wait"]).await?;
    ensure!(
        got["state"] == "ANSWERED" && got["id"] == id.as_str(),
        "{got}"
    );
    ensure!(
        got["rows"][0]
            .as_object()
            .is_some_and(|o| o.len() == 1 && o.contains_key("status")),
        "{got}"
    );
    let with_trail = ok(&broker, &civil, &["exchange", "get", &id, "--trail"]).await?;
    ensure!(
        with_trail
            .stderr
            .contains("2 receipts, every signature verified"),
        "{}",
        with_trail.stderr
    );
    ensure!(
        with_trail.stdout.contains("accepted") && with_trail.stdout.contains("answered"),
        "{}",
        with_trail.stdout
    );
    ok(&broker, &civil, &["exchange", "ack", &id]).await?;

    // Outside the grant: refused, naming the rule.
    let out = govshare_cli(
        &broker,
        &civil,
        &[
            "exchange",
            "request",
            "--dataset",
            PENSION,
            "--where",
            "id_number=1",
            "--fields",
            "month",
        ],
    )
    .await?;
    ensure!(
        out.code == 1
            && out.stderr.contains("PERMISSION_DENIED")
            && out.stderr.contains("field_outside_grant"),
        "{}",
        out.stderr
    );

    // The audit log shows the exchange's decisions, to the consumer too.
    let audit = json(&broker, &civil, &["audit", "list", "--dataset", PENSION]).await?;
    let decisions: Vec<&str> = audit
        .as_array()
        .context("audit")?
        .iter()
        .filter_map(|e| e["decision"].as_str())
        .collect();
    for d in [
        "exchange_accepted",
        "exchange_delivered",
        "exchange_answered",
        "exchange_denied",
    ] {
        ensure!(decisions.contains(&d), "{d} missing from {decisions:?}");
    }
    broker.shutdown().await
}

#[tokio::test]
async fn serve_exec_runs_a_command_per_request() -> Result<()> {
    let broker = TestBroker::start().await?;
    let (hrss, civil) = granted(&broker).await?;
    // The command echoes the filter back as a row and adds an item outside the grant.
    let script = broker.scratch("lookup.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nq=$(cat)\nid=$(printf '%s' \"$q\" | sed 's/.*\"id_number\":\"\\([^\"]*\\)\".*/\\1/')\n\
         printf '{\"id_number\":\"%s\",\"status\":\"ALIVE\",\"bank_account\":\"6222\"}\\n' \"$id\"\n",
    )?;
    let cmd = format!("sh {}", script.display());
    let _provider = serve(&broker, &hrss, &["--exec", &cmd])?;
    let r = json(
        &broker,
        &civil,
        &[
            "--timeout",
            "20s",
            "exchange",
            "request",
            "--dataset",
            PENSION,
            "--where",
            "id_number=110101200001011234",
        ],
    )
    .await?;
    ensure!(r["state"] == "ANSWERED", "{r}");
    ensure!(
        r["rows"][0]["status"] == "ALIVE" && r["rows"][0]["id_number"] == "110101********1234",
        "{r}"
    );
    ensure!(
        r["rows"][0].get("bank_account").is_none(),
        "an item outside the grant reached the consumer: {r}"
    );
    let dropped: Vec<&str> = r["dropped_fields"]
        .as_array()
        .context("dropped")?
        .iter()
        .filter_map(Json::as_str)
        .collect();
    ensure!(dropped == ["bank_account"], "{dropped:?}");
    broker.shutdown().await
}

#[tokio::test]
async fn dlq_list_replay_purge_through_the_cli() -> Result<()> {
    let broker = TestBroker::start_with("330000/hub", |c| {
        c.exchange.ack_wait_secs = 1;
        c.exchange.max_deliveries = 1;
    })
    .await?;
    let (hrss, civil) = granted(&broker).await?;
    let admin = broker.admin_dir();
    // A provider command that hangs: one delivery, no answer, then dead-lettered.
    let hung = serve(&broker, &hrss, &["--exec", "sleep 30"])?;
    let x = ok(
        &broker,
        &civil,
        &[
            "-q",
            "exchange",
            "submit",
            "--dataset",
            PENSION,
            "--where",
            "id_number=1",
        ],
    )
    .await?;
    let id = x.stdout.trim().to_string();
    // An exchange that ended without rows exits 1, still printing its state.
    let out = govshare_cli(
        &broker,
        &civil,
        &[
            "--json",
            "--timeout",
            "20s",
            "exchange",
            "get",
            &id,
            "--wait",
        ],
    )
    .await?;
    ensure!(out.code == 1, "exit {}: {}", out.code, out.stderr);
    let got = out.json()?;
    ensure!(got["state"] == "DEAD_LETTERED", "{got}");
    drop(hung);
    let list = json(&broker, &admin, &["dlq", "list"]).await?;
    let entries = list.as_array().context("dlq list is an array")?;
    ensure!(
        entries.len() == 1 && entries[0]["id"] == id.as_str(),
        "{list}"
    );
    // Department identities cannot touch it.
    let out = govshare_cli(&broker, &civil, &["dlq", "list"]).await?;
    ensure!(
        out.code == 1 && out.stderr.contains("PERMISSION_DENIED"),
        "{}",
        out.stderr
    );
    // Replay with a working provider.
    let rows = example("pension-rows.jsonl");
    let _good = serve(
        &broker,
        &hrss,
        &["--from-file", rows.to_str().context("path")?],
    )?;
    ok(&broker, &admin, &["dlq", "replay", &id]).await?;
    let again = json(
        &broker,
        &civil,
        &["--timeout", "20s", "exchange", "get", &id, "--wait"],
    )
    .await?;
    ensure!(again["state"] == "ANSWERED", "{again}");
    ensure!(json(&broker, &admin, &["dlq", "list"])
        .await?
        .as_array()
        .is_some_and(Vec::is_empty));
    ok(&broker, &admin, &["dlq", "purge"]).await?;
    broker.shutdown().await
}
