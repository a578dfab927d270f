//! `IdbBackend` against the `KvBackend` contract, in a real browser's
//! IndexedDB (wasm-bindgen-test in headless Chromium; see the crate's
//! README for the command).

#[cfg(not(target_arch = "wasm32"))]
#[test]
#[ignore = "runs in a browser: cargo test -p cubbyhole-browser --target wasm32-unknown-unknown"]
fn in_a_browser_only() {}

#[cfg(target_arch = "wasm32")]
mod browser {
    use cubbyhole::storage::kv::{KvBackend, KvKey, KvOp};
    use cubbyhole::storage::StoreError;
    use cubbyhole_browser::idb::LOCKED;
    use cubbyhole_browser::{delete_database, IdbBackend};
    use js_sys::{ArrayBuffer, Int8Array, Object, Promise, Uint8Array};
    use wasm_bindgen::closure::Closure;
    use wasm_bindgen::{JsCast, JsValue};
    use wasm_bindgen_futures::JsFuture;
    use wasm_bindgen_test::*;
    use web_sys::{IdbDatabase, IdbFactory, IdbRequest, IdbTransactionMode};

    wasm_bindgen_test_configure!(run_in_browser);

    type Records = Vec<(KvKey, Vec<u8>)>;

    /// A database name no other test uses.
    fn fresh(tag: &str) -> String {
        format!("test-{tag}-{}", (js_sys::Math::random() * 1e15) as u64)
    }

    fn key(n: u8) -> KvKey {
        let mut k = [0u8; 32];
        k[0] = n;
        k[31] = 0xa5;
        k
    }

    fn put(n: u8, value: &[u8]) -> KvOp {
        KvOp::Put {
            key: key(n),
            value: value.to_vec(),
        }
    }

    fn del(n: u8) -> KvOp {
        KvOp::Delete { key: key(n) }
    }

    /// The expected records, written out by hand, sorted by key.
    fn expect(records: &[(u8, &[u8])]) -> Records {
        let mut r: Records = records.iter().map(|(n, v)| (key(*n), v.to_vec())).collect();
        r.sort();
        r
    }

    async fn load(b: &IdbBackend) -> Records {
        let mut r = b.load().await.expect("load");
        r.sort();
        r
    }

    async fn open(name: &str) -> IdbBackend {
        IdbBackend::open(name).await.expect("open")
    }

    #[wasm_bindgen_test]
    async fn a_new_store_is_empty() {
        let name = fresh("empty");
        let b = open(&name).await;
        assert!(b.exclusive(), "Chromium has the Locks API");
        assert_eq!(load(&b).await, Records::new());
        b.write(&[]).await.expect("an empty batch");
        assert_eq!(load(&b).await, Records::new());
        b.close();
        delete_database(&name).await.expect("delete");
    }

    #[wasm_bindgen_test]
    async fn operations_apply_in_order_and_the_last_on_a_key_wins() {
        let name = fresh("order");
        let b = open(&name).await;
        b.write(&[
            put(1, b"one"),
            put(2, b"two"),
            del(1),
            put(2, b"two again"),
            put(3, b"three"),
            del(4), // nothing there: nothing happens
            put(5, b""),
            put(6, b"six"),
        ])
        .await
        .expect("write");
        assert_eq!(
            load(&b).await,
            expect(&[(2, b"two again"), (3, b"three"), (5, b""), (6, b"six")])
        );
        // A second batch: a delete then a put of the same key, a put then a
        // delete of another.
        b.write(&[del(3), put(3, b"three again"), put(6, b"gone"), del(6)])
            .await
            .expect("write");
        let after = expect(&[(2, b"two again"), (3, b"three again"), (5, b"")]);
        assert_eq!(load(&b).await, after);
        b.close();
        let b = open(&name).await;
        assert_eq!(load(&b).await, after);
        b.close();
        delete_database(&name).await.expect("delete");
    }

    #[wasm_bindgen_test]
    async fn reopening_returns_exactly_what_was_written() {
        let name = fresh("reopen");
        let b = open(&name).await;
        let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        b.write(&[put(1, b"a"), put(2, &big), put(3, &[0u8; 1])])
            .await
            .expect("write");
        b.close();
        let b = open(&name).await;
        let mut want = vec![
            (key(1), b"a".to_vec()),
            (key(2), big.clone()),
            (key(3), vec![0u8]),
        ];
        want.sort();
        assert_eq!(load(&b).await, want);
        // Dropped (not closed) and opened again at once: the open waits for the
        // dropped backend's lock to go.
        b.write(&[del(1)]).await.expect("write");
        drop(b);
        let b = open(&name).await;
        want.retain(|(k, _)| *k != key(1));
        assert_eq!(load(&b).await, want);
        b.close();
        delete_database(&name).await.expect("delete");
    }

