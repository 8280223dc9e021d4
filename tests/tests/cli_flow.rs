//! The control-plane flow through the real `govshare` binary: an admin registers two
//! departments, they publish, search, file and decide demands, and the grants that result are
//! listed and revoked; plus the CLI's error contract (`error: CODE: message` on stderr, non-zero
//! exit; usage errors exit 2) and `--quiet` for capturing ids in shell scripts.

use anyhow::{ensure, Context, Result};
use govshare_client::proto::NodeRole;
use govshare_tests::{example, govshare_cli, CliOutput, TestBroker};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

const HRSS: &str = "330000/hrss";
const CIVIL: &str = "330100/civil";
const PENSION: &str = "330000/hrss/pension-status";
const DEATHS: &str = "330100/civil/death-registration";
/// A unified social credit code whose GB 32100 check digit verifies, and one whose does not.
const GOOD_CREDIT_CODE: &str = "91350100M000100Y43";
const BAD_CREDIT_CODE: &str = "91350100M000100Y44";

/// Runs the CLI and insists that it succeeds.
async fn ok(broker: &TestBroker, identity: &Path, args: &[&str]) -> Result<CliOutput> {
    govshare_cli(broker, identity, args)
        .await?
        .ok()
        .with_context(|| format!("govshare {}", args.join(" ")))
}

/// Runs the CLI with `--json` and parses what it prints.
async fn json(broker: &TestBroker, identity: &Path, args: &[&str]) -> Result<Json> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    ok(broker, identity, &all).await?.json()
}

/// Runs the CLI expecting the one-line gRPC error `error: CODE: message` and exit status 1;
/// returns the message.
async fn fails_with(
    broker: &TestBroker,
    identity: &Path,
    args: &[&str],
    code: &str,
) -> Result<String> {
    let out = govshare_cli(broker, identity, args).await?;
    ensure!(
        out.code == 1,
        "govshare {} exited {} (want 1)\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.code,
        out.stdout,
        out.stderr
    );
    let prefix = format!("error: {code}: ");
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .with_context(|| format!("no error line on stderr:\n{}", out.stderr))?;
    ensure!(
        line.starts_with(&prefix),
        "govshare {}: want `{prefix}...`, got `{line}`",
        args.join(" ")
    );
    ensure!(
        out.stdout.is_empty(),
        "a failed command printed on stdout:\n{}",
        out.stdout
    );
    Ok(line[prefix.len()..].to_string())
}

fn s(v: &Json) -> &str {
    v.as_str().unwrap_or_default()
}

fn ids(list: &Json) -> Vec<&str> {
    list.as_array()
        .map(|a| a.iter().map(|o| s(&o["id"])).collect())
        .unwrap_or_default()
}

fn strings(v: &Json) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default()
}

/// Issues identities for both departments and registers them through the CLI.
async fn two_departments(broker: &TestBroker) -> Result<(PathBuf, PathBuf)> {
    let admin = broker.admin_dir();
    let hrss = broker.issue(HRSS, NodeRole::Department)?;
    let civil = broker.issue(CIVIL, NodeRole::Department)?;
    ok(
        broker,
        &admin,
        &[
            "node",
            "register",
            "--id",
            HRSS,
            "--name",
            "浙江省人力资源和社会保障厅",
        ],
    )
    .await?;
    ok(
        broker,
        &admin,
        &["node", "register", "--id", CIVIL, "--name", "杭州市民政局"],
    )
    .await?;
    Ok((hrss, civil))
}

