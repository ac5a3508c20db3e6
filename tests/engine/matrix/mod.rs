//! The fault matrix: every outside component keyrotd depends on, crossed with every fault that
//! applies to it, at every phase where keyrotd uses it. Each row has two stages:
//!
//! 1. the real client (`AosProvider`, `VaultStore`, `AwsStore`, `FileStore`, `Notifier`) meets the
//!    real fault — a server that refuses, stalls, answers 5xx/401/403/429/302, sends malformed JSON or
//!    100 MB, or resets the connection after reading the request; a full or read-only filesystem; a
//!    link — and what it returns is recorded, with proof that it quotes no secret and read no 100 MB
//!    body ([`clients`]);
//! 2. that very error is injected into the in-process engine at the row's phase, and the row's end is
//!    asserted: outcome, journal, regenerations, what each destination holds, and that the old key
//!    works or the new one is stored ([`rows`]).
//!
//! The state dir's faults are made for real in the engine's own state dir (stage 2 only). The table
//! is printed (`cargo test --features testing --test engine matrix -- --nocapture`) and must equal
//! the one in docs/faults.md; `KEYROTD_WRITE_FAULTS_DOC=1` writes it there.

mod clients;
mod model;
mod rows;
mod server;

use std::collections::HashMap;

use futures::StreamExt;

use clients::{Met, Reported};
use model::{Component, Fault, Op, Phase, label};
use rows::Want;

/// One row of the matrix.
struct Row {
    component: Component,
    fault: Fault,
    phase: Phase,
}

fn rows() -> Vec<Row> {
    let mut rows = Vec::new();
    // While working on one component: `KEYROTD_MATRIX_ONLY="Vault store"` (the doc check is skipped).
    let only = std::env::var("KEYROTD_MATRIX_ONLY").ok();
    for component in Component::ALL {
        if only.as_deref().is_some_and(|o| o != component.name()) {
            continue;
        }
        for &fault in component.faults() {
            for &phase in component.phases(fault) {
                rows.push(Row {
                    component,
                    fault,
                    phase,
                });
            }
        }
    }
    rows
}

/// Stage 1 for every (component, fault, operation) the rows need, all at once (real time).
fn stage_one(rows: &[Row]) -> HashMap<(Component, Fault, Op), Met> {
    let mut wanted: Vec<(Component, Fault, Op)> = rows
        .iter()
        .map(|r| (r.component, r.fault, r.component.op(r.phase)))
        .collect();
    wanted.sort_by_key(|k| format!("{k:?}"));
    wanted.dedup();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The filesystem and command faults first, one at a time (they mount and fork); then the
    // network faults, a few at once, so that a loaded machine does not turn answers into timeouts.
    let (local, network): (Vec<_>, Vec<_>) = wanted.into_iter().partition(|(c, _, _)| {
        matches!(
            c,
            Component::File | Component::CommandHook | Component::StateDir
        )
    });
    rt.block_on(async {
        let mut met = HashMap::new();
        for (c, f, op) in local {
            met.insert((c, f, op), clients::meet(c, f, op).await);
        }
        let calls = futures::stream::iter(network)
            .map(|(c, f, op)| async move { ((c, f, op), clients::meet(c, f, op).await) });
        let network: Vec<_> = calls.buffer_unordered(6).collect().await;
        met.extend(network);
        met
    })
}

