//! The JavaScript API: a [`Device`] (one device of one person, its state in
//! IndexedDB sealed under the application's key, talking to one relay).
//!
//! Every method that can fail throws (or rejects with) a JavaScript
//! `Error` whose `name` is `"CubbyholeError"`, whose `kind` is the crate's
//! error kind (`"Transport"`, `"Store"`, `"Protocol"`, `"WrongIdentity"`,
//! `"Compromised"`, `"TooLong"`, ... : the variant of
//! [`ClientError`]; `"Argument"` for a malformed argument), and whose
//! `detail` is the inner error's kind (`"Unavailable"`, `"WrongKey"`,
//! `"Auth"`, ...) when there is one.

use std::cell::Cell;
use std::rc::Rc;

use cubbyhole::client::{Client, ClientConfig, ClientError};
use cubbyhole::storage::{DeliveryState, InboxMessage, KvStore, MessageId};
use cubbyhole::transport::DeviceAddress;
use cubbyhole::{IdentityKey, OsRng, SafetyNumber};
use cubbyhole_http::HttpRelay;
use futures_util::lock::{Mutex, MutexGuard};
use js_sys::{Array, Function, Object, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use zeroize::Zeroizing;

use crate::address::{format_address, group_digits, hex, parse_address, unhex};
use crate::idb::IdbBackend;
use crate::sync::{first, First, Interrupt};

type Inner = Client<KvStore<IdbBackend>, HttpRelay, HttpRelay>;

#[wasm_bindgen(typescript_custom_section)]
const TS_TYPES: &'static str = r#"
/** A message received by a device. */
export interface Message {
  /** The sender device's address, `identity-hex:device-id`. */
  from: string;
  /** The body as text (UTF-8; invalid sequences replaced). */
  text: string;
  /** The body's bytes. */
  body: Uint8Array;
  /** When this device received it (unix seconds). */
  receivedAt: number;
  /** The envelope id, hex: unique per message. */
  id: string;
}

/** How to open a device. */
export interface DeviceOptions {
  /** The relay's base URL, such as `location.origin` or `https://relay.example`. */
  relayUrl: string;
  /** The IndexedDB database that holds this device (one per device). */
  name: string;
  /** 32 bytes that seal the device's state at rest (derive them from a passphrase, or keep them in a non-exportable place). */
  storeKey: Uint8Array;
  /** This device's number under its identity (default 1). */
  deviceId?: number;
}

/** The error every method throws. */
export interface CubbyholeError extends Error {
  name: "CubbyholeError";
  /** The crate's error kind: Transport, Store, Protocol, WrongIdentity, Compromised, TooLong, Argument, ... */
  kind: string;
  /** The inner error's kind (Unavailable, WrongKey, Auth, ...), or "". */
  detail: string;
}
"#;

/// A JavaScript `Error` with `name`, `kind` and `detail` (module docs).
fn js_error(kind: &str, detail: &str, message: &str) -> JsValue {
    let error = js_sys::Error::new(message);
    error.set_name("CubbyholeError");
    let _ = Reflect::set(&error, &"kind".into(), &kind.into());
    let _ = Reflect::set(&error, &"detail".into(), &detail.into());
    error.into()
}

/// The variant name of a `Debug` rendering: `Unavailable("x")` gives
/// `Unavailable`.
fn variant(debug: &str) -> &str {
    let end = debug
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(debug.len());
    &debug[..end]
}

fn client_error(e: &ClientError) -> JsValue {
    let kind_debug = format!("{e:?}");
    let kind = variant(&kind_debug);
    let detail = match e {
        ClientError::Protocol(inner) => format!("{inner:?}"),
        ClientError::Store(inner) => format!("{inner:?}"),
        ClientError::Transport(inner) => format!("{inner:?}"),
        _ => String::new(),
    };
    let message = match e {
        ClientError::Protocol(inner) => format!("{e}: {inner}"),
        ClientError::Store(inner) => format!("{e}: {inner}"),
        ClientError::Transport(inner) => format!("{e}: {inner}"),
        _ => e.to_string(),
    };
    js_error(kind, variant(&detail), &message)
}

fn argument(message: &str) -> JsValue {
    js_error("Argument", "", message)
}

fn closed() -> JsValue {
    js_error("Closed", "", "the device is closed")
}

/// The client in a guard that [`Shared::client`] checked.
fn open_client<'a>(guard: &'a mut MutexGuard<'_, Option<Inner>>) -> Result<&'a mut Inner, JsValue> {
    guard.as_mut().ok_or_else(closed)
}

fn parse(text: &str) -> Result<DeviceAddress, JsValue> {
    parse_address(text).map_err(argument)
}

/// Unix seconds from the browser's clock (the protocol takes time as an
/// argument; this is where the page's clock enters).
fn now() -> u64 {
    (js_sys::Date::now() / 1000.0) as u64
}

fn message_object(m: &InboxMessage) -> JsValue {
    let o = Object::new();
    let set = |k: &str, v: JsValue| {
        let _ = Reflect::set(&o, &k.into(), &v);
    };
    set("from", format_address(&m.from).into());
    set("text", String::from_utf8_lossy(&m.body).into_owned().into());
    set("body", Uint8Array::from(m.body.as_slice()).into());
    set("receivedAt", (m.received_at as f64).into());
    set("id", hex(&m.envelope_id.0).into());
    o.into()
}

fn options_field(options: &JsValue, name: &str) -> Result<JsValue, JsValue> {
    Reflect::get(options, &name.into()).map_err(|_| argument("options must be an object"))
}

/// The state the [`Device`] handle and its listeners share.
struct Shared {
    /// `None` once closed.
    client: Mutex<Option<Inner>>,
    address: DeviceAddress,
    /// Ends a listener's long poll so another call gets the client now.
    interrupt: Interrupt,
    /// Incremented by `stop`: a listener started under an older value ends.
    generation: Cell<u64>,
    closed: Cell<bool>,
}

impl Shared {
    /// The client, after interrupting a listener's long poll.
    async fn client(&self) -> Result<MutexGuard<'_, Option<Inner>>, JsValue> {
        if self.closed.get() {
            return Err(closed());
        }
        self.interrupt.fire();
        let guard = self.client.lock().await;
        if guard.is_none() {
            return Err(closed());
        }
        Ok(guard)
    }
}

