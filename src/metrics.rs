//! Prometheus metrics: registered once, `etcd_squeeze_` prefix, units in names, `_total`
//! counters, histograms in seconds. Served as text on `metrics.listen` (see `crate::health`).
//!
//! This file is the registry and the metric types only; it imports nothing of the server.
//! Most metrics are incremented where the thing happens (`server::kv` for compression,
//! `server::watch` for watch streams, `upstream` for connections, `tls` for reloads);
//! requests by method and code, latency and in-flight counts come from `server::observe`, a
//! tower layer around the whole gRPC router.
//! Series whose labels are known at start (prefixes, decode error kinds) are created at zero,
//! so rates exist before the first event.

use std::sync::LazyLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::codec::EncodeOutcome;
use crate::rewrite::EncodeStats;

/// Latency buckets in seconds: 0.5 ms (a cached Range on loopback) to 10 s (a stalled etcd).
const LATENCY_BUCKETS_SECONDS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    names: Vec<String>,
    /// `etcd_squeeze_grpc_requests_total{method, code}`: finished calls (streams count when they end).
    pub grpc_requests: IntCounterVec,
    /// `etcd_squeeze_grpc_request_duration_seconds{method}`: unary call latency, request to trailers.
    pub grpc_request_duration: HistogramVec,
    /// `etcd_squeeze_grpc_inflight_requests`: calls and streams open now.
    pub grpc_inflight_requests: IntGauge,
    /// `etcd_squeeze_grpc_inflight_request_bytes`: request bytes received by unary and
    /// server-streaming calls that have not finished (what the proxy holds in memory).
    pub grpc_inflight_request_bytes: IntGauge,
    /// `etcd_squeeze_values_logical_bytes_total{prefix}`: value bytes written by clients, before compression.
    pub values_logical_bytes: IntCounterVec,
    /// `etcd_squeeze_values_stored_bytes_total{prefix}`: the same values as sent to etcd.
    pub values_stored_bytes: IntCounterVec,
    /// `etcd_squeeze_values_written_total{prefix, outcome}`: values written under a prefix by
    /// outcome: `compressed`, `raw_frame` (too small or did not shrink), `stored_as_is`.
    pub values_written: IntCounterVec,
    /// `etcd_squeeze_decode_errors_total{reason}`: stored frames that could not be decoded (passed on as stored).
    pub decode_errors: IntCounterVec,
    /// `etcd_squeeze_dictionary_cache_hits_total`: frames whose dictionary was cached.
    pub dictionary_cache_hits: IntCounter,
    /// `etcd_squeeze_dictionary_cache_misses_total`: frames whose dictionary had to be fetched.
    pub dictionary_cache_misses: IntCounter,
    /// `etcd_squeeze_dictionary_cache_fetches_total`: dictionaries read from the dictionary store.
    pub dictionary_cache_fetches: IntCounter,
    /// `etcd_squeeze_delta_writes_total{kind}`: values stored as delta frames, by `kind`:
    /// `delta` (against the key's current base) or `rebase` (a new base written in the same Txn).
    pub delta_writes: IntCounterVec,
    /// `etcd_squeeze_bases_deleted_total`: superseded bases deleted once compaction passed them.
    pub bases_deleted: IntCounter,
    /// `etcd_squeeze_base_cache_hits_total`: delta frames whose base was in memory.
    pub base_cache_hits: IntCounter,
    /// `etcd_squeeze_base_cache_misses_total`: delta frames whose base was not in memory
    /// decompressed (decompressed from a cached base record, else read from etcd).
    pub base_cache_misses: IntCounter,
    /// `etcd_squeeze_decoded_recalls_total`: delta frames not decompressed because the value
    /// was decoded (or written) lately (`delta::cache`).
    pub decoded_recalls: IntCounter,
    /// `etcd_squeeze_base_cache_record_hits_total`: decompressed-base misses served from a
    /// cached base record (decompressed, no etcd read).
    pub base_cache_record_hits: IntCounter,
    /// `etcd_squeeze_base_fetches_total`: base records read from etcd.
    pub base_fetches: IntCounter,
    /// `etcd_squeeze_base_fetched_bytes_total`: bytes of the base records read from etcd (what a
    /// base cache miss costs etcd).
    pub base_fetched_bytes: IntCounter,
    /// `etcd_squeeze_base_cache_bytes`: bases held in memory, decompressed and as records, and
    /// values lately decoded (bounded per prefix by `prefixes[].delta_base_cache`).
    pub base_cache_bytes: IntGauge,
    /// `etcd_squeeze_watch_streams_active`: client Watch streams open now.
    pub watch_streams_active: IntGauge,
    /// `etcd_squeeze_watch_events_total`: watch events passed to clients.
    pub watch_events: IntCounter,
    /// `etcd_squeeze_upstream_up{endpoint}`: 1 when the last readiness probe of the endpoint succeeded.
    pub upstream_up: IntGaugeVec,
    /// `etcd_squeeze_upstream_probe_duration_seconds{endpoint}`: readiness probe latency.
    pub upstream_probe_duration: HistogramVec,
    /// `etcd_squeeze_upstream_connections_open{endpoint}`: HTTP/2 connections to etcd open now.
    pub upstream_connections_open: IntGaugeVec,
    /// `etcd_squeeze_upstream_connects_total{endpoint, result}`: connection attempts (`ok`,
    /// `error`); more than one `ok` per endpoint means reconnects.
    pub upstream_connects: IntCounterVec,
    /// `etcd_squeeze_ready`: 1 while `/readyz` succeeds.
    pub ready: IntGauge,
    /// `etcd_squeeze_tls_reloads_total{side, result}`: TLS files re-read after a change.
    pub tls_reloads: IntCounterVec,
    /// `etcd_squeeze_tls_handshake_failures_total`: client connections refused during the TLS
    /// handshake (no or untrusted client certificate, timeout, protocol error).
    pub tls_handshake_failures: IntCounter,
    /// `etcd_squeeze_build_info{version}`: always 1.
    pub build_info: IntGaugeVec,
    /// `etcd_squeeze_replicas_announced`: replicas announced under `/etcd-squeeze/members/`
    /// (this one included; 0 while the view is not known).
    pub replicas_announced: IntGauge,
    /// `etcd_squeeze_replicas_reading{codec}`: announced replicas that read frames of `codec`
    /// (`raw`, `zstd`, `delta`).
    pub replicas_reading: IntGaugeVec,
    /// `etcd_squeeze_delta_writing{prefix}`: 1 while the prefix writes delta frames (`delta =
    /// true`, or `"auto"` with every replica reading them), else 0.
    pub delta_writing: IntGaugeVec,
    /// `etcd_squeeze_bases_swept_total{reason}`: bases the orphan sweep deleted: `key_gone` (the
    /// key was deleted, compaction passed the deletion) or `superseded` (no readable revision of
    /// the key uses it).
    pub bases_swept: IntCounterVec,
}