#[tokio::test]
async fn control_plane_flow_through_the_cli() -> Result<()> {
    let broker = TestBroker::start().await?;
    let admin = broker.admin_dir();
    let hrss = broker.issue(HRSS, NodeRole::Department)?;
    let civil = broker.issue(CIVIL, NodeRole::Department)?;

    // Registration: a verifying credit code is quiet; a failing check digit warns on stderr
    // but the node is registered all the same.
    let out = ok(
        &broker,
        &admin,
        &[
            "--json",
            "node",
            "register",
            "--id",
            HRSS,
            "--name",
            "浙江省人力资源和社会保障厅",
            "--credit-code",
            GOOD_CREDIT_CODE,
            "--contact",
            "数据资源处 0571-00000000",
        ],
    )
    .await?;
    ensure!(!out.stderr.contains("warning"), "{}", out.stderr);
    let n = out.json()?;
    ensure!(s(&n["id"]) == HRSS && s(&n["state"]) == "ACTIVE", "{n}");
    ensure!(n["credit_code_valid"] == true, "{n}");

    let out = ok(
        &broker,
        &admin,
        &[
            "--json",
            "node",
            "register",
            "--id",
            CIVIL,
            "--name",
            "杭州市民政局",
            "--credit-code",
            BAD_CREDIT_CODE,
        ],
    )
    .await?;
    let warning = out
        .stderr
        .lines()
        .find(|l| l.starts_with("warning: "))
        .with_context(|| format!("no warning on stderr:\n{}", out.stderr))?;
    ensure!(
        warning.contains(BAD_CREDIT_CODE) && warning.contains("check digit"),
        "{warning}"
    );
    let n = out.json()?;
    ensure!(s(&n["id"]) == CIVIL && s(&n["state"]) == "ACTIVE", "{n}");
    ensure!(n["credit_code"] == BAD_CREDIT_CODE && n["credit_code_valid"] == false);

    // Publishing: JSON for hrss, TOML for civil; the provider is the caller.
    let pension_file = example("pension-status.json");
    let deaths_file = example("death-registration.toml");
    let d = json(
        &broker,
        &hrss,
        &["catalog", "publish", &pension_file.to_string_lossy()],
    )
    .await?;
    ensure!(s(&d["id"]) == PENSION && s(&d["provider"]) == HRSS, "{d}");
    ensure!(d["version"] == 1 && d["created"] == true, "{d}");
    let d = json(
        &broker,
        &civil,
        &["catalog", "publish", &deaths_file.to_string_lossy()],
    )
    .await?;
    ensure!(s(&d["id"]) == DEATHS && s(&d["share_type"]) == "UNCONDITIONAL");
    let out = ok(
        &broker,
        &hrss,
        &["catalog", "publish", &pension_file.to_string_lossy()],
    )
    .await?;
    ensure!(
        out.stdout.contains(PENSION) && out.stdout.contains("version 2"),
        "{}",
        out.stdout
    );

    // Search by a run of Chinese characters, as a table and as JSON.
    let out = ok(&broker, &civil, &["catalog", "search", "养老"]).await?;
    let header = out.stdout.lines().next().unwrap_or_default();
    ensure!(
        header.split_whitespace().next() == Some("ID"),
        "{}",
        out.stdout
    );
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with(PENSION))
        .with_context(|| format!("no pension row:\n{}", out.stdout))?;
    ensure!(row.contains("城乡居民养老保险待遇发放") && row.contains("CONDITIONAL"));
    let found = json(&broker, &civil, &["catalog", "search", "养老"]).await?;
    ensure!(ids(&found) == [PENSION], "{found}");
    ensure!(s(&found[0]["name"]) == "城乡居民养老保险待遇发放");
    // Filters: text and region, tag and region.
    let found = json(
        &broker,
        &civil,
        &["catalog", "search", "养老", "--region", "3301"],
    )
    .await?;
    ensure!(ids(&found).is_empty(), "{found}");
    let found = json(
        &broker,
        &civil,
        &[
            "catalog",
            "search",
            "--tag",
            "civil-affairs",
            "--region",
            "3301",
        ],
    )
    .await?;
    ensure!(ids(&found) == [DEATHS], "{found}");

    // Show: every item with its masking rule.
    let d = json(&broker, &civil, &["catalog", "show", PENSION]).await?;
    ensure!(s(&d["id"]) == PENSION && d["version"] == 2, "{d}");
    let items: Vec<(&str, &str)> = d["items"]
        .as_array()
        .context("items")?
        .iter()
        .map(|i| (s(&i["name"]), s(&i["mask"])))
        .collect();
    ensure!(
        items
            == [
                ("id_number", "keep:6,4"),
                ("name", "name"),
                ("status", ""),
                ("month", "")
            ],
        "{items:?}"
    );

    // A CONDITIONAL dataset: the demand waits for the provider.
    let first = json(
        &broker,
        &civil,
        &[
            "demand",
            "file",
            "--dataset",
            PENSION,
            "--fields",
            "id_number,name,status",
            "--purpose",
            "最低生活保障资格核验",
            "--legal-basis",
            "社会救助暂行办法 第十一条",
            "--days",
            "365",
        ],
    )
    .await?;
    ensure!(
        first.is_object() && s(&first["state"]) == "PENDING",
        "{first}"
    );
    let first_id = s(&first["id"]).to_string();
    ensure!(!first_id.is_empty() && first["grant"].is_null(), "{first}");
    let second = json(
        &broker,
        &civil,
        &[
            "demand",
            "file",
            "--dataset",
            PENSION,
            "--fields",
            "status",
            "--purpose",
            "统计分析",
        ],
    )
    .await?;
    ensure!(s(&second["state"]) == "PENDING", "{second}");
    let second_id = s(&second["id"]).to_string();

    // The provider sees both; the consumer sees them as its own.
    let incoming = json(&broker, &hrss, &["demand", "list", "--incoming"]).await?;
    let mut got = ids(&incoming);
    got.sort_unstable();
    let mut want = vec![first_id.as_str(), second_id.as_str()];
    want.sort_unstable();
    ensure!(got == want, "{incoming}");
    ensure!(incoming.as_array().is_some_and(|a| a
        .iter()
        .all(|d| d["consumer"] == CIVIL && d["state"] == "PENDING")));
    let mine = json(&broker, &civil, &["demand", "list"]).await?;
    ensure!(ids(&mine).len() == 2, "{mine}");
    let theirs = json(&broker, &civil, &["demand", "list", "--incoming"]).await?;
    ensure!(ids(&theirs).is_empty(), "{theirs}");

    // Approve the first, narrowed to two items and 30 days: a grant is issued.
    let approved = json(
        &broker,
        &hrss,
        &[
            "demand",
            "approve",
            &first_id,
            "--fields",
            "id_number,status",
            "--days",
            "30",
        ],
    )
    .await?;
    ensure!(
        s(&approved["id"]) == first_id && s(&approved["state"]) == "APPROVED",
        "{approved}"
    );
    let grant = &approved["grant"];
    let grant_id = s(&grant["id"]).to_string();
    ensure!(!grant_id.is_empty() && s(&approved["grant_id"]) == grant_id);
    ensure!(
        strings(&grant["fields"]) == ["id_number", "status"],
        "{grant}"
    );
    ensure!(s(&grant["consumer"]) == CIVIL && s(&grant["dataset_id"]) == PENSION);
    ensure!(s(&grant["state"]) == "ACTIVE", "{grant}");

    // Reject the second, with a reason the consumer sees.
    let rejected = json(
        &broker,
        &hrss,
        &[
            "demand",
            "reject",
            &second_id,
            "--reason",
            "统计分析请使用汇总数据",
        ],
    )
    .await?;
    ensure!(s(&rejected["id"]) == second_id && s(&rejected["state"]) == "REJECTED");
    let shown = json(&broker, &civil, &["demand", "show", &second_id]).await?;
    ensure!(s(&shown["state"]) == "REJECTED" && s(&shown["reason"]) == "统计分析请使用汇总数据");
    let pending = json(
        &broker,
        &hrss,
        &["demand", "list", "--incoming", "--state", "pending"],
    )
    .await?;
    ensure!(ids(&pending).is_empty(), "{pending}");

    // Grants: held by the consumer, issued by the provider.
    let held = json(&broker, &civil, &["grant", "list"]).await?;
    ensure!(ids(&held) == [grant_id.as_str()], "{held}");
    ensure!(
        s(&held[0]["valid_until"]) > s(&held[0]["valid_from"]),
        "{held}"
    );
    let out = ok(&broker, &hrss, &["grant", "list", "--issued"]).await?;
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with(&grant_id))
        .with_context(|| format!("no grant row:\n{}", out.stdout))?;
    ensure!(
        row.contains(PENSION) && row.contains(CIVIL) && row.contains("ACTIVE"),
        "{row}"
    );
    let issued = json(&broker, &hrss, &["grant", "list", "--issued"]).await?;
    ensure!(ids(&issued) == [grant_id.as_str()], "{issued}");
    let none = json(&broker, &hrss, &["grant", "list"]).await?;
    ensure!(ids(&none).is_empty(), "hrss holds no grants: {none}");

    // Revoke: gone from the active list, still there with --include-inactive.
    let revoked = json(
        &broker,
        &hrss,
        &["grant", "revoke", &grant_id, "--reason", "核验已完成"],
    )
    .await?;
    ensure!(
        s(&revoked["id"]) == grant_id && s(&revoked["state"]) == "REVOKED",
        "{revoked}"
    );
    ensure!(s(&revoked["revoked_by"]) == HRSS && s(&revoked["revoke_reason"]) == "核验已完成");
    let held = json(&broker, &civil, &["grant", "list"]).await?;
    ensure!(ids(&held).is_empty(), "{held}");
    let all = json(&broker, &civil, &["grant", "list", "--include-inactive"]).await?;
    ensure!(ids(&all) == [grant_id.as_str()] && all[0]["state"] == "REVOKED");

    // The audit log holds every decision, with who made it.
    let audit = json(&broker, &admin, &["audit", "list"]).await?;
    let entries = audit.as_array().context("audit is an array")?;
    let has = |decision: &str, actor: &str, about: &dyn Fn(&Json) -> bool| {
        entries
            .iter()
            .any(|e| e["decision"] == decision && e["actor"] == actor && about(e))
    };
    ensure!(
        has("node_registered", "330000/admin", &|e| e["subject"]
            == CIVIL),
        "{audit}"
    );
    ensure!(has("dataset_published", HRSS, &|e| e["dataset_id"] == PENSION));
    ensure!(has("demand_filed", CIVIL, &|e| e["demand_id"]
        == first_id.as_str()));
    ensure!(has("demand_approved", HRSS, &|e| e["demand_id"]
        == first_id.as_str()));
    ensure!(has("grant_issued", HRSS, &|e| e["grant_id"]
        == grant_id.as_str()));
    ensure!(has("demand_rejected", HRSS, &|e| e["demand_id"]
        == second_id.as_str()
        && e["reason"] == "统计分析请使用汇总数据"));
    ensure!(has("grant_revoked", HRSS, &|e| e["grant_id"]
        == grant_id.as_str()));
    let seqs: Vec<u64> = entries.iter().filter_map(|e| e["seq"].as_u64()).collect();
    ensure!(
        seqs.len() == entries.len() && seqs.windows(2).all(|w| w[0] < w[1]),
        "{seqs:?}"
    );
    let for_grant = json(&broker, &admin, &["audit", "list", "--grant", &grant_id]).await?;
    ensure!(for_grant
        .as_array()
        .is_some_and(|a| !a.is_empty() && a.iter().all(|e| e["grant_id"] == grant_id.as_str())));

    // Nodes: the admin lists them (table and JSON), suspends one, and resumes it.
    let out = ok(&broker, &admin, &["node", "list"]).await?;
    ensure!(
        out.stdout
            .lines()
            .any(|l| l.starts_with(HRSS) && l.contains("ACTIVE")),
        "{}",
        out.stdout
    );
    let nodes = json(&broker, &admin, &["node", "list"]).await?;
    for id in ["330000/admin", HRSS, CIVIL] {
        ensure!(ids(&nodes).contains(&id), "{id} missing: {nodes}");
    }
    let n = json(
        &broker,
        &admin,
        &["node", "suspend", CIVIL, "--reason", "证书轮换"],
    )
    .await?;
    ensure!(s(&n["id"]) == CIVIL && s(&n["state"]) == "SUSPENDED", "{n}");
    let why = fails_with(
        &broker,
        &civil,
        &["catalog", "search", "养老"],
        "PERMISSION_DENIED",
    )
    .await?;
    ensure!(why.contains(CIVIL) && why.contains("suspended"), "{why}");
    fails_with(&broker, &civil, &["grant", "list"], "PERMISSION_DENIED").await?;
    // Others are unaffected.
    ok(&broker, &hrss, &["catalog", "search", "养老"]).await?;
    let n = json(&broker, &admin, &["node", "resume", CIVIL]).await?;
    ensure!(s(&n["state"]) == "ACTIVE", "{n}");
    let found = json(&broker, &civil, &["catalog", "search", "养老"]).await?;
    ensure!(ids(&found) == [PENSION], "{found}");

    broker.shutdown().await
}

