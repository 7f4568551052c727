//! `Cluster`: several stores in temp dirs, connected by in-memory connections that carry frames
//! between `Session`s, with the faults a network and a machine can produce.
//!
//! A connection is two FIFO queues and a session at each end. A lost or reordered frame is what
//! a real connection turns into a disconnect (TCP delivers in order or not at all), so both end
//! the connection: both sessions and their sync states are dropped, and the next step reconnects
//! with fresh ones. A duplicated frame is delivered twice: the session must cope or fail, and a
//! failure is a disconnect too. A restart closes a store and opens its directory again. After
//! every frame, the receiving site's cursor is checked against what it claims to have.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use replication::{stored_cursor, Frame, Session, SessionSettings};
use serde_json::{Map, Value as Json};
use store::{EntityKey, Origin, Seq, Store, StoreConfig, WriteOptions};
use tempfile::TempDir;

/// Each site's view of one entity: its version and its fields (`None` where it lacks it).
pub type Views = Vec<(Option<String>, Option<Map<String, Json>>)>;

/// One site.
pub struct Node {
    pub name: String,
    dir: TempDir,
    store: Option<Store>,
}

impl Node {
    pub fn store(&self) -> &Store {
        self.store
            .as_ref()
            .expect("the store is open between restarts")
    }
}

/// One link between two sites.
pub struct Connection {
    pub ends: (usize, usize),
    /// The session at `ends.0` (talking to `ends.1`) and the one at `ends.1`; `None` while down.
    sessions: Option<(Session, Session)>,
    /// Frames on their way to `ends.1`, and to `ends.0`.
    queues: [VecDeque<Frame>; 2],
    /// Whether a duplicated frame went over this connection since it was set up: its sessions
    /// may fail later because of it, which is a disconnect like any other.
    tainted: bool,
    /// How far the cursor at `ends.0` (of `ends.1`'s feed), and the one at `ends.1`, have been
    /// checked against what they claim (see `Cluster::check_cursor`).
    verified: [Seq; 2],
}

/// What moved, for the termination bound and the assertions.
#[derive(Debug, Default)]
pub struct Tally {
    pub delivered: u64,
    pub disconnects: u64,
    /// Session errors, each with whether its connection had carried a duplicated frame.
    pub errors: Vec<(bool, String)>,
}

impl Tally {
    /// The errors on connections that never carried a duplicate: each is a bug.
    pub fn unexplained_errors(&self, from: usize) -> Vec<String> {
        self.errors[from..]
            .iter()
            .filter(|(tainted, _)| !tainted)
            .map(|(_, error)| error.clone())
            .collect()
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub connections: Vec<Connection>,
    settings: SessionSettings,
    pub tally: Tally,
}

fn open(dir: &TempDir) -> Store {
    let mut config = StoreConfig::new(dir.path());
    config.sled_cache_bytes = 2 * 1024 * 1024;
    config.cache_entries = 8;
    Store::open(config).expect("the store opens")
}

impl Cluster {
    /// `count` sites named `s0`, `s1`, ..., connected along `links`.
    pub fn new(count: usize, links: &[(usize, usize)], settings: SessionSettings) -> Self {
        let nodes = (0..count)
            .map(|index| {
                let dir = tempfile::tempdir().expect("a temp dir");
                let store = Some(open(&dir));
                Node {
                    name: format!("s{index}"),
                    dir,
                    store,
                }
            })
            .collect();
        let connections = links
            .iter()
            .map(|&ends| Connection {
                ends,
                sessions: None,
                queues: [VecDeque::new(), VecDeque::new()],
                tainted: false,
                verified: [Seq::ZERO; 2],
            })
            .collect();
        Self {
            nodes,
            connections,
            settings,
            tally: Tally::default(),
        }
    }

    /// A ring over `count` sites (every pair, for three).
    pub fn ring(count: usize) -> Vec<(usize, usize)> {
        (0..count)
            .map(|index| (index, (index + 1) % count))
            .collect()
    }