/// The decode error kinds of `etcd_squeeze_decode_errors_total{reason}` (see `DecodeReason::kind`).
pub const DECODE_ERROR_KINDS: &[&str] = &["header", "unknown_dictionary", "raw_with_dictionary", "no_content_size", "too_large", "frame_length", "zstd", "response_too_large", "base"];

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::register);

/// The process-wide metrics (registered on first use).
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn register() -> Metrics {
        let r = Registrar { registry: Registry::new(), names: std::cell::RefCell::new(Vec::new()) };
        let counter = |name: &str, help: &str| r.add(IntCounter::new(name, help));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| r.add(IntCounterVec::new(Opts::new(name, help), labels));
        let gauge = |name: &str, help: &str| r.add(IntGauge::new(name, help));
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| r.add(IntGaugeVec::new(Opts::new(name, help), labels));
        let histogram_vec = |name: &str, help: &str, labels: &[&str]| {
            r.add(HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS_SECONDS.to_vec()), labels))
        };
        let m = Metrics {
            grpc_requests: counter_vec(
                "etcd_squeeze_grpc_requests_total",
                "gRPC calls finished, by method (gRPC path) and status code; streams count when they end.",
                &["method", "code"],
            ),
            grpc_request_duration: histogram_vec(
                "etcd_squeeze_grpc_request_duration_seconds",
                "Latency of unary gRPC calls through the proxy, from request to trailers, by method.",
                &["method"],
            ),
            grpc_inflight_requests: gauge("etcd_squeeze_grpc_inflight_requests", "gRPC calls and streams in progress."),
            grpc_inflight_request_bytes: gauge(
                "etcd_squeeze_grpc_inflight_request_bytes",
                "Request bytes received by unary and server-streaming calls still in progress.",
            ),
            values_logical_bytes: counter_vec(
                "etcd_squeeze_values_logical_bytes_total",
                "Bytes of values written under a compressed prefix, as the client sent them.",
                &["prefix"],
            ),
            values_stored_bytes: counter_vec(
                "etcd_squeeze_values_stored_bytes_total",
                "Bytes of values written under a compressed prefix, as sent to etcd (frames).",
                &["prefix"],
            ),
            values_written: counter_vec(
                "etcd_squeeze_values_written_total",
                "Values written under a compressed prefix, by outcome: compressed, raw_frame (too small or did not shrink), stored_as_is.",
                &["prefix", "outcome"],
            ),
            decode_errors: counter_vec(
                "etcd_squeeze_decode_errors_total",
                "Stored frames that could not be decoded (passed on to clients as stored), by reason.",
                &["reason"],
            ),
            dictionary_cache_hits: counter("etcd_squeeze_dictionary_cache_hits_total", "Frames whose zstd dictionary was in the cache."),
            dictionary_cache_misses: counter(
                "etcd_squeeze_dictionary_cache_misses_total",
                "Frames whose zstd dictionary was not in the cache.",
            ),
            dictionary_cache_fetches: counter(
                "etcd_squeeze_dictionary_cache_fetches_total",
                "zstd dictionaries read from the dictionary store in etcd.",
            ),
            delta_writes: counter_vec(
                "etcd_squeeze_delta_writes_total",
                "Values stored as delta frames, by kind: delta (against the current base) or rebase (new base in the same Txn).",
                &["kind"],
            ),
            bases_deleted: counter("etcd_squeeze_bases_deleted_total", "Superseded bases deleted once compaction passed them."),
            base_cache_hits: counter("etcd_squeeze_base_cache_hits_total", "Delta frames whose base was in memory."),
            base_cache_misses: counter("etcd_squeeze_base_cache_misses_total", "Delta frames whose base was not in memory decompressed (decompressed from a cached base record, else read from etcd)."),
            decoded_recalls: counter("etcd_squeeze_decoded_recalls_total", "Delta frames not decompressed: the value was decoded or written lately."),
            base_cache_record_hits: counter("etcd_squeeze_base_cache_record_hits_total", "Decompressed-base misses served from a cached base record (no etcd read)."),
            base_fetches: counter("etcd_squeeze_base_fetches_total", "Base records read from etcd."),
            base_fetched_bytes: counter("etcd_squeeze_base_fetched_bytes_total", "Bytes of the base records read from etcd."),
            base_cache_bytes: gauge("etcd_squeeze_base_cache_bytes", "Delta-frame bases held in memory (decompressed, and as base records) and values lately decoded, bounded per prefix by delta_base_cache."),
            watch_streams_active: gauge("etcd_squeeze_watch_streams_active", "Client Watch streams open."),
            watch_events: counter("etcd_squeeze_watch_events_total", "Watch events passed to clients."),
            upstream_up: gauge_vec(
                "etcd_squeeze_upstream_up",
                "1 when the last readiness probe of the etcd endpoint succeeded, else 0.",
                &["endpoint"],
            ),
            upstream_probe_duration: histogram_vec(
                "etcd_squeeze_upstream_probe_duration_seconds",
                "Latency of the readiness probe (a count-only Range) per etcd endpoint.",
                &["endpoint"],
            ),
            upstream_connections_open: gauge_vec(
                "etcd_squeeze_upstream_connections_open",
                "HTTP/2 connections to the etcd endpoint that are open.",
                &["endpoint"],
            ),
            upstream_connects: counter_vec(
                "etcd_squeeze_upstream_connects_total",
                "Connection attempts to the etcd endpoint, by result (ok, error); repeated oks are reconnects.",
                &["endpoint", "result"],
            ),
            ready: gauge("etcd_squeeze_ready", "1 while the proxy is ready (etcd reachable, dictionary store readable)."),
            tls_reloads: counter_vec(
                "etcd_squeeze_tls_reloads_total",
                "TLS files re-read after they changed, by side (server, upstream) and result (ok, error).",
                &["side", "result"],
            ),
            tls_handshake_failures: counter(
                "etcd_squeeze_tls_handshake_failures_total",
                "Client connections that failed the TLS handshake (no or untrusted certificate, timeout).",
            ),
            build_info: gauge_vec("etcd_squeeze_build_info", "Always 1; the version label is the build's.", &["version"]),
            replicas_announced: gauge("etcd_squeeze_replicas_announced", "etcd-squeeze replicas announced under /etcd-squeeze/members/ (0 while unknown)."),
            replicas_reading: gauge_vec("etcd_squeeze_replicas_reading", "Announced replicas that read frames of the codec.", &["codec"]),
            delta_writing: gauge_vec("etcd_squeeze_delta_writing", "1 while the prefix writes delta frames, else 0.", &["prefix"]),
            bases_swept: counter_vec("etcd_squeeze_bases_swept_total", "Bases the orphan sweep deleted, by reason: key_gone or superseded.", &["reason"]),
            // Last: every metric above is registered by now.
            names: r.names.take(),
            registry: r.registry.clone(),
        };
        m.build_info.with_label_values(&[crate::VERSION]).set(1);
        for kind in DECODE_ERROR_KINDS {
            m.decode_errors.with_label_values(&[kind]).inc_by(0);
        }
        for kind in ["delta", "rebase"] {
            m.delta_writes.with_label_values(&[kind]).inc_by(0);
        }
        for side in ["server", "upstream"] {
            for result in ["ok", "error"] {
                m.tls_reloads.with_label_values(&[side, result]).inc_by(0);
            }
        }
        m
    }

    /// Creates the per-prefix series at zero, so a prefix's rates exist before its first write.
    pub fn init_prefixes<'a>(&self, prefixes: impl IntoIterator<Item = &'a str>) {
        for p in prefixes {
            self.values_logical_bytes.with_label_values(&[p]).inc_by(0);
            self.values_stored_bytes.with_label_values(&[p]).inc_by(0);
            for outcome in ["compressed", "raw_frame", "stored_as_is"] {
                self.values_written.with_label_values(&[p, outcome]).inc_by(0);
            }
        }
    }

    /// Counts the values of one rewritten request, per prefix.
    pub fn record_encode(&self, stats: &EncodeStats) {
        for p in &stats.by_prefix {
            let prefix = String::from_utf8_lossy(&p.prefix);
            self.values_logical_bytes.with_label_values(&[&prefix]).inc_by(p.bytes_in);
            self.values_stored_bytes.with_label_values(&[&prefix]).inc_by(p.bytes_out);
            for (outcome, n) in [
                (EncodeOutcome::Compressed, p.compressed),
                (EncodeOutcome::RawFrame, p.raw_frames),
                (EncodeOutcome::StoredAsIs, p.stored_as_is),
            ] {
                if n > 0 {
                    self.values_written.with_label_values(&[&prefix, outcome_label(outcome)]).inc_by(n);
                }
            }
        }
    }

    /// The name of every registered metric (histograms without their `_bucket`, `_sum`, `_count`).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode_text(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// Registers each metric once and remembers its name.