/// An UNCONDITIONAL dataset is granted at once, and the grant comes back with the demand.
#[tokio::test]
async fn unconditional_demand_is_granted_at_once() -> Result<()> {
    let broker = TestBroker::start().await?;
    let (hrss, civil) = two_departments(&broker).await?;
    let file = example("death-registration.toml");
    ok(
        &broker,
        &civil,
        &["catalog", "publish", &file.to_string_lossy()],
    )
    .await?;
    let d = json(
        &broker,
        &hrss,
        &[
            "demand",
            "file",
            "--dataset",
            DEATHS,
            "--fields",
            "id_number,death_date",
            "--purpose",
            "停发已故人员养老金",
        ],
    )
    .await?;
    ensure!(s(&d["state"]) == "APPROVED", "{d}");
    ensure!(
        !s(&d["grant"]["id"]).is_empty() && d["grant"]["id"] == d["grant_id"],
        "{d}"
    );
    let held = json(&broker, &hrss, &["grant", "list"]).await?;
    ensure!(ids(&held) == [s(&d["grant_id"])], "{held}");
    broker.shutdown().await
}

/// `--quiet` prints only ids, so that a shell can carry them between commands without jq,
/// exactly as the README's walk-through does.
#[tokio::test]
async fn quiet_prints_only_ids_for_shell_capture() -> Result<()> {
    let broker = TestBroker::start().await?;
    let (hrss, civil) = two_departments(&broker).await?;
    let file = example("pension-status.json");
    let out = ok(
        &broker,
        &hrss,
        &["-q", "catalog", "publish", &file.to_string_lossy()],
    )
    .await?;
    ensure!(out.stdout == format!("{PENSION}\n"), "{:?}", out.stdout);
    let out = ok(&broker, &civil, &["-q", "catalog", "search", "养老"]).await?;
    ensure!(out.stdout == format!("{PENSION}\n"), "{:?}", out.stdout);

    let out = ok(
        &broker,
        &civil,
        &[
            "demand",
            "file",
            "--dataset",
            PENSION,
            "--fields",
            "id_number,status",
            "--purpose",
            "最低生活保障资格核验",
            "--quiet",
        ],
    )
    .await?;
    let demand = out.stdout.trim_end_matches('\n');
    ensure!(
        !demand.is_empty() && !demand.contains(char::is_whitespace),
        "{:?}",
        out.stdout
    );
    let shown = json(&broker, &civil, &["demand", "show", demand]).await?;
    ensure!(s(&shown["state"]) == "PENDING", "{shown}");

    let out = ok(&broker, &hrss, &["-q", "demand", "list", "--incoming"]).await?;
    ensure!(out.stdout == format!("{demand}\n"), "{:?}", out.stdout);

    // Approval creates a grant: -q prints the grant's id.
    let out = ok(
        &broker,
        &hrss,
        &["-q", "demand", "approve", demand, "--days", "30"],
    )
    .await?;
    let grant = out.stdout.trim_end_matches('\n').to_string();
    let g = json(&broker, &civil, &["grant", "show", &grant]).await?;
    ensure!(
        s(&g["demand_id"]) == demand && s(&g["state"]) == "ACTIVE",
        "{g}"
    );
    let out = ok(&broker, &civil, &["-q", "grant", "list"]).await?;
    ensure!(out.stdout == format!("{grant}\n"), "{:?}", out.stdout);

    let out = ok(&broker, &hrss, &["-q", "grant", "revoke", &grant]).await?;
    ensure!(out.stdout == format!("{grant}\n"), "{:?}", out.stdout);
    // An empty list prints nothing at all.
    let out = ok(&broker, &civil, &["-q", "grant", "list"]).await?;
    ensure!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");

    // --quiet and --json together are a usage error.
    let out = govshare_cli(&broker, &civil, &["-q", "--json", "grant", "list"]).await?;
    ensure!(out.code == 2, "{out:?}");
    broker.shutdown().await
}

