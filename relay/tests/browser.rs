//! The web chat end to end, in a real headless Chromium: the relay serves
//! `web/` (with the package `scripts/build-web.sh` built into `web/pkg`)
//! on a loopback port; two browser profiles (two Chromium instances, so
//! two IndexedDBs) open a device each, talk, one tab is closed while the
//! other writes, then reopened: its device comes back from IndexedDB and
//! receives what was written meanwhile. Driven over WebDriver
//! (chromedriver), asserting on what each page shows.
//!
//! Built without `CUBBYHOLE_TEST_BROWSER` set (`relay/build.rs`), the test
//! is ignored: it needs the package built and Chromium with ChromeDriver
//! (`.ci/run` installs and builds everything, then sets it). Under `CI=1`
//! the guard test fails instead.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cubbyhole::relay::RelayConfig;
use cubbyhole_relay::{serve, ServerConfig, StorageConfig};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_browser_test_is_not_ignored_in_ci() {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "1" || v == "true");
    if in_ci && !cfg!(cubbyhole_test_browser) {
        panic!(
            "CI=1 but CUBBYHOLE_TEST_BROWSER was not set when the relay's tests were built: \
             the browser test would be ignored"
        );
    }
}

/// A chromedriver process on a loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let binary = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let child = Command::new(&binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(format!("{}/status", driver.url)).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        driver
    }
}

