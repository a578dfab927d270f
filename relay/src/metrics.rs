//! The server's counters and gauges, rendered in the Prometheus text format.
//!
//! Everything is kept in memory, so `/metrics` never waits for the storage.
//! The storage gauges (envelopes, pending bytes, mailboxes) count what this
//! process has seen: `cubbyhole::relay::RelayStorage` has no relay-wide
//! totals, so a mailbox holding envelopes from before the process started
//! is counted from the first time this process deposits to it or
//! acknowledges from it, and `devices` counts the devices first published
//! through this process. See the crate README.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// The metrics of one server.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<&'static str, u64>>,
    rejections: Mutex<BTreeMap<&'static str, u64>>,
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
    /// Fetches waiting for an envelope.
    pub(crate) long_polls: u64,
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
            "Fetches waiting for an envelope.",
            live.long_polls,
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
        out
    }
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
        let text = metrics.render(Live { long_polls: 3 });
        assert!(text.contains("cubbyhole_relay_requests_total{route=\"deposit\"} 2\n"));
        assert!(text.contains("cubbyhole_relay_requests_total{route=\"health\"} 0\n"));
        assert!(text.contains("cubbyhole_relay_rejections_total{reason=\"rate_requests\"} 1\n"));
        assert!(text.contains("cubbyhole_relay_deposits_total 1\n"));
        assert!(text.contains("cubbyhole_relay_long_polls 3\n"));
        for name in [
            "cubbyhole_relay_envelopes ",
            "cubbyhole_relay_mailboxes ",
            "cubbyhole_relay_devices ",
            "cubbyhole_relay_envelopes_expired_total ",
        ] {
            assert!(text.contains(name), "{name}");
        }
    }
}
