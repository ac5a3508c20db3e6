//! Re-rotations against the real stores: a key whose new secret was lost in transit has no working
//! value anywhere (the portal invalidated the old key), so it is regenerated again at once, even when
//! its AWS secret was given several new values in the last 10 minutes. (AWS's advice of one value per
//! 10 minutes holds back re-rotation loops of drift, whose every round writes a value; a lost key's
//! round wrote none, and waiting would only lengthen the outage, unflagged.) The first repair of drift
//! goes at once too: the destinations hold a dead key until it is done; only a drift loop waits.

use std::time::Duration;

use serde_json::json;

use crate::support::stack::{Options, Stack};

#[tokio::test(flavor = "multi_thread")]
async fn a_key_lost_in_transit_is_rerotated_at_once_after_recent_aws_writes() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    // Three ordinary rotations: the AWS secret has had three new values in the last minute, the most
    // keyrotd gives one in 10 minutes before a drift loop waits.
    for n in 0..keyrotd::store::aws::WRITES_PER_WINDOW {
        let record = daemon.rotate(&format!("test: rotation {n}")).await;
        assert_eq!(record["outcome"], "success", "{record:#}");
    }
    stack
        .portal
        .faults(json!({ "regenerate": { "lose_next": 1 } }))
        .await;
    let id = daemon.start_rotate("test: the answer is lost").await;
    // Without a wait the re-rotation takes well under a second; 30 s leaves room for a loaded machine
    // and is far below the 10 minutes a wait would take.
    let record = daemon.wait_rotation(&id, Duration::from_secs(30)).await;
    assert_eq!(
        record["outcome"],
        "success",
        "{record:#}\n{}",
        daemon.log_text()
    );
    assert_eq!(
        stack.regenerations().await,
        keyrotd::store::aws::WRITES_PER_WINDOW as u64 + 2,
        "the lost regenerate and one re-rotation"
    );
    stack.assert_consistent(&o).await;
    assert!(
        !daemon.log_text().contains("Re-rotation waits"),
        "{}",
        daemon.log_text()
    );
    crate::support::secrets::assert_no_secret_leaked(&stack).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_is_repaired_at_once_after_recent_aws_writes() {
    let stack = Stack::start().await;
    let o = Options {
        reconcile_interval: "2s".into(),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    // The AWS secret has had as many new values in the last minute as keyrotd gives one in 10
    // minutes before a drift *loop* waits.
    for n in 0..keyrotd::store::aws::WRITES_PER_WINDOW {
        let record = daemon.rotate(&format!("test: rotation {n}")).await;
        assert_eq!(record["outcome"], "success", "{record:#}");
    }
    // Someone rotates in the portal: every destination now holds a dead key. The first repair must
    // not wait for the write rate (that wait would be a 10-minute outage).
    let oob = stack.portal.rotate_out_of_band().await;
    stack
        .eventually(Duration::from_secs(30), "the drift repaired", || async {
            stack.portal.state().await.key_id != oob && daemon.key().await["drift"] == false
        })
        .await;
    stack.assert_consistent(&o).await;
    assert!(
        !daemon.log_text().contains("Re-rotation waits"),
        "the first repair of drift waited:\n{}",
        daemon.log_text()
    );
}