    #[wasm_bindgen_test]
    async fn an_aborted_batch_leaves_the_store_as_it_was() {
        let name = fresh("abort");
        let b = open(&name).await;
        b.write(&[put(1, b"one"), put(2, b"two"), put(3, b"three")])
            .await
            .expect("write");
        let before = expect(&[(1, b"one"), (2, b"two"), (3, b"three")]);
        let batch = [
            put(1, b"one, changed"),
            del(2),
            put(4, b"four"),
            put(5, b"five"),
            del(3),
            put(1, b"one, changed again"),
        ];
        for n in 0..batch.len() as u32 {
            b.fail_after(Some(n));
            match b.write(&batch).await {
                Err(StoreError::Backend(e)) => assert!(e.contains("aborted"), "{e}"),
                other => panic!("a write aborted after {n} requests returned {other:?}"),
            }
            assert!(!b.fault_injector().armed(), "the fault is spent");
            assert_eq!(load(&b).await, before, "after an abort at request {n}");
        }
        // Nothing of the aborted batches is there after reopening either.
        b.close();
        let b = open(&name).await;
        assert_eq!(load(&b).await, before);
        // The fault counts across writes: after 2 requests of a 1-request and a
        // 2-request batch, the second batch's second request aborts it.
        b.fail_after(Some(2));
        b.write(&[put(7, b"seven")]).await.expect("first request");
        assert!(b.write(&[put(8, b"eight"), put(9, b"nine")]).await.is_err());
        // A fault past the batch's end lets it through.
        b.fail_after(Some(batch.len() as u32));
        b.write(&batch)
            .await
            .expect("the fault comes after the batch");
        assert!(b.fault_injector().armed(), "not spent by the batch");
        b.fail_after(None);
        let after = expect(&[
            (1, b"one, changed again"),
            (4, b"four"),
            (5, b"five"),
            (7, b"seven"),
        ]);
        assert_eq!(load(&b).await, after);
        b.close();
        let b = open(&name).await;
        assert_eq!(load(&b).await, after);
        b.close();
        delete_database(&name).await.expect("delete");
    }

    #[wasm_bindgen_test]
    async fn a_second_open_of_an_open_store_fails() {
        let name = fresh("lock");
        let first = open(&name).await;
        match IdbBackend::open(&name).await {
            Err(StoreError::Backend(e)) => assert_eq!(e, LOCKED),
            Ok(_) => panic!("a second open of an open store succeeded"),
            Err(e) => panic!("a second open failed with {e:?}, not the lock error"),
        }
        // Another store is another lock.
        let other_name = fresh("lock-other");
        let other = open(&other_name).await;
        // The first is still usable, and once closed its store opens again.
        first.write(&[put(1, b"x")]).await.expect("write");
        first.close();
        let again = open(&name).await;
        assert_eq!(load(&again).await, expect(&[(1, b"x")]));
        match IdbBackend::open(&name).await {
            Err(StoreError::Backend(e)) => assert_eq!(e, LOCKED),
            other => panic!("expected the lock error, got {:?}", other.map(|_| ())),
        }
        again.close();
        other.close();
        delete_database(&name).await.expect("delete");
        delete_database(&other_name).await.expect("delete");
    }

    #[wasm_bindgen_test]
    async fn deleting_an_open_database_closes_the_backend() {
        let name = fresh("delete");
        let b = open(&name).await;
        b.write(&[put(1, b"one")]).await.expect("write");
        // The backend closes on `versionchange`, so the deletion is not
        // blocked; the backend's writes then fail.
        delete_database(&name).await.expect("delete");
        assert!(matches!(
            b.write(&[put(2, b"two")]).await,
            Err(StoreError::Backend(_))
        ));
        drop(b);
        let b = open(&name).await;
        assert_eq!(load(&b).await, Records::new(), "the records went");
        b.close();
        delete_database(&name).await.expect("delete");
    }

    // Raw IndexedDB, to write what the backend never would.

    fn factory() -> IdbFactory {
        js_sys::Reflect::get(&js_sys::global(), &"indexedDB".into())
            .unwrap()
            .dyn_into()
            .unwrap()
    }

