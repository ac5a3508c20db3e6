//! The TOML file's shape, as serde sees it. No I/O, no validation beyond types.
