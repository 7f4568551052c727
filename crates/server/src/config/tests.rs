//! Loading the configuration: defaults, file and environment layers, and the errors that name
//! what is wrong.

use std::path::Path;
use std::time::Duration;

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// The configuration from the defaults and these environment variables alone.
fn load_env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::load(ConfigSources {
        env: env(pairs),
        ..ConfigSources::default()
    })
}

fn load_toml(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().expect("a temporary directory can be created");
    let file = dir.path().join("lockstep.toml");
    std::fs::write(&file, text).expect("the temporary directory is writable");
    Config::load(ConfigSources {
        file: Some(&file),
        env: env(pairs),
        ..ConfigSources::default()
    })
}

#[test]
fn defaults_parse_and_match_the_documented_values() {
    let config = Config::load(ConfigSources::default()).expect("the defaults are valid");
    assert_eq!(config.listen.to_string(), "127.0.0.1:7878");
    assert_eq!(config.store.data_dir, Path::new("./lockstep-data"));
    assert_eq!(config.store.cache_entries, 4096);
    assert_eq!(config.store.cache_bytes, 256 * 1024 * 1024);
    assert_eq!(config.tls.reload_interval, Duration::from_secs(60));
    assert_eq!(config.store.sync_mode, SyncMode::Flush);
    assert_eq!(config.store.writer_threads, 1);
    assert_eq!(config.request_threads_nice, 5);
    assert_eq!(config.limits.max_body_bytes, 1024 * 1024);
    assert_eq!(config.limits.request_timeout, Duration::from_secs(30));
    assert_eq!(config.limits.header_read_timeout, Duration::from_secs(10));
    assert_eq!(config.limits.max_concurrent_requests, 512);
    assert_eq!(config.limits.write_timeout, Duration::from_secs(60));
    assert_eq!(config.limits.max_event_streams, 256);
    assert!(config.auth.tokens.is_empty());
}

#[test]
fn a_file_overrides_the_defaults_key_by_key() {
    let config = load_toml(
        "[limits]\nmax_body_bytes = 2048\nrequest_timeout = \"1500ms\"\n\n[[auth.tokens]]\nname = \"alice\"\ntoken = \"s3cret\"\nrole = \"read\"\n",
        &[],
    )
    .expect("the file is valid");
    assert_eq!(config.limits.max_body_bytes, 2048);
    assert_eq!(config.limits.request_timeout, Duration::from_millis(1500));
    // Keys the file does not mention keep their defaults.
    assert_eq!(config.limits.max_concurrent_requests, 512);
    assert_eq!(config.auth.tokens.len(), 1);
    assert_eq!(config.auth.tokens[0].role, Role::Read);
}

#[test]
fn an_unknown_key_in_the_file_is_an_error_that_names_it() {
    let error = load_toml("[limits]\nmax_body = 10\n", &[]).expect_err("max_body is not a key");
    let message = error.to_string();
    assert!(message.contains("max_body"), "{message}");
    assert!(message.contains("limits"), "{message}");

    let error = load_toml("lisen = \"127.0.0.1:1\"\n", &[]).expect_err("lisen is not a key");
    assert!(error.to_string().contains("lisen"), "{error}");

    let error = load_toml(
        "[[auth.tokens]]\nname = \"a\"\ntoken = \"t\"\nrole = \"read\"\nrol = \"x\"\n",
        &[],
    )
    .expect_err("rol is not a key");
    assert!(error.to_string().contains("rol"), "{error}");
}

