//! Sets the cfg `cubbyhole_test_postgres` when the PostgreSQL tests can
//! run: `CUBBYHOLE_TEST_POSTGRES` is set (a server to use), or PostgreSQL's
//! server binaries are installed and the build does not run as root (the
//! tests then start a throwaway server of their own; `initdb` refuses
//! root). Otherwise the tests are built ignored, so that the test runner
//! reports them as ignored rather than passed (`tests/support/pg.rs`).

include!("tests/support/pg_bin.rs");

fn main() {
    println!("cargo:rustc-check-cfg=cfg(cubbyhole_test_postgres)");
    println!("cargo:rustc-check-cfg=cfg(cubbyhole_test_browser)");
    println!("cargo:rustc-check-cfg=cfg(cubbyhole_test_mkfifo)");
    // tests/web.rs makes a FIFO with the mkfifo command (the crate has no
    // unsafe code to call mkfifo(3)): without one, that test is ignored.
    let mkfifo = std::process::Command::new("mkfifo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if cfg!(unix) && mkfifo {
        println!("cargo:rustc-cfg=cubbyhole_test_mkfifo");
    }
    println!("cargo:rerun-if-env-changed=CUBBYHOLE_TEST_BROWSER");
    if std::env::var("CUBBYHOLE_TEST_BROWSER").is_ok_and(|v| !v.trim().is_empty() && v != "0") {
        println!("cargo:rustc-cfg=cubbyhole_test_browser");
    }
    println!("cargo:rerun-if-env-changed=CUBBYHOLE_TEST_POSTGRES");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=tests/support/pg_bin.rs");
    // Installing or removing a Debian PostgreSQL version changes this
    // directory. (Binaries found on PATH are not tracked: after installing
    // them elsewhere, touch this file.)
    if std::path::Path::new("/usr/lib/postgresql").is_dir() {
        println!("cargo:rerun-if-changed=/usr/lib/postgresql");
    }
    let url = std::env::var("CUBBYHOLE_TEST_POSTGRES").is_ok_and(|v| !v.trim().is_empty());
    if url || (postgres_bin_dir().is_some() && !running_as_root()) {
        println!("cargo:rustc-cfg=cubbyhole_test_postgres");
    }
}
