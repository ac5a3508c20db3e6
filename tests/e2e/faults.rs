//! The fault matrix end to end: one row per outside component, made for real against the real
//! `keyrotd` daemon, OpenBao, moto and the simulators (the full matrix runs in process:
//! tests/engine/matrix/). Each row sets its fault up, rotates through the admin API, checks the
//! outcome, the journal, the regenerations and what every destination holds, then puts things back
//! so the next row starts from a key that would rotate. The table is printed and must equal the
//! end-to-end section of docs/faults.md.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::support::ReadOnlyDir;
use crate::support::daemon::Daemon;
use crate::support::stack::{Options, Stack};

/// What a row ends with.
#[derive(Debug, PartialEq, Eq)]
struct End {
    outcome: String,
    journal: String,
    regenerations: u64,
    /// "unchanged" (every destination holds what it held before) or "active key everywhere".
    destinations: &'static str,
}

struct Row {
    component: &'static str,
    fault: &'static str,
    phase: &'static str,
    made_by: &'static str,
    want: End,
}

fn end(outcome: &str, regenerations: u64, destinations: &'static str) -> End {
    End {
        outcome: outcome.into(),
        journal: "idle".into(),
        regenerations,
        destinations,
    }
}

const UNCHANGED: &str = "unchanged, old key works";
const EVERYWHERE: &str = "active key everywhere";

/// A tmpfs over `path` (what was there is hidden until it is unmounted), filled to the last block.
struct FullDisk(PathBuf);

impl FullDisk {
    fn new(path: &Path) -> FullDisk {
        let p = path.to_str().expect("UTF-8 path");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=128k", "tmpfs", p])
            .status()
            .expect("mount(8) runs")
            .success();
        assert!(ok, "mount a tmpfs on {p} (the tests run as root)");
        let full = FullDisk(path.to_path_buf());
        let block = vec![0u8; 16 * 1024];
        let mut f = std::fs::File::create(path.join(".filler")).expect("filler");
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
        full
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Rotates with the row's fault in place (held by `guard`, dropped once the rotation ended) and
/// reads the end back; `before` is what the destinations held before the fault was made.
async fn run_row(
    stack: &Stack,
    daemon: &Daemon,
    row: &Row,
    before: Vec<Option<String>>,
    guard: Guard,
) -> End {
    let record = daemon.rotate(&format!("fault matrix: {}", row.fault)).await;
    drop(guard);
    let after = stack.destination_fingerprints().await;
    let state = stack.portal.state().await;
    let everywhere = after
        .iter()
        .all(|f| f.as_deref() == Some(state.fingerprint.as_str()));
    let destinations = if after == before {
        UNCHANGED
    } else if everywhere {
        EVERYWHERE
    } else {
        "some destinations behind"
    };
    End {
        outcome: record["outcome"].as_str().unwrap_or("-").to_string(),
        journal: stack.journal_phase(),
        regenerations: state.regenerations,
        destinations,
    }
}

fn rows() -> Vec<Row> {
    vec![
        Row {
            component: "portal status",
            fault: "503",
            phase: "preflight",
            made_by: "`/_sim/faults` status fail_next",
            want: end("aborted", 0, UNCHANGED),
        },
        Row {
            component: "portal regenerate",
            fault: "connection dropped after the portal rotated",
            phase: "regenerate",
            made_by: "`/_sim/faults` regenerate lose_next 1",
            want: end("success", 2, EVERYWHERE),
        },
        Row {
            component: "portal auth check",
            fault: "401 to every key",
            phase: "verify",
            made_by: "`/_sim/faults` auth_check fail_next, status 401",
            want: end("success", 1, EVERYWHERE),
        },
        Row {
            component: "Vault store",
            fault: "refused connection",
            phase: "preflight",
            made_by: "OpenBao's gate closed",
            want: end("aborted", 0, UNCHANGED),
        },
        Row {
            component: "AWS store",
            fault: "refused connection",
            phase: "preflight",
            made_by: "moto's gate closed",
            want: end("aborted", 0, UNCHANGED),
        },
        Row {
            component: "file store",
            fault: "disk full",
            phase: "preflight",
            made_by: "a full tmpfs over the key directory",
            want: end("aborted", 0, UNCHANGED),
        },
        Row {
            component: "HTTP reload hook",
            fault: "503",
            phase: "notify",
            made_by: "the dependent simulator's fail_reload_next",
            want: end("degraded", 1, EVERYWHERE),
        },
        Row {
            component: "command hook",
            fault: "exits 1",
            phase: "notify",
            made_by: "the hook's script fails while a marker file exists",
            want: end("degraded", 1, EVERYWHERE),
        },
        Row {
            component: "state dir",
            fault: "read-only",
            phase: "before regenerate",
            made_by: "a read-only bind mount of the journal directory",
            want: end("aborted", 0, UNCHANGED),
        },
        Row {
            component: "verify probe",
            fault: "refused connection",
            phase: "preflight",
            made_by: "the dependent simulator killed",
            want: end("aborted", 0, UNCHANGED),
        },
    ]
}

/// Boxed so that every row's guard has one type.
type Guard = Box<dyn std::any::Any>;

async fn make(stack: &mut Stack, component: &str, marker: &Path) -> Guard {
    match component {
        "portal status" => {
            stack
                .portal
                .faults(json!({"status": {"fail_next": 1000, "status": 503}}))
                .await;
            Box::new(())
        }
        "portal regenerate" => {
            stack
                .portal
                .faults(json!({"regenerate": {"lose_next": 1}}))
                .await;
            Box::new(())
        }
        "portal auth check" => {
            stack
                .portal
                .faults(json!({"auth_check": {"fail_next": 100000, "status": 401}}))
                .await;
            Box::new(())
        }
        "Vault store" => {
            stack.bao.down();
            Box::new(())
        }
        "AWS store" => {
            stack.moto.down();
            Box::new(())
        }
        "file store" => Box::new(FullDisk::new(&stack.keys_dir())),
        "HTTP reload hook" => {
            stack
                .dep_vault
                .faults(json!({"fail_reload_next": 1000}))
                .await;
            Box::new(())
        }
        "command hook" => {
            std::fs::write(marker, "fail").expect("marker");
            Box::new(())
        }
        "state dir" => Box::new(ReadOnlyDir::new(&stack.state_dir().join("journal"))),
        "verify probe" => {
            stack.dep_aws.kill();
            Box::new(())
        }
        other => panic!("no fault for {other}"),
    }
}

/// Puts back what `make` changed outside its guard.
async fn heal(stack: &Stack, component: &str, marker: &Path) {
    match component {
        "Vault store" => stack.bao.up(),
        "AWS store" => stack.moto.up(),
        "HTTP reload hook" => stack.dep_vault.faults(json!({"fail_reload_next": 0})).await,
        "command hook" => std::fs::remove_file(marker).expect("marker"),
        _ => {}
    }
    stack.portal.reset().await;
}

const DOC: &str = "docs/faults.md";
const BEGIN: &str = "<!-- end-to-end matrix: generated by tests/e2e/faults.rs, do not edit -->\n";
const END: &str = "<!-- end of the end-to-end matrix -->";

#[tokio::test(flavor = "multi_thread")]
async fn one_fault_of_each_component_end_to_end() {
    let mut stack = Stack::start().await;
    let marker = stack.dir.path().join("hook-fails");
    let o = Options {
        command_hook: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("test ! -e {}", marker.display()),
        ]),
        hook_retries: Some(1),
        ..Options::default()
    };
    let daemon = stack.daemon(&stack.write_config(&o)).await;
    // A first rotation fills every destination: each row starts from a key that is stored and works.
    let first = daemon.rotate("fault matrix: first fill").await;
    assert_eq!(first["outcome"], "success", "{first:#}");

