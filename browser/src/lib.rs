//! cubbyhole in the browser: the client layer of [cubbyhole] on
//! `wasm32-unknown-unknown`, with
//!
//! - `IdbBackend`, an IndexedDB backend for the crate's persistent
//!   [`KvStore`](cubbyhole::storage::KvStore): one IndexedDB transaction
//!   per store write (so `commit_send` and `commit_receive` stay atomic),
//!   every record sealed under the application's key; one tab at a time
//!   (an exclusive Web Lock per open store); `delete_database` forgets a
//!   store (module `idb`, which also has the tests' `FaultInjector`);
//! - the relay over `fetch`: `cubbyhole_http::HttpRelay`, built for this
//!   target, with the native client's retries, timeouts and long polls;
//! - `Device`, a JavaScript API (wasm-bindgen, TypeScript declarations
//!   generated): open a device, publish prekeys, send, receive (a
//!   callback or one call at a time), delivery states, safety numbers.
//!
//! On other targets the crate holds only [`address`], the text forms the
//! JavaScript API uses (so they are tested natively). The README of the
//! repository's `web/` directory shows a chat page built on it.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod address;

#[cfg(target_arch = "wasm32")]
mod api;
#[cfg(target_arch = "wasm32")]
pub mod idb;
#[cfg(target_arch = "wasm32")]
mod sync;

#[cfg(target_arch = "wasm32")]
pub use api::Device;
#[cfg(target_arch = "wasm32")]
pub use idb::{delete_database, FaultInjector, IdbBackend};

/// Resolves after `ms` milliseconds (`setTimeout` on the global scope: a
/// window or a worker).
#[cfg(target_arch = "wasm32")]
pub(crate) async fn sleep_ms(ms: u32) {
    use wasm_bindgen::JsCast;
    let promise = js_sys::Promise::new(&mut |resolve, _reject| {
        let global = js_sys::global();
        let set_timeout = js_sys::Reflect::get(&global, &"setTimeout".into())
            .ok()
            .and_then(|f| f.dyn_into::<js_sys::Function>().ok());
        match set_timeout {
            Some(set_timeout) => {
                let _ = set_timeout.call2(&global, &resolve, &ms.into());
            }
            None => {
                let _ = resolve.call0(&wasm_bindgen::JsValue::NULL);
            }
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}
