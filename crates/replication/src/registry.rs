//! The running replication: every known peer's state, the dialers for `[[peers]]`, and the
//! accepting side for peers that connect here with a `[[replication.tokens]]` token.
//!
//! A dialer reconnects forever with backoff; an accepted link runs until it ends. Both run a
//! `link` with a fresh `Session`. The HTTP upgrade and the status codes for a refused peer are
//! `server`'s business.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use store::Store;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::{tungstenite, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::activity::{Activity, Watched};
use crate::backoff::Backoff;
use crate::config::{Peer, ReplicationSettings, Token};
use crate::error::{Error, Result};
use crate::link;
use crate::session::{stored_cursor, Session, SessionSettings};
use crate::status::{PeerState, PeerStatus};

/// A long-running task: one dialer per `[[peers]]` entry.
pub type Worker = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Replication with every configured peer; cheap to clone.
#[derive(Clone)]
pub struct Replication {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    site: String,
    settings: ReplicationSettings,
    dialed: Vec<Peer>,
    tokens: Vec<(Token, String)>,
    peers: BTreeMap<String, Arc<PeerState>>,
    accepted: Arc<Semaphore>,
    /// Each accepting peer's own slots, [`MAX_LINKS_PER_PEER`] each.
    peer_links: BTreeMap<String, Arc<Semaphore>>,
}

/// The most links one peer may have accepted here at once: its link, and a few more while
/// links that a reconnect left behind wait out their idle timeout. Without it, one peer (a
/// buggy or compromised one) could take every `max_connections` slot and lock the others out.
pub const MAX_LINKS_PER_PEER: usize = 4;

/// Room for one accepted link: a slot of `max_connections` and one of its peer's own; both are
/// given back when it is dropped.
pub struct LinkSlot {
    _all: OwnedSemaphorePermit,
    _peer: OwnedSemaphorePermit,
}

/// Why [`Replication::admit`] refused a link.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` links are up.
    Full,
    /// The peer has [`MAX_LINKS_PER_PEER`] links up here already.
    PeerFull,
}

