//! TLS end to end, with the test certificates in `tests/fixtures/tls` (a private CA and a
//! certificate it signed for `localhost` and `127.0.0.1`): a server with `[tls]` serves HTTPS
//! only, a site reaches a peer at `https://` trusting the peer's `ca_file`, and the admin CLI
//! takes `--ca-file`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use lockstep_tests::sites::{converged, free_port, release_binary, site_toml, Dial, Process};
use lockstep_tests::{poll_until, within, TestServer};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/tls")
        .join(name)
}

/// The `[tls]` section serving the certificate in `cert` with the key in `key`.
fn tls_toml(cert: &Path, key: &Path) -> String {
    format!("[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n")
}

/// The `[tls]` section serving the fixture certificate.
fn fixture_tls_toml() -> String {
    tls_toml(&fixture("server.pem"), &fixture("server.key"))
}

/// A client that trusts the fixture CA (and the public web's authorities).
fn trusting_client() -> Result<reqwest::Client> {
    let authority = reqwest::Certificate::from_pem(&std::fs::read(fixture("ca.pem"))?)?;
    Ok(reqwest::Client::builder()
        .add_root_certificate(authority)
        .timeout(Duration::from_secs(10))
        .build()?)
}

fn https(server: &TestServer, host: &str, path: &str) -> String {
    format!("https://{host}:{}{path}", server.address().port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_tls_serves_https_only() -> Result<()> {
    let server = TestServer::start_with(&format!(
        "{}[limits]\nheader_read_timeout = \"1s\"\n",
        fixture_tls_toml()
    ))
    .await?;
    let client = trusting_client()?;
    // By name and by address: the certificate names both.
    let created = client
        .patch(https(&server, "localhost", "/v1/entities/permit/p1"))
        .json(&json!({"holder": "Ada"}))
        .send()
        .await?;
    assert_eq!(created.status(), 201);
    let read: Value = client
        .get(https(&server, "127.0.0.1", "/v1/entities/permit/p1"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(read["data"], json!({"holder": "Ada"}));

    // A client that does not trust the CA refuses the certificate and sends nothing.
    let untrusting = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let refused = untrusting
        .patch(https(&server, "localhost", "/v1/entities/permit/p2"))
        .json(&json!({"holder": "Eve"}))
        .send()
        .await
        .expect_err("an unknown CA is refused");
    assert!(
        format!("{refused:?}").contains("UnknownIssuer"),
        "{refused:?}"
    );

    // Plain HTTP gets no HTTP answer: the server expects a TLS handshake.
    let plain = server
        .client()
        .patch(server.url("/v1/entities/permit/p3"))
        .json(&json!({"holder": "Eve"}))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");

    // A connection that never starts its handshake is closed after the header-read timeout.
    let mut idle = tokio::net::TcpStream::connect(server.address()).await?;
    let mut byte = [0u8; 1];
    let read = within("the idle connection's close", idle.read(&mut byte)).await?;
    ensure!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // None of that changed anything, and the server still serves.
    assert!(server
        .store()
        .get(&store::EntityKey::new("permit", "p2")?)?
        .is_none());
    assert!(server
        .store()
        .get(&store::EntityKey::new("permit", "p3")?)?
        .is_none());
    let health = client
        .get(https(&server, "localhost", "/healthz"))
        .send()
        .await?;
    assert_eq!(health.status(), 200);
    // When the certificate expires, for alerts: the fixture's ends at 2126-01-01T00:00:00Z.
    assert_eq!(not_after(&server).await?, "4922899200");
    server.stop().await?;
    Ok(())
}

/// A server whose certificate has expired starts (a renewed one would replace it without a
/// restart), but says so in a warning before it announces its address, since clients will
/// refuse it.
#[tokio::test]
async fn a_server_with_an_expired_certificate_warns_at_startup() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("lockstep.toml");
    std::fs::write(
        &config,
        tls_toml(&fixture("server-expired.pem"), &fixture("server.key")),
    )?;
    let server = Process::start_capturing(
        &release_binary()?,
        &config,
        &dir.path().join("data"),
        free_port()?,
        "info",
    )
    .await?;
    let log = server.log();
    let listening = log
        .iter()
        .position(|line| line.contains("listening on "))
        .context("the listening line")?;
    let warning = log[..listening]
        .iter()
        .find(|line| line.contains("the TLS certificate expired"))
        .with_context(|| format!("no expiry warning before listening in {log:?}"))?;
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("server-expired.pem"), "{warning}");
    Ok(())
}

/// When the server's certificate expires, from `/metrics`, over a new connection.
async fn not_after(server: &TestServer) -> Result<String> {
    let metrics = trusting_client()?
        .get(https(server, "localhost", "/metrics"))
        .send()
        .await?
        .text()
        .await?;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("lockstep_tls_certificate_not_after_seconds "))
        .map(str::to_string)
        .with_context(|| format!("no certificate expiry in {metrics}"))
}

/// A renewed certificate (its files replaced) is served from the next connection on, without a
/// restart; files that do not load leave the certificate in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(fixture("server.pem"), &cert)?;
    std::fs::copy(fixture("server.key"), &key)?;
    let server = TestServer::start_with(&format!(
        "{}reload_interval = \"50ms\"\n",
        tls_toml(&cert, &key)
    ))
    .await?;
    assert_eq!(not_after(&server).await?, "4922899200");

    // A renewal caught halfway: the new files do not load, and the certificate in use stays.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(not_after(&server).await?, "4922899200");

    // The renewed certificate; the expired fixture, so that clients can tell it apart.
    std::fs::copy(fixture("server-expired.pem"), &cert)?;
    poll_until("the new certificate", || async {
        // New connections get the expired certificate and refuse it.
        let refused = trusting_client()?
            .get(https(&server, "localhost", "/healthz"))
            .send()
            .await;
        Ok(match refused {
            Err(error) if format!("{error:?}").contains("Expired") => Some(()),
            _ => None,
        })
    })
    .await?;
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_replicates_with_a_peer_over_https_trusting_its_ca_file() -> Result<()> {
    let north = TestServer::start_with(&format!(
        "{}{}",
        site_toml(
            "north",
            &[("south", "tok-south"), ("east", "tok-east")],
            &[],
            "1s"
        ),
        fixture_tls_toml()
    ))
    .await?;
    let north_url = https(&north, "localhost", "");
    // The last table `site_toml` writes is the peer's, so `ca_file` joins it.
    let south_toml = format!(
        "{}ca_file = {:?}\n",
        site_toml(
            "south",
            &[],
            &[Dial {
                name: "north",
                url: &north_url,
                token: "tok-south"
            }],
            "1s"
        ),
        fixture("ca.pem")
    );
    let south = TestServer::start_with(&south_toml).await?;
    // East dials north without the CA: the link must fail on the certificate. It also dials
    // south, which serves plain HTTP, at an https:// url.
    let south_as_https = format!("https://127.0.0.1:{}", south.address().port());
    let east = TestServer::start_with(&site_toml(
        "east",
        &[],
        &[
            Dial {
                name: "north",
                url: &north_url,
                token: "tok-east",
            },
            Dial {
                name: "south",
                url: &south_as_https,
                token: "tok-east",
            },
        ],
        "1s",
    ))
    .await?;

    let client = trusting_client()?;
    client
        .patch(https(&north, "localhost", "/v1/entities/permit/n1"))
        .json(&json!({"holder": "Ada"}))
        .send()
        .await?
        .error_for_status()?;
    south
        .patch("/v1/entities/permit/s1", &json!({"holder": "Grace"}))
        .await?;
    let south_url = south.url("");
    let both = converged(
        &client,
        &[&north_url, &south_url],
        "permit",
        Duration::from_secs(10),
    )
    .await?;
    assert_eq!(both.len(), 2);

    let last_error = |peer: &'static str| {
        let east = &east;
        poll_until("east's link to fail", move || async move {
            let (status, body) = east.get(&format!("/v1/peers/{peer}")).await?;
            ensure!(status == 200, "{status} {body}");
            Ok(body["last_error"].as_str().map(str::to_string))
        })
    };
    // Said once, not once per layer of the error.
    let untrusted = last_error("north").await?;
    assert_eq!(untrusted.matches("UnknownIssuer").count(), 1, "{untrusted}");
    let not_tls = last_error("south").await?;
    assert!(
        not_tls.contains(
            "the peer does not answer in TLS: if it serves plain HTTP, use an http:// url"
        ),
        "{not_tls}"
    );
    let (_, page) = east.get("/v1/entities/permit").await?;
    assert_eq!(page["items"], json!([]), "{page}");
    for server in [north, south, east] {
        server.stop().await?;
    }
    Ok(())
}