#[test]
fn environment_variables_override_the_file() {
    let config = load_toml(
        "listen = \"127.0.0.1:9000\"\n[store]\ncache_entries = 10\n",
        &[
            ("LOCKSTEP_LISTEN", "127.0.0.1:9001"),
            ("LOCKSTEP_CACHE_ENTRIES", "20"),
            ("LOCKSTEP_SYNC_MODE", "fsync"),
            ("LOCKSTEP_WRITER_THREADS", "4"),
            ("LOCKSTEP_REQUEST_THREADS_NICE", "0"),
            ("LOCKSTEP_HEADER_READ_TIMEOUT", "2s"),
            ("LOCKSTEP_AUTH_TOKENS", "alice:write:tok-a, bob:read:tok:b"),
            ("PATH", "/usr/bin"),
        ],
    )
    .expect("the variables are valid");
    assert_eq!(config.listen.to_string(), "127.0.0.1:9001");
    assert_eq!(config.store.cache_entries, 20);
    assert_eq!(config.store.sync_mode, SyncMode::Fsync);
    assert_eq!(config.store.writer_threads, 4);
    assert_eq!(config.store.store_config().writer_threads, 4);
    assert_eq!(config.request_threads_nice, 0);
    assert_eq!(config.limits.header_read_timeout, Duration::from_secs(2));
    let tokens: Vec<_> = config
        .auth
        .tokens
        .iter()
        .map(|token| (token.name.as_str(), token.role, token.token.expose()))
        .collect();
    assert_eq!(
        tokens,
        [
            ("alice", Role::Write, "tok-a"),
            ("bob", Role::Read, "tok:b")
        ]
    );
}

#[test]
fn flags_override_the_environment() {
    let config = Config::load(ConfigSources {
        env: env(&[
            ("LOCKSTEP_LISTEN", "127.0.0.1:9001"),
            ("LOCKSTEP_DATA_DIR", "/env"),
        ]),
        listen: Some("127.0.0.1:9002".parse().expect("a valid address")),
        data_dir: Some("/flag".into()),
        ..ConfigSources::default()
    })
    .expect("valid");
    assert_eq!(config.listen.to_string(), "127.0.0.1:9002");
    assert_eq!(config.store.data_dir, Path::new("/flag"));
}

#[test]
fn an_unknown_lockstep_variable_is_an_error_that_names_it() {
    let error =
        load_env(&[("LOCKSTEP_MAX_BODY", "10")]).expect_err("LOCKSTEP_MAX_BODY is not a setting");
    assert!(error.to_string().contains("LOCKSTEP_MAX_BODY"), "{error}");
}

#[test]
fn tooling_variables_are_ignored() {
    load_env(&[
        ("LOCKSTEP_PROPTEST_CASES", "2000"),
        ("LOCKSTEP_BENCH_SECONDS", "5"),
    ])
    .expect("tooling variables are not settings and not errors");
}

