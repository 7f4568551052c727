//! End-to-end tests: the real server (`server::run_with_store`, or the release binary in `crash`)
//! on `127.0.0.1:0` over real sled directories, spoken to over HTTP.
//!
//! `api` covers the entity endpoints, `changes` the change feed, `auth` tokens and roles,
//! `limits` body size, timeouts and the concurrency cap, `bad_input` every malformed request
//! (each must change nothing and leave the server serving), `shutdown` graceful shutdown with
//! writes in flight, `crash` kill -9 of the release binary, and `replication` sites peered with
//! each other (in process, and three release-binary processes with one killed and restarted),
//! and `priority` the CPU priorities of the release binary's threads.

mod api;
mod auth;
mod bad_input;
mod changes;
mod cli;
mod connector_model;
mod connectors;
mod crash;
mod limits;
mod priority;
mod replication;
mod shutdown;
mod tls;
