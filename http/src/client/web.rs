//! The `wasm32` engine: the browser's `fetch` and timers, taken from the
//! global scope (a window's or a Web Worker's). No runtime: a request runs
//! in the future that awaits it (which is therefore not `Send`), and
//! dropping that future aborts the request (`AbortController`). See
//! [In the browser](crate#in-the-browser).

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use cubbyhole::transport::TransportError;
use js_sys::{Function, Promise, Uint8Array};
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    AbortController, Headers, ReadableStreamDefaultReader, ReadableStreamReadResult, RequestCache,
    RequestCredentials, RequestInit, RequestRedirect, Response, Url, Window, WorkerGlobalScope,
};

use super::{
    Failure, Header, HttpRelay, HttpRelayConfig, HttpRelayError, Inner, Method, ERROR_BODY_MAX,
};

/// The base URL, checked as natively (an absolute `http` or `https` URL
/// with a host, no query, no fragment) by the platform's URL parser,
/// without a trailing slash.
pub(super) fn parse_base(base_url: &str) -> Result<String, HttpRelayError> {
    let url = Url::new(base_url).map_err(|_| HttpRelayError::InvalidUrl("syntax"))?;
    if !matches!(url.protocol().as_str(), "http:" | "https:") {
        return Err(HttpRelayError::InvalidUrl(
            "the scheme must be http or https",
        ));
    }
    if url.host().is_empty() {
        return Err(HttpRelayError::InvalidUrl("no host"));
    }
    // The serialization escapes `?` and `#` everywhere but where they
    // start a query or a fragment (`search` and `hash` are empty for an
    // empty one, so they cannot tell).
    let href = url.href();
    if href.contains(['?', '#']) {
        return Err(HttpRelayError::InvalidUrl("a query or fragment"));
    }
    Ok(href.trim_end_matches('/').to_owned())
}

/// Does the requests: nothing to hold, the browser pools the connections.
pub(super) struct Engine;

/// Where the requests run: in the futures that await them.
#[derive(Clone)]
pub(super) struct Executor;

impl Executor {
    pub(super) fn is_private(&self) -> bool {
        false
    }
}

/// Nothing to build: `connect_timeout`, `pool_idle_timeout` and
/// `local_address` are the browser's business.
pub(super) fn build(_config: &HttpRelayConfig) -> Result<(Engine, Executor), HttpRelayError> {
    Ok((Engine, Executor))
}

impl HttpRelay {
    /// The request's future itself: it runs where it is polled.
    pub(super) fn run<T, F>(&self, request: impl FnOnce(Arc<Inner>) -> F) -> F
    where
        F: Future<Output = Result<T, TransportError>>,
    {
        request(Arc::clone(&self.inner))
    }
}

/// The global scope, whose `fetch` and `setTimeout` the engine uses.
enum Scope {
    Window(Window),
    Worker(WorkerGlobalScope),
}

impl Scope {
    /// The current global scope, if it is a window's or a worker's.
    fn current() -> Option<Scope> {
        match js_sys::global().dyn_into::<Window>() {
            Ok(window) => Some(Scope::Window(window)),
            Err(global) => global
                .dyn_into::<WorkerGlobalScope>()
                .ok()
                .map(Scope::Worker),
        }
    }

    fn fetch(&self, url: &str, init: &RequestInit) -> Promise {
        match self {
            Scope::Window(w) => w.fetch_with_str_and_init(url, init),
            Scope::Worker(w) => w.fetch_with_str_and_init(url, init),
        }
    }

    /// Calls `handler` once after `duration` (capped at `i32::MAX`
    /// milliseconds, about 24 days); the timer's id.
    fn set_timeout(&self, handler: &Function, duration: Duration) -> Option<i32> {
        let ms = i32::try_from(duration.as_millis()).unwrap_or(i32::MAX);
        match self {
            Scope::Window(w) => {
                w.set_timeout_with_callback_and_timeout_and_arguments_0(handler, ms)
            }
            Scope::Worker(w) => {
                w.set_timeout_with_callback_and_timeout_and_arguments_0(handler, ms)
            }
        }
        .ok()
    }

    fn clear_timeout(&self, id: i32) {
        match self {
            Scope::Window(w) => w.clear_timeout_with_handle(id),
            Scope::Worker(w) => w.clear_timeout_with_handle(id),
        }
    }
}

/// A timer that is cleared when dropped (a no-op once it has fired).
struct Timer {
    scope: Scope,
    id: i32,
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.scope.clear_timeout(self.id);
    }
}

/// Sleeps on the global scope's timer (returns at once where there is
/// none: the attempt that follows fails the same way).
pub(super) async fn sleep(duration: Duration) {
    let Some(scope) = Scope::current() else {
        return;
    };
    let mut id = None;
    let wake = Promise::new(&mut |resolve, _reject| {
        id = scope.set_timeout(&resolve, duration);
    });
    let Some(id) = id else {
        return;
    };
    let _timer = Timer { scope, id };
    // The promise only resolves.
    let _ = JsFuture::from(wake).await;
}

/// The bound of one attempt: a timer that aborts the request (its
/// answer's body included) when it expires. Dropped (the attempt is over,
/// or its future was dropped) it clears the timer and aborts the request,
/// which then stops wherever it is (a no-op once the body is read).
struct Deadline {
    controller: AbortController,
    expired: Rc<Cell<bool>>,
    /// Declared before the closure: the timer is cleared before the
    /// closure it calls is freed.
    timer: Timer,
    _on_expiry: Closure<dyn FnMut()>,
}

