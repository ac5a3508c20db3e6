//! libFuzzer entry of the `admin_request` target; the target itself is fuzz/targets/admin_request.rs, which
//! the test command also runs (tests/offline/fuzz.rs).
#![no_main]

#[path = "../targets/admin_request.rs"]
mod target;

libfuzzer_sys::fuzz_target!(|data: &[u8]| target::run(data));
