//! The operator console in a real browser: headless Chromium loads `/` from a broker under a
//! little load (one exchange denied), the page's script fills in the live figures from
//! `/status`, and they match what `/status` says. A screenshot is kept as a test artifact in
//! `target/test-artifacts/console.png`.
//!
//! Needs the Debian package `chromium`. Without it the test is skipped with a loud message,
//! unless `GOVSHARE_REQUIRE_EXTERNAL=1` (as in CI), where a missing browser is a failure.

use anyhow::{ensure, Context, Result};
use govshare_tests::TestBroker;
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// The exchanges answered before the browser looks.
const ANSWERED: u64 = 4;

/// Kills a whole process group when dropped: Chromium forks renderer, GPU and zygote
/// processes, which must not outlive the test whatever path it takes.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs headless Chromium on `url` with `extra` arguments (in its own process group, killed
/// with all its children on every path); returns stdout.
async fn chromium(bin: &Path, profile: &Path, url: &str, extra: &[String]) -> Result<String> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    // Give the page eight seconds of (virtual) time: its first fetch of /status and a few of its
    // two-second refreshes. Virtual time waits for pending fetches, so no real sleep is needed.
    .arg("--virtual-time-budget=8000")
    .args(extra)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0)
    .kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let _group = GroupGuard(child.id());
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .context("chromium did not finish within 2 minutes")??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "chromium {extra:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// The inner HTML of the element with `id` (elements of one tag name do not nest here).
fn inner<'a>(dom: &'a str, id: &str) -> Result<&'a str> {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .with_context(|| format!("no element #{id}"))?;
    let open = dom[..at].rfind('<').context("no tag start")?;
    let tag: String = dom[open + 1..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let start = at + dom[at..].find('>').context("no tag end")? + 1;
    let end = start
        + dom[start..]
            .find(&format!("</{tag}>"))
            .with_context(|| format!("#{id} is not closed"))?;
    Ok(&dom[start..end])
}

/// The visible text of an HTML fragment (tags dropped, entities of the console's escaping
/// undone).
fn text(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
        .trim()
        .to_string()
}

/// The rows of a table body, as the texts of their cells.
fn table(dom: &str, id: &str) -> Result<Vec<Vec<String>>> {
    Ok(inner(dom, id)?
        .split("<tr>")
        .skip(1)
        .map(|r| {
            r.split("<td")
                .skip(1)
                .map(|c| text(&format!("<td{c}")))
                .collect()
        })
        .collect())
}

/// Where test artifacts go: `$CARGO_TARGET_DIR/test-artifacts`, else the workspace's
/// `target/test-artifacts`.
fn artifacts() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("test-artifacts")
}

#[tokio::test]
async fn the_console_shows_live_figures_in_a_browser() -> Result<()> {
    let test = "the_console_shows_live_figures_in_a_browser";
    let Some(bin) = govshare_tests::external("chromium", "chromium", test)? else {
        return Ok(());
    };
    let broker = TestBroker::start_with("330000/hub", |c| {
        c.metrics.listen = "127.0.0.1:0".into();
    })
    .await?;
    let base = broker.metrics_url().context("metrics port")?;

    // A little load: answered exchanges and one denial.
    let load = govshare_tests::load::AliveLoad::start(&broker).await?;
    let (civil, ask) = (&load.civil, govshare_tests::load::AliveLoad::ask);
    for _ in 0..ANSWERED {
        civil.request(ask(vec![])).await?;
    }
    ensure!(
        civil.request(ask(vec!["salary".into()])).await.is_err(),
        "an item outside the grant was allowed"
    );

    let profile = tempfile::tempdir()?;
    let url = format!("{base}/");
    let dom = chromium(&bin, profile.path(), &url, &["--dump-dom".to_string()]).await?;
    // The load is over: what the page showed must be what /status says now.
    let (code, body) = govshare_tests::http_get(&base, "/status").await?;
    ensure!(code == 200, "/status answered {code}");
    let status: Json = serde_json::from_str(&body)?;
    let checked = check_dom(&dom, &status);

    // The screenshot, kept whatever the DOM check said.
    let dir = artifacts();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let png = dir.join("console.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        &bin,
        profile.path(),
        &url,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1280,1400".to_string(),
        ],
    )
    .await?;
    let shot = std::fs::read(&png)
        .with_context(|| format!("chromium wrote no screenshot at {}", png.display()))?;
    ensure!(
        shot.starts_with(b"\x89PNG\r\n\x1a\n") && shot.len() > 10_000,
        "{} is not a plausible PNG ({} bytes)",
        png.display(),
        shot.len()
    );
    eprintln!("console screenshot: {}", png.display());
    broker.shutdown().await?;
    checked.with_context(|| format!("--- DOM ---\n{dom}\n--- /status ---\n{status:#}"))
}

