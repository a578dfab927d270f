//! The native engine: `reqwest` (rustls) on a Tokio runtime, the runtime
//! the relay was built in or a private one (see [Runtimes](crate#runtimes)).
//! Every request runs as a task on it; the futures the relay returns only
//! wait for their task ([`Spawned`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use cubbyhole::transport::TransportError;
use reqwest::header::HeaderValue;
use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

use super::{
    Failure, Header, HttpRelay, HttpRelayConfig, HttpRelayError, Inner, Method, ACCESS_HEADER,
    ERROR_BODY_MAX,
};

/// The base URL, checked (an absolute `http` or `https` URL with a host,
/// no query, no fragment), without a trailing slash.
pub(super) fn parse_base(base_url: &str) -> Result<String, HttpRelayError> {
    let url = reqwest::Url::parse(base_url).map_err(|_| HttpRelayError::InvalidUrl("syntax"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(HttpRelayError::InvalidUrl(
            "the scheme must be http or https",
        ));
    }
    if url.host_str().is_none() {
        return Err(HttpRelayError::InvalidUrl("no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(HttpRelayError::InvalidUrl("a query or fragment"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// Does the requests: the HTTP client (its connection pool).
pub(super) struct Engine {
    http: reqwest::Client,
}

/// Where the requests run.
#[derive(Clone)]
pub(super) struct Executor {
    handle: Handle,
    /// The private runtime, when the relay was built outside any runtime.
    private: Option<Arc<PrivateRuntime>>,
}

impl Executor {
    pub(super) fn is_private(&self) -> bool {
        self.private.is_some()
    }
}

/// The HTTP client for these settings, and the runtime: the current one,
/// or else a new private one.
pub(super) fn build(config: &HttpRelayConfig) -> Result<(Engine, Executor), HttpRelayError> {
    let http = reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .pool_idle_timeout(config.pool_idle_timeout)
        .local_address(config.local_address)
        // A relay answers, it does not send clients elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("cubbyhole-http/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(HttpRelayError::Client)?;
    let (handle, private) = match Handle::try_current() {
        Ok(handle) => (handle, None),
        Err(_) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("cubbyhole-http")
                .enable_all()
                .build()
                .map_err(HttpRelayError::Runtime)?;
            let handle = runtime.handle().clone();
            (handle, Some(Arc::new(PrivateRuntime(Some(runtime)))))
        }
    };
    Ok((Engine { http }, Executor { handle, private }))
}

/// A runtime owned by the [`HttpRelay`]s cloned from one that was built
/// outside any Tokio runtime: one worker thread (`cubbyhole-http`), I/O and
/// timers enabled. The last clone's drop shuts it down with
/// [`Runtime::shutdown_background`], which neither blocks nor panics, even
/// inside an async context; requests still running are cancelled.
struct PrivateRuntime(Option<Runtime>);

impl Drop for PrivateRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// The future of one request: waits for the request's task. Dropping it
/// aborts the task.
pub(super) struct Spawned<T>(JoinHandle<Result<T, TransportError>>);

impl<T> Future for Spawned<T> {
    type Output = Result<T, TransportError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.get_mut().0).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(answer)) => Poll::Ready(answer),
            // A panic in the request task is a bug: it goes on in the
            // caller, as it would have with the request polled in place.
            Poll::Ready(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime was shut down under the request.
            Poll::Ready(Err(_)) => Poll::Ready(Err(TransportError::Unavailable(
                "the HTTP client's runtime is shut down",
            ))),
        }
    }
}

impl<T> Drop for Spawned<T> {
    fn drop(&mut self) {
        // A no-op once the task has finished.
        self.0.abort();
    }
}

impl HttpRelay {
    /// Runs a request as a task on the relay's runtime.
    pub(super) fn run<T, F>(&self, request: impl FnOnce(Arc<Inner>) -> F) -> Spawned<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, TransportError>> + Send + 'static,
    {
        Spawned(self.exec.handle.spawn(request(Arc::clone(&self.inner))))
    }
}

/// Sleeps on the runtime's timer (the caller is a request task).
pub(super) async fn sleep(duration: Duration) {
    tokio::time::sleep(duration).await;
}

impl Engine {
    /// One exchange: the answer's status and body. A `2xx` body is read up
    /// to `max` bytes (above is a failure); another status's up to
    /// [`ERROR_BODY_MAX`], and an unreadable one is empty.
    pub(super) async fn attempt(
        &self,
        method: Method,
        url: &str,
        body: Option<&[u8]>,
        headers: &[Header],
        timeout: Duration,
        max: usize,
    ) -> Result<(u16, Vec<u8>), Failure> {
        let method = match method {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
        };
        let mut request = self.http.request(method, url).timeout(timeout);
        for (name, value) in headers {
            if let Ok(mut value) = HeaderValue::from_str(value) {
                value.set_sensitive(*name == ACCESS_HEADER);
                request = request.header(*name, value);
            }
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(body.to_vec());
        }
        let mut response = request.send().await.map_err(|e| Failure {
            error: network_error(&e),
            unsent: e.is_connect(),
        })?;
        let status = response.status();
        if status.is_success() {
            let bytes = read_body(&mut response, max)
                .await
                .map_err(Failure::answered)?;
            return Ok((status.as_u16(), bytes));
        }
        let bytes = read_body(&mut response, ERROR_BODY_MAX)
            .await
            .unwrap_or_default();
        Ok((status.as_u16(), bytes))
    }
}

/// A network failure (no answer) as a transport error.
fn network_error(e: &reqwest::Error) -> TransportError {
    if e.is_timeout() {
        TransportError::Unavailable("relay timed out")
    } else if e.is_connect() {
        TransportError::Unavailable("cannot connect to the relay")
    } else {
        TransportError::Unavailable("relay connection failed")
    }
}

/// Reads a body of at most `max` bytes.
async fn read_body(
    response: &mut reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, TransportError> {
    let too_big = TransportError::Unavailable("relay answer too large");
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_big);
    }
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| network_error(&e))? {
        if out.len() + chunk.len() > max {
            return Err(too_big);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}
