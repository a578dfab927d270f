//! The JavaScript API (`Device`) in headless Chromium, called as a page
//! calls it (options as a JavaScript object, errors as JavaScript `Error`s
//! with `name`, `kind` and `detail`), without a relay: the URL points at a
//! closed port, so what needs the relay fails as a transport error.
//! Natively there is nothing to run: one ignored test says so.

#[cfg(not(target_arch = "wasm32"))]
#[test]
#[ignore = "runs in a browser: cargo test -p cubbyhole-browser --target wasm32-unknown-unknown"]
fn api_tests_run_in_the_browser() {}

#[cfg(target_arch = "wasm32")]
mod browser {
    use cubbyhole_browser::{delete_database, Device};
    use js_sys::{Object, Reflect, Uint8Array};
    use wasm_bindgen::JsValue;
    use wasm_bindgen_test::*;

    wasm_bindgen_test_configure!(run_in_browser);

    /// A relay URL nothing listens at (port 9, discard: refused).
    const NO_RELAY: &str = "http://127.0.0.1:9";

    fn options(name: &str, key: u8) -> JsValue {
        let o = Object::new();
        Reflect::set(&o, &"relayUrl".into(), &NO_RELAY.into()).unwrap();
        Reflect::set(&o, &"name".into(), &name.into()).unwrap();
        Reflect::set(
            &o,
            &"storeKey".into(),
            &Uint8Array::from(&[key; 32][..]).into(),
        )
        .unwrap();
        o.into()
    }

    fn with(options: &JsValue, field: &str, value: JsValue) -> JsValue {
        let o = Object::assign(&Object::new(), options.unchecked_ref());
        Reflect::set(&o, &field.into(), &value).unwrap();
        o.into()
    }

    use wasm_bindgen::JsCast;

    /// `(name, kind, detail)` of a thrown error.
    fn error_of(e: JsValue) -> (String, String, String) {
        let get = |k: &str| {
            Reflect::get(&e, &k.into())
                .ok()
                .and_then(|v| v.as_string())
                .unwrap_or_default()
        };
        assert!(e.is_instance_of::<js_sys::Error>(), "not an Error: {e:?}");
        (get("name"), get("kind"), get("detail"))
    }

    async fn fresh(name: &str) -> String {
        let name = format!("api-test-{name}-{}", js_sys::Math::random());
        delete_database(&name).await.unwrap();
        name
    }

    #[wasm_bindgen_test]
    async fn malformed_options_are_argument_errors() {
        let name = fresh("options").await;
        let good = options(&name, 1);
        for (bad, why) in [
            (JsValue::from(3), "not an object"),
            (with(&good, "relayUrl", JsValue::from(5)), "relayUrl"),
            (with(&good, "name", "".into()), "empty name"),
            (
                with(&good, "storeKey", Uint8Array::new_with_length(31).into()),
                "31-byte key",
            ),
            (
                with(&good, "storeKey", "x".repeat(32).into()),
                "a string key",
            ),
            (with(&good, "deviceId", JsValue::from(0)), "device 0"),
            (with(&good, "deviceId", JsValue::from(1.5)), "device 1.5"),
        ] {
            let e = Device::open(bad)
                .await
                .err()
                .unwrap_or_else(|| panic!("{why}: opened"));
            let (name, kind, _) = error_of(e);
            assert_eq!(
                (name.as_str(), kind.as_str()),
                ("CubbyholeError", "Argument"),
                "{why}"
            );
        }
        let e = Device::open(with(&good, "relayUrl", "ftp://relay".into()))
            .await
            .err()
            .expect("an ftp relay");
        assert_eq!(error_of(e).1, "Transport");
    }

