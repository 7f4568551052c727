//! Validation names the key at fault and derives the endpoint URL.

use std::time::Duration;

use super::*;

fn settings() -> ReplicationSettings {
    ReplicationSettings {
        site: "north".into(),
        tokens: vec![PeerToken {
            name: "south".into(),
            token: Token::new("s3cret"),
        }],
        batch_entities: 256,
        max_rounds: 32,
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(30),
        max_connections: 64,
    }
}

fn peer(name: &str, url: &str) -> PeerConfig {
    PeerConfig {
        name: name.into(),
        url: url.into(),
        token: Token::new("t0ken"),
        ca_file: None,
    }
}

/// A file of `tests/fixtures/tls`.
fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tls")
        .join(name)
}

fn peer_trusting(name: &str, url: &str, ca_file: std::path::PathBuf) -> PeerConfig {
    PeerConfig {
        ca_file: Some(ca_file),
        ..peer(name, url)
    }
}

#[test]
fn valid_peers_get_their_websocket_endpoint() {
    let peers = validate(
        &settings(),
        &[
            peer("south", "http://127.0.0.1:7878"),
            peer("east", "ws://east.example:80/"),
            peer("west", "http://proxy.example:8080/west/"),
            peer("north", "https://north.example:7878"),
            peer_trusting("hub", "wss://hub.example/sites/", fixture("ca.pem")),
            // Schemes are case-insensitive; an empty ca_file is none.
            peer_trusting("upper", "HTTPS://east.example", std::path::PathBuf::new()),
            peer("mixed", "Http://west.example"),
        ],
    )
    .expect("valid");
    assert_eq!(peers[0].endpoint, "ws://127.0.0.1:7878/v1/replication");
    assert_eq!(peers[1].endpoint, "ws://east.example:80/v1/replication");
    assert_eq!(
        peers[2].endpoint,
        "ws://proxy.example:8080/west/v1/replication"
    );
    assert_eq!(format!("{:?}", peers[0].token), "***");
    assert_eq!(peers[3].endpoint, "wss://north.example:7878/v1/replication");
    assert_eq!(peers[4].endpoint, "wss://hub.example/sites/v1/replication");
    assert_eq!(peers[5].endpoint, "wss://east.example/v1/replication");
    assert_eq!(peers[6].endpoint, "ws://west.example/v1/replication");
    let secure: Vec<bool> = peers.iter().map(|peer| peer.tls.is_some()).collect();
    assert_eq!(secure, [false, false, false, true, true, true, false]);
    // What the dialer connects to: the URL's port, or its scheme's.
    let addresses: Vec<&str> = peers.iter().map(|peer| peer.address.as_str()).collect();
    assert_eq!(
        addresses,
        [
            "127.0.0.1:7878",
            "east.example:80",
            "proxy.example:8080",
            "north.example:7878",
            "hub.example:443",
            "east.example:443",
            "west.example:80"
        ]
    );
}

/// An IPv6 literal keeps its brackets, which is the form `TcpStream::connect` takes.
#[tokio::test]
async fn an_ipv6_literal_peer_gives_an_address_that_connects() {
    let Ok(listener) = tokio::net::TcpListener::bind("[::1]:0").await else {
        // A machine without IPv6 on its loopback has nothing to test here.
        return;
    };
    let port = listener.local_addr().expect("an address").port();
    let peers =
        validate(&settings(), &[peer("six", &format!("http://[::1]:{port}"))]).expect("valid");
    assert_eq!(peers[0].address, format!("[::1]:{port}"));
    let (connected, accepted) = tokio::join!(
        tokio::net::TcpStream::connect(&peers[0].address),
        listener.accept()
    );
    connected.expect("connected");
    accepted.expect("accepted");
}

#[test]
fn each_mistake_names_its_key() {
    let cases: Vec<(ReplicationSettings, Vec<PeerConfig>, &str)> = vec![
        (
            settings(),
            vec![peer("bad name", "http://a:1")],
            "peers.name",
        ),
        (
            settings(),
            vec![peer("a", "http://a:1"), peer("a", "http://b:1")],
            "peers.name",
        ),
        (settings(), vec![peer("a", "ftp://a:1")], "peers[a].url"),
        (settings(), vec![peer("a", "https://")], "peers[a].url"),
        (
            settings(),
            vec![peer_trusting("a", "http://a:1", fixture("ca.pem"))],
            "peers[a].ca_file",
        ),
        (
            settings(),
            vec![peer_trusting("a", "https://a:1", fixture("missing.pem"))],
            "peers[a].ca_file",
        ),
        (
            settings(),
            vec![peer_trusting("a", "https://a:1", fixture("server.key"))],
            "peers[a].ca_file",
        ),
        (settings(), vec![peer("a", "http://")], "peers[a].url"),
        (
            settings(),
            vec![peer("a", "http://a:1/?x=1")],
            "peers[a].url",
        ),
        (
            settings(),
            vec![peer("a", "http://a:1#top")],
            "peers[a].url",
        ),
        (
            ReplicationSettings {
                batch_entities: 0,
                ..settings()
            },
            vec![],
            "replication.batch_entities",
        ),
        (
            ReplicationSettings {
                site: "no spaces".into(),
                ..settings()
            },
            vec![],
            "replication.site",
        ),
        (
            // A third of it is the ping period, which may not be zero.
            ReplicationSettings {
                idle_timeout: Duration::from_nanos(2),
                ..settings()
            },
            vec![],
            "replication.idle_timeout",
        ),
        (
            // Added to the current instant, which panics past its range; a day is the bound.
            ReplicationSettings {
                idle_timeout: Duration::from_secs(24 * 3600 + 1),
                ..settings()
            },
            vec![],
            "replication.idle_timeout",
        ),
        (
            ReplicationSettings {
                reconnect_max: Duration::from_millis(1),
                ..settings()
            },
            vec![],
            "replication.reconnect_max",
        ),
        (
            ReplicationSettings {
                tokens: vec![
                    PeerToken {
                        name: "a".into(),
                        token: Token::new("same"),
                    },
                    PeerToken {
                        name: "b".into(),
                        token: Token::new("same"),
                    },
                ],
                ..settings()
            },
            vec![],
            "replication.tokens.token",
        ),
    ];
    for (settings, peers, key) in cases {
        let error = validate(&settings, &peers).expect_err(key);
        assert_eq!(error.key, key, "{error}");
    }
    let mut empty_token = peer("a", "http://a:1");
    empty_token.token = Token::new("");
    assert_eq!(
        validate(&settings(), &[empty_token])
            .expect_err("empty")
            .key,
        "peers[a].token"
    );
}
