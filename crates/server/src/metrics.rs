//! `/metrics`: request counts and latencies recorded by `telemetry`, and the store's counters,
//! in the Prometheus text exposition format (version 0.0.4).
//!
//! Labels are bounded: the route is the matched route template (`/v1/entities/{kind}/{id}`), never
//! the raw path, so the number of series does not grow with the number of entities.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::state::AppState;

/// Upper bounds of the latency histogram's buckets, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// HTTP request counters and latency histograms.
///
/// The maps sit behind a `std::sync::Mutex` because each update is a few arithmetic operations
/// and no lock is ever held across an `.await`.
#[derive(Default)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<RequestLabels, u64>>,
    latencies: Mutex<BTreeMap<String, Histogram>>,
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Default)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

impl Metrics {
    /// Records one finished request. `route` is a route template or `"unmatched"`.
    pub(crate) fn record(&self, route: &str, method: &str, status: u16, latency: Duration) {
        let labels = RequestLabels {
            route: route.to_string(),
            method: method.to_string(),
            status,
        };
        *lock(&self.requests).entry(labels).or_default() += 1;
        let seconds = latency.as_secs_f64();
        let mut latencies = lock(&self.latencies);
        if !latencies.contains_key(route) {
            latencies.insert(route.to_string(), Histogram::default());
        }
        let Some(histogram) = latencies.get_mut(route) else {
            return;
        };
        for (bucket, bound) in histogram.buckets.iter_mut().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        histogram.count += 1;
        histogram.sum_seconds += seconds;
    }

    /// The exposition text: HTTP metrics, then the store's counters and the admission gauge.
    fn render(&self, store: store::StoreStats, in_flight: usize) -> String {
        let mut out = String::new();
        out.push_str("# HELP lockstep_http_requests_total HTTP requests answered, by route, method and status.\n");
        out.push_str("# TYPE lockstep_http_requests_total counter\n");
        for (labels, count) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "lockstep_http_requests_total{{route=\"{}\",method=\"{}\",status=\"{}\"}} {count}",
                escape(&labels.route),
                escape(&labels.method),
                labels.status
            );
        }
        out.push_str("# HELP lockstep_http_request_duration_seconds Time until the response started, by route.\n");
        out.push_str("# TYPE lockstep_http_request_duration_seconds histogram\n");
        for (route, histogram) in lock(&self.latencies).iter() {
            let route = escape(route);
            for (bound, count) in LATENCY_BUCKETS.iter().zip(histogram.buckets) {
                let _ = writeln!(
                    out,
                    "lockstep_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "lockstep_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                histogram.count
            );
            let _ = writeln!(
                out,
                "lockstep_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                histogram.sum_seconds
            );
            let _ = writeln!(
                out,
                "lockstep_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                histogram.count
            );
        }
        let store_metrics = [
            (
                "lockstep_http_requests_in_flight",
                "gauge",
                "/v1 requests being handled now.",
                in_flight as u64,
            ),
            (
                "lockstep_store_writes_total",
                "counter",
                "Changes committed since the store was opened.",
                store.writes,
            ),
            (
                "lockstep_store_built_writes_total",
                "counter",
                "Local edits built as changes without Automerge's transaction (a subset of the writes).",
                store.built_writes,
            ),
            (
                "lockstep_store_index_only_writes_total",
                "counter",
                "Built writes of entities whose documents were evicted, made from their write indexes without loading them (a subset of the built writes).",
                store.index_only_writes,
            ),
            (
                "lockstep_store_flushes_total",
                "counter",
                "Group flushes run since the store was opened.",
                store.flushes,
            ),
            (
                "lockstep_store_blob_syncs_total",
                "counter",
                "Files of values or pages over about 128 KiB that sled wrote outside its log, synced: after every flush in fsync mode, every 500 ms by a thread of their own in flush mode.",
                store.blob_syncs,
            ),
            (
                "lockstep_store_cache_hits_total",
                "counter",
                "Document reads served from the cache.",
                store.cache_hits,
            ),
            (
                "lockstep_store_cache_misses_total",
                "counter",
                "Document reads that loaded from disk.",
                store.cache_misses,
            ),
            (
                "lockstep_store_cached_documents",
                "gauge",
                "Documents loaded in the cache now.",
                store.cached_documents,
            ),
            (
                "lockstep_store_cached_document_bytes",
                "gauge",
                "What the documents in the cache are estimated to take in memory, in bytes.",
                store.cached_document_bytes,
            ),
            (
                "lockstep_store_cached_write_indexes",
                "gauge",
                "Write indexes kept of documents evicted from the cache.",
                store.cached_write_indexes,
            ),
            (
                "lockstep_feed_seq",
                "gauge",
                "The highest durable feed sequence number (the feed's length).",
                store.feed_seq,
            ),
        ];
        for (name, kind, help, value) in store_metrics {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}

/// Locks a metrics map; a poisoned lock only means a panic mid-update, and a counter that is off
/// by one is better than no metrics at all.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Escapes a label value as the exposition format requires.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `GET /metrics`.
pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let in_flight = state
        .config
        .limits
        .max_concurrent_requests
        .saturating_sub(state.admission.available_permits());
    let mut text = state.metrics.render(state.store.stats(), in_flight);
    if let Some(validity) = state
        .config
        .tls_acceptor
        .as_ref()
        .and_then(crate::tls::Acceptor::validity)
    {
        let name = "lockstep_tls_certificate_not_after_seconds";
        let _ = writeln!(
            text,
            "# HELP {name} When the server's TLS certificate expires, in seconds since the Unix epoch.\n# TYPE {name} gauge\n{name} {}",
            validity.not_after
        );
    }
    crate::connectors::render_metrics(&state, &mut text);
    crate::replication::render_metrics(&state, &mut text);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}
