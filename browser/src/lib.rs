//! cubbyhole in the browser (placeholder while the crate is built).
#![forbid(unsafe_code)]
#![deny(missing_docs)]
