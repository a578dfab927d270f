//! Sets `cubbyhole_test_relay` when `CUBBYHOLE_TEST_RELAY_URL` names a
//! running relay (with `--cors-origin '*'`) for `tests/relay.rs`, which is
//! otherwise built ignored (reported as ignored, never as passed).

fn main() {
    println!("cargo:rustc-check-cfg=cfg(cubbyhole_test_relay)");
    println!("cargo:rerun-if-env-changed=CUBBYHOLE_TEST_RELAY_URL");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CUBBYHOLE_TEST_RELAY_URL").is_ok_and(|v| !v.trim().is_empty()) {
        println!("cargo:rustc-cfg=cubbyhole_test_relay");
    }
}