    /// Every pair of `count` sites.
    pub fn mesh(count: usize) -> Vec<(usize, usize)> {
        let mut links = Vec::new();
        for a in 0..count {
            for b in a + 1..count {
                links.push((a, b));
            }
        }
        links
    }

    pub fn write(&mut self, node: usize, id: &str, patch: &Json) {
        let key = EntityKey::new("item", id).expect("a valid key");
        let options = WriteOptions::new(Origin::local("writer").expect("valid"));
        // A patch that would create an entity with no fields is refused; that is fine here.
        let _ = self.nodes[node].store().patch(&key, patch, &options);
    }

    pub fn delete(&mut self, node: usize, id: &str) {
        let key = EntityKey::new("item", id).expect("a valid key");
        let options = WriteOptions::new(Origin::local("writer").expect("valid"));
        self.nodes[node]
            .store()
            .delete(&key, &options)
            .expect("a delete");
    }

    /// Closes a site's store and opens it again; its connections go down.
    pub fn restart(&mut self, node: usize) {
        for index in 0..self.connections.len() {
            let (a, b) = self.connections[index].ends;
            if a == node || b == node {
                self.disconnect(index);
            }
        }
        let site = &mut self.nodes[node];
        let store = site.store.take().expect("open");
        store.close().expect("closing flushes");
        drop(store);
        site.store = Some(open(&site.dir));
    }

    /// Ends a connection: both sessions and every frame in flight are gone.
    pub fn disconnect(&mut self, index: usize) {
        let connection = &mut self.connections[index];
        if connection.sessions.take().is_some() {
            self.tally.disconnects += 1;
        }
        connection.queues[0].clear();
        connection.queues[1].clear();
        connection.tainted = false;
    }

    fn connect(&mut self, index: usize) {
        if self.connections[index].sessions.is_some() {
            return;
        }
        let (a, b) = self.connections[index].ends;
        let (name_a, name_b) = (self.nodes[a].name.clone(), self.nodes[b].name.clone());
        let at_a = Session::open(
            self.nodes[a].store().clone(),
            &name_b,
            &name_a,
            self.settings,
        )
        .expect("a session opens");
        let at_b = Session::open(
            self.nodes[b].store().clone(),
            &name_a,
            &name_b,
            self.settings,
        )
        .expect("a session opens");
        let connection = &mut self.connections[index];
        connection.queues[0].push_back(at_a.hello());
        connection.queues[1].push_back(at_b.hello());
        connection.sessions = Some((at_a, at_b));
    }

    /// Lets both ends of a connection notice their local feed; returns whether anything was sent.
    fn poll_feeds(&mut self, index: usize) -> bool {
        let connection = &mut self.connections[index];
        let Some((at_a, at_b)) = connection.sessions.as_mut() else {
            return false;
        };
        let from_a = at_a.poll_feed();
        let from_b = at_b.poll_feed();
        match (from_a, from_b) {
            (Ok(from_a), Ok(from_b)) => {
                let sent = !from_a.is_empty() || !from_b.is_empty();
                connection.queues[0].extend(from_a);
                connection.queues[1].extend(from_b);
                sent
            }
            (Err(error), _) | (_, Err(error)) => {
                let tainted = connection.tainted;
                self.tally.errors.push((tainted, error.to_string()));
                self.disconnect(index);
                false
            }
        }
    }

    /// Delivers the next frame travelling `direction` (0: towards `ends.1`), `times` times;
    /// returns whether there was one.
    pub fn deliver(&mut self, index: usize, direction: usize, times: usize) -> bool {
        self.connect(index);
        self.poll_feeds(index);
        let connection = &mut self.connections[index];
        let Some(frame) = connection.queues[direction].pop_front() else {
            return false;
        };
        if times > 1 {
            connection.tainted = true;
        }
        for _ in 0..times {
            let Some((at_a, at_b)) = connection.sessions.as_mut() else {
                return true;
            };
            let receiver = if direction == 0 { at_b } else { at_a };
            self.tally.delivered += 1;
            match receiver.receive(frame.clone()) {
                Ok(out) => connection.queues[1 - direction].extend(out),
                Err(error) => {
                    let tainted = connection.tainted;
                    self.tally.errors.push((tainted, error.to_string()));
                    self.disconnect(index);
                    return true;
                }
            }
        }
        self.check_cursor(index, 1 - direction);
        true
    }