impl Replication {
    /// Replication for `store` as site `site`, dialing `dialed` and accepting the peers named by
    /// `settings.tokens`.
    ///
    /// # Errors
    /// Storage errors reading the peers' cursors.
    pub fn new(
        store: Store,
        site: &str,
        settings: ReplicationSettings,
        dialed: Vec<Peer>,
    ) -> store::Result<Self> {
        let mut peers = BTreeMap::new();
        for peer in &dialed {
            let cursor = stored_cursor(&store, &peer.name)?;
            peers.insert(
                peer.name.clone(),
                Arc::new(PeerState::new(&peer.name, Some(peer.url.clone()), cursor)),
            );
        }
        for token in &settings.tokens {
            if !peers.contains_key(&token.name) {
                let cursor = stored_cursor(&store, &token.name)?;
                peers.insert(
                    token.name.clone(),
                    Arc::new(PeerState::new(&token.name, None, cursor)),
                );
            }
        }
        let tokens = settings
            .tokens
            .iter()
            .map(|token| (token.token.clone(), token.name.clone()))
            .collect();
        let peer_links = settings
            .tokens
            .iter()
            .map(|token| {
                (
                    token.name.clone(),
                    Arc::new(Semaphore::new(MAX_LINKS_PER_PEER)),
                )
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                site: site.to_string(),
                accepted: Arc::new(Semaphore::new(settings.max_connections)),
                peer_links,
                settings,
                dialed,
                tokens,
                peers,
            }),
        })
    }

    /// This site's name, as sent to peers.
    pub fn site(&self) -> &str {
        &self.inner.site
    }

    /// One dialer per `[[peers]]` entry, named by the peer, to spawn on the server's task
    /// tracker; each runs until `shutdown` is cancelled.
    pub fn dialers(&self, shutdown: &CancellationToken) -> Vec<(String, Worker)> {
        self.inner
            .dialed
            .iter()
            .map(|peer| {
                let this = self.clone();
                let peer = peer.clone();
                let shutdown = shutdown.child_token();
                let name = peer.name.clone();
                let worker: Worker = Box::pin(async move { this.dial(peer, shutdown).await });
                (name, worker)
            })
            .collect()
    }

    /// The name of the peer whose token `presented` is, compared in constant time.
    pub fn identify(&self, presented: &str) -> Option<String> {
        let mut found = None;
        // Compare against every token, so the time taken does not say which one matched.
        for (token, name) in &self.inner.tokens {
            let matches: bool = token.expose().as_bytes().ct_eq(presented.as_bytes()).into();
            if matches {
                found = Some(name.clone());
            }
        }
        found
    }

    /// A slot for one more accepted link with `peer` (a name [`Replication::identify`] gave).
    ///
    /// # Errors
    /// [`Refusal::PeerFull`] when the peer has [`MAX_LINKS_PER_PEER`] links up here (or is not
    /// an accepting peer), [`Refusal::Full`] when `max_connections` links are up.
    pub fn admit(&self, peer: &str) -> Result<LinkSlot, Refusal> {
        let peer = self
            .inner
            .peer_links
            .get(peer)
            .and_then(|links| links.clone().try_acquire_owned().ok())
            .ok_or(Refusal::PeerFull)?;
        let all = self
            .inner
            .accepted
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Full)?;
        Ok(LinkSlot {
            _all: all,
            _peer: peer,
        })
    }

    /// Runs an accepted link with `peer` (identified by [`Replication::identify`]) over an
    /// upgraded HTTP connection, until it ends or `shutdown` is cancelled. Errors are logged and
    /// shown in the peer's status.
    pub async fn serve_upgraded<I>(
        &self,
        peer: String,
        io: I,
        slot: LinkSlot,
        shutdown: CancellationToken,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Some(state) = self.inner.peers.get(&peer).cloned() else {
            tracing::warn!(%peer, "an accepted link names no known peer");
            return;
        };
        let activity = Activity::default();
        let io = activity.watch(io);
        let socket =
            WebSocketStream::from_raw_socket(io, Role::Server, Some(link::websocket_config()))
                .await;
        let span = tracing::info_span!("link", direction = "accepted");
        async {
            tracing::info!("peer connected");
            self.run_link(socket, activity, &state, &shutdown).await;
        }
        .instrument(span)
        .await;
        drop(slot);
    }

    /// Every known peer's status, by name.
    pub fn statuses(&self) -> Vec<PeerStatus> {
        let head = self.inner.store.last_seq();
        self.inner
            .peers
            .values()
            .map(|peer| peer.status(head))
            .collect()
    }

    /// One peer's status, or `None` when no peer has this name.
    pub fn status(&self, name: &str) -> Option<PeerStatus> {
        let head = self.inner.store.last_seq();
        self.inner.peers.get(name).map(|peer| peer.status(head))
    }

    /// Dials `peer` until `shutdown`, reconnecting with backoff.
    async fn dial(self, peer: Peer, shutdown: CancellationToken) {
        let Some(state) = self.inner.peers.get(&peer.name).cloned() else {
            return;
        };
        let settings = &self.inner.settings;
        let mut backoff = Backoff::new(settings.reconnect_min, settings.reconnect_max);
        let span = tracing::info_span!("link", direction = "dialed");
        async {
            loop {
                let started = Instant::now();
                let activity = Activity::default();
                let connected = tokio::select! {
                    () = shutdown.cancelled() => return,
                    connected = connect(&peer, settings.idle_timeout, &activity) => connected,
                };
                match connected {
                    Ok(socket) => {
                        tracing::info!(url = %peer.url, "connected to peer");
                        self.run_link(socket, activity, &state, &shutdown).await;
                    }
                    Err(error) => state.failed(&error),
                }
                if shutdown.is_cancelled() {
                    return;
                }
                if started.elapsed() > settings.reconnect_max {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::debug!(?delay, "reconnecting after a pause");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
        .instrument(span)
        .await;
    }

    /// Runs a link over `socket`, whose connection stamps `activity`, until it ends, and reports
    /// how it ended.
    async fn run_link<S>(
        &self,
        socket: WebSocketStream<S>,
        activity: Activity,
        state: &PeerState,
        shutdown: &CancellationToken,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let store = self.inner.store.clone();
        let name = state.name().to_string();
        let site = self.inner.site.clone();
        let settings = SessionSettings {
            batch_entities: self.inner.settings.batch_entities,
            max_rounds: self.inner.settings.max_rounds,
            ..SessionSettings::default()
        };
        let opened =
            tokio::task::spawn_blocking(move || Session::open(store, &name, &site, settings))
                .await
                .map_err(Error::Task)
                .and_then(|opened| opened);
        let session = match opened {
            Ok(session) => session,
            Err(error) => {
                state.failed(&error);
                return;
            }
        };
        link::run(
            socket,
            activity,
            session,
            &self.inner.store,
            state,
            self.inner.settings.idle_timeout,
            shutdown,
        )
        .await;
    }
}

/// Opens a websocket to `peer`'s replication endpoint, presenting its token, over a connection
/// that stamps `activity`.
async fn connect(
    peer: &Peer,
    timeout: std::time::Duration,
    activity: &Activity,
) -> Result<WebSocketStream<MaybeTlsStream<Watched<TcpStream>>>> {
    let mut request = peer.endpoint.as_str().into_client_request()?;
    let bearer = HeaderValue::from_str(&format!("Bearer {}", peer.token.expose()))
        .map_err(|_| Error::Protocol("the peer token is not a valid header value".into()))?;
    request.headers_mut().insert(AUTHORIZATION, bearer);
    // A `wss://` endpoint always has its own configuration (see `tls`), never the default one.
    let connector = peer.tls.clone().map(tokio_tungstenite::Connector::Rustls);
    let connecting = async {
        let tcp = TcpStream::connect(&peer.address)
            .await
            .map_err(tungstenite::Error::Io)?;
        tcp.set_nodelay(true).map_err(tungstenite::Error::Io)?;
        tokio_tungstenite::client_async_tls_with_config(
            request,
            activity.watch(tcp),
            Some(link::websocket_config()),
            connector,
        )
        .await
    };
    match tokio::time::timeout(timeout, connecting).await {
        Err(_) => Err(Error::ConnectTimeout(timeout)),
        Ok(Ok((socket, _))) => Ok(socket),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .map(|body| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
                .unwrap_or_default();
            Err(Error::Refused {
                status,
                detail: body,
            })
        }
        Ok(Err(error)) => Err(error.into()),
    }
}
