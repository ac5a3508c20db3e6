//! What the matrix crosses: the outside components, the faults that apply to each, and the phases at
//! which each component is used.

use std::fmt;

/// An outside component keyrotd depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    PortalStatus,
    PortalRegenerate,
    PortalAuthCheck,
    Vault,
    Aws,
    File,
    HttpHook,
    CommandHook,
    Probe,
    StateDir,
}

/// A fault. A few mean something of their own to a component that is not spoken to over HTTP (see
/// [`label`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    Refused,
    Timeout,
    ServerError,
    Unauthorized,
    RateLimited,
    MalformedJson,
    Huge,
    ResetAfterCommit,
    Redirect,
    DiskFull,
    ReadOnly,
    Symlink,
}

/// Where in keyrotd's life a component meets the fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Preflight,
    /// A regenerate whose answer was ambiguous: the status is read again to tell.
    Regenerate,
    /// The state dir: the `regenerating` record, written before the call.
    BeforeRegenerate,
    /// The state dir: every record after the regenerate answered.
    AfterRegenerate,
    Store,
    Notify,
    Verify,
    Watch,
    /// The recovery scan at start, from the journal a crash left.
    Recovery,
    Reconcile,
}

/// The operation of a client a phase calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Status,
    Regenerate,
    AuthCheck,
    StorePreflight,
    StoreWrite,
    StoreRead,
    Reload,
    Probe,
    /// The fault is made for real in the engine's own state dir: no client stage.
    InPlace,
}

use Component::*;
use Fault::*;

const NETWORK: &[Fault] = &[
    Refused,
    Timeout,
    ServerError,
    Unauthorized,
    RateLimited,
    MalformedJson,
    Huge,
    ResetAfterCommit,
    Redirect,
];
/// A hook's and a probe's body is never read: malformed JSON cannot matter to them.
const STATUS_ONLY: &[Fault] = &[
    Refused,
    Timeout,
    ServerError,
    Unauthorized,
    RateLimited,
    Huge,
    ResetAfterCommit,
    Redirect,
];

impl Component {
    pub const ALL: [Component; 10] = [
        PortalStatus,
        PortalRegenerate,
        PortalAuthCheck,
        Vault,
        Aws,
        File,
        HttpHook,
        CommandHook,
        Probe,
        StateDir,
    ];

    pub fn faults(self) -> &'static [Fault] {
        match self {
            PortalStatus | PortalRegenerate | PortalAuthCheck | Vault | Aws => NETWORK,
            HttpHook | Probe => STATUS_ONLY,
            CommandHook => &[Refused, Timeout, ServerError, Huge, ResetAfterCommit],
            File => &[DiskFull, ReadOnly, Symlink, Huge],
            StateDir => &[DiskFull, ReadOnly, Symlink],
        }
    }

    pub fn phases(self, fault: Fault) -> &'static [Phase] {
        use Phase::*;
        match self {
            PortalStatus => &[Preflight, Regenerate, Verify, Watch, Recovery, Reconcile],
            PortalRegenerate => &[Phase::Regenerate, Recovery],
            PortalAuthCheck => &[Verify, Recovery],
            Vault | Aws | File => &[Preflight, Store, Recovery],
            HttpHook | CommandHook => &[Notify],
            Probe => &[Preflight, Watch],
            // A journal that is a link matters where it is read: at start.
            StateDir if fault == Symlink => &[Recovery],
            StateDir => &[BeforeRegenerate, AfterRegenerate, Recovery],
        }
    }

    /// The client operation used at `phase`.
    pub fn op(self, phase: Phase) -> Op {
        match (self, phase) {
            (PortalStatus, _) => Op::Status,
            (PortalRegenerate, _) => Op::Regenerate,
            (PortalAuthCheck, _) => Op::AuthCheck,
            (Vault | Aws | File, Phase::Preflight) => Op::StorePreflight,
            (Vault | Aws | File, Phase::Store) => Op::StoreWrite,
            (Vault | Aws | File, _) => Op::StoreRead,
            (HttpHook | CommandHook, _) => Op::Reload,
            (Probe, _) => Op::Probe,
            (StateDir, _) => Op::InPlace,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PortalStatus => "portal status",
            PortalRegenerate => "portal regenerate",
            PortalAuthCheck => "portal auth check",
            Vault => "Vault store",
            Aws => "AWS store",
            File => "file store",
            HttpHook => "HTTP reload hook",
            CommandHook => "command hook",
            Probe => "verify probe",
            StateDir => "state dir",
        }
    }
}

/// The fault in words, as it is made for `component`.
pub fn label(component: Component, fault: Fault) -> &'static str {
    match (component, fault) {
        (CommandHook, Refused) => "cannot start (no such program)",
        (CommandHook, Timeout) => "runs past its timeout",
        (CommandHook, ServerError) => "exits 1, printing a secret",
        (CommandHook, Huge) => "prints 100 MB, exits 0",
        (CommandHook, ResetAfterCommit) => "killed after doing its work",
        (File, Huge) => "100 MB file in place",
        (File, Symlink) => "destination is a link to /dev/zero",
        (StateDir, Symlink) => "journal is a link to another journal",
        (Vault | Aws, Unauthorized) => "403",
        (_, Refused) => "refused connection",
        (_, Timeout) => "timeout past the limit",
        (_, ServerError) => "503",
        (_, Unauthorized) => "401",
        (_, RateLimited) => "429, Retry-After: 86400",
        (_, MalformedJson) => "200, malformed JSON",
        (_, Huge) => "200, 100 MB body",
        (_, ResetAfterCommit) => "TCP reset after the request",
        (_, Redirect) => "302",
        (_, DiskFull) => "disk full",
        (_, ReadOnly) => "read-only",
        (_, Symlink) => "symlink",
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Phase::Preflight => "preflight",
            Phase::Regenerate => "regenerate (ambiguous answer)",
            Phase::BeforeRegenerate => "before regenerate",
            Phase::AfterRegenerate => "after regenerate",
            Phase::Store => "store",
            Phase::Notify => "notify",
            Phase::Verify => "verify",
            Phase::Watch => "watch",
            Phase::Recovery => "recovery",
            Phase::Reconcile => "reconcile",
        };
        f.write_str(s)
    }
}

/// Where the regenerate fault's request got: `true` when the portal rotated before the answer went
/// wrong (a 200 that cannot be read, a connection reset after the request arrived).
pub fn portal_rotates(fault: Fault) -> bool {
    matches!(fault, MalformedJson | Huge | ResetAfterCommit)
}
