//! The search for secrets in everything keyrotd wrote or answered. A test gathers the outputs
//! ([`Haystacks`]), names the secrets it created ([`secrets_of`]) and asserts that no output holds
//! one. Outputs every end-to-end run has ([`Haystacks::gather_standard`]): the state directory
//! (journals, audit log, lock), every daemon log, the key files' sidecars (`*.meta.json`), the Vault
//! custom metadata and the AWS secret's tags and description.

use std::path::Path;

use super::stack::{AWS_SECRET, Stack, VAULT_PATH};

/// Named texts to search: (where it came from, what it says).
#[derive(Default)]
pub struct Haystacks(Vec<(String, String)>);

impl Haystacks {
    pub fn add(&mut self, place: impl Into<String>, text: impl Into<String>) {
        self.0.push((place.into(), text.into()));
    }

    /// Every file under `dir` (recursively) for which `wanted` holds.
    pub fn add_files_under(&mut self, dir: &Path, wanted: &dyn Fn(&Path) -> bool) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                self.add_files_under(&path, wanted);
            } else if wanted(&path)
                && let Ok(bytes) = std::fs::read(&path)
            {
                self.add(
                    path.display().to_string(),
                    String::from_utf8_lossy(&bytes).into_owned(),
                );
            }
        }
    }

    /// The outputs of every end-to-end run, see the module doc.
    pub async fn gather_standard(&mut self, stack: &Stack) {
        self.add_files_under(&stack.state_dir(), &|_| true);
        for log in stack.daemon_logs() {
            self.add_files_under(log.parent().expect("a log has a directory"), &|p| p == log);
        }
        // The key files hold the key by design; their sidecars must not.
        self.add_files_under(&stack.keys_dir(), &|p| {
            p.to_string_lossy().ends_with(".meta.json")
        });
        self.add(
            "OpenBao metadata",
            stack.bao.kv_metadata_opt(VAULT_PATH).await.to_string(),
        );
        if let Ok(d) = stack
            .moto
            .client()
            .await
            .describe_secret()
            .secret_id(AWS_SECRET)
            .send()
            .await
        {
            self.add("AWS tags", format!("{:?}", d.tags()));
            self.add(
                "AWS description",
                d.description().unwrap_or_default().to_string(),
            );
        }
    }

    pub fn places(&self) -> Vec<&str> {
        self.0.iter().map(|(p, _)| p.as_str()).collect()
    }

    /// How much text was gathered.
    pub fn total_len(&self) -> usize {
        self.0.iter().map(|(_, t)| t.len()).sum()
    }

    /// Every `(place, secret name)` where a secret occurs.
    pub fn leaks(&self, secrets: &[(String, String)]) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for (place, text) in &self.0 {
            for (name, secret) in secrets {
                if text.contains(secret.as_str()) {
                    found.push((place.clone(), name.clone()));
                }
            }
        }
        found
    }

    /// No secret anywhere; and the search itself works (a planted secret is found).
    pub fn assert_none_of(&self, secrets: &[(String, String)]) {
        assert!(!secrets.is_empty(), "no secrets to look for");
        assert!(
            secrets.iter().all(|(_, s)| s.len() >= 16),
            "secrets long enough to be unique"
        );
        let (name, secret) = &secrets[secrets.len() - 1];
        let mut control = Haystacks::default();
        control.add("control", format!("xx{secret}yy"));
        assert_eq!(
            control.leaks(secrets),
            vec![("control".to_string(), name.clone())],
            "the search finds a secret where there is one"
        );
        let found = self.leaks(secrets);
        assert!(
            found.is_empty(),
            "secrets leaked: {found:#?}\n(searched: {:?})",
            self.places()
        );
    }
}

/// Every key the portal ever issued, and every credential the test gave keyrotd.
pub async fn secrets_of(stack: &Stack) -> Vec<(String, String)> {
    let mut secrets: Vec<(String, String)> = stack
        .portal
        .issued_secrets()
        .await
        .into_iter()
        .enumerate()
        .map(|(i, s)| (format!("issued secret #{i}"), s))
        .collect();
    for (k, v) in stack.env() {
        if k.starts_with("KEYROTD_TEST_") {
            secrets.push((k, v));
        }
    }
    secrets
}

/// No secret of this stack is in the outputs every run has (see the module doc).
pub async fn assert_no_secret_leaked(stack: &Stack) {
    let mut outputs = Haystacks::default();
    outputs.gather_standard(stack).await;
    assert!(
        outputs
            .places()
            .iter()
            .any(|p| p.ends_with(&format!("journal/{}.json", super::stack::KEY))),
        "the journal is among the outputs: {:?}",
        outputs.places()
    );
    outputs.assert_none_of(&secrets_of(stack).await);
}
