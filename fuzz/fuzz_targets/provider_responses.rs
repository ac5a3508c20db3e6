//! libFuzzer entry of the `provider_responses` target; the target itself is fuzz/targets/provider_responses.rs, which
//! the test command also runs (tests/offline/fuzz.rs).
#![no_main]

#[path = "../targets/provider_responses.rs"]
mod target;

libfuzzer_sys::fuzz_target!(|data: &[u8]| target::run(data));
