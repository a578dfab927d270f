//! The transport conformance suite (`cubbyhole::transport::conformance`)
//! against the real thing: the relay server on a loopback port (SQLite in
//! memory, a fresh server for each check) driven through [`HttpRelay`],
//! long polls included.

use cubbyhole::relay::RelayConfig;
use std::sync::{Arc, Mutex};

use cubbyhole::transport::conformance::{self, Options, ParkedProbe};
use cubbyhole_http::HttpRelay;
use cubbyhole_relay::{serve, Limits, ServerConfig, StorageConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Starts a server (on the current Tokio runtime) and returns its URL; it
/// stops when its sender in `stops` is dropped.
fn start(stops: &mut Vec<oneshot::Sender<()>>, max_wait_ms: u32) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let listener = TcpListener::from_std(listener).unwrap();
    let config = ServerConfig {
        storage: StorageConfig::SqliteMemory,
        relay: RelayConfig::unpriced(),
        // The suite makes a few dozen requests per check from one address.
        limits: Limits {
            deposits_per_minute: 0,
            claims_per_minute: 0,
            requests_per_minute: 0,
            max_wait_ms,
            ..Limits::default()
        },
        ..ServerConfig::unpriced()
    };
    let (stop, stopped) = oneshot::channel::<()>();
    stops.push(stop);
    tokio::spawn(async move {
        serve(listener, config, async move {
            let _ = stopped.await;
        })
        .await
        .expect("the server failed");
    });
    url
}

/// The server's `cubbyhole_relay_long_polls` gauge: fetches parked on an
/// empty mailbox.
async fn parked_long_polls(url: &str) -> u64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .expect("/metrics")
        .text()
        .await
        .expect("/metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix("cubbyhole_relay_long_polls "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the long_polls gauge")
}

/// Runs the suite against fresh servers with this long-poll cap.
fn suite(max_wait_ms: u32) -> Result<(), Vec<conformance::Violation>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut stops = Vec::new();
        // The server of the check running now, which the probe asks.
        let current = Arc::new(Mutex::new(String::new()));
        let asked = current.clone();
        let options = Options {
            max_envelope_bytes: RelayConfig::DEFAULT_MAX_ENVELOPE_BYTES,
            supports_waiting: true,
            wait_ms: 10_000,
            // fetch_waiting deposits once the server has parked the fetch,
            // not after a delay a loaded machine can outrun.
            parked: Some(ParkedProbe::new(move || {
                let url = asked.lock().unwrap().clone();
                async move { parked_long_polls(&url).await > 0 }
            })),
        };
        let mut servers = 0;
        let result = conformance::check_all(
            || {
                servers += 1;
                let url = start(&mut stops, max_wait_ms);
                *current.lock().unwrap() = url.clone();
                let relay = HttpRelay::new(&url).unwrap();
                (relay.clone(), relay)
            },
            &options,
        )
        .await;
        drop(stops);
        assert_eq!(servers, conformance::CHECKS.len(), "one server per check");
        result
    })
}

#[test]
fn the_http_relay_conforms() {
    if let Err(violations) = suite(Limits::DEFAULT_MAX_WAIT_MS) {
        panic!("{}", conformance::report(&violations));
    }
}

/// The long-poll part of the suite is real over HTTP: a server that does
/// not wait fails it, and only it.
#[test]
fn a_server_without_long_polls_fails_fetch_waiting() {
    let violations = suite(0).expect_err("a server that never waits passed fetch_waiting");
    let names: Vec<&str> = violations.iter().map(|v| v.check).collect();
    assert_eq!(
        names,
        ["fetch_waiting"],
        "{}",
        conformance::report(&violations)
    );
}

/// The device-directory suite (`conformance::check_device_directory`,
/// SPEC.md 25.12) against fresh servers through [`HttpRelay`]: the routes
/// `PUT`/`GET /v1/accounts/{account}/devices`, their error mapping on both
/// sides (`409 stale_device_list` is `Replayed`, `409 device_list_conflict`
/// `Conflict`, `409 device_list_gap` and `400` `BadRequest`, `401`
/// `Unauthorized`, `404` `NotFound`) and the answer's framing.
#[test]
fn the_http_relay_conforms_as_a_device_directory() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut stops = Vec::new();
        let mut servers = 0;
        let result = conformance::check_device_directory(|| {
            servers += 1;
            HttpRelay::new(&start(&mut stops, 0)).unwrap()
        })
        .await;
        drop(stops);
        assert_eq!(
            servers,
            conformance::DEVICE_CHECKS.len(),
            "one server per check"
        );
        if let Err(violations) = result {
            panic!("{}", conformance::report(&violations));
        }
    });
}