    /// Checks that the cursor at end `at` of a connection (0: `ends.0`) claims no more than is
    /// there: every row of the other end's feed up to it, except those that came from this very
    /// site, is at its version here. Rows checked once stay checked: entities only gain changes.
    fn check_cursor(&mut self, index: usize, at: usize) {
        let (a, b) = self.connections[index].ends;
        let (here, there) = if at == 0 { (a, b) } else { (b, a) };
        let (store, peer) = (self.nodes[here].store(), self.nodes[there].store());
        let cursor = stored_cursor(store, &self.nodes[there].name).expect("the cursor reads");
        let from = self.connections[index].verified[at];
        if cursor <= from {
            return;
        }
        let came_from_here = format!("peer:{}", self.nodes[here].name);
        for row in peer.feed(from, None, usize::MAX).expect("the feed reads") {
            if row.seq > cursor {
                break;
            }
            if row.origin.as_str() == came_from_here {
                continue;
            }
            let key = EntityKey {
                kind: row.kind,
                id: row.id,
            };
            assert!(
                store.has_version(&key, &row.version).expect("reads"),
                "{} consumed {}'s feed up to {cursor} but lacks {key} at row {}",
                self.nodes[here].name,
                self.nodes[there].name,
                row.seq
            );
        }
        self.connections[index].verified[at] = cursor;
    }

    /// Reconnects everything and moves frames, fault-free, until no connection has anything
    /// left to say; returns the frames delivered, or `None` when `limit` was reached first.
    pub fn settle(&mut self, limit: u64) -> Option<u64> {
        let start = self.tally.delivered;
        loop {
            let mut moved = false;
            for index in 0..self.connections.len() {
                self.connect(index);
                moved |= self.poll_feeds(index);
                for direction in [0, 1] {
                    while self.deliver(index, direction, 1) {
                        moved = true;
                        if self.tally.delivered - start > limit {
                            return None;
                        }
                    }
                }
            }
            if !moved {
                return Some(self.tally.delivered - start);
            }
        }
    }

    /// The connections whose sessions are not both idle (a batch or a request still in flight),
    /// by their ends' names; after [`Cluster::settle`], any is a batch that waits for ever.
    pub fn busy_connections(&self) -> Vec<(String, String)> {
        self.connections
            .iter()
            .filter(|connection| {
                connection
                    .sessions
                    .as_ref()
                    .is_some_and(|(a, b)| !a.is_idle() || !b.is_idle())
            })
            .map(|connection| {
                (
                    self.nodes[connection.ends.0].name.clone(),
                    self.nodes[connection.ends.1].name.clone(),
                )
            })
            .collect()
    }

    /// Every entity any site has, with each site's view of it.
    pub fn snapshot(&self) -> BTreeMap<EntityKey, Views> {
        let mut keys = BTreeSet::new();
        for node in &self.nodes {
            for row in node
                .store()
                .feed(store::Seq::ZERO, None, usize::MAX)
                .expect("the feed reads")
            {
                keys.insert(EntityKey {
                    kind: row.kind,
                    id: row.id,
                });
            }
        }
        keys.into_iter()
            .map(|key| {
                let views = self
                    .nodes
                    .iter()
                    .map(|node| {
                        let store = node.store();
                        (
                            store.version(&key).expect("read"),
                            store.get(&key).expect("read").map(|entity| entity.data),
                        )
                    })
                    .collect();
                (key, views)
            })
            .collect()
    }
}
