//! HashiCorp Vault / OpenBao KV v2 destinations (vaultrs).
use super::{StoreError, StoredValue, WriteRequest};
use crate::config::{DestinationTarget, VaultStoreConfig};

pub struct VaultStore {
    name: String,
}
impl VaultStore {
    pub fn new(name: &str, _c: &VaultStoreConfig) -> Result<Self, StoreError> {
        Ok(Self { name: name.into() })
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub async fn preflight(&self, _t: &DestinationTarget) -> Result<(), StoreError> {
        unimplemented!()
    }
    pub async fn write(
        &self,
        _t: &DestinationTarget,
        _r: &WriteRequest<'_>,
    ) -> Result<Option<String>, StoreError> {
        unimplemented!()
    }
    pub async fn read(&self, _t: &DestinationTarget) -> Result<Option<StoredValue>, StoreError> {
        unimplemented!()
    }
}
