//! cubbyhole-relay: the untrusted prekey directory and mailbox over HTTP.
//!
//! (Being built: see relay/API.md for the HTTP API.)
