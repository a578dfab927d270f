//! Deposit access keys, stamps and the relay's storage accounting over
//! HTTP (issue 16; SPEC.md 16.10 to 16.12): the real server on a loopback
//! port, driven by [`HttpRelay`] and by raw HTTP where the status, reason
//! and body are under test.

use std::time::{SystemTime, UNIX_EPOCH};

use cubbyhole::relay::{reason as core_reason, RelayConfig};
use cubbyhole::transport::stamp::Stamp;
use cubbyhole::transport::{
    encode_envelope, AccessKey, BundleSetUpload, DepositPass, DeviceAddress, Envelope, EnvelopeId,
    Mailbox, MailboxId, PrekeyDirectory, TransportError,
};
use cubbyhole::{IdentityKeyPair, OsRng, SignedPrekey};
use cubbyhole_http::{reason, HttpRelay};
use cubbyhole_relay::{serve, Limits, ServerConfig, StorageConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const DIFFICULTY: u8 = 8;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A relay server on a loopback port; stops when dropped.
struct Server {
    url: String,
    _stop: oneshot::Sender<()>,
}

async fn start(relay: RelayConfig, limits: Limits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let config = ServerConfig {
        storage: StorageConfig::SqliteMemory,
        relay,
        limits,
        ..ServerConfig::default()
    };
    tokio::spawn(async move {
        let _ = serve(listener, config, async move {
            let _ = stopped.await;
        })
        .await;
    });
    Server { url, _stop: stop }
}

/// Low difficulties (the test mints in microseconds), a strangers' share
/// of two envelopes.
fn priced() -> RelayConfig {
    RelayConfig {
        deposit_stamp_difficulty: DIFFICULTY,
        identity_stamp_difficulty: DIFFICULTY,
        max_stranger_envelopes: 2,
        ..RelayConfig::default()
    }
}

/// Rate limits off (the tests send bursts from one address).
fn open_limits() -> Limits {
    Limits {
        deposits_per_minute: 0,
        requests_per_minute: 0,
        ..Limits::default()
    }
}

struct Owner {
    keys: IdentityKeyPair,
    key: AccessKey,
}

impl Owner {
    fn new() -> Owner {
        Owner {
            keys: IdentityKeyPair::generate(&mut OsRng),
            key: AccessKey::generate(&mut OsRng),
        }
    }
    fn address(&self) -> DeviceAddress {
        DeviceAddress::new(self.keys.public(), 1)
    }
    fn mailbox(&self) -> MailboxId {
        self.address().mailbox()
    }
    /// Its upload, registering its key, with or without an identity stamp.
    fn upload(&self, stamped: bool) -> Vec<u8> {
        let spk = SignedPrekey::generate(&mut OsRng, &self.keys, 1, now()).unwrap();
        let mut upload = BundleSetUpload::new(1, &self.keys, now(), &spk, &[], true);
        upload.access_verifier = Some(self.key.verifier(&self.mailbox()));
        if stamped {
            upload.identity_stamp = Some(
                Stamp::mint_identity(&self.address(), DIFFICULTY, now(), 0, u64::MAX)
                    .unwrap()
                    .unwrap(),
            );
        }
        upload.sign(&self.keys)
    }
    fn contact(&self) -> DepositPass {
        DepositPass::with_access(self.key.clone())
    }
}

fn envelope(n: u8, len: usize) -> Envelope {
    let mut id = [n; 16];
    id[15] = 0xee;
    Envelope {
        id: EnvelopeId(id),
        payload: vec![n; len],
    }
}

fn stamped(to: &MailboxId, envelope: &Envelope) -> DepositPass {
    let len = envelope.payload.len() as u32;
    DepositPass::with_stamp(
        Stamp::mint(to, &envelope.id, len, DIFFICULTY, now(), 0, u64::MAX)
            .unwrap()
            .unwrap(),
    )
}

/// Status, reason and the whole JSON body of a raw deposit.
async fn raw_deposit(
    url: &str,
    to: &MailboxId,
    envelope: &Envelope,
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new()
        .post(format!(
            "{url}/v1/mailboxes/{}/envelopes",
            hex::encode(to.0)
        ))
        .header("content-type", "application/octet-stream")
        .body(encode_envelope(envelope));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

#[tokio::test]
async fn stamps_and_access_keys_over_http() {
    let server = start(priced(), open_limits()).await;
    let relay = HttpRelay::new(&server.url).unwrap();
    let bob = Owner::new();
    // A first upload without an identity stamp: 403 stamp_required with
    // the difficulty, which HttpRelay hands back as StampRequired(d).
    assert_eq!(
        relay.publish(&bob.upload(false)).await,
        Err(TransportError::StampRequired(DIFFICULTY))
    );
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/directory", server.url))
        .header("content-type", "application/octet-stream")
        .body(bob.upload(false))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 403);
    let body: serde_json::Value = serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "stamp_required");
    assert_eq!(body["difficulty"], u64::from(DIFFICULTY));
    relay.publish(&bob.upload(true)).await.unwrap();

    let to = bob.mailbox();
    // Without a pass: a stamp is required.
    let e1 = envelope(1, 100);
    assert_eq!(
        relay.deposit(&to, &e1, &DepositPass::NONE).await,
        Err(TransportError::StampRequired(DIFFICULTY))
    );
    let (status, body) = raw_deposit(&server.url, &to, &e1, &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("stamp_required"))
    );
    assert_eq!(body["difficulty"], u64::from(DIFFICULTY));
    // A wrong key is no key.
    let wrong = DepositPass::with_access(AccessKey::from_bytes([7; 16]));
    assert_eq!(
        relay.deposit(&to, &e1, &wrong).await,
        Err(TransportError::StampRequired(DIFFICULTY))
    );
    // Stamped deposits fill the strangers' share (2), then are refused;
    // the key still admits.
    relay.deposit(&to, &e1, &stamped(&to, &e1)).await.unwrap();
    let e2 = envelope(2, 100);
    relay.deposit(&to, &e2, &stamped(&to, &e2)).await.unwrap();
    let e3 = envelope(3, 100);
    assert_eq!(
        relay.deposit(&to, &e3, &stamped(&to, &e3)).await,
        Err(TransportError::LimitExceeded(
            core_reason::STRANGER_ENVELOPES
        ))
    );
    relay.deposit(&to, &e3, &bob.contact()).await.unwrap();
    // A retried stamped deposit lands once, even with the share full.
    relay.deposit(&to, &e1, &stamped(&to, &e1)).await.unwrap();
    let (status, _) = raw_deposit(
        &server.url,
        &to,
        &e1,
        &[("cubbyhole-access", &hex::encode(bob.key.as_bytes()))],
    )
    .await;
    assert_eq!(status, 200, "a repeat");
}

