//! Every provider response parser: the AOS status, regenerate and auth-check bodies, the generic
//! `http` provider's status and regenerate bodies (JSON Pointers from a fixed config), `Retry-After`
//! values and error-body excerpts. Never a panic; errors are fixed texts or name a pointer, never a
//! value from the body; an excerpt never shows a secret it was told about.

use keyrotd::config::{HttpRegenerate, HttpStatus};
use keyrotd::provider::{aos, http};
use keyrotd::secret::Secret;
use secrecy::ExposeSecret;

fn regen() -> HttpRegenerate {
    HttpRegenerate {
        method: "POST".into(),
        url: "https://vendor.example/roll".into(),
        body: None,
        secret_pointer: "/data/secret".into(),
        key_id_pointer: "/data/id".into(),
    }
}

fn status() -> HttpStatus {
    HttpStatus {
        url: "https://vendor.example/current".into(),
        key_id_pointer: "/id".into(),
        last_rotated_pointer: Some("/rotated_at".into()),
        active_pointer: Some("/state/on".into()),
        account_id_pointer: Some("/owner/account".into()),
    }
}

/// One input: never a panic, and the checks above hold.
pub fn run(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 7 {
        0 => {
            if let Err(e) = aos::parse_status(body) {
                assert!(e.to_string().len() < 100);
            }
        }
        1 => match aos::parse_regenerate(body) {
            Ok(r) => assert!(!r.secret.expose_secret().is_empty()),
            // BodyProblem's texts are fixed: nothing of the body can be in them.
            Err(e) => assert!(e.to_string().len() < 100),
        },
        2 => {
            let _ = aos::parse_auth_check(body);
        }
        3 => {
            if let Err(e) = http::parse_status(&status(), body) {
                let allowed = [
                    "status response is not JSON",
                    "status response has no key id at /id",
                    "value at /rotated_at is not an RFC 3339 time",
                    "status response has no boolean at /state/on",
                ];
                assert!(allowed.contains(&e.as_str()), "unexpected message {e:?}");
            }
        }
        4 => match http::parse_regenerate(&regen(), body) {
            Ok(r) => assert!(!r.secret.expose_secret().is_empty()),
            Err(e) => {
                let allowed = [
                    "regenerate response is not JSON",
                    "regenerate response has no key id at /data/id",
                    "regenerate response has no secret at /data/secret",
                ];
                assert!(allowed.contains(&e.as_str()), "unexpected message {e:?}");
            }
        },
        5 => {
            if let Ok(v) = std::str::from_utf8(body) {
                let _ = http::wire::parse_retry_after(v, std::time::SystemTime::now());
            }
        }
        _ => {
            // The first 8..=40 bytes (as text) are a secret the excerpt must never show.
            let Some((&n, rest)) = body.split_first() else {
                return;
            };
            let n = 8 + usize::from(n) % 33;
            if rest.len() < n {
                return;
            }
            let (secret, page) = rest.split_at(n);
            let (Ok(secret), Ok(page)) = (std::str::from_utf8(secret), std::str::from_utf8(page))
            else {
                return;
            };
            // Keys and tokens are made of these; a "secret" like "error pag" would be found in the
            // fixed text "HTML error page" without anything leaking.
            if !secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return;
            }
            let s = Secret::from(secret.to_string());
            if let Some(x) = http::wire::excerpt(page, &[&s]) {
                assert!(x.chars().count() <= 200, "excerpt too long");
                if x != "HTML error page" {
                    assert!(!x.contains(secret), "excerpt shows the secret: {x:?}");
                }
            }
        }
    }
}
