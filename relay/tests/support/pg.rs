//! Scratch PostgreSQL databases for the relay's PostgreSQL tests
//! (`tests/postgres.rs`, `tests/postgres_push.rs`, `tests/crash.rs`,
//! `tests/relay_storage_conformance.rs`), and how those tests are reported
//! when there is no database.
//!
//! The server: `CUBBYHOLE_TEST_POSTGRES`, if set, names a role that may
//! `CREATE DATABASE` (`postgres://user:password@host:port/db`, or a
//! `key=value` string). If it is not set, the tests start a throwaway
//! server of their own, once per test binary: `initdb` into a fresh
//! temporary directory, `postgres` listening only on a Unix socket in it
//! (no TCP port), fsync off. A watchdog process (`sh`, reading a pipe from
//! the test process) stops it and deletes the directory when the test
//! process exits, however it exits (a failed test, a panic, a signal; only
//! a `SIGKILL` of the whole process group, watchdog included, leaks it).
//! That needs PostgreSQL's server binaries (`initdb`, `pg_ctl`,
//! `postgres`: on `PATH`, or Debian's `/usr/lib/postgresql/<version>/bin`)
//! and a user other than root (`initdb` refuses root).
//!
//! Each test makes a database of its own and drops it at its end. The build
//! script (`relay/build.rs`) sets the cfg `cubbyhole_test_postgres` when the
//! variable is set at build time, or the binaries are installed and the
//! build does not run as root; otherwise every PostgreSQL test is
//! `#[ignore]`d, so the runner reports it as ignored, never as passed (run
//! with `-- --ignored`, they fail at once, saying what is missing). Under
//! `CI` the guard test [`assert_not_ignored_in_ci`] fails if they would be
//! ignored.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
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

/// The administrative connection string: `CUBBYHOLE_TEST_POSTGRES`, or the
/// server this process started. A test that runs without either fails (it
/// was built to run, or run with `--ignored`).
fn admin_url() -> String {
    match std::env::var(ENV) {
        Ok(url) if !url.trim().is_empty() => url,
        _ => match own_server() {
            Ok(server) => server.url.clone(),
            Err(why) => panic!(
                "{ENV} is not set and no PostgreSQL server could be started here: {why}. \
                 Set {ENV} to postgres://user:password@host:port/db (a role that may \
                 CREATE DATABASE), or install PostgreSQL's server binaries and run the \
                 tests as a user other than root"
            ),
        },
    }
}

include!("pg_bin.rs");

/// A server started by this process (see the module docs).
struct OwnServer {
    /// `host=<socket dir> user=cubbyhole dbname=postgres`.
    url: String,
    /// The watchdog's stdin: closed when this process exits, which makes
    /// the watchdog stop the server and delete its directory. Never
    /// written.
    _watchdog: std::process::ChildStdin,
}

/// The server of this process, started at the first call.
fn own_server() -> Result<&'static OwnServer, String> {
    static SERVER: OnceLock<Result<OwnServer, String>> = OnceLock::new();
    SERVER
        .get_or_init(start_own_server)
        .as_ref()
        .map_err(Clone::clone)
}

fn start_own_server() -> Result<OwnServer, String> {
    let bin = postgres_bin_dir().ok_or_else(|| {
        "PostgreSQL's server binaries (initdb, pg_ctl, postgres) are neither on PATH \
         nor in /usr/lib/postgresql/<version>/bin"
            .to_string()
    })?;
    if running_as_root() {
        return Err("this process runs as root, and initdb refuses root".into());
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("cubbyhole-pg-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let data = dir.join("data");
    // The watchdog first, so that whatever follows is cleaned up. It
    // ignores the terminal's signals (a Ctrl-C reaches the whole process
    // group) and waits for end of file on its stdin.
    let script = r#"trap '' INT TERM HUP QUIT
read _ignored
"$1/pg_ctl" -D "$2/data" -m immediate -w stop >/dev/null 2>&1
rm -rf "$2""#;
    let mut watchdog = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("pg-watchdog")
        .arg(&bin)
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the watchdog (sh): {e}"))?;
    let stdin = watchdog
        .stdin
        .take()
        .ok_or_else(|| "the watchdog has no stdin".to_string())?;
    let run = |what: &str, command: &mut Command| -> Result<(), String> {
        let out = command
            .output()
            .map_err(|e| format!("cannot run {what}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    run(
        "initdb",
        Command::new(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "cubbyhole", "-A", "trust", "-E", "UTF8"])
            .args(["--no-locale", "--no-sync"]),
    )?;
    let options = format!(
        "-k {} -c listen_addresses='' -c fsync=off -c synchronous_commit=off \
         -c full_page_writes=off -c max_connections=200",
        dir.display()
    );
    run(
        "pg_ctl start",
        Command::new(bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("server.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"]),
    )?;
    Ok(OwnServer {
        url: format!("host={} user=cubbyhole dbname=postgres", dir.display()),
        _watchdog: stdin,
    })
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
