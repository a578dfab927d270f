#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cubbyhole_fuzz::targets::sealed(data);
});