    /// The request's result, or its error.
    async fn done(request: &IdbRequest) -> Result<JsValue, JsValue> {
        let promise = Promise::new(&mut |resolve, reject| {
            let r = request.clone();
            let ok = Closure::once_into_js(move |_: JsValue| {
                let _ = resolve.call1(&JsValue::UNDEFINED, &r.result().unwrap());
            });
            let r = request.clone();
            let failed = Closure::once_into_js(move |_: JsValue| {
                let e: JsValue = r.error().ok().flatten().map_or(JsValue::NULL, Into::into);
                let _ = reject.call1(&JsValue::UNDEFINED, &e);
            });
            request.set_onsuccess(Some(ok.unchecked_ref()));
            request.set_onerror(Some(failed.unchecked_ref()));
        });
        JsFuture::from(promise).await
    }

    /// Opens database `name` at `version` without creating anything.
    async fn raw_open(name: &str, version: u32) -> IdbDatabase {
        let request = factory().open_with_u32(name, version).unwrap();
        done(&request).await.expect("raw open").dyn_into().unwrap()
    }

    /// Puts `value` under `key` in the `records` store, raw.
    async fn raw_put(name: &str, key: &JsValue, value: &JsValue) {
        let db = raw_open(name, 1).await;
        let tx = db
            .transaction_with_str_and_mode("records", IdbTransactionMode::Readwrite)
            .unwrap();
        let request = tx
            .object_store("records")
            .unwrap()
            .put_with_key(value, key)
            .unwrap();
        done(&request).await.expect("raw put");
        db.close();
    }

    fn bytes(b: &[u8]) -> JsValue {
        Uint8Array::from(b).into()
    }

    #[wasm_bindgen_test]
    async fn malformed_records_are_typed_errors() {
        let good_key = bytes(&key(9));
        let cases: Vec<(&str, JsValue, JsValue, &str)> = vec![
            ("short-key", bytes(&[1u8; 31]), bytes(b"v"), "31 bytes"),
            ("long-key", bytes(&[1u8; 33]), bytes(b"v"), "33 bytes"),
            ("string-key", "a key".into(), bytes(b"v"), "not binary"),
            ("number-key", 7.into(), bytes(b"v"), "not binary"),
            (
                "string-value",
                good_key.clone(),
                "a value".into(),
                "not a Uint8Array",
            ),
            (
                "buffer-value",
                good_key.clone(),
                ArrayBuffer::new(4).into(),
                "not a Uint8Array",
            ),
            (
                "int8-value",
                good_key.clone(),
                Int8Array::new_with_length(4).into(),
                "not a Uint8Array",
            ),
            (
                "object-value",
                good_key.clone(),
                Object::new().into(),
                "not a Uint8Array",
            ),
            (
                "null-value",
                good_key.clone(),
                JsValue::NULL,
                "not a Uint8Array",
            ),
        ];
        for (tag, bad_key, bad_value, reason) in cases {
            let name = fresh(tag);
            let b = open(&name).await;
            b.write(&[put(1, b"fine")]).await.expect("write");
            assert_eq!(load(&b).await, expect(&[(1, b"fine")]));
            b.close();
            raw_put(&name, &bad_key, &bad_value).await;
            let b = open(&name).await;
            match b.load().await {
                Err(StoreError::Corrupted { reason: r, .. }) => {
                    assert!(r.contains(reason), "{tag}: {r:?} lacks {reason:?}")
                }
                other => panic!("{tag}: load returned {other:?}"),
            }
            b.close();
            delete_database(&name).await.expect("delete");
        }
    }

