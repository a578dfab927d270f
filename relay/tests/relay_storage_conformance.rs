//! The relay storage conformance suite (`cubbyhole::relay::conformance`)
//! against [`PostgresRelayStorage`]: each check in a scratch database of
//! its own (`support/pg.rs`: `CUBBYHOLE_TEST_POSTGRES`, or a server the
//! tests start themselves; ignored, and reported so, without either).

#![cfg(feature = "postgres")]

use cubbyhole::relay::conformance;
use cubbyhole_relay::postgres::PostgresRelayStorage;

#[path = "support/pg.rs"]
mod pg;

#[test]
fn postgres_tests_are_not_ignored_in_ci() {
    pg::assert_not_ignored_in_ci();
}

#[test]
#[cfg_attr(
    not(cubbyhole_test_postgres),
    ignore = "needs PostgreSQL: CUBBYHOLE_TEST_POSTGRES, or its server binaries and a user other than root (relay/tests/support/pg.rs)"
)]
fn the_postgres_storage_conforms() {
    let mut databases = Vec::new();
    conformance::run(|| {
        let db = pg::TestDb::create("conformance");
        let storage = PostgresRelayStorage::connect(&db.url).unwrap();
        databases.push(db);
        storage
    });
    assert_eq!(databases.len(), conformance::CHECKS.len());
}
