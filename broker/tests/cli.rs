//! The real `govshare-broker` binary: init, issue, run with a graceful SIGTERM, audit verify.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn broker(args: &[&str]) -> std::io::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_govshare-broker"))
        .args(args)
        .env_remove("GOVSHARE_DATA_DIR")
        .env_remove("GOVSHARE_LISTEN")
        .output()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn init(dir: &Path) -> TestResult {
    let d = dir.to_str().ok_or("temp path is not UTF-8")?;
    let out = broker(&[
        "init",
        "--data-dir",
        d,
        "--id",
        "330000/hub",
        "--san",
        "broker.zj.example",
    ])?;
    assert!(out.status.success(), "init failed: {}", text(&out.stderr));
    Ok(())
}

/// Runs the broker on port 0 until it has printed where it listens, then sends SIGTERM and
/// expects a clean exit 0.
fn run_and_term(dir: &Path) -> TestResult {
    let d = dir.to_str().ok_or("temp path is not UTF-8")?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_govshare-broker"));
    cmd.args([
        "run",
        "--data-dir",
        d,
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    term_after_start(cmd, "330000/admin")
}

fn term_after_start(mut cmd: Command, admin: &str) -> TestResult {
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    // Blocks until the line arrives (or the process dies and closes stdout): no sleeping.
    let first = lines.next().transpose()?.unwrap_or_default();
    assert!(first.contains("listening on https://127.0.0.1:"), "{first}");
    let second = lines.next().transpose()?.unwrap_or_default();
    assert!(
        second.contains(&format!("admin identity ({admin})")),
        "{second}"
    );
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(kill.success());
    let rest: Vec<String> = lines.collect::<Result<_, _>>()?;
    let status = child.wait()?;
    assert!(status.success(), "exit {status:?}, output {rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("stopped cleanly")),
        "{rest:?}"
    );
    Ok(())
}

#[test]
fn init_writes_config_pki_and_admin_identity() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    init(&dir)?;
    for f in [
        "config.toml",
        "ca/ca.pem",
        "ca/ca.key",
        "tls/broker.pem",
        "tls/broker.key",
        "tls/ca.pem",
        "admin/node.pem",
        "admin/node.key",
        "admin/ca.pem",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let cfg = std::fs::read_to_string(dir.join("config.toml"))?;
    assert!(cfg.contains("id = \"330000/hub\"") && cfg.contains("listen = \"127.0.0.1:7443\""));
    // A second init refuses to overwrite.
    let d = dir.to_str().ok_or("path")?;
    let again = broker(&["init", "--data-dir", d, "--id", "330000/hub"])?;
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("initialised"),
        "{}",
        text(&again.stderr)
    );
    // Bad ids are refused with a message naming the problem.
    let bad = broker(&[
        "init",
        "--data-dir",
        tmp.path().join("x").to_str().ok_or("path")?,
        "--id",
        "hub",
    ])?;
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("not a node id"));
    Ok(())
}

#[test]
fn issue_writes_an_identity_and_validates_input() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    init(&dir)?;
    let d = dir.to_str().ok_or("path")?;
    let out_dir = tmp.path().join("hrss");
    let out = broker(&[
        "issue",
        "--data-dir",
        d,
        "--node",
        "330000/hrss",
        "--out",
        out_dir.to_str().ok_or("path")?,
    ])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    for f in ["node.pem", "node.key", "ca.pem"] {
        assert!(out_dir.join(f).exists(), "{f} missing");
    }
    let bad_role = broker(&[
        "issue",
        "--data-dir",
        d,
        "--node",
        "330000/x",
        "--role",
        "king",
        "--out",
        "/tmp/never",
    ])?;
    assert!(!bad_role.status.success());
    let no_dir = broker(&[
        "issue",
        "--data-dir",
        tmp.path().join("none").to_str().ok_or("path")?,
        "--node",
        "330000/x",
        "--out",
        "/tmp/never",
    ])?;
    assert!(!no_dir.status.success());
    assert!(
        text(&no_dir.stderr).contains("govshare-broker init"),
        "{}",
        text(&no_dir.stderr)
    );
    Ok(())
}