struct Registrar {
    registry: Registry,
    names: std::cell::RefCell<Vec<String>>,
}

impl Registrar {
    fn add<M: prometheus::core::Collector + Clone + 'static>(&self, metric: prometheus::Result<M>) -> M {
        let m = metric.expect("valid metric name and labels");
        self.names.borrow_mut().extend(m.desc().iter().map(|d| d.fq_name.clone()));
        self.registry.register(Box::new(m.clone())).expect("metric names are unique");
        m
    }
}

fn outcome_label(o: EncodeOutcome) -> &'static str {
    match o {
        EncodeOutcome::Compressed | EncodeOutcome::Delta => "compressed",
        EncodeOutcome::RawFrame => "raw_frame",
        EncodeOutcome::StoredAsIs => "stored_as_is",
        EncodeOutcome::Untouched => "untouched",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_named_by_the_rules() {
        let m = get();
        m.init_prefixes(["/p/"]);
        m.upstream_up.with_label_values(&["http://e:1"]).set(1);
        m.grpc_requests.with_label_values(&["/etcdserverpb.KV/Range", "OK"]).inc();
        m.grpc_request_duration.with_label_values(&["/etcdserverpb.KV/Range"]).observe(0.001);
        let text = m.encode_text();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = line.split(' ').skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("etcd_squeeze_"), "{name}");
            match kind {
                "counter" => assert!(name.ends_with("_total"), "{name}"),
                "histogram" => assert!(name.ends_with("_seconds"), "{name}"),
                "gauge" => assert!(!name.ends_with("_total"), "{name}"),
                other => panic!("{name}: unexpected type {other}"),
            }
        }
        assert!(text.contains("etcd_squeeze_values_written_total{outcome=\"raw_frame\",prefix=\"/p/\"} 0"), "{text}");
        assert!(text.contains("etcd_squeeze_decode_errors_total{reason=\"zstd\"} 0"));
    }
}
