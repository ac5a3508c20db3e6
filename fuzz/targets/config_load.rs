//! Config loading: any text is either a config or a list of problems; never a panic or a hang, and
//! no problem about a credential field quotes what was written there.

use std::collections::BTreeMap;

use keyrotd::config::{ConfigError, load::load_str_with_overrides};

/// The value the seed configs give their inline credentials.
const MARKER: &str = "FUZZSECRET";
/// Fields that hold a credential reference.
const CREDENTIAL_FIELDS: &[&str] = &[
    "management_token",
    "admin_token",
    "token",
    "value",
    "role_id",
    "secret_id",
    "signing_key",
];

/// One input: never a panic, and the checks above hold.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // No environment overrides: the process environment must not change what a run finds.
    match load_str_with_overrides(text, &BTreeMap::new()) {
        Ok(_) | Err(ConfigError::Read { .. }) => {}
        Err(ConfigError::Invalid(problems)) => {
            for p in problems {
                let field = p.path.rsplit('.').next().unwrap_or("");
                let field = field.split('[').next().unwrap_or(field);
                // An environment variable's name is the config's own text, not a credential: the
                // error names it (a name that is no valid variable name, perhaps a misplaced
                // credential, keyrotd does not quote).
                let names_a_variable = p
                    .message
                    .strip_prefix("environment variable ")
                    .and_then(|rest| rest.split(' ').next())
                    .is_some_and(|n| n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                if CREDENTIAL_FIELDS.contains(&field) && !names_a_variable {
                    assert!(
                        !p.message.contains(MARKER),
                        "a problem about {} quotes the credential: {}",
                        p.path,
                        p.message
                    );
                }
            }
        }
    }
}
