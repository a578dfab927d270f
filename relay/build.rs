//! Sets the cfg `cubbyhole_test_postgres` when `CUBBYHOLE_TEST_POSTGRES` is
//! set: the PostgreSQL tests then run; without it they are built ignored,
//! so that the test runner reports them as ignored rather than passed
//! (`tests/support/pg.rs`).
fn main() {
    println!("cargo:rustc-check-cfg=cfg(cubbyhole_test_postgres)");
    println!("cargo:rerun-if-env-changed=CUBBYHOLE_TEST_POSTGRES");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CUBBYHOLE_TEST_POSTGRES").is_ok_and(|v| !v.trim().is_empty()) {
        println!("cargo:rustc-cfg=cubbyhole_test_postgres");
    }
}