    let mut table = String::from(
        "| component | fault | phase | made by | outcome | journal | regenerations | destinations |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mut failures = Vec::new();
    for row in rows() {
        // The portal's counters start from zero for each row.
        stack.portal.reset().await;
        let before = stack.destination_fingerprints().await;
        let guard = make(&mut stack, row.component, &marker).await;
        let got = run_row(&stack, &daemon, &row, before, guard).await;
        heal(&stack, row.component, &marker).await;
        // The journal is written again once its directory is (the daemon retries every few seconds).
        if row.component == "state dir" {
            crate::support::eventually(
                Duration::from_secs(30),
                "the daemon ready again",
                || async { daemon.get("/readyz").await.0 == 200 },
            )
            .await;
        }
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.component,
            row.fault,
            row.phase,
            row.made_by,
            got.outcome,
            got.journal,
            got.regenerations,
            got.destinations
        ));
        if got != row.want {
            failures.push(format!(
                "{} / {}: got {got:?}, want {:?}",
                row.component, row.fault, row.want
            ));
        }
    }
    println!("{table}");
    crate::support::secrets::assert_no_secret_leaked(&stack).await;
    if let Err(e) = check_doc(&table) {
        failures.push(e);
    }
    assert!(
        failures.is_empty(),
        "{}\nlog:\n{}",
        failures.join("\n"),
        daemon.log_text()
    );
}

/// The doc's end-to-end table equals `table`; `KEYROTD_WRITE_FAULTS_DOC=1` writes it there instead.
fn check_doc(table: &str) -> Result<(), String> {
    let path = crate::support::project_root().join(DOC);
    let doc = std::fs::read_to_string(&path).map_err(|e| format!("{DOC}: {e}"))?;
    let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) else {
        return Err(format!("{DOC} lacks the end-to-end markers"));
    };
    if &doc[b + BEGIN.len()..e] == table {
        return Ok(());
    }
    if std::env::var_os("KEYROTD_WRITE_FAULTS_DOC").is_some() {
        let new = format!("{}{BEGIN}{table}{}", &doc[..b], &doc[e..]);
        return std::fs::write(&path, new).map_err(|e| format!("{DOC}: {e}"));
    }
    Err(format!(
        "{DOC}'s end-to-end table differs from the one this test generated (KEYROTD_WRITE_FAULTS_DOC=1 rewrites it)"
    ))
}
