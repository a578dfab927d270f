//! The server's counters, gauges and histograms, rendered in the
//! Prometheus text format.
//!
//! Everything is kept in memory, so `/metrics` never waits for the storage.
//! The storage gauges (envelopes, pending bytes, mailboxes) count what this
//! process has seen: `cubbyhole::relay::RelayStorage` has no relay-wide
//! totals, so a mailbox holding envelopes from before the process started
//! is counted from the first time this process deposits to it or
//! acknowledges from it, and `devices` counts the devices first published
//! through this process. See the crate README.
//!
//! Request latencies are one histogram per (route, method, status class):
//! the route is the matched route's name (never the raw path, which holds
//! keys and mailbox ids), the method one of a fixed few and the status its
//! class (`2xx`, ...), so the number of series is bounded whatever clients
//! send. The process metrics (`process_*`, the names Prometheus client
//! libraries use) are read from `/proc/self` on Linux at each scrape, and
//! absent elsewhere.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// The metrics of one server.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<&'static str, u64>>,
    rejections: Mutex<BTreeMap<&'static str, u64>>,
    latencies: Mutex<BTreeMap<SeriesKey, Histogram>>,
    /// Envelopes stored (not counting idempotent repeats).
    pub(crate) deposits: AtomicU64,
    /// Envelopes deleted by the retention sweeper.
    pub(crate) expired: AtomicU64,
    /// Pending envelopes (gauge, see the module docs).
    pub(crate) envelopes: AtomicU64,
    /// Their payload bytes (gauge).
    pub(crate) pending_bytes: AtomicU64,
    /// Mailboxes with pending envelopes (gauge).
    pub(crate) mailboxes: AtomicU64,
    /// Published devices (gauge).
    pub(crate) devices: AtomicU64,
}

/// A snapshot of values that live elsewhere.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Live {
    /// Fetches parked waiting for an envelope (their first listing found
    /// the mailbox empty; a deposit now wakes them).
    pub(crate) long_polls: u64,
    /// Connections open (admitted by the connection caps).
    pub(crate) connections: u64,
}

impl Metrics {
    /// A metrics set whose label values all start at zero.
    pub(crate) fn new(routes: &[&'static str], reasons: &[&'static str]) -> Self {
        let metrics = Metrics::default();
        {
            let mut requests = metrics.lock_requests();
            for route in routes {
                requests.insert(route, 0);
            }
        }
        {
            let mut rejections = metrics.lock_rejections();
            for reason in reasons {
                rejections.insert(reason, 0);
            }
        }
        metrics
    }