/// Errors print `error: CODE: message` on stderr and exit 1.
#[tokio::test]
async fn errors_print_the_grpc_code_and_message() -> Result<()> {
    let broker = TestBroker::start().await?;
    let (hrss, civil) = two_departments(&broker).await?;

    let why = fails_with(
        &broker,
        &hrss,
        &["catalog", "show", "330000/hrss/nope"],
        "NOT_FOUND",
    )
    .await?;
    ensure!(why.contains("330000/hrss/nope"), "{why}");

    let why = fails_with(&broker, &civil, &["node", "list"], "PERMISSION_DENIED").await?;
    ensure!(why.contains("admin"), "{why}");

    let why = fails_with(
        &broker,
        &civil,
        &["catalog", "show", "not-a-dataset-id"],
        "INVALID_ARGUMENT",
    )
    .await?;
    ensure!(why.contains("not-a-dataset-id"), "{why}");

    let file = example("pension-status.json");
    ok(
        &broker,
        &hrss,
        &["catalog", "publish", &file.to_string_lossy()],
    )
    .await?;
    let why = fails_with(
        &broker,
        &civil,
        &[
            "demand",
            "file",
            "--dataset",
            PENSION,
            "--fields",
            "id_number,salary",
            "--purpose",
            "核验",
        ],
        "INVALID_ARGUMENT",
    )
    .await?;
    ensure!(why.contains("salary"), "{why}");

    // Deciding a demand on someone else's dataset.
    let d = json(
        &broker,
        &civil,
        &[
            "demand",
            "file",
            "--dataset",
            PENSION,
            "--fields",
            "status",
            "--purpose",
            "核验",
        ],
    )
    .await?;
    fails_with(
        &broker,
        &civil,
        &["demand", "approve", s(&d["id"])],
        "PERMISSION_DENIED",
    )
    .await?;

    // An identity the broker's CA did not sign is refused at the handshake, as UNAVAILABLE.
    let other = TestBroker::start().await?;
    let foreign = other.issue(HRSS, NodeRole::Department)?;
    fails_with(&broker, &foreign, &["whoami"], "UNAVAILABLE").await?;
    other.shutdown().await?;

    broker.shutdown().await
}

