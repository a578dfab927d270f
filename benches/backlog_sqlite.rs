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

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use cubbyhole::storage::SqliteStore;

#[path = "support/backlog.rs"]
mod support;

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static RUN: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cubbyhole-bench-backlog-{}-{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn backlog(c: &mut Criterion) {
    let mut group = c.benchmark_group("backlog");
    support::bench(&mut group, "sqlite", Duration::from_secs(5), || {
        let dir = TempDir::new();
        let store = SqliteStore::open(dir.0.join("bob.db"), &[7; 32]).expect("SQLite store");
        (store, dir)
    });
    group.finish();
}

criterion_group!(benches, backlog);
criterion_main!(benches);
