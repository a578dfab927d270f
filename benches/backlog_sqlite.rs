//! The client layer receiving a backlog of 10,000 offline messages from an
//! in-process relay, with the SQLite store (`backlog/sqlite`): a new
//! database file per run in the system's temporary directory, WAL,
//! `synchronous = FULL` (one fsync per committed batch), records encrypted
//! under the store key. See `support/backlog.rs` for the scenario and what is
//! timed.
//!
//! ```text
//! cargo bench --features sqlite --bench backlog_sqlite
//! ```

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use cubbyhole::storage::SqliteStore;

#[path = "support/backlog.rs"]
mod support;

use support::scenario::TempDir;

fn backlog(c: &mut Criterion) {
    let mut group = c.benchmark_group("backlog");
    support::bench(&mut group, "sqlite", Duration::from_secs(5), || {
        let dir = TempDir::new("cubbyhole-bench-backlog");
        let store = SqliteStore::open(dir.0.join("bob.db"), &[7; 32]).expect("SQLite store");
        (store, dir)
    });
    group.finish();
}

criterion_group!(benches, backlog);
criterion_main!(benches);