/// A catalog file with a key the proto does not have is refused before anything is sent,
/// and the error names the key.
#[tokio::test]
async fn publishing_a_file_with_an_unknown_key_names_it() -> Result<()> {
    let broker = TestBroker::start().await?;
    let (hrss, _civil) = two_departments(&broker).await?;
    let text = std::fs::read_to_string(example("pension-status.json"))?.replacen(
        "\"code\"",
        "\"owner\": \"someone\",\n  \"code\"",
        1,
    );
    let path = broker.scratch("pension-owner.json");
    std::fs::write(&path, text)?;
    let out = govshare_cli(
        &broker,
        &hrss,
        &["catalog", "publish", &path.to_string_lossy()],
    )
    .await?;
    ensure!(out.code != 0, "{out:?}");
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .with_context(|| format!("no error line:\n{}", out.stderr))?;
    ensure!(
        line.contains("owner") && line.contains("pension-owner.json"),
        "{line}"
    );

    // An unknown key inside an item, in TOML, is named too.
    let text = std::fs::read_to_string(example("death-registration.toml"))?.replacen(
        "mask = \"address\"",
        "mask = \"address\"\nlength = 200",
        1,
    );
    let path = broker.scratch("deaths.toml");
    std::fs::write(&path, text)?;
    let out = govshare_cli(
        &broker,
        &hrss,
        &["catalog", "publish", &path.to_string_lossy()],
    )
    .await?;
    ensure!(out.code != 0 && out.stderr.contains("length"), "{out:?}");

    // Nothing was published.
    fails_with(&broker, &hrss, &["catalog", "show", PENSION], "NOT_FOUND").await?;
    broker.shutdown().await
}