#[tokio::test]
async fn the_admin_cli_trusts_a_ca_file() -> Result<()> {
    let server = TestServer::start_with(&fixture_tls_toml()).await?;
    let url = https(&server, "localhost", "");
    let run = |ca_file: Option<PathBuf>| {
        let mut command = tokio::process::Command::new(release_binary()?);
        command.args(["connectors", "--url", &url]);
        if let Some(ca_file) = ca_file {
            command.arg("--ca-file").arg(ca_file);
        }
        command.arg("list");
        Ok::<_, anyhow::Error>(command.output())
    };
    let trusted = run(Some(fixture("ca.pem")))?.await?;
    let stdout = String::from_utf8_lossy(&trusted.stdout);
    assert!(
        trusted.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    let listed: Value = serde_json::from_str(&stdout).context("the list is JSON")?;
    assert_eq!(listed["connectors"], json!([]), "{stdout}");

    let untrusted = run(None)?.await?;
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert_eq!(untrusted.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");

    // A CA file that cannot be read is one line naming it.
    let missing = run(Some(fixture("missing.pem")))?.await?;
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: reading --ca-file "), "{stderr}");

    // A CA file is for https:// only.
    let plain = tokio::process::Command::new(release_binary()?)
        .args(["connectors", "--url", &server.url(""), "--ca-file"])
        .arg(fixture("ca.pem"))
        .arg("list")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert_eq!(plain.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "error: --ca-file is only used with an https:// --url"
    );
    server.stop().await?;
    Ok(())
}