#[test]
fn bad_values_name_their_key_or_variable() {
    for raw in ["lots", "+5", "5.0", "1_000", "", "-"] {
        let error = load_env(&[("LOCKSTEP_MAX_BODY_BYTES", raw)]).expect_err("not a number");
        assert!(
            error.to_string().contains("LOCKSTEP_MAX_BODY_BYTES"),
            "{raw:?}: {error}"
        );
    }
    let loaded = load_env(&[("LOCKSTEP_MAX_BODY_BYTES", " 2048 ")])
        .expect("a whole number, spaces around it");
    assert_eq!(loaded.limits.max_body_bytes, 2048);

    let error =
        load_toml("[limits]\nrequest_timeout = \"soon\"\n", &[]).expect_err("not a duration");
    assert!(
        error.to_string().contains("limits.request_timeout"),
        "{error}"
    );

    let error = load_toml("[store]\nsync_mode = \"always\"\n", &[]).expect_err("not a mode");
    assert!(error.to_string().contains("store.sync_mode"), "{error}");

    let error = load_toml("[limits]\nmax_concurrent_requests = 0\n", &[]).expect_err("zero");
    assert!(
        error.to_string().contains("limits.max_concurrent_requests"),
        "{error}"
    );
    for (text, key) in [
        (
            "[limits]\nmax_event_streams = 0\n",
            "limits.max_event_streams",
        ),
        ("[limits]\nwrite_timeout = \"0s\"\n", "limits.write_timeout"),
        // hyper would panic on every connection adding this to the current instant.
        (
            "[limits]\nheader_read_timeout = \"300000000000years\"\n",
            "limits.header_read_timeout",
        ),
        (
            "[limits]\nrequest_timeout = \"25h\"\n",
            "limits.request_timeout",
        ),
    ] {
        let error = load_toml(text, &[]).expect_err(key);
        assert!(error.to_string().contains(key), "{error}");
    }

    // Set from the environment, the error names the variable as well as the key.
    for (variable, raw, key) in [
        ("LOCKSTEP_WRITER_THREADS", "0", "store.writer_threads"),
        ("LOCKSTEP_SYNC_MODE", "always", "store.sync_mode"),
        ("LOCKSTEP_REQUEST_TIMEOUT", "soon", "limits.request_timeout"),
        ("LOCKSTEP_WRITE_TIMEOUT", "0s", "limits.write_timeout"),
        (
            "LOCKSTEP_MAX_EVENT_STREAMS",
            "0",
            "limits.max_event_streams",
        ),
    ] {
        let error = load_env(&[(variable, raw)]).expect_err("out of range");
        let text = error.to_string();
        assert!(text.contains(key) && text.contains(variable), "{text}");
    }

    for threads in [0, 65] {
        let error = load_toml(&format!("[store]\nwriter_threads = {threads}\n"), &[])
            .expect_err("out of range");
        assert!(
            error.to_string().contains("store.writer_threads"),
            "{error}"
        );
    }

    for nice in ["20", "-1"] {
        let error =
            load_toml(&format!("request_threads_nice = {nice}\n"), &[]).expect_err("out of range");
        assert!(
            error.to_string().contains("request_threads_nice"),
            "{error}"
        );
    }

    let error = load_toml("[limits\n", &[]).expect_err("not TOML");
    assert!(error.to_string().contains("lockstep.toml"), "{error}");
}

#[test]
fn token_names_and_secrets_are_checked_without_revealing_secrets() {
    let error = load_env(&[("LOCKSTEP_AUTH_TOKENS", "alice:write:same,bob:read:same")])
        .expect_err("two names share a token");
    assert!(!error.to_string().contains("same"), "{error}");

    let error =
        load_env(&[("LOCKSTEP_AUTH_TOKENS", "al ice:write:t1")]).expect_err("a name with a space");
    assert!(error.to_string().contains("al ice"), "{error}");

    let error = load_env(&[("LOCKSTEP_AUTH_TOKENS", "alice-only-secret")])
        .expect_err("not name:role:token");
    assert!(!error.to_string().contains("alice-only-secret"), "{error}");
}

#[test]
fn secrets_do_not_show_in_debug_output() {
    let config = load_env(&[("LOCKSTEP_AUTH_TOKENS", "alice:write:hunter2")]).expect("valid");
    let debug = format!("{config:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("***"), "{debug}");
}

#[test]
fn a_token_of_the_wrong_type_is_refused_without_echoing_it() {
    let error = load_toml(
        "[[auth.tokens]]\nname = \"alice\"\ntoken = 987654321\nrole = \"write\"\n",
        &[],
    )
    .expect_err("a token must be a string");
    let message = error.to_string();
    assert!(message.contains("auth.tokens"), "{message}");
    assert!(!message.contains("987654321"), "{message}");
}

#[test]
fn an_empty_token_variable_is_refused_rather_than_opening_the_api() {
    // Blank, or only separators (a template whose variables were unset).
    for raw in ["  ", ",", " , ,"] {
        let error = load_env(&[("LOCKSTEP_AUTH_TOKENS", raw)])
            .expect_err("an empty token list from the environment");
        assert!(
            error.to_string().contains("LOCKSTEP_AUTH_TOKENS"),
            "{raw:?}: {error}"
        );
    }
}

#[test]
fn the_cache_byte_bound_is_set_by_file_or_environment_and_has_a_floor() {
    let config = load_toml("[store]\ncache_bytes = 2097152\n", &[]).expect("2 MiB is valid");
    assert_eq!(config.store.store_config().cache_bytes, 2 * 1024 * 1024);
    let config = load_toml(
        "[store]\ncache_bytes = 2097152\n",
        &[("LOCKSTEP_CACHE_BYTES", "8388608")],
    )
    .expect("8 MiB is valid");
    assert_eq!(config.store.store_config().cache_bytes, 8 * 1024 * 1024);
    let error = load_toml("[store]\ncache_bytes = 1000\n", &[]).expect_err("below 1 MiB");
    assert_eq!(
        error.to_string(),
        "configuration key `store.cache_bytes`: must be at least 1048576 (1 MiB)"
    );
}

/// A file of `tests/fixtures/tls`.
fn tls_fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tls")
        .join(name)
}