/// One device: its identity and sessions in IndexedDB (sealed under the
/// application's key), the relay reached over `fetch`.
#[wasm_bindgen]
pub struct Device {
    shared: Rc<Shared>,
}

#[wasm_bindgen]
impl Device {
    /// Opens the device stored in IndexedDB database `options.name`,
    /// creating its identity (as device `options.deviceId`, default 1) if
    /// it has none; a stored device keeps its number (another
    /// `deviceId` throws, `kind` `"Argument"`). Another tab holding the same
    /// database makes this throw (`kind` `"Store"`): one device's state is
    /// never used by two tabs at once.
    #[wasm_bindgen(unchecked_return_type = "Device")]
    pub async fn open(
        #[wasm_bindgen(unchecked_param_type = "DeviceOptions")] options: JsValue,
    ) -> Result<Device, JsValue> {
        let relay_url = options_field(&options, "relayUrl")?
            .as_string()
            .ok_or_else(|| argument("relayUrl must be a string"))?;
        let name = options_field(&options, "name")?
            .as_string()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| argument("name must be a non-empty string"))?;
        let key_value = options_field(&options, "storeKey")?;
        let key_array = key_value
            .dyn_ref::<Uint8Array>()
            .filter(|k| k.length() == 32)
            .ok_or_else(|| argument("storeKey must be a Uint8Array of 32 bytes"))?;
        let mut key = Zeroizing::new([0u8; 32]);
        key_array.copy_to(&mut key[..]);
        let device_field = options_field(&options, "deviceId")?;
        let asked = match device_field.as_f64() {
            None if device_field.is_undefined() || device_field.is_null() => None,
            Some(n) if n.fract() == 0.0 && (1.0..=f64::from(u32::MAX)).contains(&n) => {
                Some(n as u32)
            }
            _ => return Err(argument("deviceId must be a positive integer")),
        };
        let device_id = asked.unwrap_or(1);
        let relay = HttpRelay::new(&relay_url)
            .map_err(|e| js_error("Transport", "InvalidUrl", &e.to_string()))?;
        let backend = IdbBackend::open(&name)
            .await
            .map_err(|e| client_error(&ClientError::Store(e)))?;
        let store = KvStore::open(backend, &key)
            .await
            .map_err(|e| client_error(&ClientError::Store(e)))?;
        let config = ClientConfig {
            device_id,
            ..ClientConfig::default()
        };
        let client = Client::open(store, relay.clone(), relay, config, &mut OsRng)
            .await
            .map_err(|e| client_error(&e))?;
        let address = client.address();
        // A stored device keeps its number: asking for another one is a
        // mistake the page should hear about, not a silent substitution.
        if asked.is_some_and(|n| n != address.device_id) {
            return Err(argument(&format!(
                "this database holds device {}, not device {device_id}",
                address.device_id
            )));
        }
        Ok(Device {
            shared: Rc::new(Shared {
                client: Mutex::new(Some(client)),
                address,
                interrupt: Interrupt::default(),
                generation: Cell::new(0),
                closed: Cell::new(false),
            }),
        })
    }

    /// This device's address (`identity-hex:device-id`): what others send
    /// to.
    #[wasm_bindgen(getter)]
    pub fn address(&self) -> String {
        format_address(&self.shared.address)
    }

    /// Publishes this device's prekeys to the relay, or tops them up and
    /// rotates its signed prekey when due (call it at start and now and
    /// then). Resolves to whether anything was uploaded.
    #[wasm_bindgen(js_name = publishPrekeys)]
    pub async fn publish_prekeys(&self) -> Result<bool, JsValue> {
        let shared = Rc::clone(&self.shared);
        let mut guard = shared.client().await?;
        let client = open_client(&mut guard)?;
        client
            .maintain_prekeys(&mut OsRng, now())
            .await
            .map_err(|e| client_error(&e))
    }

    /// Sends `message` (a string, sent as UTF-8, or a `Uint8Array`) to the
    /// device at `to`. Resolves to the message id (hex) once it is stored
    /// for delivery: a failed deposit is retried later by itself.
    pub async fn send(
        &self,
        to: String,
        #[wasm_bindgen(unchecked_param_type = "string | Uint8Array")] message: JsValue,
    ) -> Result<String, JsValue> {
        let to = parse(&to)?;
        let body = if let Some(text) = message.as_string() {
            text.into_bytes()
        } else if let Some(bytes) = message.dyn_ref::<Uint8Array>() {
            bytes.to_vec()
        } else {
            return Err(argument("message must be a string or a Uint8Array"));
        };
        let shared = Rc::clone(&self.shared);
        let mut guard = shared.client().await?;
        let client = open_client(&mut guard)?;
        let sent = client
            .send(&mut OsRng, &to, &body, now())
            .await
            .map_err(|e| client_error(&e))?;
        Ok(hex(&sent.message.0))
    }

    /// Where a sent message is: `"stored"`, `"deposited"`, `"resent"`,
    /// `"delivered"` (the recipient's receipt came), `"failed"`, or
    /// `"unknown"`.
    pub async fn delivery(&self, id: String) -> Result<String, JsValue> {
        let message =
            unhex::<16>(id.trim()).ok_or_else(|| argument("a message id is 32 hex digits"))?;
        let shared = Rc::clone(&self.shared);
        let mut guard = shared.client().await?;
        let client = open_client(&mut guard)?;
        let state = client
            .delivery(&MessageId(message))
            .await
            .map_err(|e| client_error(&e))?;
        Ok(match state {
            None => "unknown",
            Some(DeliveryState::Stored) => "stored",
            Some(DeliveryState::Deposited) => "deposited",
            Some(DeliveryState::Resent) => "resent",
            Some(DeliveryState::Delivered) => "delivered",
            Some(DeliveryState::Failed(_)) => "failed",
        }
        .to_owned())
    }

    /// One receive: fetches what waits at the relay (waiting up to
    /// `waitMs` milliseconds, a long poll, when nothing does), decrypts and
    /// stores it, sends receipts and due re-sends, and resolves to the
    /// messages received, each once: they leave the device's inbox as they
    /// are returned.
    #[wasm_bindgen(unchecked_return_type = "Message[]")]
    pub async fn receive(
        &self,
        #[wasm_bindgen(js_name = waitMs)] wait_ms: Option<u32>,
    ) -> Result<JsValue, JsValue> {
        let shared = Rc::clone(&self.shared);
        let mut guard = shared.client().await?;
        let client = open_client(&mut guard)?;
        shared.interrupt.clear();
        let wait = wait_ms.unwrap_or(0).min(60_000);
        // Interrupted by another call, it returns what the inbox holds.
        let mut rng = OsRng;
        let receive = client.receive_waiting(&mut rng, now(), wait);
        if let First::Left(result) = first(receive, shared.interrupt.wait()).await {
            result.map_err(|e| client_error(&e))?;
        }
        let out = Array::new();
        take_inbox(client, |m| {
            out.push(&message_object(m));
        })
        .await?;
        Ok(out.into())
    }

    /// Receives continuously: long polls the relay and calls
    /// `onMessage(message)` for every message, once (a message leaves the
    /// inbox after its callback returned; a tab closed in between shows it
    /// again next time). Transport failures are retried with a growing
    /// delay (1 s to 30 s) and reported to `onError(error)` if given. Other
    /// calls on the device interrupt the long poll and run at once. Ends at
    /// [`Device::stop`] or [`Device::close`].
    pub fn listen(
        &self,
        #[wasm_bindgen(js_name = onMessage, unchecked_param_type = "(message: Message) => void")]
        on_message: Function,
        #[wasm_bindgen(js_name = onError)] on_error: Option<Function>,
    ) {
        let shared = Rc::clone(&self.shared);
        let generation = shared.generation.get();
        wasm_bindgen_futures::spawn_local(async move {
            let mut delay_ms = 0u32;
            while !shared.closed.get() && shared.generation.get() == generation {
                if delay_ms > 0 {
                    crate::sleep_ms(delay_ms).await;
                }
                let mut guard = shared.client.lock().await;
                let Some(client) = guard.as_mut() else {
                    break;
                };
                if shared.closed.get() || shared.generation.get() != generation {
                    break;
                }
                shared.interrupt.clear();
                let outcome = {
                    let mut rng = OsRng;
                    let receive = client.receive_waiting(&mut rng, now(), 25_000);
                    match first(receive, shared.interrupt.wait()).await {
                        First::Left(result) => Some(result),
                        First::Right(()) => None,
                    }
                };
                match outcome {
                    Some(Err(e)) => {
                        delay_ms = (delay_ms * 2).clamp(1_000, 30_000);
                        if let Some(on_error) = &on_error {
                            let _ = on_error.call1(&JsValue::NULL, &client_error(&e));
                        }
                    }
                    _ => delay_ms = 0,
                }
                let delivered = take_inbox(client, |m| {
                    let _ = on_message.call1(&JsValue::NULL, &message_object(m));
                })
                .await;
                if let (Err(e), Some(on_error)) = (delivered, &on_error) {
                    let _ = on_error.call1(&JsValue::NULL, &e);
                }
                drop(guard);
                // Let a call that interrupted the poll take the client.
                crate::sleep_ms(0).await;
            }
        });
    }

    /// Ends the listeners started by [`Device::listen`].
    pub fn stop(&self) {
        self.shared.generation.set(self.shared.generation.get() + 1);
        self.shared.interrupt.fire();
    }

    /// The safety number to compare with the person at `peer` (60 digits
    /// in groups of five), out of band.
    #[wasm_bindgen(js_name = safetyNumber)]
    pub fn safety_number(&self, peer: String) -> Result<String, JsValue> {
        let peer = parse(&peer)?;
        // The number needs only the two identity keys (as
        // `Client::safety_number` computes it), so no lock is taken.
        safety_number_of(&self.shared.address, &peer)
    }

    /// Stops the listeners and releases the device's database (another tab
    /// may then open it). The handle is unusable afterwards.
    pub async fn close(&self) {
        self.stop();
        self.shared.closed.set(true);
        // Dropping the client drops the store and its IndexedDB backend,
        // which closes the database and releases the tab's lock on it.
        let client = self.shared.client.lock().await.take();
        drop(client);
    }
}

/// The safety number from the two identity keys alone.
fn safety_number_of(me: &DeviceAddress, peer: &DeviceAddress) -> Result<String, JsValue> {
    let key = |bytes: &[u8; 32]| {
        IdentityKey::from_bytes(bytes).map_err(|e| client_error(&ClientError::Protocol(e)))
    };
    Ok(group_digits(
        SafetyNumber::new(&key(&me.identity)?, &key(&peer.identity)?).as_str(),
    ))
}

/// Hands every inbox message to `deliver`, then removes it from the inbox.
async fn take_inbox(
    client: &mut Inner,
    mut deliver: impl FnMut(&InboxMessage),
) -> Result<(), JsValue> {
    let messages = client.inbox().await.map_err(|e| client_error(&e))?;
    for m in &messages {
        deliver(m);
        client
            .remove_from_inbox(&m.envelope_id)
            .await
            .map_err(|e| client_error(&e))?;
    }
    Ok(())
}