    #[wasm_bindgen_test]
    async fn a_foreign_database_is_refused() {
        // Version 1 without the `records` store.
        let name = fresh("no-store");
        raw_open(&name, 1).await.close();
        match IdbBackend::open(&name).await {
            Err(StoreError::Backend(e)) => assert!(e.contains("records"), "{e}"),
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
        delete_database(&name).await.expect("delete");
        // A later version than the backend's.
        let name = fresh("later");
        raw_open(&name, 2).await.close();
        match IdbBackend::open(&name).await {
            Err(StoreError::Backend(e)) => assert!(e.contains("VersionError"), "{e}"),
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
        // The refused opens released the lock.
        delete_database(&name).await.expect("delete");
        let b = open(&name).await;
        b.close();
        delete_database(&name).await.expect("delete");
    }

    // The persistent store over IndexedDB.

    use cubbyhole::client::{Client, ClientConfig};
    use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
    use cubbyhole::storage::conformance::{self, CHECKS};
    use cubbyhole::storage::{KvStore, MemoryStore};
    use cubbyhole::OsRng;

    const STORE_KEY: [u8; 32] = [0x4b; 32];

    async fn kv_store(name: &str) -> KvStore<IdbBackend> {
        KvStore::open(open(name).await, &STORE_KEY)
            .await
            .expect("KvStore::open")
    }

    #[wasm_bindgen_test]
    async fn store_conformance_kv_store_over_indexeddb() {
        // The suite makes its stores synchronously: open them first, one
        // database each.
        let mut names = Vec::new();
        let mut stores = Vec::new();
        for check in CHECKS {
            let name = fresh(check.name);
            stores.push(kv_store(&name).await);
            names.push(name);
        }
        stores.reverse();
        let result = conformance::try_run_async(|| stores.pop().expect("a store per check")).await;
        if let Err(v) = result {
            let lines: Vec<String> = v.iter().map(|v| format!("  {v}")).collect();
            panic!("{} checks failed:\n{}", v.len(), lines.join("\n"));
        }
        for name in names {
            delete_database(&name).await.expect("delete");
        }
    }

    #[wasm_bindgen_test]
    async fn store_atomicity_kv_store_over_indexeddb() {
        let name = fresh("atomicity");
        let mut store = kv_store(&name).await;
        let mut deepest = 0;
        conformance::check_atomicity(&mut store, |s: &mut KvStore<IdbBackend>, n| {
            deepest = deepest.max(n.unwrap_or(0));
            s.backend().fail_after(n);
        })
        .await
        .unwrap_or_else(|v| panic!("{v}"));
        // The commits failed at every request before succeeding (the
        // injector is not a no-op).
        assert!(deepest >= 2, "the injector was asked for {deepest} at most");
        drop(store);
        delete_database(&name).await.expect("delete");
    }

    fn now() -> u64 {
        (js_sys::Date::now() / 1000.0) as u64
    }

    #[wasm_bindgen_test]
    async fn a_client_on_indexeddb_keeps_its_state_across_reopening() {
        let at = now();
        let name = fresh("client");
        let relay = InProcessRelay::with_clock(
            Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()),
            std::sync::Arc::new(now),
        );
        let config = ClientConfig::default();
        let mut bob = Client::open(
            kv_store(&name).await,
            relay.clone(),
            relay.clone(),
            config,
            &mut OsRng,
        )
        .await
        .expect("bob");
        let mut alice = Client::open(
            MemoryStore::new(),
            relay.clone(),
            relay.clone(),
            config,
            &mut OsRng,
        )
        .await
        .expect("alice");
        assert!(bob.maintain_prekeys(&mut OsRng, at).await.expect("publish"));
        alice
            .maintain_prekeys(&mut OsRng, at)
            .await
            .expect("publish");
        let to = bob.address();
        for text in [&b"one"[..], b"two"] {
            alice.send(&mut OsRng, &to, text, at).await.expect("send");
        }
        assert_eq!(
            bob.receive(&mut OsRng, at).await.expect("receive").received,
            2
        );
        let from = alice.address();
        bob.send(&mut OsRng, &from, b"reply", at)
            .await
            .expect("send");

        // The tab closes: the client and its store go.
        drop(bob);
        // While it is open elsewhere, no second store opens.
        let held = kv_store(&name).await;
        match IdbBackend::open(&name).await {
            Err(StoreError::Backend(e)) => assert_eq!(e, LOCKED),
            other => panic!("expected the lock error, got {:?}", other.map(|_| ())),
        }
        drop(held);
        // Another key is refused.
        match KvStore::open(open(&name).await, &[0x4c; 32]).await {
            Err(StoreError::WrongKey) => {}
            other => panic!("another key: {:?}", other.map(|_| ())),
        }
        // Reopened under the key: the same device, its inbox, its sessions.
        let mut bob = Client::open(
            kv_store(&name).await,
            relay.clone(),
            relay.clone(),
            config,
            &mut OsRng,
        )
        .await
        .expect("bob again");
        assert_eq!(bob.address(), to, "the same identity");
        let inbox: Vec<Vec<u8>> = bob
            .inbox()
            .await
            .expect("inbox")
            .into_iter()
            .map(|m| m.body)
            .collect();
        assert_eq!(inbox, [b"one".to_vec(), b"two".to_vec()]);
        alice.receive(&mut OsRng, at).await.expect("receive");
        assert!(alice
            .inbox()
            .await
            .expect("inbox")
            .iter()
            .any(|m| m.body == b"reply"));
        alice
            .send(&mut OsRng, &to, b"three", at)
            .await
            .expect("send");
        assert_eq!(
            bob.receive(&mut OsRng, at).await.expect("receive").received,
            1
        );
        let last = bob.inbox().await.expect("inbox");
        assert_eq!(last.last().map(|m| m.body.as_slice()), Some(&b"three"[..]));
        drop(bob);
        delete_database(&name).await.expect("delete");
    }
}
