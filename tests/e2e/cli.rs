//! The `lockstep` binary's own failures: one line on stderr that names the cause, exit status 1,
//! and nothing opened.

use anyhow::Result;
use lockstep_tests::sites::release_binary;

#[tokio::test]
async fn a_configuration_error_is_one_line_without_a_backtrace() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("typo.toml");
    std::fs::write(&config, "[limits]\nmax_body_byte = 5\n")?;
    let output = tokio::process::Command::new(release_binary()?)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        // As a developer's shell often has it: the message must not drown in frames.
        .env("RUST_BACKTRACE", "1")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].starts_with("error: loading the configuration with ")
            && lines[0].contains("configuration key `limits.max_body_byte`: unknown field"),
        "{stderr}"
    );
    assert!(!dir.path().join("data").exists(), "nothing was opened");
    Ok(())
}

#[tokio::test]
async fn an_admin_command_that_cannot_reach_the_server_says_so_in_one_line() -> Result<()> {
    let output = tokio::process::Command::new(release_binary()?)
        .args(["connectors", "--url", "http://127.0.0.1:1", "list"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("error: calling http://127.0.0.1:1/v1/connectors: "),
        "{stderr}"
    );
    Ok(())
}
