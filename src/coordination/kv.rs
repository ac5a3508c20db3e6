//! Where leases and journals live: documents at paths of a Vault/OpenBao KV v2 mount, read with their
//! version and written with check-and-set. In memory for the engine's tests (feature `testing`).

use std::sync::Arc;

use serde_json::Value;

/// Why a document operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KvError {
    /// Check-and-set lost: someone else wrote the document since it was read.
    #[error("check-and-set lost: the document changed since it was read")]
    Conflict,
    /// The store could not be reached or answered with an error; nothing is known.
    #[error("{0}")]
    Unavailable(String),
}

/// A document and the version a check-and-set write must name.
#[derive(Debug, Clone)]
pub struct Doc {
    pub value: Value,
    pub version: u64,
}

/// The document store the coordination uses.
#[derive(Clone)]
pub enum Kv {
    /// The KV v2 mount of a configured Vault store.
    Vault(Arc<crate::limits::Limited<crate::store::Store>>),
    #[cfg(feature = "testing")]
    Memory(Arc<memory::MemoryKv>),
}

impl Kv {
    /// The document at `path`, or `None` when there is none (or only a deleted version).
    pub async fn read(&self, path: &str) -> Result<Option<Doc>, KvError> {
        match self {
            Kv::Vault(v) => match &***v {
                crate::store::Store::Vault(v) => v.doc_read(path).await,
                _ => Err(KvError::Unavailable(
                    "the coordination store is not a vault store".into(),
                )),
            },
            #[cfg(feature = "testing")]
            Kv::Memory(m) => m.read(path).await,
        }
    }

    /// Writes `value` at `path` if its version is still `cas` (0: it must not exist yet). Returns the
    /// new version.
    pub async fn write(&self, path: &str, value: &Value, cas: u64) -> Result<u64, KvError> {
        match self {
            Kv::Vault(v) => match &***v {
                crate::store::Store::Vault(v) => v.doc_write(path, value, cas).await,
                _ => Err(KvError::Unavailable(
                    "the coordination store is not a vault store".into(),
                )),
            },
            #[cfg(feature = "testing")]
            Kv::Memory(m) => m.write(path, value, cas).await,
        }
    }

    /// The names directly under `dir`.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, KvError> {
        match self {
            Kv::Vault(v) => match &***v {
                crate::store::Store::Vault(v) => v.doc_list(dir).await,
                _ => Err(KvError::Unavailable(
                    "the coordination store is not a vault store".into(),
                )),
            },
            #[cfg(feature = "testing")]
            Kv::Memory(m) => m.list(dir).await,
        }
    }

    /// Removes the document at `path` and its history.
    pub async fn delete(&self, path: &str) -> Result<(), KvError> {
        match self {
            Kv::Vault(v) => match &***v {
                crate::store::Store::Vault(v) => v.doc_delete(path).await,
                _ => Err(KvError::Unavailable(
                    "the coordination store is not a vault store".into(),
                )),
            },
            #[cfg(feature = "testing")]
            Kv::Memory(m) => m.delete(path).await,
        }
    }
}

#[cfg(feature = "testing")]
pub mod memory {
    //! An in-memory KV v2 with Vault's check-and-set semantics, for tests of several replicas in one
    //! process. It can be taken down (every call fails) and counts requests.

    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use serde_json::Value;

    use super::{Doc, KvError};

    #[derive(Default)]
    pub struct MemoryKv {
        docs: Mutex<BTreeMap<String, (Value, u64)>>,
        down: AtomicBool,
        requests: AtomicU64,
    }

    impl MemoryKv {
        pub fn set_down(&self, down: bool) {
            self.down.store(down, Ordering::SeqCst);
        }

        pub fn requests(&self) -> u64 {
            self.requests.load(Ordering::SeqCst)
        }

        /// The document at `path` as stored (for assertions).
        pub fn get(&self, path: &str) -> Option<Value> {
            self.lock().get(path).map(|(v, _)| v.clone())
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Value, u64)>> {
            self.docs.lock().unwrap_or_else(|p| p.into_inner())
        }

        fn enter(&self) -> Result<(), KvError> {
            self.requests.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                Err(KvError::Unavailable("connection refused".into()))
            } else {
                Ok(())
            }
        }

        pub async fn read(&self, path: &str) -> Result<Option<Doc>, KvError> {
            self.enter()?;
            Ok(self.lock().get(path).map(|(value, version)| Doc {
                value: value.clone(),
                version: *version,
            }))
        }

        pub async fn write(&self, path: &str, value: &Value, cas: u64) -> Result<u64, KvError> {
            self.enter()?;
            let mut docs = self.lock();
            let current = docs.get(path).map(|(_, v)| *v).unwrap_or(0);
            if current != cas {
                return Err(KvError::Conflict);
            }
            docs.insert(path.to_string(), (value.clone(), current + 1));
            Ok(current + 1)
        }

        pub async fn list(&self, dir: &str) -> Result<Vec<String>, KvError> {
            self.enter()?;
            let prefix = format!("{}/", dir.trim_end_matches('/'));
            Ok(self
                .lock()
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix))
                .filter(|rest| !rest.contains('/'))
                .map(String::from)
                .collect())
        }

        pub async fn delete(&self, path: &str) -> Result<(), KvError> {
            self.enter()?;
            self.lock().remove(path);
            Ok(())
        }
    }
}
