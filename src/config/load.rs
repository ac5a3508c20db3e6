//! TOML + `KEYROTD__` environment overrides -> raw -> validated [`Config`]. Every problem reported at
//! once, each naming its field path.

use std::path::Path;

use super::Config;

/// One thing wrong with a config, naming its field, e.g. `keys[1].destinations[0].store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{} problem(s) in the configuration", .0.len())]
    Invalid(Vec<Problem>),
}

pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    load_str(&text)
}

pub fn load_str(_text: &str) -> Result<Config, ConfigError> {
    Err(ConfigError::Invalid(vec![Problem {
        path: "".into(),
        message: "config loading is not built yet".into(),
    }]))
}