#[test]
fn run_stops_cleanly_on_sigterm_and_audit_verify_finds_an_edit() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    init(&dir)?;
    run_and_term(&dir)?;
    // A second run from the same data dir works (the lock was released, state reopened).
    run_and_term(&dir)?;
    let d = dir.to_str().ok_or("path")?;
    let ok = broker(&["audit", "verify", "--data-dir", d])?;
    assert!(
        ok.status.success(),
        "{}{}",
        text(&ok.stdout),
        text(&ok.stderr)
    );
    assert!(
        text(&ok.stdout).contains("audit chain OK: 2 entries"),
        "{}",
        text(&ok.stdout)
    );

    // Edit the second entry's reason in place, as someone with disk access might.
    {
        use govshare_broker::store;
        use prost::Message;
        let db = store::open_offline(&dir.join("db"))?;
        let tree = db.tree(store::T::Audit as usize);
        let key = 2u64.to_be_bytes();
        let raw = tree.get(key)?.ok_or("entry 2 missing")?;
        let mut e = govshare_proto::v1::AuditEntry::decode(raw.as_ref())?;
        e.reason = "nothing to see here".into();
        tree.insert(key, e.encode_to_vec())?;
        db.flush()?;
    }
    let broken = broker(&["audit", "verify", "--data-dir", d])?;
    assert_eq!(broken.status.code(), Some(3));
    let msg = text(&broken.stdout);
    assert!(
        msg.contains("BROKEN at entry 2") && msg.contains("edited"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn no_arguments_initialises_and_runs_govshare_data() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_govshare-broker"));
    cmd.current_dir(tmp.path())
        .env_remove("GOVSHARE_DATA_DIR")
        .env("GOVSHARE_LISTEN", "127.0.0.1:0")
        .env("GOVSHARE_METRICS_LISTEN", "127.0.0.1:0");
    // The first line is the first-start notice; skip it by checking the files afterwards.
    let mut child = cmd.env("RUST_LOG", "warn").stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    assert!(
        first.contains("first start: initialised ./govshare-data"),
        "{first}"
    );
    let listening = lines.next().transpose()?.unwrap_or_default();
    assert!(
        listening.contains("govshare broker 000000/broker listening on https://127.0.0.1:"),
        "{listening}"
    );
    let admin = lines.next().transpose()?.unwrap_or_default();
    assert!(admin.contains("./govshare-data/admin"), "{admin}");
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert!(kill.success());
    let status = child.wait()?;
    assert!(status.success(), "{status:?}");
    assert!(tmp.path().join("govshare-data/config.toml").exists());
    assert!(tmp.path().join("govshare-data/db").exists());
    Ok(())
}

#[test]
fn audit_verify_shows_entries_an_unclean_run_lost_and_the_next_start_records_them() -> TestResult {
    use govshare_broker::{audit, store};
    use prost::Message;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    init(&dir)?;
    run_and_term(&dir)?;
    let d = dir.to_str().ok_or("path")?;
    // A run that wrote entries 3-5 and stopped uncleanly, sled keeping 3 and 5 but losing 4
    // (as it can when a write fails on a full disk).
    {
        let db = store::open_offline(&dir.join("db"))?;
        let tree = db.tree(store::T::Audit as usize);
        let mut head = audit::load_head(&tree)?;
        assert_eq!(head.seq, 2, "two entries from the first run");
        db.tree(store::T::Meta as usize)
            .insert(store::RUNNING, &3u64.to_be_bytes()[..])?;
        for n in 0..3 {
            let e = audit::chain(
                &mut head,
                audit::entry("test_write", &format!("n{n}")),
                "330000/hub",
            );
            tree.insert(e.seq.to_be_bytes(), e.encode_to_vec())?;
        }
        tree.remove(4u64.to_be_bytes())?;
        db.flush()?;
    }
    let pending = broker(&["audit", "verify", "--data-dir", d])?;
    let out = text(&pending.stdout);
    assert!(pending.status.success(), "{out}{}", text(&pending.stderr));
    assert!(
        out.contains("audit chain OK: 4 entries verified, 1 gap(s)")
            && out.contains("entry 4 lost")
            && out.contains("not recorded yet"),
        "{out}"
    );

    // The next start records the loss as the first entry it writes.
    run_and_term(&dir)?;
    let recorded = broker(&["audit", "verify", "--data-dir", d])?;
    let out = text(&recorded.stdout);
    assert!(recorded.status.success(), "{out}{}", text(&recorded.stderr));
    assert!(
        out.contains("entry 4 lost before reaching the disk (recorded at entry 6)"),
        "{out}"
    );

    // An entry removed from a run that stopped cleanly is not a loss but an edit.
    {
        let db = store::open_offline(&dir.join("db"))?;
        db.tree(store::T::Audit as usize)
            .remove(1u64.to_be_bytes())?;
        db.flush()?;
    }
    let broken = broker(&["audit", "verify", "--data-dir", d])?;
    let out = text(&broken.stdout);
    assert_eq!(broken.status.code(), Some(3), "{out}");
    assert!(
        out.contains("BROKEN at entry 2") && out.contains("no entry records their loss"),
        "{out}"
    );
    Ok(())
}

#[test]
fn a_data_dir_from_sled_is_refused_until_migrate_storage_converts_it() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    init(&dir)?;
    let d = dir.to_str().ok_or("path")?;
    // The database as a govshare from before 2026-11-29 left it: sled, with one node.
    let db_dir = dir.join("db");
    if db_dir.exists() {
        std::fs::remove_dir_all(&db_dir)?;
    }
    {
        let db = sled::open(&db_dir)?;
        db.open_tree("nodes")?.insert("330000/old", &b"kept"[..])?;
        db.flush()?;
    }
    let refused = broker(&["run", "--data-dir", d, "--listen", "127.0.0.1:0"])?;
    let err = text(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains("older govshare (sled)") && err.contains("migrate-storage"),
        "{err}"
    );
    assert!(
        !dir.join("db").join("LOCK").exists(),
        "nothing of the new store was written over the old one"
    );

    let done = broker(&["migrate-storage", "--data-dir", d])?;
    let out = text(&done.stdout);
    assert!(done.status.success(), "{out}{}", text(&done.stderr));
    assert!(
        out.contains("converted") && out.contains("1 records"),
        "{out}"
    );
    assert!(dir.join("db.sled-old").join("conf").is_file());
    let again = broker(&["migrate-storage", "--data-dir", d])?;
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("holds no sled database"));

    run_and_term(&dir)?;
    let db = govshare_broker::store::open_offline(&db_dir)?;
    let node = db
        .tree(govshare_broker::store::T::Nodes as usize)
        .get("330000/old")?;
    assert_eq!(node.as_deref(), Some(&b"kept"[..]));
    Ok(())
}
