//! libFuzzer entry of the `journal_load` target; the target itself is fuzz/targets/journal_load.rs,
//! which the test command also runs (tests/offline/fuzz.rs).
#![no_main]

#[path = "../targets/journal_load.rs"]
mod target;

libfuzzer_sys::fuzz_target!(|data: &[u8]| target::run(data));