    // Counters only: a poisoned lock holds consistent numbers.
    fn lock_requests(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, u64>> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_rejections(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, u64>> {
        self.rejections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a request to `route`, rejected for `reason` if any.
    pub(crate) fn record(&self, route: &'static str, reason: Option<&'static str>) {
        *self.lock_requests().entry(route).or_insert(0) += 1;
        if let Some(reason) = reason {
            *self.lock_rejections().entry(reason).or_insert(0) += 1;
        }
    }

    /// Adds a request's latency to the histogram of its route, method and
    /// status class.
    pub(crate) fn observe(
        &self,
        route: &'static str,
        method: &str,
        status: u16,
        latency: Duration,
    ) {
        let key = SeriesKey {
            route,
            method: method_label(method),
            class: status_class(status),
        };
        self.latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .observe(latency.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self, live: Live) -> String {
        let mut out = String::with_capacity(2048);
        let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {value}");
        };
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {value}");
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            &mut out,
            "cubbyhole_relay_envelopes",
            "Pending envelopes (in mailboxes this process has seen).",
            load(&self.envelopes),
        );
        gauge(
            &mut out,
            "cubbyhole_relay_pending_bytes",
            "Payload bytes of the pending envelopes (in mailboxes this process has seen).",
            load(&self.pending_bytes),
        );
        gauge(
            &mut out,
            "cubbyhole_relay_mailboxes",
            "Mailboxes with pending envelopes (that this process has seen).",
            load(&self.mailboxes),
        );
        gauge(
            &mut out,
            "cubbyhole_relay_devices",
            "Published devices (first published through this process).",
            load(&self.devices),
        );
        gauge(
            &mut out,
            "cubbyhole_relay_long_polls",
            "Fetches parked waiting for an envelope (the mailbox was empty; a deposit wakes them).",
            live.long_polls,
        );
        gauge(
            &mut out,
            "cubbyhole_relay_connections",
            "Connections open (admitted by the connection caps).",
            live.connections,
        );
        counter(
            &mut out,
            "cubbyhole_relay_deposits_total",
            "Envelopes stored (idempotent repeats not counted).",
            load(&self.deposits),
        );
        counter(
            &mut out,
            "cubbyhole_relay_envelopes_expired_total",
            "Envelopes deleted by the retention sweeper.",
            load(&self.expired),
        );
        let _ = writeln!(
            out,
            "# HELP cubbyhole_relay_requests_total Requests by route."
        );
        let _ = writeln!(out, "# TYPE cubbyhole_relay_requests_total counter");
        for (route, n) in self.lock_requests().iter() {
            let _ = writeln!(
                out,
                "cubbyhole_relay_requests_total{{route=\"{route}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP cubbyhole_relay_rejections_total Error answers by reason."
        );
        let _ = writeln!(out, "# TYPE cubbyhole_relay_rejections_total counter");
        for (reason, n) in self.lock_rejections().iter() {
            let _ = writeln!(
                out,
                "cubbyhole_relay_rejections_total{{reason=\"{reason}\"}} {n}"
            );
        }
        self.render_latencies(&mut out);
        if let Some(process) = ProcessStats::read() {
            process.render(&mut out);
        }
        out
    }

    fn render_latencies(&self, out: &mut String) {
        let name = "cubbyhole_relay_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from a request's headers to its answer, by route, \
             method and status class."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        let latencies = self
            .latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (key, histogram) in latencies.iter() {
            let labels = format!(
                "route=\"{}\",method=\"{}\",status=\"{}\"",
                key.route, key.method, key.class
            );
            let mut cumulative = 0u64;
            for (bound, n) in LATENCY_BUCKETS.iter().zip(histogram.buckets.iter()) {
                cumulative += n;
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"+Inf\"}} {}",
                histogram.count
            );
            let _ = writeln!(out, "{name}_sum{{{labels}}} {}", histogram.sum);
            let _ = writeln!(out, "{name}_count{{{labels}}} {}", histogram.count);
        }
    }
}

/// Upper bounds of the latency buckets, in seconds: from half a
/// millisecond (a health check) to a minute (a long poll's wait plus the
/// request timeout).
pub(crate) const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The labels of one latency series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SeriesKey {
    route: &'static str,
    method: &'static str,
    class: &'static str,
}

/// The `method` label: one of a fixed few, so clients cannot add series.
fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        _ => "other",
    }
}

/// The `status` label: the status class.
fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// One latency histogram: per-bucket (not cumulative) counts, the count of
/// all observations (the `+Inf` bucket) and their sum.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// The process metrics, from `/proc/self` (Linux only).
#[derive(Clone, Copy, Debug, PartialEq)]
struct ProcessStats {
    resident_bytes: u64,
    virtual_bytes: u64,
    open_fds: u64,
    max_fds: Option<u64>,
    cpu_seconds: f64,
    start_time_seconds: f64,
}

impl ProcessStats {
    #[cfg(target_os = "linux")]
    fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let limits = std::fs::read_to_string("/proc/self/limits").ok();
        let ticks = std::fs::read("/proc/self/auxv")
            .ok()
            .and_then(|auxv| clock_ticks(&auxv))
            .unwrap_or(100);
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        parse_process(&stat, &status, &boot, limits.as_deref(), ticks, open_fds)
    }

    #[cfg(not(target_os = "linux"))]
    fn read() -> Option<ProcessStats> {
        None
    }

    fn render(&self, out: &mut String) {
        let mut one = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        one(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            self.resident_bytes.to_string(),
        );
        one(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            self.virtual_bytes.to_string(),
        );
        one(
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            self.open_fds.to_string(),
        );
        if let Some(max) = self.max_fds {
            one(
                "process_max_fds",
                "gauge",
                "Most open file descriptors allowed (soft limit).",
                max.to_string(),
            );
        }
        one(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
            self.cpu_seconds.to_string(),
        );
        one(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the unix epoch, in seconds.",
            self.start_time_seconds.to_string(),
        );
    }
}

/// `AT_CLKTCK` from `/proc/self/auxv` (pairs of native-endian words): the
/// unit of the times in `/proc/self/stat`.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn clock_ticks(auxv: &[u8]) -> Option<u64> {
    const AT_CLKTCK: u64 = 17;
    const WORD: usize = std::mem::size_of::<usize>();
    let word = |bytes: &[u8]| -> Option<u64> {
        let mut buf = [0u8; WORD];
        buf.copy_from_slice(bytes.get(..WORD)?);
        Some(usize::from_ne_bytes(buf) as u64)
    };
    auxv.chunks_exact(2 * WORD)
        .filter_map(|pair| Some((word(pair)?, word(&pair[WORD..])?)))
        .find(|(key, _)| *key == AT_CLKTCK)
        .map(|(_, value)| value)
        .filter(|ticks| *ticks > 0)
}