/// One WebDriver session: one Chromium with a profile of its own.
struct Browser {
    http: reqwest::Client,
    base: String,
    _profile: TempDir,
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "cubbyhole-browser-{name}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    async fn open(driver: &Driver, name: &str) -> Browser {
        let profile = TempDir::new(name);
        let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let http = reqwest::Client::new();
        let answer = post_json(
            &http,
            reqwest::Method::POST,
            &format!("{}/session", driver.url),
            &json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": binary,
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--disable-background-networking",
                        "--disable-component-update", "--no-first-run", "--disable-sync",
                        "--disable-extensions", "--disable-default-apps",
                        format!("--user-data-dir={}", profile.0.display()),
                    ],
                },
            }}}),
        )
        .await;
        let id = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {answer}"))
            .to_owned();
        Browser {
            base: format!("{}/session/{id}", driver.url),
            http,
            _profile: profile,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let answer = post_json(&self.http, method, &format!("{}{path}", self.base), &body).await;
        if answer["value"].get("error").is_some() {
            panic!("WebDriver {path}: {answer}");
        }
        answer["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    async fn run(&self, script: &str, args: Value) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": args }),
        )
        .await
    }

    /// Runs `script` until it returns something truthy; that value.
    async fn wait_for(&self, what: &str, script: &str, args: Value, seconds: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            let v = self.run(script, args.clone()).await;
            if !(v.is_null() || v == json!(false) || v == json!("")) {
                return v;
            }
            if Instant::now() > deadline {
                let status = self
                    .run(
                        "return document.getElementById('status').textContent",
                        json!([]),
                    )
                    .await;
                panic!("timed out waiting for {what}; the page's status: {status}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens the chat page and the device `name` with `passphrase`.
    async fn open_device(&self, page: &str, name: &str, passphrase: &str) {
        self.goto(page).await;
        self.wait_for(
            "the setup form",
            "return !document.getElementById('setup').hidden",
            json!([]),
            30,
        )
        .await;
        self.run(
            "document.getElementById('name').value = arguments[0];
             document.getElementById('passphrase').value = arguments[1];
             document.getElementById('open').click();",
            json!([name, passphrase]),
        )
        .await;
    }

    async fn status(&self) -> String {
        self.run(
            "return document.getElementById('status').textContent",
            json!([]),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    async fn wait_ready(&self, name: &str) -> String {
        self.wait_for(
            "the device to be ready",
            "const s = document.getElementById('status');
             if (s.classList.contains('error')) throw new Error(s.textContent);
             return s.textContent.startsWith('Ready') && document.getElementById('address').textContent",
            json!([]),
            120,
        )
        .await;
        assert_eq!(self.status().await, format!("Ready as {name}"));
        self.address().await
    }

    async fn address(&self) -> String {
        self.run(
            "return document.getElementById('address').textContent",
            json!([]),
        )
        .await
        .as_str()
        .unwrap()
        .to_owned()
    }

    async fn send(&self, to: &str, text: &str) {
        self.run(
            "const peer = document.getElementById('peer');
             peer.value = arguments[0];
             peer.dispatchEvent(new Event('change'));
             document.getElementById('text').value = arguments[1];
             document.getElementById('send').click();",
            json!([to, text]),
        )
        .await;
    }

    /// The log as the page shows it: (direction, sender, text, state).
    async fn log(&self) -> Vec<(String, String, String, String)> {
        let v = self
            .run(
                "return [...document.querySelectorAll('#log li')].map(li => [
                   li.className, li.dataset.from || '',
                   li.querySelector('.text').textContent, li.dataset.state || '']);",
                json!([]),
            )
            .await;
        v.as_array()
            .unwrap()
            .iter()
            .map(|row| {
                let s = |i: usize| row[i].as_str().unwrap_or_default().to_owned();
                (s(0), s(1), s(2), s(3))
            })
            .collect()
    }

    async fn wait_received(&self, from: &str, text: &str) {
        self.wait_for(
            &format!("{text:?} to arrive"),
            "return [...document.querySelectorAll('#log li.in')].some(li =>
               li.dataset.from === arguments[0] && li.querySelector('.text').textContent === arguments[1])",
            json!([from, text]),
            60,
        )
        .await;
    }

    async fn wait_state(&self, text: &str, state: &str) {
        self.wait_for(
            &format!("{text:?} to be {state}"),
            "return [...document.querySelectorAll('#log li.out')].some(li =>
               li.querySelector('.text').textContent === arguments[0] && li.dataset.state === arguments[1])",
            json!([text, state]),
            60,
        )
        .await;
    }

    /// Closes the current tab after opening a new, empty one, and goes on
    /// in the new one (the page is gone: its memory, its listeners, its
    /// lock on the device's database).
    async fn close_tab(&self) {
        let old = self
            .call(reqwest::Method::GET, "/window", Value::Null)
            .await;
        let new = self
            .call(reqwest::Method::POST, "/window/new", json!({"type": "tab"}))
            .await;
        self.call(reqwest::Method::DELETE, "/window", json!({}))
            .await;
        self.call(
            reqwest::Method::POST,
            "/window",
            json!({ "handle": new["handle"] }),
        )
        .await;
        let handles = self
            .call(reqwest::Method::GET, "/window/handles", Value::Null)
            .await;
        assert!(
            !handles.as_array().unwrap().contains(&old),
            "the tab is still open"
        );
    }

    /// Whether any value in the device's IndexedDB contains `needle` (as
    /// UTF-8 bytes), and how many records it holds.
    async fn database_holds(&self, name: &str, needle: &str) -> (bool, u64) {
        let v = self
            .call(
                reqwest::Method::POST,
                "/execute/async",
                json!({"script": "
                  const [name, needle, done] = arguments;
                  const want = new TextEncoder().encode(needle);
                  const open = indexedDB.open(name);
                  open.onerror = () => done(['error', String(open.error)]);
                  open.onsuccess = () => {
                    const db = open.result;
                    const names = [...db.objectStoreNames];
                    const tx = db.transaction(names, 'readonly');
                    let found = false, count = 0, pending = names.length;
                    for (const n of names) {
                      const all = tx.objectStore(n).getAll();
                      all.onsuccess = () => {
                        for (const value of all.result) {
                          count++;
                          const bytes = value instanceof ArrayBuffer ? new Uint8Array(value)
                            : ArrayBuffer.isView(value) ? new Uint8Array(value.buffer, value.byteOffset, value.byteLength)
                            : new TextEncoder().encode(JSON.stringify(value));
                          outer: for (let i = 0; i + want.length <= bytes.length; i++) {
                            for (let j = 0; j < want.length; j++) if (bytes[i + j] !== want[j]) continue outer;
                            found = true; break;
                          }
                        }
                        if (--pending === 0) { db.close(); done([found, count]); }
                      };
                    }
                    if (names.length === 0) { db.close(); done([false, 0]); }
                  };",
                  "args": [name, needle]}),
            )
            .await;
        assert!(v[0].is_boolean(), "reading IndexedDB failed: {v}");
        (v[0].as_bool().unwrap(), v[1].as_u64().unwrap())
    }
}

/// A WebDriver call: `body` as JSON, the answer parsed.
async fn post_json(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: &Value,
) -> Value {
    let mut request = http.request(method.clone(), url);
    if method != reqwest::Method::GET {
        request = request
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).unwrap());
    }
    let bytes = request.send().await.unwrap().bytes().await.unwrap();
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("WebDriver {url}: {e}: {}", String::from_utf8_lossy(&bytes)))
}

