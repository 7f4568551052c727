//! The store's integration tests: every test opens real sled directories in temp dirs and goes
//! through the public `Store` API, as `server` and `replication` do.

mod batch;
mod concurrency;
mod convergence;
mod entity;
mod feed;
mod harness;
mod hostile;
mod model;
mod persistence;
mod replicas;
mod rfc7386;
mod strategies;