/// Without `--identity` (or GOVSHARE_IDENTITY) the CLI cannot talk to a broker: a usage error.
#[tokio::test]
async fn missing_identity_is_a_usage_error() -> Result<()> {
    let broker = TestBroker::start().await?;
    let out = tokio::process::Command::new(govshare_tests::bin_path("govshare")?)
        .args(["--broker", &broker.url(), "node", "list"])
        .env_remove("GOVSHARE_IDENTITY")
        .env_remove("GOVSHARE_BROKER")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(2), "{out:?}");
    ensure!(stderr.contains("--identity"), "{stderr}");
    ensure!(out.stdout.is_empty());
    broker.shutdown().await
}

/// Search by filters alone, without text (the path that scans the datasets tree by id prefix).
#[tokio::test]
async fn search_by_provider_or_region_alone() -> Result<()> {
    let broker = TestBroker::start().await?;
    let (hrss, civil) = two_departments(&broker).await?;
    let pension = example("pension-status.json");
    let deaths = example("death-registration.toml");
    ok(
        &broker,
        &hrss,
        &["catalog", "publish", &pension.to_string_lossy()],
    )
    .await?;
    ok(
        &broker,
        &civil,
        &["catalog", "publish", &deaths.to_string_lossy()],
    )
    .await?;
    for (filter, value, want) in [
        ("--provider", HRSS, PENSION),
        ("--provider", CIVIL, DEATHS),
        ("--region", "3301", DEATHS),
        ("--region", "330000", PENSION),
    ] {
        let found = json(&broker, &civil, &["catalog", "search", filter, value]).await?;
        ensure!(ids(&found) == [want], "{filter} {value}: {found}");
    }
    let found = json(&broker, &civil, &["catalog", "search", "--region", "33"]).await?;
    ensure!(ids(&found) == [PENSION, DEATHS], "--region 33: {found}");
    broker.shutdown().await
}
