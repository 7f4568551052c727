//! The `lockstep` binary's own failures: one line on stderr that names the cause, exit status 1,
//! and nothing opened.

use anyhow::{Context, Result};
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

/// A server whose stderr is a pipe that nobody reads any more (a log collector that died) goes
/// on serving, and still shuts down on SIGTERM with status 0: a log line it cannot write is
/// dropped, never a panic.
#[tokio::test]
async fn a_server_whose_log_reader_went_away_serves_and_shuts_down() -> Result<()> {
    use tokio::io::AsyncBufReadExt;

    let dir = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(release_binary()?)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        // A line per request, so every request below writes to the broken pipe.
        .env("RUST_LOG", "info,server=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stderr = child.stderr.take().context("stderr is piped")?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let address = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some((_, address)) = line.split_once("listening on ") {
                return Ok(address.trim().to_string());
            }
        }
        anyhow::bail!("the server ended before it listened")
    })
    .await??;
    // The reader goes away: from now on every write to stderr fails with a broken pipe.
    drop(lines);
    let client = reqwest::Client::new();
    for n in 0..20 {
        let response = client
            .patch(format!("http://{address}/v1/entities/note/n{n}"))
            .header("content-type", "application/merge-patch+json")
            .body(r#"{"text": "still here"}"#)
            .send()
            .await?;
        assert_eq!(response.status(), 201, "write {n}");
    }
    let pid = child.id().context("the server is running")?;
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid)?).context("a process id")?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait()).await??;
    assert_eq!(status.code(), Some(0), "{status}");
    Ok(())
}

/// A second server on a data directory that a running one holds says so in one line, exits 1,
/// and never announces an address: "listening on" means the store is open and requests are
/// served, so a script that waits for it is not misled.
#[tokio::test]
async fn a_second_server_on_a_held_data_directory_fails_without_announcing_an_address() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let serve = |data: &std::path::Path| {
        let mut command = tokio::process::Command::new(release_binary().expect("built"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .kill_on_drop(true);
        command
    };
    let mut first = serve(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = first.stderr.take().context("stderr is piped")?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("listening on ") {
                return Ok(());
            }
        }
        anyhow::bail!("the first server ended before it listened")
    })
    .await??;
    let second =
        tokio::time::timeout(std::time::Duration::from_secs(30), serve(&data).output()).await??;
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("listening on"), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("could not open the store in ") && errors[0].contains("lock"),
        "{stderr}"
    );
    first.kill().await?;
    Ok(())
}
