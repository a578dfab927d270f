//! `Send`/`Sync` where the platform has threads.
//!
//! The client's futures must be `Send` on native targets, so that an
//! application can `tokio::spawn` them, while a browser store (IndexedDB)
//! or transport (`fetch`) is built on JavaScript promises, which are not
//! `Send`. The [`Store`](crate::storage::Store) and transport traits
//! therefore bound their futures by [`MaybeSend`]: `Send` on every target
//! but `wasm32`, nothing on `wasm32` (which has no threads to send to).

/// `Send` on native targets; no bound on `wasm32`.
#[cfg(not(target_arch = "wasm32"))]
pub trait MaybeSend: Send {}
#[cfg(not(target_arch = "wasm32"))]
impl<T: Send + ?Sized> MaybeSend for T {}

/// `Send` on native targets; no bound on `wasm32`.
#[cfg(target_arch = "wasm32")]
pub trait MaybeSend {}
#[cfg(target_arch = "wasm32")]
impl<T: ?Sized> MaybeSend for T {}

/// `Sync` on native targets; no bound on `wasm32`.
#[cfg(not(target_arch = "wasm32"))]
pub trait MaybeSync: Sync {}
#[cfg(not(target_arch = "wasm32"))]
impl<T: Sync + ?Sized> MaybeSync for T {}

/// `Sync` on native targets; no bound on `wasm32`.
#[cfg(target_arch = "wasm32")]
pub trait MaybeSync {}
#[cfg(target_arch = "wasm32")]
impl<T: ?Sized> MaybeSync for T {}