    #[wasm_bindgen_test]
    async fn a_device_is_kept_sealed_in_indexeddb_and_held_by_one_handle() {
        let name = fresh("reopen").await;
        let first = Device::open(options(&name, 1)).await.expect("open");
        let address = first.address();
        assert_eq!(address.len(), 66, "{address}");
        assert!(address.ends_with(":1"));
        // A second handle on the same device is refused while the first
        // holds it (a second tab would be).
        let (_, kind, detail) =
            error_of(Device::open(options(&name, 1)).await.err().expect("twice"));
        assert_eq!((kind.as_str(), detail.as_str()), ("Store", "Backend"));
        first.close().await;
        // After close, calls fail as closed.
        let (_, kind, _) = error_of(first.publish_prekeys().await.expect_err("closed"));
        assert_eq!(kind, "Closed");
        // Reopened: the same identity.
        let again = Device::open(options(&name, 1)).await.expect("reopen");
        assert_eq!(again.address(), address);
        again.close().await;
        // Another key: the store refuses it.
        let (_, kind, detail) = error_of(Device::open(options(&name, 2)).await.err().expect("key"));
        assert_eq!((kind.as_str(), detail.as_str()), ("Store", "WrongKey"));
        // The stored device keeps its number: asking for another throws.
        let (_, kind, _) = error_of(
            Device::open(with(&options(&name, 1), "deviceId", 7.into()))
                .await
                .err()
                .expect("reopened as device 7"),
        );
        assert_eq!(kind, "Argument");
        let same = Device::open(with(&options(&name, 1), "deviceId", 1.into()))
            .await
            .expect("reopen as device 1");
        assert_eq!(same.address(), address);
        same.close().await;
        // A new device takes the number asked for.
        let seven = fresh("seven").await;
        let d = Device::open(with(&options(&seven, 1), "deviceId", 7.into()))
            .await
            .expect("device 7");
        assert!(d.address().ends_with(":7"));
        d.close().await;
    }

    #[wasm_bindgen_test]
    async fn sends_and_safety_numbers_check_their_arguments() {
        let (a_name, b_name) = (fresh("a").await, fresh("b").await);
        let a = Device::open(options(&a_name, 1)).await.expect("open a");
        let b = Device::open(options(&b_name, 1)).await.expect("open b");
        // One safety number for the two, 60 digits in 12 groups.
        let number = a.safety_number(b.address()).expect("safety number");
        assert_eq!(number, b.safety_number(a.address()).expect("safety number"));
        assert_eq!(number.len(), 71, "{number}");
        assert!(number
            .split(' ')
            .all(|g| g.len() == 5 && g.bytes().all(|c| c.is_ascii_digit())));
        for bad in ["", "abc:1", &format!("{}:0", "00".repeat(32))] {
            let (_, kind, _) = error_of(a.safety_number(bad.to_owned()).expect_err(bad));
            assert_eq!(kind, "Argument", "{bad:?}");
            let (_, kind, _) = error_of(a.send(bad.to_owned(), "hi".into()).await.expect_err(bad));
            assert_eq!(kind, "Argument", "{bad:?}");
        }
        // An address that is no key: the protocol refuses it.
        let not_a_key = format!("{}:1", "00".repeat(32));
        let (_, kind, _) = error_of(a.safety_number(not_a_key).expect_err("no key"));
        assert_eq!(kind, "Protocol");
        // A body that is neither text nor bytes.
        let (_, kind, _) = error_of(
            a.send(b.address(), JsValue::from(5))
                .await
                .expect_err("number"),
        );
        assert_eq!(kind, "Argument");
        // No relay: the bundle cannot be fetched, a transport error.
        let (_, kind, detail) = error_of(
            a.send(b.address(), "hello".into())
                .await
                .expect_err("no relay"),
        );
        assert_eq!(
            (kind.as_str(), detail.as_str()),
            ("Transport", "Unavailable")
        );
        // A message id that is not one.
        let (_, kind, _) = error_of(a.delivery("xyz".into()).await.expect_err("id"));
        assert_eq!(kind, "Argument");
        assert_eq!(
            a.delivery("00".repeat(16)).await.expect("unknown id"),
            "unknown"
        );
        a.close().await;
        b.close().await;
    }
}