/// What the real client must report for a fault: the classification the engine's rules rely on.
fn expected_kind(c: Component, f: Fault, op: Op) -> &'static str {
    use Component as C;
    use Fault::*;
    match (c, f, op) {
        (C::StateDir, _, _) => "-",
        // Read-only provider calls: anything but 401/403 and 429 is worth a retry; a 3xx is never
        // followed and is an answer retrying will not change.
        (C::PortalStatus, Unauthorized, _) => "auth",
        (C::PortalStatus | C::PortalRegenerate | C::PortalAuthCheck, RateLimited, _) => {
            "rate limited (300s)"
        }
        (C::PortalStatus, Redirect, _) => "permanent",
        (C::PortalStatus, _, _) => "transient",
        // Regenerate: only a refused connection proves nothing was sent; anything after the request
        // left may have rotated.
        (C::PortalRegenerate, Refused, _) => "transient",
        (C::PortalRegenerate, Unauthorized, _) => "auth",
        (C::PortalRegenerate, _, _) => "ambiguous",
        // The auth check: 200 is the answer (the identity in the body is a bonus), 401 a refusal.
        (C::PortalAuthCheck, MalformedJson | Huge, _) => "ok: authenticates",
        (C::PortalAuthCheck, Unauthorized, _) => "ok: refused the secret",
        (C::PortalAuthCheck, Redirect, _) => "permanent",
        (C::PortalAuthCheck, _, _) => "transient",
        (C::Vault | C::Aws, Unauthorized, _) => "auth",
        // An AWS answer that is not AWS's JSON, or a redirect: the same request will fail again.
        // A cut-off JSON answer may be a cut connection: Vault is asked again.
        (C::Vault, MalformedJson, _) => "transient",
        (C::Vault | C::Aws, MalformedJson | Redirect, _) => "permanent",
        (C::Vault | C::Aws, _, _) => "transient",
        (C::File, DiskFull, Op::StoreWrite) => "transient",
        (C::File, ReadOnly, Op::StorePreflight | Op::StoreWrite) => "auth",
        // The preflight probe writes a block: a full disk is found before anything is destroyed.
        (C::File, DiskFull, Op::StorePreflight) => "transient",
        (C::File, Huge, Op::StorePreflight) => "ok: writable",
        (C::File, DiskFull | ReadOnly, Op::StoreRead) => "ok: read",
        (C::File, Symlink, _) => "permanent",
        (C::File, Huge, Op::StoreRead) => "permanent",
        (C::File, Huge, _) => "ok: written",
        (C::HttpHook, Refused | ResetAfterCommit, _) => "request failed",
        (C::HttpHook, Timeout, _) => "timeout",
        (C::HttpHook, ServerError, _) => "HTTP 503",
        (C::HttpHook, Unauthorized, _) => "HTTP 401",
        (C::HttpHook, RateLimited, _) => "HTTP 429",
        (C::HttpHook, Huge, _) => "ok: reloaded",
        (C::HttpHook, Redirect, _) => "HTTP 302",
        (C::CommandHook, Refused, _) => "cannot start",
        (C::CommandHook, Timeout, _) => "timeout",
        (C::CommandHook, ServerError | ResetAfterCommit, _) => "exit",
        (C::CommandHook, Huge, _) => "ok: reloaded",
        (C::Probe, Refused | Timeout | ResetAfterCommit, _) => "unreachable",
        (C::Probe, ServerError, _) => "unexpected (503)",
        (C::Probe, Unauthorized, _) => "auth failure (401)",
        (C::Probe, RateLimited, _) => "unexpected (429)",
        (C::Probe, Huge, _) => "ok",
        (C::Probe, Redirect, _) => "unexpected (302)",
        (c, f, op) => panic!("no expected kind for {c:?} {f:?} {op:?}"),
    }
}

/// The message as the docs show it: the fault's own addresses and paths replaced, cut short.
fn shown(met: &Met) -> String {
    let mut m = met.reported.message();
    if met.server.starts_with('/') {
        m = m.replace(&met.server, "{dir}");
    } else if !met.server.is_empty() {
        m = m.replace(&met.server, "{server}");
    }
    let m: String = m
        .replace(env!("CARGO_PKG_VERSION"), "{version}")
        .replace('|', "\\|")
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    if m.chars().count() > 150 {
        format!("{}…", m.chars().take(150).collect::<String>())
    } else {
        m
    }
}

fn holds(h: crate::fixture::Holds) -> &'static str {
    use crate::fixture::Holds::*;
    match h {
        Active => "active key",
        Original => "old key",
        Nothing => "nothing",
        Other => "another value",
    }
}

/// Whether the promise held, in words: the old key works, the new one is stored, or the key is
/// flagged for an operator (or kept for recovery to decide).
fn promise(w: &Want) -> &'static str {
    if w.regenerations == 0 && w.a == crate::fixture::Holds::Active {
        "old key works"
    } else if w.a == crate::fixture::Holds::Active || w.b == crate::fixture::Holds::Active {
        "new key stored"
    } else if w.lost {
        "flagged lost"
    } else {
        "recovery pending"
    }
}

fn phase_name(c: Component, p: Phase) -> String {
    match (c, p) {
        (Component::PortalRegenerate, Phase::Regenerate) => "regenerate".into(),
        (Component::PortalRegenerate, Phase::Recovery) => {
            "recovery (lost key's re-rotation)".into()
        }
        (Component::PortalAuthCheck, Phase::Recovery) => "recovery (copy of a stored key)".into(),
        (Component::Vault | Component::Aws | Component::File, Phase::Recovery) => {
            "recovery (read after a crash in storing)".into()
        }
        (Component::StateDir, Phase::Recovery) => "recovery (load at start)".into(),
        _ => p.to_string(),
    }
}

