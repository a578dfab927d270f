//! cubbyhole in the browser (`wasm32-unknown-unknown`).
//!
//! - `IdbBackend` (module `idb`): a `KvBackend` over IndexedDB (one
//!   database per device store, one transaction per write, an exclusive
//!   Web Lock per open store), for the crate's persistent `KvStore`;
//!   `delete_database` forgets a store; `FaultInjector` aborts writes in
//!   tests.
//!
//! On other targets the crate is empty.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

#[cfg(target_arch = "wasm32")]
pub mod idb;

#[cfg(target_arch = "wasm32")]
pub use idb::{delete_database, FaultInjector, IdbBackend};
