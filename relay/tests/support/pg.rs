//! Scratch PostgreSQL databases for the relay's PostgreSQL tests
//! (`tests/postgres.rs`, `tests/postgres_push.rs`, `tests/crash.rs`), and
//! how those tests are reported when there is no database.
//!
//! `CUBBYHOLE_TEST_POSTGRES` names a role that may `CREATE DATABASE`
//! (`postgres://user:password@host:port/db`, or a `key=value` string): each
//! test makes a database of its own and drops it at its end. The build
//! script (`relay/build.rs`) sets the cfg `cubbyhole_test_postgres` when
//! the variable is set at build time; without it every PostgreSQL test is
//! `#[ignore]`d, so the runner reports it as ignored, never as passed. Run
//! them with the variable set (or, with `-- --ignored`, they fail at once,
//! saying what is missing). Under `CI` the guard test
//! [`assert_not_ignored_in_ci`] fails if they would be ignored.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use postgres::{Client, NoTls};

pub const ENV: &str = "CUBBYHOLE_TEST_POSTGRES";

/// Fails under `CI` when the PostgreSQL tests were built to be ignored.
pub fn assert_not_ignored_in_ci() {
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    assert!(
        !in_ci || cfg!(cubbyhole_test_postgres),
        "{ENV} was not set when the tests were built, but CI is: \
         the PostgreSQL tests must not be ignored in CI"
    );
}

/// The administrative connection string; a test that runs without it
/// fails (it was built to run, or run with `--ignored`).
fn admin_url() -> String {
    match std::env::var(ENV) {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "{ENV} is not set: set it to postgres://user:password@host:port/db \
             (a role that may CREATE DATABASE) to run the PostgreSQL tests"
        ),
    }
}

/// `url` pointing at database `name` instead.
pub fn with_database(url: &str, name: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        // A key=value string: the last setting wins.
        return format!("{url} dbname={name}");
    };
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let path = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{name}{query}", &base[..path])
}

/// A database of its own for one test, dropped (connections and all) when
/// this is. Created and dropped outside any Tokio runtime (the blocking
/// PostgreSQL client runs one of its own).
pub struct TestDb {
    pub admin: String,
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// A fresh database named `cubbyhole_<prefix>_<pid>_<n>_<nanos>`.
    pub fn create(prefix: &str) -> TestDb {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let admin = admin_url();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "cubbyhole_{prefix}_{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut client = Client::connect(&admin, NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to {ENV}: {e:?}"));
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("cannot create a scratch database: {e:?}"));
        let url = with_database(&admin, &name);
        TestDb { admin, name, url }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Never panics (it may run while a failed test unwinds).
        let dropped = Client::connect(&self.admin, NoTls).and_then(|mut admin| {
            admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
        });
        if let Err(e) = dropped {
            eprintln!("could not drop scratch database {}: {e:?}", self.name);
        }
    }
}
