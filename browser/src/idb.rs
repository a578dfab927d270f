//! [`IdbBackend`]: a [`KvBackend`] over the browser's IndexedDB.
//!
//! # Layout
//!
//! One database per device store (its name is the application's), version
//! 1, with one object store `records` of out-of-line keys: each record's key
//! is its 32 key bytes as an IndexedDB binary key, its value the sealed
//! bytes as a `Uint8Array`. Nothing else is kept there.
//!
//! # Atomicity and durability
//!
//! Each [`KvBackend::write`] is one `readwrite` transaction with
//! `durability: "strict"` (the browser flushes it to disk before it reports
//! `complete`): IndexedDB applies all its requests or, if the transaction
//! aborts, none. Every request of the batch is issued synchronously, before
//! the first `await`, so the transaction cannot commit early: IndexedDB
//! commits a transaction by itself once a task ends with no request of it
//! pending. The write returns `Ok` only on the transaction's `complete`
//! event.
//!
//! # One tab at a time
//!
//! Two tabs running one device's ratchets at once would fork them (each
//! advancing the same chains from the same state). [`IdbBackend::open`]
//! therefore takes an exclusive [Web Lock] named `cubbyhole-idb:<name>`
//! (without waiting: `ifAvailable`), held until the backend is closed or
//! dropped; a second open of the same name, in this tab or another of the
//! same origin, fails with `StoreError::Backend("the store is open in
//! another tab")`. Where the Locks API is absent (an insecure context: a
//! page served over plain HTTP from a host other than `localhost`; very old
//! browsers) the backend opens without the lock and
//! [`IdbBackend::exclusive`] says so: the application must then keep to one
//! tab itself.
//!
//! An open backend also closes its connection when another context asks
//! for a version change or deletes the database (the `versionchange`
//! event), so that [`delete_database`] is not blocked by it; its later
//! operations then fail with `StoreError::Backend`.
//!
//! [Web Lock]: https://developer.mozilla.org/en-US/docs/Web/API/Web_Locks_API

use core::cell::{Cell, RefCell};
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};
use std::collections::HashMap;
use std::rc::Rc;
use std::string::{String, ToString};
use std::vec::Vec;

use cubbyhole::storage::kv::{KvBackend, KvKey, KvOp};
use cubbyhole::storage::StoreError;
use js_sys::{Array, ArrayBuffer, Function, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    DomException, Event, EventTarget, IdbDatabase, IdbFactory, IdbObjectStore, IdbOpenDbRequest,
    IdbRequest, IdbTransaction, IdbTransactionMode,
};

/// The object store holding the records.
const RECORDS: &str = "records";
/// The database's schema version.
const VERSION: u32 = 1;
/// The error of an open that finds the store's lock taken.
pub const LOCKED: &str = "the store is open in another tab";
/// The name of the Web Lock guarding database `name` is this prefix, then
/// `name`.
pub const LOCK_PREFIX: &str = "cubbyhole-idb:";

/// A [`KvBackend`] over one IndexedDB database (see the [module
/// docs](self)): open it with [`IdbBackend::open`], hand it to a
/// `KvStore`.
///
/// [`IdbBackend::close`] or dropping it closes the connection and releases
/// the lock.
pub struct IdbBackend {
    name: String,
    db: IdbDatabase,
    /// Closes the connection on `versionchange`; kept alive with it.
    _on_version_change: Closure<dyn FnMut(Event)>,
    /// `None` without the Locks API, and once closed.
    lock: RefCell<Option<LockGuard>>,
    closed: Cell<bool>,
    fault: FaultInjector,
}

impl core::fmt::Debug for IdbBackend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IdbBackend")
            .field("name", &self.name)
            .field("exclusive", &self.exclusive())
            .field("closed", &self.closed.get())
            .finish_non_exhaustive()
    }
}

/// A fault injector for tests, shared with the [`IdbBackend`] it came from
/// ([`IdbBackend::fault_injector`]): makes a write abort its IndexedDB
/// transaction (`IDBTransaction.abort()`, a real abort: what IndexedDB then
/// keeps is its own atomicity's doing).
#[derive(Clone, Debug, Default)]
pub struct FaultInjector(Rc<Cell<Option<u32>>>);

impl FaultInjector {
    /// With `Some(n)`: the writes from now on issue `n` more requests (puts
    /// and deletes, counted across writes), then the write that would issue
    /// the next one aborts its transaction instead and fails; the fault is
    /// then spent. `Some(0)` aborts the next write before its first
    /// request. `None` removes the fault.
    pub fn fail_after(&self, requests: Option<u32>) {
        self.0.set(requests);
    }