const HEADER: &str = "| component | fault | phase | the client reports | outcome | journal | regenerations | a | b | promise |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";

fn table_row(row: &Row, met: &Met, got: &Want) -> String {
    let message = shown(met);
    let kind = met.reported.kind();
    let reports = match &met.reported {
        Reported::InPlace => "(made for real)".to_string(),
        _ if message.is_empty() => kind,
        _ if message.starts_with(&kind) => message,
        _ => format!("{kind}: {message}"),
    };
    format!(
        "| {} | {} | {} | {} | {} | {}{} | {} | {} | {} | {} |\n",
        row.component.name(),
        label(row.component, row.fault),
        phase_name(row.component, row.phase),
        reports,
        got.outcome.map_or("-", |o| o.as_str()),
        keyrotd::journal::phase_name(got.phase),
        if got.lost { ", lost" } else { "" },
        got.regenerations,
        holds(got.a),
        holds(got.b),
        promise(got),
    )
}

const DOC: &str = "docs/faults.md";
const BEGIN: &str = "<!-- in-process matrix: generated by tests/engine/matrix, do not edit -->\n";
const END: &str = "<!-- end of the in-process matrix -->";

/// The doc's table equals `table`; with `KEYROTD_WRITE_FAULTS_DOC=1` it is written there instead.
fn check_doc(table: &str) -> Result<(), String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(DOC);
    let doc = std::fs::read_to_string(&path).map_err(|e| format!("{DOC}: {e}"))?;
    let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) else {
        return Err(format!("{DOC} lacks the matrix markers"));
    };
    let current = &doc[b + BEGIN.len()..e];
    if current == table {
        return Ok(());
    }
    if std::env::var_os("KEYROTD_WRITE_FAULTS_DOC").is_some() {
        let new = format!("{}{BEGIN}{table}{}", &doc[..b], &doc[e..]);
        std::fs::write(&path, new).map_err(|e| format!("{DOC}: {e}"))?;
        return Ok(());
    }
    let first = current
        .lines()
        .zip(table.lines())
        .find(|(a, b)| a != b)
        .map(|(a, b)| format!("\n  doc:  {a}\n  test: {b}"))
        .unwrap_or_default();
    Err(format!(
        "{DOC} differs from the matrix the test generated (KEYROTD_WRITE_FAULTS_DOC=1 rewrites it){first}"
    ))
}

#[test]
fn every_component_meets_every_fault_at_every_phase() {
    let rows = rows();
    let met = stage_one(&rows);
    let mut failures = Vec::new();
    for ((c, f, op), m) in &met {
        let kind = m.reported.kind();
        if kind != expected_kind(*c, *f, *op) {
            failures.push(format!(
                "{} / {} / {op:?}: the client reports {kind} ({}), expected {}",
                c.name(),
                label(*c, *f),
                m.reported.message(),
                expected_kind(*c, *f, *op)
            ));
        }
        let networked = !matches!(
            c,
            Component::File | Component::CommandHook | Component::StateDir
        );
        if networked && *f != Fault::Refused && m.requests == 0 {
            failures.push(format!(
                "{} / {}: the fault server never read a request",
                c.name(),
                label(*c, *f)
            ));
        }
        for p in clients::check(m) {
            failures.push(format!("{} / {} / {op:?}: {p}", c.name(), label(*c, *f)));
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let mut table = String::from(HEADER);
    rt.block_on(async {
        for row in &rows {
            let m = &met[&(row.component, row.fault, row.component.op(row.phase))];
            let ran = rows::run(row.component, row.fault, row.phase, &m.reported).await;
            let want = rows::expected(row.component, row.fault, row.phase, &m.reported);
            let name = format!(
                "{} / {} / {}",
                row.component.name(),
                label(row.component, row.fault),
                row.phase
            );
            if ran.got != want {
                failures.push(format!("{name}:\n   got {:?}\n  want {want:?}", ran.got));
            }
            for p in ran.problems {
                failures.push(format!("{name}: {p}"));
            }
            table.push_str(&table_row(row, m, &ran.got));
        }
    });
    println!("{table}");
    if std::env::var_os("KEYROTD_MATRIX_ONLY").is_none() {
        if let Err(e) = check_doc(&table) {
            failures.push(e);
        }
        assert!(rows.len() >= 150, "{} rows", rows.len());
    }
    assert!(
        failures.is_empty(),
        "{} problems in {} rows:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}
