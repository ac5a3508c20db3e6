//! The AOS portal contract (spec/aos-portal-api.md).
use super::{AuthIdentity, KeyStatus, ProviderError, Regenerated};
use crate::config::AosProviderConfig;
use crate::secret::Secret;

pub struct AosProvider {
    name: String,
}
impl AosProvider {
    pub fn new(name: &str, _c: &AosProviderConfig) -> Result<Self, ProviderError> {
        Ok(Self { name: name.into() })
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn expected_account(&self) -> Option<&str> {
        None
    }
    pub async fn status(&self) -> Result<KeyStatus, ProviderError> {
        unimplemented!()
    }
    pub async fn regenerate(&self, _reason: &str) -> Result<Regenerated, ProviderError> {
        unimplemented!()
    }
    pub async fn auth_check(&self, _s: &Secret) -> Result<Option<AuthIdentity>, ProviderError> {
        unimplemented!()
    }
}
