//! The real `govshare` binary's usage behaviour (and, as a side effect, `cargo test --workspace`
//! builds the binary so that the end-to-end tests in `tests/` can run it).

use std::process::Command;

fn govshare(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new(env!("CARGO_BIN_EXE_govshare"))
        .args(args)
        .env_remove("GOVSHARE_BROKER")
        .env_remove("GOVSHARE_IDENTITY")
        .output()
}

#[test]
fn help_lists_every_command_group() -> std::io::Result<()> {
    let out = govshare(&["--help"])?;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "node", "catalog", "demand", "grant", "audit", "exchange", "dlq",
    ] {
        assert!(text.contains(cmd), "--help lacks {cmd}:\n{text}");
    }
    Ok(())
}

#[test]
fn a_usage_error_exits_2() -> std::io::Result<()> {
    let out = govshare(&["demand", "file", "--no-such-flag"])?;
    assert_eq!(out.status.code(), Some(2));
    let out = govshare(&["node", "list"])?;
    assert_eq!(
        out.status.code(),
        Some(2),
        "missing --identity is a usage error"
    );
    Ok(())
}