/// The live figures of the page against `/status`.
fn check_dom(dom: &str, s: &Json) -> Result<()> {
    let body_tag = &dom[dom.find("<body").context("no <body>")?..];
    let body_tag = &body_tag[..body_tag.find('>').context("<body> not closed")?];
    ensure!(
        body_tag.contains("data-ready=\"1\""),
        "the page never rendered /status (no data-ready on <body>): {body_tag}"
    );
    ensure!(
        text(inner(dom, "err")?).is_empty(),
        "the page shows an error: {}",
        text(inner(dom, "err")?)
    );
    let field = |id: &str| -> Result<String> { Ok(text(inner(dom, id)?)) };
    ensure!(
        field("broker")? == "330000/hub",
        "broker id {:?}",
        field("broker")?
    );
    ensure!(s["broker_id"] == "330000/hub");
    ensure!(field("version")? == s["version"].as_str().unwrap_or("?"));
    ensure!(field("refreshed")? != "never", "never refreshed");

    // Exchanges by outcome: every outcome of /status, with its count.
    let rows = table(dom, "exchanges")?;
    let answered = rows
        .iter()
        .find(|r| r.first().is_some_and(|c| c == "answered"))
        .and_then(|r| r.get(1))
        .with_context(|| format!("no answered row in {rows:?}"))?;
    let want = s["exchanges"]["answered"].as_u64().context("answered")?;
    ensure!(want >= ANSWERED, "/status answered {want}");
    ensure!(
        answered == &want.to_string(),
        "page answered {answered}, /status {want}"
    );
    for (outcome, n) in s["exchanges"].as_object().context("exchanges")? {
        let n = n
            .as_u64()
            .with_context(|| format!("count of {outcome}: {n}"))?;
        let n = n.to_string();
        ensure!(
            rows.iter()
                .any(|r| r.len() == 2 && &r[0] == outcome && r[1] == n),
            "outcome {outcome} = {n} not on the page: {rows:?}"
        );
    }

    // The cards.
    let num = |v: &Json| v.as_u64().map(|n| n.to_string()).unwrap_or_default();
    let cards = [
        ("providers", num(&s["providers"])),
        ("dlq", num(&s["dead_letters"])),
        ("pending", num(&s["demands_pending"])),
        ("overdue", num(&s["demands_overdue"])),
        ("grants", num(&s["grants_active"])),
    ];
    for (id, want) in cards {
        ensure!(
            field(id)? == want,
            "#{id} shows {:?}, /status {want}",
            field(id)?
        );
    }
    ensure!(field("providers")? == "1" && field("grants")? == "1");
    let p50 = field("p50")?;
    ensure!(
        p50.parse::<f64>().is_ok(),
        "p50 {p50:?} is not a number after {ANSWERED} exchanges"
    );

    // Queues: each destination of /status.
    let queues = table(dom, "queues")?;
    for q in s["queues"].as_array().context("queues")? {
        let dest = q["destination"].as_str().unwrap_or("?");
        ensure!(
            queues.iter().any(
                |r| r.first().is_some_and(|c| c == dest) && r.get(1) == Some(&num(&q["depth"]))
            ),
            "queue {dest} not on the page: {queues:?}"
        );
    }

    // The denial: its rule, consumer and dataset.
    let denials = table(dom, "denials")?;
    let d = &s["recent_denials"][0];
    ensure!(d["rule"] == "field_outside_grant", "/status denials: {d}");
    ensure!(
        denials.iter().any(|r| r.len() == 5
            && r[1] == "field_outside_grant"
            && r[2] == "330100/civil"
            && r[3] == "330000/hrss/alive"),
        "the denial is not on the page: {denials:?}"
    );
    Ok(())
}
