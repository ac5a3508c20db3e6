//! The generic HTTP provider (spec/config.md, "The generic http provider").
use super::{AuthIdentity, KeyStatus, ProviderError, Regenerated};
use crate::config::HttpProviderConfig;
use crate::secret::Secret;

pub struct HttpProvider {
    name: String,
}
impl HttpProvider {
    pub fn new(name: &str, _c: &HttpProviderConfig) -> Result<Self, ProviderError> {
        Ok(Self { name: name.into() })
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn expected_account(&self) -> Option<&str> {
        None
    }
    pub fn has_status(&self) -> bool {
        false
    }
    pub fn has_auth_check(&self) -> bool {
        false
    }
    pub async fn status(&self) -> Result<KeyStatus, ProviderError> {
        unimplemented!()
    }
    pub async fn regenerate(
        &self,
        _reason: &str,
        _k: Option<&str>,
    ) -> Result<Regenerated, ProviderError> {
        unimplemented!()
    }
    pub async fn auth_check(&self, _s: &Secret) -> Result<Option<AuthIdentity>, ProviderError> {
        unimplemented!()
    }
}