#[test]
fn tls_needs_a_certificate_and_its_key_that_load() {
    let toml = |cert: &str, key: &str| {
        format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            if cert.is_empty() {
                Path::new("").to_path_buf()
            } else {
                tls_fixture(cert)
            },
            if key.is_empty() {
                Path::new("").to_path_buf()
            } else {
                tls_fixture(key)
            },
        )
    };
    let config = load_toml(&toml("server.pem", "server.key"), &[]).expect("the fixtures load");
    assert!(config.tls_acceptor.is_some());
    assert!(Config::load(ConfigSources::default())
        .expect("the defaults are valid")
        .tls_acceptor
        .is_none());
    let cases = [
        (toml("server.pem", ""), "tls.key_file", "both or neither"),
        (toml("", "server.key"), "tls.cert_file", "both or neither"),
        (
            toml("missing.pem", "server.key"),
            "tls.cert_file",
            "missing.pem: I/O error",
        ),
        (
            toml("server.pem", "missing.key"),
            "tls.key_file",
            "missing.key: I/O error",
        ),
        (
            toml("server.key", "server.key"),
            "tls.cert_file",
            "holds no PEM certificate",
        ),
        (
            toml("server.pem", "server.pem"),
            "tls.key_file",
            "holds no PEM private key",
        ),
        (
            toml("ca.pem", "server.key"),
            "tls.key_file",
            "does not go with the certificate",
        ),
        (
            toml("server.pem", "server-encrypted.key"),
            "tls.key_file",
            "the private key is encrypted",
        ),
    ];
    for (text, key, detail) in cases {
        let error = load_toml(&text, &[]).expect_err(key).to_string();
        assert!(
            error.starts_with(&format!("configuration key `{key}`: ")) && error.contains(detail),
            "{error}"
        );
    }
    // The environment sets them too, and is named when they are wrong.
    let error = load_toml(
        "",
        &[(
            "LOCKSTEP_TLS_CERT_FILE",
            tls_fixture("server.pem").to_str().expect("UTF-8"),
        )],
    )
    .expect_err("no key")
    .to_string();
    assert!(error.contains("tls.key_file"), "{error}");
}

#[test]
fn a_mistake_in_a_peer_or_connector_entry_names_it_by_its_name() {
    let error = load_toml(
        "[[peers]]\nname = \"north\"\nurl = \"https://north.example\"\ntoken = \"t\"\nca_file = 5\n",
        &[],
    )
    .expect_err("ca_file is a path")
    .to_string();
    assert!(
        error.starts_with("configuration key `peers[north].ca_file`: invalid type"),
        "{error}"
    );
    let error = load_toml(
        "[[connectors]]\nname = \"a\"\nkind = \"k\"\nid_field = \"id\"\nwebhook_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nfields = { x = \"y\" }\n\n[[connectors]]\nname = \"b\"\nkind = 5\n",
        &[],
    )
    .expect_err("kind is a string")
    .to_string();
    assert!(
        error.starts_with("configuration key `connectors[b].kind`: invalid type"),
        "{error}"
    );
    // Without a name, the index is all there is.
    let error = load_toml("[[peers]]\nurl = 5\n", &[])
        .expect_err("no name")
        .to_string();
    assert!(error.starts_with("configuration key `peers[0]"), "{error}");
}
