// The cubbyhole web chat: one device per browser profile (or per device
// name), its state in IndexedDB, talking to the relay that serves this page
// (or any relay that allows this page's origin: --cors-origin).
import init, { Device } from "./pkg/cubbyhole_browser.js";

const $ = (id) => document.getElementById(id);
let device = null;
const pending = new Map(); // message id -> <li> of a sent message

function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function short(address) {
  return address.slice(0, 8) + "…" + address.slice(address.indexOf(":"));
}

function show(direction, who, text) {
  const li = document.createElement("li");
  li.className = direction;
  const w = document.createElement("span");
  w.className = "who";
  w.textContent = who;
  const t = document.createElement("span");
  t.className = "text";
  t.textContent = text;
  li.append(w, t);
  $("log").append(li);
  return li;
}

function setState(li, state) {
  let s = li.querySelector(".state");
  if (!s) {
    s = document.createElement("span");
    s.className = "state";
    li.append(s);
  }
  s.textContent = state;
  li.dataset.state = state;
}

// The store key: PBKDF2-SHA-256 of the passphrase (WebCrypto), salted with
// the device name. The passphrase never leaves the page.
async function storeKey(name, passphrase) {
  const material = await crypto.subtle.importKey(
    "raw", new TextEncoder().encode(passphrase), "PBKDF2", false, ["deriveBits"]);
  const bits = await crypto.subtle.deriveBits(
    { name: "PBKDF2", hash: "SHA-256", iterations: 310000,
      salt: new TextEncoder().encode("cubbyhole web chat store key/" + name) },
    material, 256);
  return new Uint8Array(bits);
}

async function open(event) {
  event.preventDefault();
  const name = $("name").value.trim();
  $("open").disabled = true;
  try {
    status("Opening " + name + "…");
    device = await Device.open({
      relayUrl: $("relay").value.trim(),
      name,
      storeKey: await storeKey(name, $("passphrase").value),
    });
    localStorage.setItem("cubbyhole-chat-name", name);
    $("address").textContent = device.address;
    $("setup").hidden = true;
    $("chat").hidden = false;
    status("Publishing prekeys (the relay may ask for a proof of work)…");
    await device.publishPrekeys();
    device.listen(
      (m) => {
        show("in", short(m.from), m.text).dataset.from = m.from;
        if (!$("peer").value) {
          $("peer").value = m.from;
          peerChanged();
        }
      },
      (e) => status("Receiving: " + e.message + " (retrying)", true),
    );
    status("Ready as " + name);
  } catch (e) {
    status("Could not open the device: " + e.message + (e.kind ? " [" + e.kind + "]" : ""), true);
    $("open").disabled = false;
    device = null;
  }
}

function peerChanged() {
  const peer = $("peer").value.trim();
  try {
    $("safety").textContent = peer ? device.safetyNumber(peer) : "-";
  } catch (e) {
    $("safety").textContent = e.message;
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("text").value;
  const peer = $("peer").value.trim();
  if (!text || !peer) return;
  const li = show("out", "me", text);
  setState(li, "sending");
  $("text").value = "";
  try {
    const id = await device.send(peer, text);
    li.dataset.id = id;
    setState(li, await device.delivery(id));
    pending.set(id, li);
    status("Ready");
  } catch (e) {
    setState(li, "not sent");
    status("Sending failed: " + e.message + (e.kind ? " [" + e.kind + "]" : ""), true);
  }
}

// Delivery states of what is not delivered yet, every few seconds.
async function refreshStates() {
  if (!device) return;
  for (const [id, li] of pending) {
    try {
      const state = await device.delivery(id);
      setState(li, state);
      if (state === "delivered" || state === "failed") pending.delete(id);
    } catch (_) {
      return;
    }
  }
}

async function main() {
  await init();
  $("relay").value = new URLSearchParams(location.search).get("relay") || location.origin;
  $("name").value = localStorage.getItem("cubbyhole-chat-name") || "";
  $("setup").addEventListener("submit", open);
  $("compose").addEventListener("submit", send);
  $("peer").addEventListener("change", peerChanged);
  $("copy").addEventListener("click", () => navigator.clipboard.writeText(device.address));
  $("close").addEventListener("click", async () => {
    await device.close();
    device = null;
    status("Closed");
    $("chat").hidden = true;
    $("setup").hidden = false;
    $("open").disabled = false;
  });
  setInterval(refreshStates, 3000);
  $("setup").hidden = false;
  status("Choose a device name and a passphrase");
}

main().catch((e) => status("Could not load: " + e, true));
