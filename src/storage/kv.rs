//! A persistent [`Store`](super::Store) over any atomic key-value backend:
//! [`KvStore`] keeps the device's state decoded in memory and writes every
//! change, sealed, through a [`KvBackend`] in one atomic batch per store
//! write. The browser's IndexedDB (crate `cubbyhole-browser`) is one such
//! backend; [`MemoryKv`] is one in memory, for tests.

use core::future::Future;
use std::vec::Vec;

use super::StoreError;
use crate::bounds::{MaybeSend, MaybeSync};

/// The key of one backend record: opaque, 32 bytes (a keyed hash of what
/// the record is, so the backend learns nothing from the keys).
pub type KvKey = [u8; 32];

/// One change of a batch.
#[derive(Clone, PartialEq, Eq)]
pub enum KvOp {
    /// Store `value` under `key`, replacing any value there.
    Put {
        /// The record's key.
        key: KvKey,
        /// The sealed value.
        value: Vec<u8>,
    },
    /// Remove the record under `key` (nothing happens if there is none).
    Delete {
        /// The record's key.
        key: KvKey,
    },
}

impl core::fmt::Debug for KvOp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            KvOp::Put { value, .. } => write!(f, "Put({} bytes)", value.len()),
            KvOp::Delete { .. } => f.write_str("Delete"),
        }
    }
}

/// Where a [`KvStore`] keeps its records: a map from [`KvKey`] to bytes
/// with atomic batches.
///
/// The contract:
/// - [`KvBackend::write`] applies its operations in order (a later one on
///   the same key wins) and **all or none** of them; once it returned
///   `Ok`, they survive a crash (or the closing of the browser tab).
/// - [`KvBackend::load`] returns every record, in any order.
pub trait KvBackend: MaybeSend + MaybeSync {
    /// Every record.
    fn load(&self) -> impl Future<Output = Result<Vec<(KvKey, Vec<u8>)>, StoreError>> + MaybeSend;
    /// Applies `ops` atomically.
    fn write(&self, ops: &[KvOp]) -> impl Future<Output = Result<(), StoreError>> + MaybeSend;
}
