//! The in-process test seam (feature `testing`): an in-memory store, a scripted provider and scripted
//! dependents, each with faults that can be injected per call. With them the engine's lifecycle rules
//! run in milliseconds under tokio's paused clock, with no server started (tests/engine.rs).
//!
//! They play by the same contract as the real components: the provider invalidates the old key at
//! regenerate and shows the new secret once; a store returns what was written; a dependent reads its
//! key from a store when told to reload and its verify probe fails authentication while that key is
//! not the provider's active one.

mod dependents;
mod memory;
mod scripted;

pub use dependents::{DependentScript, ScriptedDependents};
pub use memory::{MemoryStore, StoreFault, StoreOp};
pub use scripted::{Fault, Op, ScriptedProvider};