impl Deadline {
    fn start(scope: Scope, controller: AbortController, timeout: Duration) -> Option<Deadline> {
        let expired = Rc::new(Cell::new(false));
        let on_expiry = {
            let expired = Rc::clone(&expired);
            let controller = controller.clone();
            Closure::<dyn FnMut()>::new(move || {
                expired.set(true);
                controller.abort();
            })
        };
        let id = scope.set_timeout(on_expiry.as_ref().unchecked_ref(), timeout)?;
        Some(Deadline {
            controller,
            expired,
            timer: Timer { scope, id },
            _on_expiry: on_expiry,
        })
    }

    /// The error of a rejected promise of the request: a timeout if the
    /// deadline aborted it, else `otherwise`.
    fn error(&self, otherwise: &'static str) -> TransportError {
        if self.expired.get() {
            TransportError::Unavailable("relay timed out")
        } else {
            TransportError::Unavailable(otherwise)
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.controller.abort();
    }
}

impl Engine {
    /// One exchange: the answer's status and body. A `2xx` body is read up
    /// to `max` bytes (above is a failure); another status's up to
    /// [`ERROR_BODY_MAX`], and an unreadable one is empty.
    ///
    /// A rejected `fetch` is a network failure that may have happened
    /// after the request left (the browser does not tell), so it is never
    /// `unsent`.
    pub(super) async fn attempt(
        &self,
        method: Method,
        url: &str,
        body: Option<&[u8]>,
        headers: &[Header],
        timeout: Duration,
        max: usize,
    ) -> Result<(u16, Vec<u8>), Failure> {
        let refused = |_: JsValue| {
            Failure::answered(TransportError::Unavailable(
                "the browser refused the request",
            ))
        };
        let scope = Scope::current().ok_or(Failure {
            error: TransportError::Unavailable("no fetch here (not a window nor a worker)"),
            unsent: true,
        })?;
        let init = RequestInit::new();
        init.set_method(match method {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
        });
        // No cookies or HTTP authentication: the relay authenticates by
        // the bodies and headers of the API. A relay never redirects, and
        // no answer is cached.
        init.set_credentials(RequestCredentials::Omit);
        init.set_redirect(RequestRedirect::Error);
        init.set_cache(RequestCache::NoStore);
        let request_headers = Headers::new().map_err(refused)?;
        for (name, value) in headers {
            request_headers.append(name, value).map_err(refused)?;
        }
        if let Some(body) = body {
            request_headers
                .append("content-type", "application/octet-stream")
                .map_err(refused)?;
            init.set_body(&Uint8Array::from(body));
        }
        init.set_headers(&request_headers);
        let controller = AbortController::new().map_err(refused)?;
        init.set_signal(Some(&controller.signal()));
        let deadline = Deadline::start(scope, controller, timeout).ok_or(Failure {
            error: TransportError::Unavailable("no timer for the request"),
            unsent: true,
        })?;
        let response = JsFuture::from(deadline.timer.scope.fetch(url, &init))
            .await
            .map_err(|_| Failure {
                error: deadline.error("cannot connect to the relay"),
                unsent: false,
            })?;
        let response: Response = response.dyn_into().map_err(|_| {
            Failure::answered(TransportError::Unavailable("malformed relay answer"))
        })?;
        let status = response.status();
        if (200..300).contains(&status) {
            let bytes = read_body(&response, max, &deadline)
                .await
                .map_err(Failure::answered)?;
            return Ok((status, bytes));
        }
        let bytes = read_body(&response, ERROR_BODY_MAX, &deadline)
            .await
            .unwrap_or_default();
        Ok((status, bytes))
    }
}

/// Reads a body of at most `max` bytes: refused at once by its
/// `Content-Length`, else read chunk by chunk from the body's stream,
/// stopping at the first chunk that would go above (the caller's
/// [`Deadline`] then aborts the rest).
async fn read_body(
    response: &Response,
    max: usize,
    deadline: &Deadline,
) -> Result<Vec<u8>, TransportError> {
    let too_big = TransportError::Unavailable("relay answer too large");
    if let Ok(Some(length)) = response.headers().get("content-length") {
        if length.trim().parse::<u64>().is_ok_and(|n| n > max as u64) {
            return Err(too_big);
        }
    }
    let Some(stream) = response.body() else {
        return Ok(Vec::new());
    };
    let reader = ReadableStreamDefaultReader::new(&stream)
        .map_err(|_| TransportError::Unavailable("relay connection failed"))?;
    let mut out = Vec::new();
    loop {
        let result: ReadableStreamReadResult = JsFuture::from(reader.read())
            .await
            .map_err(|_| deadline.error("relay connection failed"))?
            .unchecked_into();
        if result.get_done().unwrap_or(true) {
            return Ok(out);
        }
        let chunk: Uint8Array = result
            .get_value()
            .dyn_into()
            .map_err(|_| TransportError::Unavailable("malformed relay answer"))?;
        let length = chunk.length() as usize;
        if length > max - out.len() {
            return Err(too_big);
        }
        let start = out.len();
        out.resize(start + length, 0);
        chunk.copy_to(&mut out[start..]);
    }
}
