//! The HTTP relay end to end: the real server on a loopback port (SQLite in
//! memory or in a file), driven by `cubbyhole::client::Client` over
//! [`HttpRelay`], and by raw HTTP where the status and reason themselves
//! are under test.

use cubbyhole::transport::DepositPass;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use cubbyhole::client::{Client, ClientConfig, ClientError};
use cubbyhole::relay::{reason as core_reason, RelayConfig};
use cubbyhole::storage::{MemoryStore, SqliteStore, Store};
use cubbyhole::transport::{
    encode_envelope, BundleSetUpload, DeviceAddress, Envelope, EnvelopeId, Mailbox, MailboxAuth,
    MailboxOp, PrekeyDirectory, TransportError,
};
use cubbyhole::{IdentityKeyPair, OsRng, PrekeyStore};
use cubbyhole_http::{reason, HttpRelay, HttpRelayConfig};
use cubbyhole_relay::{serve, Limits, ServerConfig, StorageConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A running relay server on a loopback port.
struct Server {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    async fn start(config: ServerConfig) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(listener, config, async move {
                let _ = stopped.await;
            })
            .await
            .expect("the server failed");
        });
        Server {
            url,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn memory() -> Server {
        Self::start(config(StorageConfig::SqliteMemory)).await
    }

    async fn with(relay: RelayConfig, limits: Limits) -> Server {
        Self::start(ServerConfig {
            relay,
            limits,
            ..config(StorageConfig::SqliteMemory)
        })
        .await
    }

    fn relay(&self) -> HttpRelay {
        HttpRelay::new(&self.url).unwrap()
    }

    /// The `cubbyhole_relay_long_polls` gauge of `/metrics`: fetches parked
    /// on an empty mailbox, which a deposit made now must wake.
    async fn parked_long_polls(&self) -> u64 {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix("cubbyhole_relay_long_polls "))
            .and_then(|n| n.trim().parse().ok())
            .expect("the long_polls gauge")
    }

    /// Waits until `n` fetches are parked on this server (polling
    /// `/metrics`; the 60 s guard only turns a hang into a failure).
    async fn until_parked(&self, n: u64) {
        let guard = Instant::now() + Duration::from_secs(60);
        while self.parked_long_polls().await < n {
            assert!(Instant::now() < guard, "no fetch parked on the relay");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the server gracefully and waits for it.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("the server did not stop")
            .unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn config(storage: StorageConfig) -> ServerConfig {
    ServerConfig {
        storage,
        ..ServerConfig::unpriced()
    }
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "cubbyhole-relay-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type Device<S = MemoryStore> = Client<S, HttpRelay, HttpRelay>;

fn device_on<S: Store>(store: S, relay: &HttpRelay, config: ClientConfig) -> Device<S> {
    Client::open(store, relay.clone(), relay.clone(), config, &mut OsRng)
        .wait()
        .unwrap()
}

/// A device with a fresh in-memory store, its prekeys published.
async fn published(relay: &HttpRelay) -> Device {
    let mut device = device_on(MemoryStore::new(), relay, ClientConfig::default());
    assert!(device.maintain_prekeys(&mut OsRng, now()).await.unwrap());
    device
}

/// Takes every message from the inbox, as text.
fn take_inbox<S: Store>(device: &mut Device<S>) -> Vec<(DeviceAddress, String)> {
    let mut out = Vec::new();
    for m in device.inbox().wait().unwrap() {
        out.push((m.from, String::from_utf8(m.body.clone()).unwrap()));
        device.remove_from_inbox(&m.envelope_id).wait().unwrap();
    }
    out
}

/// A raw request: the status and the JSON `error` reason (if any).
async fn raw(method: reqwest::Method, url: String, body: Vec<u8>) -> (u16, Option<String>) {
    let response = reqwest::Client::new()
        .request(method, url)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    let reason = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_owned));
    (status, reason)
}

fn deposit_url(base: &str, to: &DeviceAddress) -> String {
    format!(
        "{base}/v1/mailboxes/{}/envelopes",
        hex::encode(to.mailbox().0)
    )
}

fn bundle_url(base: &str, of: &DeviceAddress) -> String {
    format!(
        "{base}/v1/directory/{}/{}/bundle",
        hex::encode(of.identity),
        of.device_id
    )
}

fn envelope(id: u8, len: usize) -> Envelope {
    Envelope {
        id: EnvelopeId([id; 16]),
        payload: vec![0x5a; len],
    }
}

/// A fetch proof by the owner's key (taken from the device's store).
async fn owner_auth<S: Store>(device: &Device<S>, relay: &HttpRelay, op: MailboxOp) -> MailboxAuth {
    let me = device.address();
    let keys = device.store().identity().await.unwrap().unwrap().keys;
    let challenge = relay.challenge(&me.mailbox()).await.unwrap();
    MailboxAuth::sign(&keys, me.device_id, op, challenge)
}

// ---------------------------------------------------------------------------
// Conversations

/// Bob publishes and goes away; Alice sends; Bob comes back and receives;
/// he answers and Alice receives.
async fn offline_conversation(relay: &HttpRelay, bob_store: impl Store + Send) {
    let mut bob = device_on(bob_store, relay, ClientConfig::default());
    bob.maintain_prekeys(&mut OsRng, now()).await.unwrap();
    let bob_address = bob.address();
    let bob_store = bob.into_store(); // Bob is offline

    let mut alice = published(relay).await;
    let texts = ["Hi Bob, it's Alice.", "Are you there?", "Write back."];
    for text in texts {
        let sent = alice
            .send(&mut OsRng, &bob_address, text.as_bytes(), now())
            .await
            .unwrap();
        assert!(sent.deposited);
    }

    let mut bob = device_on(bob_store, relay, ClientConfig::default());
    let report = bob.receive(&mut cubbyhole::OsRng, now()).await.unwrap();
    assert_eq!(report.received, 3);
    assert!(report.rejected.is_empty() && report.missing.is_empty());
    let got = take_inbox(&mut bob);
    assert_eq!(
        got.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(),
        texts
    );
    assert!(got.iter().all(|(from, _)| *from == alice.address()));
    // Acknowledged: nothing more for Bob.
    assert_eq!(
        bob.receive(&mut cubbyhole::OsRng, now())
            .await
            .unwrap()
            .received,
        0
    );

    bob.send(&mut OsRng, &alice.address(), b"Got them all.", now())
        .await
        .unwrap();
    assert_eq!(
        alice
            .receive(&mut cubbyhole::OsRng, now())
            .await
            .unwrap()
            .received,
        1
    );
    assert_eq!(
        take_inbox(&mut alice),
        vec![(bob_address, "Got them all.".to_owned())]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_conversation_over_sqlite_in_memory() {
    let server = Server::memory().await;
    offline_conversation(&server.relay(), MemoryStore::new()).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_conversation_over_a_sqlite_file_survives_a_relay_restart() {
    let dir = TempDir::new("offline");
    let db = dir.0.join("relay.db");
    let bob_key = [0xB0; 32];

    // Bob publishes on the first server process, and goes offline.
    let server = Server::start(config(StorageConfig::Sqlite(db.clone()))).await;
    let relay = server.relay();
    let mut bob = device_on(
        SqliteStore::open(dir.0.join("bob.db"), &bob_key).unwrap(),
        &relay,
        ClientConfig::default(),
    );
    bob.maintain_prekeys(&mut OsRng, now()).await.unwrap();
    let bob_address = bob.address();
    drop(bob);
    server.stop().await;

    // A new relay process on the same file: Alice finds Bob's prekeys.
    let server = Server::start(config(StorageConfig::Sqlite(db.clone()))).await;
    let relay = server.relay();
    let mut alice = published(&relay).await;
    alice
        .send(&mut OsRng, &bob_address, b"after the restart", now())
        .await
        .unwrap();
    server.stop().await;

    // And again: Bob's envelope is still there.
    let server = Server::start(config(StorageConfig::Sqlite(db))).await;
    let relay = server.relay();
    let mut bob = device_on(
        SqliteStore::open(dir.0.join("bob.db"), &bob_key).unwrap(),
        &relay,
        ClientConfig::default(),
    );
    assert_eq!(
        bob.receive(&mut cubbyhole::OsRng, now())
            .await
            .unwrap()
            .received,
        1
    );
    assert_eq!(
        take_inbox(&mut bob),
        vec![(alice.address(), "after the restart".to_owned())]
    );

    // The whole conversation once more on the file-backed relay.
    offline_conversation(
        &relay,
        SqliteStore::open(dir.0.join("bob2.db"), &bob_key).unwrap(),
    )
    .await;
    server.stop().await;
}

/// Far longer than a wake-up takes, even on a loaded machine: a long poll
/// that answers with an envelope was woken by the deposit; it did not run
/// out (a wait that runs out answers empty).
const LONG_WAIT_MS: u32 = 60_000;

#[tokio::test(flavor = "multi_thread")]
async fn online_recipient_gets_messages_pushed_by_long_poll() {
    let server = Server::with(
        RelayConfig::unpriced(),
        Limits {
            max_wait_ms: LONG_WAIT_MS,
            ..Limits::default()
        },
    )
    .await;
    let relay = server.relay();
    let mut bob = published(&relay).await;
    let bob_address = bob.address();
    let mut alice = published(&relay).await;

    let mut latencies = Vec::new();
    for round in 0..3 {
        // Bob waits (up to LONG_WAIT_MS) in his own task...
        let waiting = tokio::spawn(async move {
            let report = bob
                .receive_waiting(&mut cubbyhole::OsRng, now(), LONG_WAIT_MS)
                .await
                .unwrap();
            (bob, report, Instant::now())
        });
        // ...and his fetch is parked on the relay (its first look found
        // the mailbox empty) before Alice writes: only the deposit's
        // wake-up can answer it now.
        server.until_parked(1).await;
        let text = format!("online message {round}");
        let sent_at = Instant::now();
        let sent = alice
            .send(&mut OsRng, &bob_address, text.as_bytes(), now())
            .await
            .unwrap();
        assert!(sent.deposited);
        let (b, report, done) = waiting.await.unwrap();
        bob = b;
        // Pushed: the wait answered with the envelope (its end would have
        // answered empty: `received` 0).
        assert_eq!(report.received, 1);
        assert_eq!(take_inbox(&mut bob), vec![(alice.address(), text)]);
        assert_eq!(server.parked_long_polls().await, 0);
        latencies.push(done.saturating_duration_since(sent_at));
    }
    // Measured, not asserted (a loaded machine may take longer).
    println!("push latencies (send start to Bob's inbox): {latencies:?}");

    // With nothing coming, the wait runs its course and returns empty.
    let started = Instant::now();
    let report = bob
        .receive_waiting(&mut cubbyhole::OsRng, now(), 700)
        .await
        .unwrap();
    assert_eq!(report.received, 0);
    assert!(started.elapsed() >= Duration::from_millis(650));
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Strangers

#[tokio::test(flavor = "multi_thread")]
async fn a_stranger_cannot_read_acknowledge_or_replace_bobs_keys() {
    let server = Server::memory().await;
    let relay = server.relay();
    let mut bob = published(&relay).await;
    let bob_address = bob.address();
    let bob_mailbox = bob_address.mailbox();
    let mut alice = published(&relay).await;
    alice
        .send(&mut OsRng, &bob_address, b"for Bob only", now())
        .await
        .unwrap();

    let stranger = IdentityKeyPair::generate(&mut OsRng);
    // A proof for Bob's mailbox signed by the stranger's key, over a fresh
    // challenge anyone can get.
    for op in [MailboxOp::Fetch, MailboxOp::Acknowledge] {
        let challenge = relay.challenge(&bob_mailbox).await.unwrap();
        let own = MailboxAuth::sign(&stranger, bob_address.device_id, op, challenge);
        let forged = MailboxAuth {
            device: bob_address,
            ..own.clone()
        };
        let result = match op {
            MailboxOp::Fetch => relay.fetch(&forged, 100).await.map(drop),
            MailboxOp::Acknowledge => relay.acknowledge(&forged, &[EnvelopeId([0; 16])]).await,
        };
        assert_eq!(result, Err(TransportError::Unauthorized), "{op:?}");
        // Raw: the status and reason.
        let url = format!(
            "{}/v1/mailboxes/{}/{}",
            server.url,
            hex::encode(bob_mailbox.0),
            if op == MailboxOp::Fetch {
                "fetch"
            } else {
                "acknowledge"
            }
        );
        let challenge = relay.challenge(&bob_mailbox).await.unwrap();
        let forged = MailboxAuth {
            device: bob_address,
            ..MailboxAuth::sign(&stranger, bob_address.device_id, op, challenge)
        };
        let body = |auth: &MailboxAuth| {
            let mut body = auth.encode();
            if op == MailboxOp::Acknowledge {
                body.extend_from_slice(&1u16.to_be_bytes());
                body.extend_from_slice(&[0; 16]);
            }
            body
        };
        let (status, why) = raw(reqwest::Method::POST, url.clone(), body(&forged)).await;
        assert_eq!((status, why.as_deref()), (401, Some("unauthorized")));
        // The stranger's valid proof for its own mailbox, sent to Bob's.
        let (status, why) = raw(reqwest::Method::POST, url, body(&own)).await;
        assert_eq!((status, why.as_deref()), (401, Some("unauthorized")));
    }
    // A proof replayed after Bob used it.
    let used = owner_auth(&bob, &relay, MailboxOp::Fetch).await;
    assert_eq!(relay.fetch(&used, 10).await.unwrap().len(), 1);
    assert_eq!(
        relay.fetch(&used, 10).await,
        Err(TransportError::Unauthorized)
    );

    // Replacing Bob's prekeys: an upload for Bob's device signed by another
    // key is refused...
    let mut stranger_prekeys =
        PrekeyStore::new(&mut OsRng, &stranger, now()).expect("time in unix seconds");
    let keys: Vec<_> = stranger_prekeys
        .generate_one_time_prekeys(&mut OsRng, 5)
        .iter()
        .map(|k| (k.id(), *k.public()))
        .collect();
    let mut upload = BundleSetUpload::new(
        bob_address.device_id,
        &stranger,
        u64::MAX,
        stranger_prekeys.current_signed_prekey(),
        &[],
        true,
    );
    upload.device = bob_address;
    upload.one_time_prekeys = keys;
    let signed = upload.sign(&stranger);
    assert_eq!(
        relay.publish(&signed).await,
        Err(TransportError::Unauthorized)
    );
    let (status, why) = raw(
        reqwest::Method::POST,
        format!("{}/v1/directory", server.url),
        signed,
    )
    .await;
    assert_eq!((status, why.as_deref()), (401, Some("unauthorized")));

    // ...and so is one signed by Bob's key under an old counter (a replay).
    let bob_keys = bob.store().identity().await.unwrap().unwrap().keys;
    let bob_prekeys = bob.store().prekeys().await.unwrap().unwrap();
    let old = BundleSetUpload::new(
        bob_address.device_id,
        &bob_keys,
        1,
        bob_prekeys.prekeys.current_signed_prekey(),
        &[],
        true,
    )
    .sign(&bob_keys);
    assert_eq!(relay.publish(&old).await, Err(TransportError::Replayed));
    let (status, why) = raw(
        reqwest::Method::POST,
        format!("{}/v1/directory", server.url),
        old,
    )
    .await;
    assert_eq!((status, why.as_deref()), (409, Some("replayed")));

    // Bob's keys are intact: he still has his pool (less Alice's claim), and
    // a new sender reaches him.
    assert_eq!(relay.one_time_prekeys_left(&bob_address).await, Ok(99));
    let mut carol = published(&relay).await;
    carol
        .send(&mut OsRng, &bob_address, b"hi from Carol", now())
        .await
        .unwrap();
    bob.receive(&mut cubbyhole::OsRng, now()).await.unwrap();
    assert!(take_inbox(&mut bob)
        .iter()
        .any(|(from, t)| *from == carol.address() && t == "hi from Carol"));
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Limits: every one answers with its status and reason.

#[tokio::test(flavor = "multi_thread")]
async fn oversized_envelope_is_413_envelope_size() {
    let relay_config = RelayConfig {
        max_envelope_bytes: 1024,
        ..RelayConfig::unpriced()
    };
    let server = Server::with(relay_config, Limits::default()).await;
    let relay = server.relay();
    let bob = published(&relay).await.address();
    let (status, why) = raw(
        reqwest::Method::POST,
        deposit_url(&server.url, &bob),
        encode_envelope(&envelope(1, 1025)),
    )
    .await;
    assert_eq!((status, why.as_deref()), (413, Some("envelope_size")));
    assert_eq!(
        relay
            .deposit(&bob.mailbox(), &envelope(2, 1025), &DepositPass::NONE)
            .await,
        Err(TransportError::LimitExceeded(core_reason::ENVELOPE_SIZE))
    );
    assert_eq!(
        relay
            .deposit(&bob.mailbox(), &envelope(3, 1024), &DepositPass::NONE)
            .await,
        Ok(())
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn body_over_the_server_limit_is_413_body_size() {
    let limits = Limits {
        max_body_bytes: 4096,
        ..Limits::default()
    };
    let server = Server::with(RelayConfig::unpriced(), limits).await;
    let relay = server.relay();
    let bob = published(&relay).await.address();
    let (status, why) = raw(
        reqwest::Method::POST,
        deposit_url(&server.url, &bob),
        encode_envelope(&envelope(1, 8192)),
    )
    .await;
    assert_eq!((status, why.as_deref()), (413, Some("body_size")));
    assert_eq!(
        relay
            .deposit(&bob.mailbox(), &envelope(2, 8192), &DepositPass::NONE)
            .await,
        Err(TransportError::LimitExceeded(reason::BODY_SIZE))
    );
    // An upload too: 100 one-time prekeys are about 3.7 KB, 200 are not.
    let mut big = device_on(
        MemoryStore::new(),
        &relay,
        ClientConfig {
            one_time_prekeys: 200,
            ..ClientConfig::default()
        },
    );
    assert!(matches!(
        big.maintain_prekeys(&mut OsRng, now()).await,
        Err(ClientError::Transport(TransportError::LimitExceeded(
            reason::BODY_SIZE
        )))
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn full_mailbox_is_507_pending_envelopes() {
    let relay_config = RelayConfig {
        max_pending_envelopes: 3,
        ..RelayConfig::unpriced()
    };
    let server = Server::with(relay_config, Limits::default()).await;
    let relay = server.relay();
    let bob_client = published(&relay).await;
    let bob = bob_client.address();
    // A contact's deposits: with Bob's access key (the contacts' share,
    // bounded by max_pending_envelopes).
    let key = bob_client.access_key().await.unwrap().unwrap().key;
    let contact = DepositPass::with_access(key.clone());
    for id in 1..=3 {
        relay
            .deposit(&bob.mailbox(), &envelope(id, 10), &contact)
            .await
            .unwrap();
    }
    let answer = reqwest::Client::new()
        .post(deposit_url(&server.url, &bob))
        .header("content-type", "application/octet-stream")
        .header("cubbyhole-access", hex::encode(key.as_bytes()))
        .body(encode_envelope(&envelope(4, 10)))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 507);
    let body: serde_json::Value = serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "pending_envelopes");
    // A stranger (no key, at a relay that asks no stamps) still has the
    // strangers' share.
    relay
        .deposit(&bob.mailbox(), &envelope(6, 10), &DepositPass::NONE)
        .await
        .unwrap();
    assert_eq!(
        relay
            .deposit(&bob.mailbox(), &envelope(5, 10), &contact)
            .await,
        Err(TransportError::LimitExceeded(
            core_reason::PENDING_ENVELOPES
        ))
    );
    // A repeat of a pending id is still accepted (idempotent), not stored.
    assert_eq!(
        relay
            .deposit(&bob.mailbox(), &envelope(1, 10), &contact)
            .await,
        Ok(())
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn too_many_one_time_prekeys_is_422() {
    let relay_config = RelayConfig {
        max_one_time_prekeys: 10,
        ..RelayConfig::unpriced()
    };
    let server = Server::with(relay_config, Limits::default()).await;
    let relay = server.relay();
    // The client wants 100: refused whole.
    let mut bob = device_on(MemoryStore::new(), &relay, ClientConfig::default());
    assert!(matches!(
        bob.maintain_prekeys(&mut OsRng, now()).await,
        Err(ClientError::Transport(TransportError::LimitExceeded(
            core_reason::ONE_TIME_PREKEYS
        )))
    ));
    // Raw: 11 keys are 422, 10 are fine.
    let keys = IdentityKeyPair::generate(&mut OsRng);
    let mut prekeys = PrekeyStore::new(&mut OsRng, &keys, now()).expect("time in unix seconds");
    prekeys.generate_one_time_prekeys(&mut OsRng, 11);
    let all: Vec<_> = prekeys.one_time_prekeys().collect();
    let upload = |counter, n: usize| {
        BundleSetUpload::new(
            1,
            &keys,
            counter,
            prekeys.current_signed_prekey(),
            &all[..n],
            true,
        )
        .sign(&keys)
    };
    let url = format!("{}/v1/directory", server.url);
    let (status, why) = raw(reqwest::Method::POST, url.clone(), upload(1, 11)).await;
    assert_eq!((status, why.as_deref()), (422, Some("one_time_prekeys")));
    let (status, _) = raw(reqwest::Method::POST, url, upload(2, 10)).await;
    assert_eq!(status, 204);
    let me = DeviceAddress::new(keys.public(), 1);
    assert_eq!(relay.one_time_prekeys_left(&me).await, Ok(10));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deposit_rate_is_429_rate_deposits() {
    let limits = Limits {
        deposits_per_minute: 5,
        ..Limits::default()
    };
    let server = Server::with(RelayConfig::unpriced(), limits).await;
    let relay = server.relay();
    let bob = published(&relay).await.address();
    for id in 1..=5 {
        relay
            .deposit(&bob.mailbox(), &envelope(id, 10), &DepositPass::NONE)
            .await
            .unwrap();
    }
    let (status, why) = raw(
        reqwest::Method::POST,
        deposit_url(&server.url, &bob),
        encode_envelope(&envelope(6, 10)),
    )
    .await;
    assert_eq!((status, why.as_deref()), (429, Some("rate_deposits")));
    // A refusal is not retried: through a counting proxy, one request.
    let upstream = server.url.clone();
    let proxy = Fake::start(answer(move |_, _, _, _| {
        FakeReply::Forward(upstream.clone())
    }))
    .await;
    assert_eq!(
        HttpRelay::new(&proxy.url)
            .unwrap()
            .deposit(&bob.mailbox(), &envelope(7, 10), &DepositPass::NONE)
            .await,
        Err(TransportError::LimitExceeded(reason::RATE_DEPOSITS))
    );
    assert_eq!(proxy.requests(), 1, "a refused deposit is not retried");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn claim_rate_is_429_rate_claims_and_stops_draining_one_time_prekeys() {
    let limits = Limits {
        claims_per_minute: 10,
        ..Limits::default()
    };
    let server = Server::with(RelayConfig::unpriced(), limits).await;
    let relay = server.relay();
    let bob = published(&relay).await.address();
    let before = relay.one_time_prekeys_left(&bob).await.unwrap();
    assert_eq!(before, 100);

    // A stranger loops on Bob's bundle.
    let stranger = server.relay();
    let started = Instant::now();
    let (mut served, mut refused) = (0u32, 0u32);
    for _ in 0..50 {
        match stranger.fetch_bundle(&bob).await {
            Ok(_) => served += 1,
            Err(e) => {
                assert_eq!(e, TransportError::LimitExceeded(reason::RATE_CLAIMS));
                refused += 1;
            }
        }
    }
    let (status, why) = raw(reqwest::Method::GET, bundle_url(&server.url, &bob), vec![]).await;
    let elapsed = started.elapsed();
    if status == 200 {
        served += 1;
    } else {
        assert_eq!((status, why.as_deref()), (429, Some("rate_claims")));
    }

    let after = relay.one_time_prekeys_left(&bob).await.unwrap();
    println!(
        "bundle fetches in {elapsed:?}: served {served}, refused {refused}; one-time prekeys \
         {before} -> {after}"
    );
    // The burst is the limit; the bucket refills 10 a minute, so a slow
    // loop may see one more every 6 s.
    let allowed = 10 + (elapsed.as_secs_f64() / 6.0).ceil() as u32;
    assert!(served >= 10 && served <= allowed, "{served} served");
    assert!(refused >= 50 - allowed);
    assert_eq!(before - after, served, "every served fetch claimed one");
    // Bob refills when he next maintains his prekeys.
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Retries

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_deposit_lands_once() {
    let server = Server::memory().await;
    let relay = server.relay();
    let bob = published(&relay).await;
    let to = bob.address();
    let url = deposit_url(&server.url, &to);
    let body = encode_envelope(&envelope(7, 40));
    // 201 the first time, 200 for the repeat.
    assert_eq!(
        raw(reqwest::Method::POST, url.clone(), body.clone())
            .await
            .0,
        201
    );
    assert_eq!(
        raw(reqwest::Method::POST, url.clone(), body.clone())
            .await
            .0,
        200
    );
    assert_eq!(
        relay
            .deposit(&to.mailbox(), &envelope(7, 40), &DepositPass::NONE)
            .await,
        Ok(())
    );

    let auth = owner_auth(&bob, &relay, MailboxOp::Fetch).await;
    let got = relay.fetch(&auth, 100).await.unwrap();
    assert_eq!(got, vec![envelope(7, 40)]);
    let auth = owner_auth(&bob, &relay, MailboxOp::Acknowledge).await;
    relay.acknowledge(&auth, &[got[0].id]).await.unwrap();
    // Still recognised after it was acknowledged: not stored again.
    assert_eq!(raw(reqwest::Method::POST, url, body).await.0, 200);
    let auth = owner_auth(&bob, &relay, MailboxOp::Fetch).await;
    assert!(relay.fetch(&auth, 100).await.unwrap().is_empty());
    server.stop().await;
}

/// A hand-made HTTP server in front of (or instead of) the relay: counts
/// requests and answers through `answer`.
struct Fake {
    url: String,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

type Answer = Arc<dyn Fn(usize, Method, Uri, Bytes) -> FakeReply + Send + Sync>;

/// How a [`Fake`] answers request number `n` (from 0).
fn answer(f: impl Fn(usize, Method, Uri, Bytes) -> FakeReply + Send + Sync + 'static) -> Answer {
    Arc::new(f)
}

enum FakeReply {
    /// Answer this status with this reason.
    Error(StatusCode, &'static str),
    /// Forward to the upstream relay, then answer this instead.
    ForwardThen(String, StatusCode, &'static str),
    /// Forward to the upstream relay and relay its answer.
    Forward(String),
}

impl Fake {
    async fn start(answer: Answer) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&requests);
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
            let answer = Arc::clone(&answer);
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let error = |status: StatusCode, why: &str| {
                    let json = serde_json::json!({"error": why, "message": "fake"}).to_string();
                    (status, [("content-type", "application/json")], json).into_response()
                };
                let forward = |upstream: String| {
                    let (method, uri, body) = (method.clone(), uri.clone(), body.clone());
                    async move {
                        let m = reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap();
                        let mut request =
                            reqwest::Client::new().request(m, format!("{upstream}{uri}"));
                        if !body.is_empty() {
                            request = request.header("content-type", "application/octet-stream");
                        }
                        let r = request.body(body.to_vec()).send().await.unwrap();
                        let status = StatusCode::from_u16(r.status().as_u16()).unwrap();
                        (status, r.bytes().await.unwrap().to_vec()).into_response()
                    }
                };
                let reply: Response = match answer(n, method.clone(), uri.clone(), body.clone()) {
                    FakeReply::Error(status, why) => error(status, why),
                    FakeReply::ForwardThen(upstream, status, why) => {
                        forward(upstream).await;
                        error(status, why)
                    }
                    FakeReply::Forward(upstream) => forward(upstream).await,
                };
                reply
            }
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Fake {
            url,
            requests,
            task,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The sum of the sleeps before `retries` retries: at least half the
/// nominal delays, at most all of them.
fn backoff_bounds(config: &HttpRelayConfig, retries: u32) -> (Duration, Duration) {
    let total: Duration = (0..retries).map(|r| config.backoff(r)).sum();
    (total / 2, total)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deposit_whose_reply_is_lost_is_retried_and_lands_once() {
    let server = Server::memory().await;
    let direct = server.relay();
    let mut bob = published(&direct).await;
    let bob_address = bob.address();
    // The first deposit reaches the relay, but its answer is lost (the
    // proxy answers 503 instead); everything else passes through.
    let upstream = server.url.clone();
    let deposits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&deposits);
    let proxy = Fake::start(answer(move |_, method, uri, _| {
        if method == Method::POST
            && uri.path().ends_with("/envelopes")
            && seen.fetch_add(1, Ordering::SeqCst) == 0
        {
            return FakeReply::ForwardThen(
                upstream.clone(),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            );
        }
        FakeReply::Forward(upstream.clone())
    }))
    .await;
    let mut alice = published(&HttpRelay::new(&proxy.url).unwrap()).await;
    let sent = alice
        .send(&mut OsRng, &bob_address, b"exactly once", now())
        .await
        .unwrap();
    assert!(sent.deposited);
    assert_eq!(deposits.load(Ordering::SeqCst), 2, "one retry");
    let report = bob.receive(&mut cubbyhole::OsRng, now()).await.unwrap();
    assert_eq!((report.received, report.redelivered), (1, 0));
    assert_eq!(
        take_inbox(&mut bob),
        vec![(alice.address(), "exactly once".to_owned())]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_calls_back_off_on_503_and_others_are_not_retried() {
    // Always 503.
    let down = Fake::start(answer(|_, _, _, _| {
        FakeReply::Error(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    }))
    .await;
    let relay = HttpRelay::new(&down.url).unwrap();
    let (low, high) = backoff_bounds(relay.config(), 3);
    let to = DeviceAddress {
        identity: [9; 32],
        device_id: 1,
    };
    let started = Instant::now();
    let result = relay
        .deposit(&to.mailbox(), &envelope(1, 10), &DepositPass::NONE)
        .await;
    let elapsed = started.elapsed();
    assert!(matches!(result, Err(TransportError::Unavailable(_))));
    assert_eq!(down.requests(), 4, "one attempt and three retries");
    println!("deposit gave up after {elapsed:?} (backoff {low:?}..{high:?})");
    assert!(elapsed >= low && elapsed < high + Duration::from_millis(800));

    // Publish and fetch are not retried on a 503 (the relay was reached).
    let before = down.requests();
    assert!(matches!(
        relay.publish(&[1, 2, 3]).await,
        Err(TransportError::Unavailable(_))
    ));
    let keys = IdentityKeyPair::generate(&mut OsRng);
    let auth = MailboxAuth::sign(&keys, 1, MailboxOp::Fetch, [0; 32]);
    assert!(matches!(
        relay.fetch(&auth, 10).await,
        Err(TransportError::Unavailable(_))
    ));
    assert!(matches!(
        relay.fetch_bundle(&to).await,
        Err(TransportError::Unavailable(_))
    ));
    assert_eq!(down.requests() - before, 3);

    // 503 twice, then the real answer: the deposit lands on the third try.
    let server = Server::memory().await;
    let direct = server.relay();
    let bob = published(&direct).await;
    let upstream = server.url.clone();
    let flaky = Fake::start(answer(move |n, _, _, _| {
        if n < 2 {
            FakeReply::Error(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        } else {
            FakeReply::Forward(upstream.clone())
        }
    }))
    .await;
    let relay = HttpRelay::new(&flaky.url).unwrap();
    relay
        .deposit(
            &bob.address().mailbox(),
            &envelope(3, 10),
            &DepositPass::NONE,
        )
        .await
        .unwrap();
    assert_eq!(flaky.requests(), 3);
    let auth = owner_auth(&bob, &direct, MailboxOp::Fetch).await;
    assert_eq!(
        direct.fetch(&auth, 10).await.unwrap(),
        vec![envelope(3, 10)]
    );

    // A 409 on publish is final: one request.
    let replayed = Fake::start(answer(|_, _, _, _| {
        FakeReply::Error(StatusCode::CONFLICT, "replayed")
    }))
    .await;
    let relay = HttpRelay::new(&replayed.url).unwrap();
    assert_eq!(relay.publish(&[1]).await, Err(TransportError::Replayed));
    assert_eq!(replayed.requests(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_port_is_unavailable_after_the_retries() {
    // A port nobody listens on.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = HttpRelayConfig {
        retries: 4,
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(300),
        ..HttpRelayConfig::default()
    };
    let relay = HttpRelay::with_config(&format!("http://127.0.0.1:{port}"), config).unwrap();
    let (low, high) = backoff_bounds(relay.config(), 4);
    let to = DeviceAddress {
        identity: [9; 32],
        device_id: 1,
    };
    for (name, call) in [
        ("deposit", 0),
        ("challenge", 1),
        ("one_time_prekeys_left", 2),
        ("publish", 3),
        ("fetch_bundle", 4),
    ] {
        let started = Instant::now();
        let result = match call {
            0 => {
                relay
                    .deposit(&to.mailbox(), &envelope(1, 10), &DepositPass::NONE)
                    .await
            }
            1 => relay.challenge(&to.mailbox()).await.map(drop),
            2 => relay.one_time_prekeys_left(&to).await.map(drop),
            3 => relay.publish(&[1]).await,
            _ => relay.fetch_bundle(&to).await.map(drop),
        };
        let elapsed = started.elapsed();
        println!("{name}: {result:?} after {elapsed:?} (backoff {low:?}..{high:?})");
        assert!(matches!(result, Err(TransportError::Unavailable(_))));
        // Connecting failed, so even publish and fetch_bundle retried.
        assert!(elapsed >= low, "{name} gave up too early: {elapsed:?}");
        assert!(
            elapsed < high + Duration::from_millis(800),
            "{name} took {elapsed:?}"
        );
    }
    // Fetch is never retried here: it fails at once.
    let keys = IdentityKeyPair::generate(&mut OsRng);
    let auth = MailboxAuth::sign(&keys, 1, MailboxOp::Fetch, [0; 32]);
    let started = Instant::now();
    assert!(matches!(
        relay.fetch(&auth, 10).await,
        Err(TransportError::Unavailable(_))
    ));
    assert!(started.elapsed() < low);

    // A client whose relay is down keeps its message in the outbox, and
    // deposits it with the same id once a relay answers.
    let server = Server::memory().await;
    let live = server.relay();
    let mut bob = published(&live).await;
    let mut alice = published(&live).await;
    alice
        .send(&mut OsRng, &bob.address(), b"first", now())
        .await
        .unwrap();
    let mut alice = device_on(alice.into_store(), &relay, ClientConfig::default());
    let sent = alice
        .send(&mut OsRng, &bob.address(), b"second", now())
        .await
        .unwrap();
    assert!(!sent.deposited);
    let mut alice = device_on(alice.into_store(), &live, ClientConfig::default());
    assert_eq!(alice.flush_outbox().await.unwrap(), 1);
    assert_eq!(
        bob.receive(&mut cubbyhole::OsRng, now())
            .await
            .unwrap()
            .received,
        2
    );
    let texts: Vec<String> = take_inbox(&mut bob).into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, ["first", "second"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_unknown_routes() {
    let server = Server::memory().await;
    let relay = server.relay();
    relay.health().await.unwrap();
    // A base URL with a wrong prefix: every route is unknown.
    let wrong = HttpRelay::new(&format!("{}/nope", server.url)).unwrap();
    let device = DeviceAddress {
        identity: [1; 32],
        device_id: 1,
    };
    assert!(matches!(
        wrong.one_time_prekeys_left(&device).await,
        Err(TransportError::BadRequest(_))
    ));
    // A device that never published.
    assert_eq!(
        relay.one_time_prekeys_left(&device).await,
        Err(TransportError::NotFound)
    );
    assert_eq!(
        relay.fetch_bundle(&device).await,
        Err(TransportError::NotFound)
    );
    server.stop().await;
}

/// Drives a future to completion on this thread (the client's futures, from
/// synchronous test code).
trait Wait: std::future::Future + Sized {
    fn wait(self) -> Self::Output {
        cubbyhole::client::block_on(self)
    }
}
impl<F: std::future::Future> Wait for F {}

/// A device of the device-list tests (keys from a fixed seed).
fn list_key(n: u8) -> IdentityKeyPair {
    IdentityKeyPair::from_seed(&[0x70 ^ n; 32])
}

/// What only the HTTP layer of the device-list routes decides (the rules
/// are the transport conformance suite's, `transport_conformance.rs`): the
/// path's account must be the list's, strict path and query syntax, the
/// 1691-byte body limit, the answer's framing and content type, and the
/// route labels of the metrics.
#[tokio::test(flavor = "multi_thread")]
async fn device_list_routes_check_paths_bodies_and_label_their_metrics() {
    use cubbyhole::transport::DeviceDirectory;
    use cubbyhole::{DeviceEntry, DeviceList};
    use cubbyhole_http::wire::{decode_device_lists, MAX_SIGNED_DEVICE_LIST_BYTES};

    let server = Server::memory().await;
    let devices_url = |account: &[u8; 32]| {
        format!(
            "{}/v1/accounts/{}/devices",
            server.url,
            hex::encode(account)
        )
    };
    let v1 = DeviceList::genesis(&list_key(1), 1)
        .verify_genesis()
        .unwrap();
    let account = v1.account_id().0;
    let other = DeviceList::genesis(&list_key(2), 2)
        .verify_genesis()
        .unwrap();

    // The path's account must be the list's.
    assert_eq!(
        raw(
            reqwest::Method::PUT,
            devices_url(&other.account_id().0),
            v1.encode()
        )
        .await,
        (400, Some("bad_request".into()))
    );
    // Uppercase hex and a short account are refused, not looked up.
    let upper = format!(
        "{}/v1/accounts/{}/devices",
        server.url,
        hex::encode(account).to_uppercase()
    );
    assert_eq!(
        raw(reqwest::Method::PUT, upper, v1.encode()).await,
        (400, Some("bad_request".into()))
    );
    assert_eq!(
        raw(
            reqwest::Method::GET,
            format!("{}/v1/accounts/ab/devices", server.url),
            vec![]
        )
        .await,
        (400, Some("bad_request".into()))
    );
    // Above the largest list: refused before the body is read in full.
    assert_eq!(
        raw(
            reqwest::Method::PUT,
            devices_url(&account),
            vec![1; MAX_SIGNED_DEVICE_LIST_BYTES + 1]
        )
        .await,
        (413, Some("body_size".into()))
    );
    // The largest list (16 devices, all signing) fits exactly.
    let all: Vec<DeviceEntry> = (1..=16u8)
        .map(|n| DeviceEntry {
            identity: *list_key(n).public(),
            device_id: u32::from(n),
        })
        .collect();
    let mut largest = v1.successor(&all).unwrap();
    for n in 1..=16u8 {
        largest.sign(&list_key(n)).unwrap();
    }
    let v2 = largest.into_list().unwrap().verify_successor(&v1).unwrap();
    assert_eq!(v2.encode().len(), MAX_SIGNED_DEVICE_LIST_BYTES);
    assert_eq!(
        raw(reqwest::Method::PUT, devices_url(&account), v1.encode()).await,
        (204, None)
    );
    assert_eq!(
        raw(reqwest::Method::PUT, devices_url(&account), v2.encode()).await,
        (204, None)
    );

    // The answer: octet-stream, length-prefixed, oldest first.
    let response = reqwest::get(format!("{}?after=0", devices_url(&account)))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    let bytes = response.bytes().await.unwrap();
    assert_eq!(&bytes[..4], &(v1.encode().len() as u32).to_be_bytes());
    assert_eq!(
        decode_device_lists(&bytes).unwrap(),
        vec![v1.encode(), v2.encode()]
    );
    for bad in [
        "after=-1",
        "after=",
        "after=18446744073709551616",
        "after=0x1",
    ] {
        assert_eq!(
            raw(
                reqwest::Method::GET,
                format!("{}?{bad}", devices_url(&account)),
                vec![]
            )
            .await,
            (400, Some("bad_request".into())),
            "{bad}"
        );
    }
    assert_eq!(
        server.relay().fetch_device_lists(v1.account_id(), 1).await,
        Ok(vec![v2.encode()])
    );
    assert_eq!(
        server
            .relay()
            .fetch_device_lists(v1.account_id(), u64::MAX)
            .await,
        Ok(vec![])
    );
    assert_eq!(
        server
            .relay()
            .fetch_device_lists(other.account_id(), 0)
            .await,
        Err(TransportError::NotFound)
    );

    // PUT and GET share a path: each has its own route label.
    let text = reqwest::get(format!("{}/metrics", server.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let requests = |route: &str| -> u64 {
        let prefix = format!("cubbyhole_relay_requests_total{{route=\"{route}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {route} counter in\n{text}"))
    };
    // PUT: mismatch, uppercase, 413, v1, v2; GET: short account, the
    // answer, 4 bad queries, 3 fetches.
    assert_eq!(requests("publish_devices"), 5);
    assert_eq!(requests("devices"), 9);
    server.stop().await;
}
