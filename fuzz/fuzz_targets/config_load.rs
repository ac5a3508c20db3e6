//! libFuzzer entry of the `config_load` target; the target itself is fuzz/targets/config_load.rs, which
//! the test command also runs (tests/offline/fuzz.rs).
#![no_main]

#[path = "../targets/config_load.rs"]
mod target;

libfuzzer_sys::fuzz_target!(|data: &[u8]| target::run(data));