/// The process metrics from the texts of `/proc/self/stat`,
/// `/proc/self/status`, `/proc/stat` and `/proc/self/limits`.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse_process(
    stat: &str,
    status: &str,
    boot: &str,
    limits: Option<&str>,
    ticks: u64,
    open_fds: u64,
) -> Option<ProcessStats> {
    // The command name (field 2) is in parentheses and may hold anything:
    // the fields after it start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field n (1-based, as proc(5) numbers them) is fields[n - 3].
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let (utime, stime, start) = (field(14)?, field(15)?, field(22)?);
    let kib = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let value: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
        Some(value.saturating_mul(1024))
    };
    let btime: u64 = boot
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let max_fds = limits.and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    });
    let ticks = ticks as f64;
    Some(ProcessStats {
        resident_bytes: kib("VmRSS:").unwrap_or(0),
        virtual_bytes: kib("VmSize:").unwrap_or(0),
        open_fds,
        max_fds,
        cpu_seconds: (utime + stime) as f64 / ticks,
        start_time_seconds: btime as f64 + start as f64 / ticks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series() {
        let metrics = Metrics::new(&["health", "deposit"], &["rate_requests"]);
        metrics.record("deposit", None);
        metrics.record("deposit", Some("rate_requests"));
        metrics.deposits.fetch_add(1, Ordering::Relaxed);
        let text = metrics.render(Live {
            long_polls: 3,
            connections: 5,
        });
        assert!(text.contains("cubbyhole_relay_requests_total{route=\"deposit\"} 2\n"));
        assert!(text.contains("cubbyhole_relay_requests_total{route=\"health\"} 0\n"));
        assert!(text.contains("cubbyhole_relay_rejections_total{reason=\"rate_requests\"} 1\n"));
        assert!(text.contains("cubbyhole_relay_deposits_total 1\n"));
        assert!(text.contains("cubbyhole_relay_long_polls 3\n"));
        assert!(text.contains("cubbyhole_relay_connections 5\n"));
        for name in [
            "cubbyhole_relay_envelopes ",
            "cubbyhole_relay_mailboxes ",
            "cubbyhole_relay_devices ",
            "cubbyhole_relay_envelopes_expired_total ",
        ] {
            assert!(text.contains(name), "{name}");
        }
    }

    #[test]
    fn latency_series_are_bounded_and_cumulative() {
        let metrics = Metrics::new(&["health"], &[]);
        metrics.observe("health", "GET", 200, Duration::from_micros(300));
        metrics.observe("health", "GET", 204, Duration::from_millis(3));
        metrics.observe("health", "GET", 200, Duration::from_secs(120));
        metrics.observe("health", "BREW", 418, Duration::from_millis(3));
        metrics.observe("health", "WHATEVER", 404, Duration::from_millis(3));
        let text = metrics.render(Live::default());
        let series = "cubbyhole_relay_request_duration_seconds";
        let ok = "route=\"health\",method=\"GET\",status=\"2xx\"";
        assert!(text.contains(&format!("{series}_bucket{{{ok},le=\"0.0005\"}} 1\n")));
        assert!(text.contains(&format!("{series}_bucket{{{ok},le=\"0.0025\"}} 1\n")));
        assert!(text.contains(&format!("{series}_bucket{{{ok},le=\"0.005\"}} 2\n")));
        assert!(text.contains(&format!("{series}_bucket{{{ok},le=\"60\"}} 2\n")));
        assert!(text.contains(&format!("{series}_bucket{{{ok},le=\"+Inf\"}} 3\n")));
        assert!(text.contains(&format!("{series}_count{{{ok}}} 3\n")));
        // Unknown methods share one series.
        let other = "route=\"health\",method=\"other\",status=\"4xx\"";
        assert!(text.contains(&format!("{series}_count{{{other}}} 2\n")));
        assert!(!text.contains("BREW"));
    }

    #[test]
    fn parses_proc_files() {
        // proc(5): fields 14, 15 (utime, stime) and 22 (starttime) in
        // clock ticks; a command name with spaces and parentheses.
        let mut fields: Vec<String> = (3..=52).map(|n| format!("{n}")).collect();
        fields[14 - 3] = "250".into();
        fields[15 - 3] = "50".into();
        fields[22 - 3] = "1000".into();
        let stat = format!("4242 (we) ird) {}\n", fields.join(" "));
        let status = "Name:\twe\nVmSize:\t  2048 kB\nVmRSS:\t   100 kB\n";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        let stats = parse_process(&stat, status, boot, Some(limits), 100, 7).unwrap();
        assert_eq!(
            stats,
            ProcessStats {
                resident_bytes: 102_400,
                virtual_bytes: 2_097_152,
                open_fds: 7,
                max_fds: Some(1024),
                cpu_seconds: 3.0,
                start_time_seconds: 1_700_000_010.0,
            }
        );
        assert_eq!(parse_process("garbage", status, boot, None, 100, 1), None);
        assert_eq!(parse_process(&stat, status, "", None, 100, 1), None);

        let word = std::mem::size_of::<usize>();
        let mut auxv = Vec::new();
        for (key, value) in [(6usize, 4096usize), (17, 250), (0, 0)] {
            auxv.extend_from_slice(&key.to_ne_bytes());
            auxv.extend_from_slice(&value.to_ne_bytes());
        }
        assert_eq!(clock_ticks(&auxv), Some(250));
        assert_eq!(clock_ticks(&auxv[..2 * word]), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let stats = ProcessStats::read().expect("/proc is readable");
        assert!(stats.resident_bytes > 0);
        assert!(stats.virtual_bytes >= stats.resident_bytes);
        assert!(stats.open_fds >= 3);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(stats.start_time_seconds > 1.0e9 && stats.start_time_seconds <= now + 1.0);
    }
}
