//! Fuzz targets for cubbyhole. The logic of every target lives in
//! [`targets`], a plain module with no libFuzzer dependency, so that the root
//! crate's `tests/fuzz_corpus.rs` can include it and replay every corpus on
//! stable.

pub mod targets;

/// Meters allocations, so the decoder targets check that they stay bounded
/// by the input's size ([`targets::measure`]).
#[global_allocator]
static ALLOCATOR: targets::MeteredAllocator = targets::MeteredAllocator;
