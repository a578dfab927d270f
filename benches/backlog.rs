//! The client layer receiving a backlog of 10,000 offline messages from an
//! in-process relay, with the in-memory store (`backlog/memory`); the SQLite
//! store is the `backlog_sqlite` bench (feature `sqlite`), HTTP on loopback
//! is `cubbyhole-relay`'s `backlog_http` bench. See `support/backlog.rs` for
//! the scenario and what is timed.
//!
//! ```text
//! cargo bench --bench backlog
//! cargo bench --features sqlite --bench backlog_sqlite
//! ```
//!
//! Criterion reports the median time for 10,000 messages and the rate
//! (`thrpt`, messages per second).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use cubbyhole::storage::MemoryStore;

#[path = "support/backlog.rs"]
mod support;

fn backlog(c: &mut Criterion) {
    let mut group = c.benchmark_group("backlog");
    support::bench(&mut group, "memory", Duration::from_secs(2), || {
        (MemoryStore::new(), ())
    });
    group.finish();
}

criterion_group!(benches, backlog);
criterion_main!(benches);
