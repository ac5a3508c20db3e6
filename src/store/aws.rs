//! AWS Secrets Manager destinations.
use super::{StoreError, StoredValue, WriteRequest};
use crate::config::{AwsStoreConfig, DestinationTarget};

pub struct AwsStore {
    name: String,
}
impl AwsStore {
    pub async fn new(name: &str, _c: &AwsStoreConfig) -> Result<Self, StoreError> {
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
impl AwsStore {
    pub async fn after_write(
        &self,
        _t: &DestinationTarget,
        _r: &WriteRequest<'_>,
    ) -> Result<(), StoreError> {
        Ok(())
    }
}