    /// Whether a fault is armed (not yet spent).
    pub fn armed(&self) -> bool {
        self.0.get().is_some()
    }

    /// Counts one request about to be issued: `true` if the transaction
    /// must abort instead (the fault is then spent).
    fn strikes(&self) -> bool {
        match self.0.get() {
            None => false,
            Some(0) => {
                self.0.set(None);
                true
            }
            Some(n) => {
                self.0.set(Some(n - 1));
                false
            }
        }
    }
}

impl IdbBackend {
    /// Opens (creating it if needed) the database `name` and takes its
    /// lock (see the [module docs](self)).
    ///
    /// # Errors
    /// `StoreError::Backend` with [`LOCKED`] if the store is open elsewhere
    /// (another tab, or another `IdbBackend` in this one);
    /// `StoreError::Backend` if IndexedDB is unavailable or refuses (private
    /// mode, quota, a database of a later version, one without the
    /// `records` store).
    pub async fn open(name: &str) -> Result<IdbBackend, StoreError> {
        let lock = LockGuard::acquire(&format!("{LOCK_PREFIX}{name}")).await?;
        let db = open_database(name).await?;
        if !db.object_store_names().contains(RECORDS) {
            db.close();
            return Err(StoreError::Backend(format!(
                "IndexedDB database {name:?} has no {RECORDS:?} object store"
            )));
        }
        let closing = db.clone();
        let on_version_change = Closure::<dyn FnMut(Event)>::new(move |_: Event| closing.close());
        db.set_onversionchange(Some(on_version_change.as_ref().unchecked_ref()));
        Ok(IdbBackend {
            name: name.to_string(),
            db,
            _on_version_change: on_version_change,
            lock: RefCell::new(lock),
            closed: Cell::new(false),
            fault: FaultInjector::default(),
        })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this backend holds the store's exclusive lock (`false`
    /// where the Locks API is absent, and once closed).
    pub fn exclusive(&self) -> bool {
        self.lock.borrow().is_some()
    }

    /// The test fault injector: see [`FaultInjector::fail_after`].
    pub fn fail_after(&self, requests: Option<u32>) {
        self.fault.fail_after(requests);
    }

    /// A handle on this backend's fault injector (for a test that hands
    /// the backend to a store).
    pub fn fault_injector(&self) -> FaultInjector {
        self.fault.clone()
    }

    /// Closes the connection (after the transactions under way) and
    /// releases the lock, so that another tab may open the store; the
    /// backend's operations fail from then on. An open of the same name in
    /// this tab waits for the release to be done; another tab may need a
    /// moment to see it.
    pub fn close(&self) {
        self.closed.set(true);
        self.db.close();
        // Dropping the guard releases the lock.
        self.lock.borrow_mut().take();
    }

    fn transaction(&self, mode: IdbTransactionMode) -> Result<IdbTransaction, StoreError> {
        if self.closed.get() {
            return Err(StoreError::Backend("the store is closed".into()));
        }
        if mode == IdbTransactionMode::Readwrite {
            // `db.transaction(RECORDS, "readwrite", {durability: "strict"})`,
            // called through Reflect: web-sys has the options only behind
            // `web_sys_unstable_apis`. A browser that does not know the
            // option ignores it (its default is then its only durability).
            let options = Object::new();
            Reflect::set(&options, &"durability".into(), &"strict".into()).map_err(js_error)?;
            let transaction: Function = Reflect::get(&self.db, &"transaction".into())
                .map_err(js_error)?
                .dyn_into()
                .map_err(|_| StoreError::Backend("IDBDatabase.transaction is missing".into()))?;
            let tx = transaction
                .call3(
                    &self.db,
                    &RECORDS.into(),
                    &"readwrite".into(),
                    &options.into(),
                )
                .map_err(js_error)?;
            tx.dyn_into::<IdbTransaction>()
                .map_err(|_| StoreError::Backend("IDBDatabase.transaction: no transaction".into()))
        } else {
            self.db
                .transaction_with_str_and_mode(RECORDS, mode)
                .map_err(js_error)
        }
    }
}

impl Drop for IdbBackend {
    fn drop(&mut self) {
        self.db.set_onversionchange(None);
        self.close();
    }
}

impl KvBackend for IdbBackend {
    async fn load(&self) -> Result<Vec<(KvKey, Vec<u8>)>, StoreError> {
        // Both requests in one transaction, issued before any await:
        // the keys and values are of one state, in the same (key) order.
        let tx = self.transaction(IdbTransactionMode::Readonly)?;
        let store = tx.object_store(RECORDS).map_err(js_error)?;
        let keys = Request::issue(store.get_all_keys())?;
        let values = Request::issue(store.get_all())?;
        let keys: Array = keys
            .await?
            .dyn_into()
            .map_err(|_| not_array("getAllKeys"))?;
        let values: Array = values.await?.dyn_into().map_err(|_| not_array("getAll"))?;
        if keys.length() != values.length() {
            return Err(StoreError::Backend(format!(
                "IndexedDB returned {} keys and {} values",
                keys.length(),
                values.length()
            )));
        }
        let mut records = Vec::with_capacity(keys.length() as usize);
        for (i, (key, value)) in keys.iter().zip(values.iter()).enumerate() {
            let key = decode_key(&key).map_err(|reason| corrupted(format!("#{i}"), reason))?;
            let value = value.dyn_into::<Uint8Array>().map_err(|v| {
                corrupted(
                    hex_key(&key),
                    format!("the value is not a Uint8Array but {}", describe(&v)),
                )
            })?;
            records.push((key, value.to_vec()));
        }
        Ok(records)
    }

