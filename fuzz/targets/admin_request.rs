//! The admin API's request handling: any method, path, headers and body through the real router
//! (extractors, the body limit, JSON parsing of a rotate request, the bearer-token check). Never a
//! panic; no response ever contains the admin token; a request without the token changes nothing.

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use keyrotd::engine::Engine;
use tower::ServiceExt;

const ADMIN_TOKEN: &str = "fuzz-admin-token-0123456789";

struct World {
    rt: tokio::runtime::Runtime,
    engine: Arc<Engine>,
    _dir: std::path::PathBuf,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("keyrotd-fuzz-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("admin"), ADMIN_TOKEN).expect("admin token file");
        std::fs::write(dir.join("tok"), "portal-token").expect("token file");
        let text = format!(
            r#"
[daemon]
state_dir = "{d}/state"
admin_token = {{ file = "{d}/admin" }}
paused = true
[providers.p]
kind = "aos"
base_url = "http://127.0.0.1:1"
management_token = {{ file = "{d}/tok" }}
timeout = "1s"
[stores.local]
kind = "file"
dir = "{d}"
[[keys]]
name = "k"
provider = "p"
  [[keys.destinations]]
  store = "local"
  file = "k"
"#,
            d = dir.display()
        );
        let config = keyrotd::config::load_str(&text).expect("fuzz config loads");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let engine = rt
            .block_on(Engine::new(
                Arc::new(config),
                Arc::new(keyrotd::telemetry::Metrics::new()),
            ))
            .expect("engine");
        World {
            rt,
            engine,
            _dir: dir,
        }
    })
}

/// `METHOD PATH\nHeader: value\n...\n\nbody`, leniently.
fn request(data: &[u8]) -> Option<Request<Body>> {
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (head, body) = match split {
        Some(i) => (&data[..i], data[i + 2..].to_vec()),
        None => (data, Vec::new()),
    };
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.lines();
    let mut first = lines.next()?.splitn(2, ' ');
    let method = first.next()?;
    let path = first.next().unwrap_or("/");
    let mut b = Request::builder().method(method).uri(path);
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            b = b.header(k.trim(), v.trim());
        }
    }
    b.body(Body::from(body)).ok()
}

/// One input: never a panic, and the checks above hold.
pub fn run(data: &[u8]) {
    let Some(req) = request(data) else {
        return;
    };
    let w = world();
    let router = keyrotd::admin::router(w.engine.clone());
    w.rt.block_on(async {
        let Ok(resp) = router.oneshot(req).await;
        let body = axum::body::to_bytes(resp.into_body(), 1 << 22)
            .await
            .unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&body).contains(ADMIN_TOKEN),
            "a response shows the admin token"
        );
    });
    // Nothing the fuzzer can send without the token may unpause the daemon.
    assert!(
        w.engine.is_paused(),
        "a request without the token resumed the daemon"
    );
}