#[tokio::test]
async fn malformed_pass_headers_are_bad_requests() {
    let server = start(priced(), open_limits()).await;
    let relay = HttpRelay::new(&server.url).unwrap();
    let bob = Owner::new();
    relay.publish(&bob.upload(true)).await.unwrap();
    let to = bob.mailbox();
    let key = hex::encode(bob.key.as_bytes());
    let e = envelope(1, 10);
    let cases: [&[(&str, &str)]; 6] = [
        &[("cubbyhole-access", "not hex at all, not hex at all!!")],
        &[("cubbyhole-access", &key[..31])],
        &[("cubbyhole-access", &key.to_uppercase())],
        &[("cubbyhole-access", &key), ("cubbyhole-access", &key)],
        &[("cubbyhole-stamp", "00")],
        &[("cubbyhole-stamp", "0000000000000000000000000000000g")],
    ];
    for headers in cases {
        let (status, body) = raw_deposit(&server.url, &to, &e, headers).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_request")),
            "{headers:?}"
        );
    }
    // The same key, well formed: stored.
    let (status, _) = raw_deposit(&server.url, &to, &e, &[("cubbyhole-access", &key)]).await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn strangers_total_and_the_fair_share() {
    let limits = Limits {
        total_storage_bytes: 10_000,
        strangers_storage_percent: 25,
        fair_share_percent: 75,
        fair_share_bytes: 1_000,
        ..open_limits()
    };
    let relay_config = RelayConfig {
        max_stranger_envelopes: 100,
        ..priced()
    };
    let server = start(relay_config, limits).await;
    let relay = HttpRelay::new(&server.url).unwrap();
    let (bob, carol) = (Owner::new(), Owner::new());
    relay.publish(&bob.upload(true)).await.unwrap();
    relay.publish(&carol.upload(true)).await.unwrap();
    let (to_bob, to_carol) = (bob.mailbox(), carol.mailbox());
    // Strangers together: 25 % of 10,000 bytes.
    for n in 1..=2 {
        let e = envelope(n, 1_000);
        relay
            .deposit(&to_bob, &e, &stamped(&to_bob, &e))
            .await
            .unwrap();
    }
    let e = envelope(3, 1_000);
    assert_eq!(
        relay.deposit(&to_carol, &e, &stamped(&to_carol, &e)).await,
        Err(TransportError::LimitExceeded(reason::STRANGERS_TOTAL))
    );
    // Contacts fill Bob up to 75 % of the total (7,000 bytes held).
    for n in 10..15 {
        relay
            .deposit(&to_bob, &envelope(n, 1_000), &bob.contact())
            .await
            .unwrap();
    }
    // Above 75 %: Bob (7,000 bytes) is refused, Carol (nothing) gets one
    // envelope of up to 1,000 bytes, then she too holds her fair share.
    assert_eq!(
        relay
            .deposit(&to_bob, &envelope(20, 1_000), &bob.contact())
            .await,
        Err(TransportError::LimitExceeded(reason::TOTAL_STORAGE))
    );
    relay
        .deposit(&to_carol, &envelope(21, 1_000), &carol.contact())
        .await
        .unwrap();
    assert_eq!(
        relay
            .deposit(&to_carol, &envelope(22, 10), &carol.contact())
            .await,
        Err(TransportError::LimitExceeded(reason::TOTAL_STORAGE))
    );
}