/// The relay serving the page, on a loopback port, SQLite in a file.
async fn start_relay(db: &Path) -> (String, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut config = ServerConfig {
        storage: StorageConfig::Sqlite(db.to_owned()),
        relay: if std::env::var("CUBBYHOLE_BROWSER_TEST_PRICES").is_ok_and(|v| v == "default") {
            // To measure what a page pays at a relay with default prices.
            RelayConfig::default()
        } else {
            RelayConfig {
                // Stamps are minted in the browser (wasm): priced, but
                // cheaply, so the test's identities (two devices and their
                // inboxes) and first messages take a moment, not minutes.
                identity_stamp_difficulty: 12,
                deposit_stamp_difficulty: 8,
                ..RelayConfig::default()
            }
        },
        ..ServerConfig::default()
    };
    config.web_root = Some(workspace().join("web"));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        serve(listener, config, async move {
            let _ = stopped.await;
        })
        .await
        .expect("the relay failed");
    });
    (url, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cubbyhole_test_browser),
    ignore = "set CUBBYHOLE_TEST_BROWSER=1 after scripts/build-web.sh, with chromium and chromedriver installed"
)]
async fn two_browser_profiles_chat_through_the_relay_and_a_closed_tab_catches_up() {
    let pkg = workspace().join("web/pkg/cubbyhole_browser_bg.wasm");
    assert!(
        pkg.is_file(),
        "{} is missing: run scripts/build-web.sh",
        pkg.display()
    );
    let dir = TempDir::new("relay");
    let (relay, _stop) = start_relay(&dir.0.join("relay.db")).await;
    let page = format!("{relay}/");
    let driver = Driver::start().await;
    let alice = Browser::open(&driver, "alice").await;
    let bob = Browser::open(&driver, "bob").await;

    let started = Instant::now();
    alice
        .open_device(&page, "alice", "alice's passphrase")
        .await;
    bob.open_device(&page, "bob", "bob's passphrase").await;
    let alice_address = alice.wait_ready("alice").await;
    let bob_address = bob.wait_ready("bob").await;
    eprintln!(
        "both devices opened and published in {:?}",
        started.elapsed()
    );
    assert_ne!(alice_address, bob_address);
    assert!(alice_address.ends_with(":1") && alice_address.len() == 66);

    // First contact, and the answer.
    let started = Instant::now();
    alice.send(&bob_address, "hello bob").await;
    bob.wait_received(&alice_address, "hello bob").await;
    eprintln!("first contact shown in {:?}", started.elapsed());
    // Bob's page took the sender as its peer: both show one safety number.
    let safety = "return document.getElementById('safety').textContent";
    let (a_safety, b_safety) = (
        alice.run(safety, json!([])).await,
        bob.run(safety, json!([])).await,
    );
    assert_eq!(a_safety, b_safety);
    assert_eq!(
        a_safety.as_str().unwrap().replace(' ', "").len(),
        60,
        "{a_safety}"
    );
    bob.send(&alice_address, "hi alice").await;
    alice.wait_received(&bob_address, "hi alice").await;
    // Alice's first message was acknowledged end to end.
    alice.wait_state("hello bob", "delivered").await;

    // What the IndexedDB of each holds is sealed: no message body in it.
    for (b, name, texts) in [
        (&alice, "alice", ["hello bob", "hi alice"]),
        (&bob, "bob", ["hello bob", "hi alice"]),
    ] {
        for text in texts {
            let (found, records) = b.database_holds(name, text).await;
            assert!(records > 0, "{name}'s database is empty");
            assert!(!found, "{name}'s database holds {text:?} in the clear");
        }
    }

    // Alice closes her tab; Bob writes meanwhile.
    alice.close_tab().await;
    bob.send(&alice_address, "are you there?").await;
    bob.wait_state("are you there?", "deposited").await;

    // A wrong passphrase does not open Alice's device.
    alice
        .open_device(&page, "alice", "not alice's passphrase")
        .await;
    let error = alice
        .wait_for(
            "the wrong passphrase to be refused",
            "const s = document.getElementById('status');
             return s.classList.contains('error') && s.textContent",
            json!([]),
            60,
        )
        .await;
    assert!(
        error.as_str().unwrap().contains("[Store]"),
        "unexpected error: {error}"
    );

    // Reopened with her passphrase, the device is the same one (its identity
    // came back from IndexedDB) and gets what Bob wrote while it was closed,
    // through the session it had: no new first contact.
    alice
        .open_device(&page, "alice", "alice's passphrase")
        .await;
    assert_eq!(alice.wait_ready("alice").await, alice_address);
    alice.wait_received(&bob_address, "are you there?").await;
    alice.send(&bob_address, "back again").await;
    bob.wait_received(&alice_address, "back again").await;
    bob.wait_state("are you there?", "delivered").await;

    eprintln!(
        "alice shows {:?}\nbob shows {:?}",
        alice.log().await,
        bob.log().await
    );
    // Each page shows each message once.
    let alice_log = alice.log().await;
    let bob_log = bob.log().await;
    let texts = |log: &[(String, String, String, String)], dir: &str| {
        log.iter()
            .filter(|r| r.0 == dir)
            .map(|r| r.2.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(texts(&alice_log, "in"), ["are you there?"], "{alice_log:?}");
    assert_eq!(texts(&alice_log, "out"), ["back again"], "{alice_log:?}");
    assert_eq!(
        texts(&bob_log, "in"),
        ["hello bob", "back again"],
        "{bob_log:?}"
    );
    assert_eq!(
        texts(&bob_log, "out"),
        ["hi alice", "are you there?"],
        "{bob_log:?}"
    );
}