    async fn write(&self, ops: &[KvOp]) -> Result<(), StoreError> {
        // Everything up to the `await` runs in one task: the transaction
        // stays active until every request is issued.
        let tx = self.transaction(IdbTransactionMode::Readwrite)?;
        let done = Events::listen(tx.as_ref(), &["complete", "abort"])?;
        if let Err(e) = issue(&tx, ops, &self.fault) {
            let _ = tx.abort();
            return Err(e);
        }
        match done.await {
            0 => Ok(()),
            _ => Err(match tx.error() {
                Some(e) => dom_error("transaction aborted", &e),
                None => StoreError::Backend("IndexedDB transaction aborted".into()),
            }),
        }
    }
}

/// Issues the batch's requests on `tx`, or aborts it where the fault
/// injector strikes; `Err` if a request could not be issued (`tx` must
/// then be aborted).
fn issue(tx: &IdbTransaction, ops: &[KvOp], fault: &FaultInjector) -> Result<(), StoreError> {
    let store: IdbObjectStore = tx.object_store(RECORDS).map_err(js_error)?;
    for op in ops {
        if fault.strikes() {
            tx.abort().map_err(js_error)?;
            // `complete` never comes; the `abort` event does.
            return Ok(());
        }
        match op {
            KvOp::Put { key, value } => {
                let value = Uint8Array::from(value.as_slice());
                store
                    .put_with_key(&value, &Uint8Array::from(&key[..]))
                    .map_err(js_error)?;
            }
            KvOp::Delete { key } => {
                store
                    .delete(&Uint8Array::from(&key[..]))
                    .map_err(js_error)?;
            }
        }
    }
    Ok(())
}

/// Deletes the database `name` with all its records ("forget this
/// device"; tests). Open connections elsewhere receive `versionchange`
/// (an [`IdbBackend`] closes on it); the deletion waits until they are
/// closed.
///
/// # Errors
/// `StoreError::Backend` if IndexedDB is unavailable or refuses.
pub async fn delete_database(name: &str) -> Result<(), StoreError> {
    let request = factory()?.delete_database(name).map_err(js_error)?;
    Request::issue(Ok(request.into()))?.await.map(|_| ())
}

/// Opens database `name` at [`VERSION`], creating its object store on the
/// first open.
async fn open_database(name: &str) -> Result<IdbDatabase, StoreError> {
    let request: IdbOpenDbRequest = factory()?.open_with_u32(name, VERSION).map_err(js_error)?;
    // Runs inside the versionchange transaction (synchronously, as it
    // must): creates the object store of out-of-line keys.
    let upgrade_request = request.clone();
    let on_upgrade = Closure::<dyn FnMut(Event)>::new(move |_: Event| {
        let created = upgrade_request
            .result()
            .and_then(|db| db.dyn_into::<IdbDatabase>())
            .and_then(|db| db.create_object_store(RECORDS));
        if created.is_err() {
            if let Some(tx) = upgrade_request.transaction() {
                // The open then fails with AbortError.
                let _ = tx.abort();
            }
        }
    });
    request.set_onupgradeneeded(Some(on_upgrade.as_ref().unchecked_ref()));
    let result = Request::issue(Ok(request.clone().into()))?.await;
    request.set_onupgradeneeded(None);
    drop(on_upgrade);
    match result {
        Ok(db) => db
            .dyn_into::<IdbDatabase>()
            .map_err(|_| StoreError::Backend("IndexedDB open returned no database".into())),
        Err(e) => Err(e),
    }
}

/// The global scope's `indexedDB` (a window's or a worker's).
fn factory() -> Result<IdbFactory, StoreError> {
    Reflect::get(&js_sys::global(), &"indexedDB".into())
        .ok()
        .and_then(|f| f.dyn_into::<IdbFactory>().ok())
        .ok_or_else(|| StoreError::Backend("IndexedDB is not available here".into()))
}

/// A record key from IndexedDB: a binary key (`ArrayBuffer`) of 32 bytes.
fn decode_key(key: &JsValue) -> Result<KvKey, String> {
    let buffer = key
        .dyn_ref::<ArrayBuffer>()
        .ok_or_else(|| format!("the key is not binary but {}", describe(key)))?;
    let bytes = Uint8Array::new(buffer);
    let len = bytes.length();
    if len != 32 {
        return Err(format!("the key is {len} bytes, not 32"));
    }
    let mut out = [0u8; 32];
    bytes.copy_to(&mut out);
    Ok(out)
}

fn corrupted(row: String, reason: String) -> StoreError {
    StoreError::Corrupted {
        table: "IndexedDB records",
        row,
        reason,
    }
}

/// The first 8 bytes of a key in hex (a record's name in an error).
fn hex_key(key: &KvKey) -> String {
    let mut s: String = key[..8].iter().map(|b| format!("{b:02x}")).collect();
    s.push_str("...");
    s
}

/// A JavaScript value's kind, for an error (never its contents).
fn describe(value: &JsValue) -> String {
    if value.is_null() {
        return "null".into();
    }
    let kind = value.js_typeof().as_string().unwrap_or_default();
    if kind == "object" {
        let ctor = Reflect::get(value, &"constructor".into())
            .ok()
            .and_then(|c| Reflect::get(&c, &"name".into()).ok())
            .and_then(|n| n.as_string());
        if let Some(ctor) = ctor {
            return format!("an object ({ctor})");
        }
    }
    format!("a value of type {kind}")
}

fn not_array(what: &str) -> StoreError {
    StoreError::Backend(format!("IndexedDB {what} did not return an array"))
}

/// A JavaScript exception as a backend error (a `DOMException`'s name and
/// message, or the value's string form).
fn js_error(e: JsValue) -> StoreError {
    match e.dyn_ref::<DomException>() {
        Some(d) => dom_error("IndexedDB", d),
        None => StoreError::Backend(format!(
            "IndexedDB: {}",
            e.as_string()
                .or_else(|| js_sys::Error::from(e.clone()).message().as_string())
                .unwrap_or_else(|| describe(&e))
        )),
    }
}

fn dom_error(context: &str, e: &DomException) -> StoreError {
    StoreError::Backend(format!("{context}: {}: {}", e.name(), e.message()))
}

type Listener = Closure<dyn FnMut(Event)>;

/// Waits for the first of some events on a target; the listeners are
/// removed when it is dropped.
struct Events {
    target: EventTarget,
    listeners: Vec<(&'static str, Listener)>,
    state: Rc<RefCell<Fired>>,
}

#[derive(Default)]
struct Fired {
    which: Option<usize>,
    waker: Option<Waker>,
}

impl Events {
    fn listen(target: &EventTarget, names: &[&'static str]) -> Result<Events, StoreError> {
        let state = Rc::new(RefCell::new(Fired::default()));
        let mut events = Events {
            target: target.clone(),
            listeners: Vec::with_capacity(names.len()),
            state: Rc::clone(&state),
        };
        for (i, name) in names.iter().enumerate() {
            let state = Rc::clone(&state);
            let listener = Closure::<dyn FnMut(Event)>::new(move |_: Event| {
                let mut fired = state.borrow_mut();
                if fired.which.is_none() {
                    fired.which = Some(i);
                    if let Some(w) = fired.waker.take() {
                        w.wake();
                    }
                }
            });
            target
                .add_event_listener_with_callback(name, listener.as_ref().unchecked_ref())
                .map_err(js_error)?;
            events.listeners.push((name, listener));
        }
        Ok(events)
    }
}

impl Future for Events {
    type Output = usize;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
        let mut fired = self.state.borrow_mut();
        match fired.which {
            Some(i) => Poll::Ready(i),
            None => {
                fired.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        for (name, listener) in &self.listeners {
            let _ = self
                .target
                .remove_event_listener_with_callback(name, listener.as_ref().unchecked_ref());
        }
    }
}

/// An issued `IDBRequest`: resolves to its result on `success`, to its
/// error on `error`.
struct Request {
    request: IdbRequest,
    events: Events,
}

impl Request {
    fn issue(request: Result<IdbRequest, JsValue>) -> Result<Request, StoreError> {
        let request = request.map_err(js_error)?;
        let events = Events::listen(request.as_ref(), &["success", "error"])?;
        Ok(Request { request, events })
    }
}

impl Future for Request {
    type Output = Result<JsValue, StoreError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.events).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(0) => Poll::Ready(self.request.result().map_err(js_error)),
            Poll::Ready(_) => Poll::Ready(Err(match self.request.error() {
                Ok(Some(e)) => dom_error("IndexedDB request failed", &e),
                _ => StoreError::Backend("IndexedDB request failed".into()),
            })),
        }
    }
}

/// A Web Lock held until released: resolving `release` settles the promise
/// the lock's callback returned, which releases it; `released` settles
/// after that. Dropping the guard releases the lock without waiting.
struct LockGuard {
    name: String,
    release: Function,
    /// `None` once released.
    released: Option<Promise>,
}

thread_local! {
    /// Locks released by a dropped guard and not yet known to be released,
    /// by name: an acquisition of the same name in this tab waits for them
    /// first (so that dropping a backend and opening it again succeeds).
    static RELEASING: RefCell<HashMap<String, Promise>> = RefCell::new(HashMap::new());
}

impl LockGuard {
    /// Takes the exclusive lock `name` if it is free: `Ok(None)` if the
    /// Locks API is absent.
    async fn acquire(name: &str) -> Result<Option<LockGuard>, StoreError> {
        // A guard of this name dropped in this tab: its release first.
        if let Some(pending) = RELEASING.with(|r| r.borrow_mut().remove(name)) {
            let _ = JsFuture::from(pending).await;
        }
        let Some(locks) = Reflect::get(&js_sys::global(), &"navigator".into())
            .ok()
            .filter(|n| n.is_object())
            .and_then(|n| Reflect::get(&n, &"locks".into()).ok())
            .filter(|l| l.is_object())
        else {
            return Ok(None);
        };
        let request: Function = Reflect::get(&locks, &"request".into())
            .map_err(js_error)?
            .dyn_into()
            .map_err(|_| StoreError::Backend("navigator.locks.request is missing".into()))?;

        // `held` settles when the guard releases the lock.
        let mut release = None;
        let held = Promise::new(&mut |resolve, _| release = Some(resolve));
        let release = release.ok_or_else(|| StoreError::Backend("Promise executor".into()))?;
        // `granted` settles with whether the lock was granted (or rejects
        // if the request fails).
        let mut settle = None;
        let granted = Promise::new(&mut |resolve, reject| settle = Some((resolve, reject)));
        let (grant, fail) = settle.ok_or_else(|| StoreError::Backend("Promise executor".into()))?;

        let callback = Closure::once_into_js(move |lock: JsValue| -> JsValue {
            let got = !lock.is_null() && !lock.is_undefined();
            let _ = grant.call1(&JsValue::UNDEFINED, &JsValue::from_bool(got));
            if got {
                held.into()
            } else {
                JsValue::UNDEFINED
            }
        });
        let options = Object::new();
        Reflect::set(&options, &"ifAvailable".into(), &JsValue::TRUE).map_err(js_error)?;
        let released: Promise = request
            .call3(&locks, &name.into(), &options.into(), &callback)
            .map_err(js_error)?
            .dyn_into()
            .map_err(|_| StoreError::Backend("navigator.locks.request: no promise".into()))?;
        // A failed request (it never calls back) fails `granted`.
        let catch: Function = Reflect::get(&released, &"catch".into())
            .map_err(js_error)?
            .dyn_into()
            .map_err(|_| StoreError::Backend("Promise.catch is missing".into()))?;
        catch
            .call1(&released, &JsValue::from(fail))
            .map_err(js_error)?;

        match JsFuture::from(granted).await {
            Ok(v) if v.as_bool() == Some(true) => Ok(Some(LockGuard {
                name: name.to_string(),
                release,
                released: Some(released),
            })),
            Ok(_) => Err(StoreError::Backend(LOCKED.into())),
            Err(e) => Err(js_error(e)),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(released) = self.released.take() {
            let _ = self.release.call0(&JsValue::UNDEFINED);
            let name = core::mem::take(&mut self.name);
            RELEASING.with(|r| r.borrow_mut().insert(name, released));
        }
    }
}
