//! End-to-end rotations through the real daemon against real OpenBao, moto and the simulators.

use crate::support::secrets::assert_no_secret_leaked;
use crate::support::stack::{Options, Stack, fp};

#[tokio::test(flavor = "multi_thread")]
async fn a_manual_rotation_reaches_every_destination_and_dependent() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    let old_secret = stack.portal.current_secret().await;

    let record = daemon.rotate("test: manual rotation").await;
    assert_eq!(
        record["outcome"],
        "success",
        "{record:#}\n{}",
        daemon.log_text()
    );

    stack.assert_consistent(&o).await;
    // The old key no longer authenticates; the new one does.
    let state = stack.portal.state().await;
    assert_ne!(fp(&old_secret), state.fingerprint);
    let provider = stack.portal.provider();
    let old = keyrotd::secret::Secret::from(old_secret);
    assert!(
        provider.auth_check(&old).await.unwrap().is_none(),
        "old key rejected"
    );
    // Both dependents reloaded through their signed hooks, once.
    for dep in [&stack.dep_vault, &stack.dep_aws] {
        assert_eq!(dep.state().await.reloads, 1, "dependent reloaded once");
    }
    assert_no_secret_leaked(&stack).await;
}
