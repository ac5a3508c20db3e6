//! Guard for the crash-recovery tests (tests/e2e/crash.rs).
//!
//! Those tests kill the daemon at phase boundaries through named failpoints (the `fail` crate), which
//! exist only in a binary built with the `failpoints` cargo feature. tests/e2e/crash.rs is therefore
//! compiled only with that feature (`#![cfg(feature = "failpoints")]`): without it, it would not
//! test what it claims. So that a plain `cargo test` cannot pass while silently leaving them out, this
//! file always compiles and fails loudly when the feature is off. The test suite is run as
//! `cargo test --features failpoints`.

#[test]
// The constant is the point: it is decided by how the suite was built.
#[allow(clippy::assertions_on_constants)]
fn the_test_suite_runs_with_failpoints() {
    assert!(
        cfg!(feature = "failpoints"),
        "run the test suite with --features failpoints (see README): the crash-recovery tests in \
         tests/e2e/crash.rs need the daemon's failpoints and are not compiled without them"
    );
}
