//! The faults a real client meets: a raw TCP server that answers every request the same broken way,
//! a port that refuses connections, and filesystems that are full, read-only or hold a link.
//!
//! The server reads each request whole before it misbehaves, so a fault "after the request was
//! received" really is one: for a regenerate, the portal could have committed. Its error bodies echo
//! the request (headers and body, so the credentials and any secret in it), as a hostile or merely
//! careless server might: a client's error must still quote none of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where a body quotes the request it answers.
pub const ECHO: &str = "{echo}";

/// How the server answers every request.
#[derive(Clone, Debug)]
pub enum Answer {
    /// Reads the request, then says nothing for longer than any client waits.
    Stall,
    /// A complete answer; [`ECHO`] in the body is replaced by the request's text.
    Http {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// `status` with a chunked body of `len` bytes, made as it is sent (the server never holds it).
    Stream { status: u16, len: u64 },
    /// Reads the request, then resets the connection (RST): the request arrived, no answer will.
    Reset,
}

impl Answer {
    pub fn status(status: u16, body: &str) -> Answer {
        Answer::Http {
            status,
            headers: Vec::new(),
            body: body.to_string(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: &str) -> Answer {
        if let Answer::Http { headers, .. } = &mut self {
            headers.push((name, value.to_string()));
        }
        self
    }
}

/// A server on a loopback port of its own, answering every request with one [`Answer`].
pub struct FaultServer {
    pub addr: std::net::SocketAddr,
    sent: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultServer {
    pub async fn start(answer: Answer) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let sent = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let (s, r) = (sent.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (answer, s, r) = (answer.clone(), s.clone(), r.clone());
                tokio::spawn(serve(conn, answer, s, r));
            }
        });
        FaultServer {
            addr,
            sent,
            requests,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The most body bytes one connection accepted (written into its socket) so far.
    pub fn body_bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Requests read whole so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut conn: TcpStream,
    answer: Answer,
    sent: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
) {
    // Keep-alive: a client may send its retries on the same connection.
    while let Some(request) = read_request(&mut conn).await {
        requests.fetch_add(1, Ordering::SeqCst);
        let keep = match &answer {
            Answer::Stall => {
                tokio::time::sleep(Duration::from_secs(120)).await;
                false
            }
            Answer::Http {
                status,
                headers,
                body,
            } => {
                // Escaped as a JSON string's content: an error body that parses, so that clients
                // which quote an excerpt of `{"error": ...}` get to see the credentials in it.
                let echo =
                    serde_json::to_string(&String::from_utf8_lossy(&request)).unwrap_or_default();
                let body = body.replace(ECHO, echo.trim_matches('"'));
                let mut head = format!(
                    "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
                    reason(*status),
                    body.len()
                );
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                conn.write_all(head.as_bytes()).await.is_ok()
                    && conn.write_all(body.as_bytes()).await.is_ok()
            }
            Answer::Stream { status, len } => {
                stream(&mut conn, *status, *len, &sent).await;
                false
            }
            Answer::Reset => {
                reset(conn);
                return;
            }
        };
        if !keep {
            return;
        }
    }
}

/// Streams `len` bytes in chunks, recording the most one connection's client took.
async fn stream(conn: &mut TcpStream, status: u16, len: u64, sent: &AtomicU64) {
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
        reason(status)
    );
    if conn.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let chunk = vec![b'x'; 64 * 1024];
    let framed = [
        format!("{:x}\r\n", chunk.len()).into_bytes(),
        chunk,
        b"\r\n".to_vec(),
    ]
    .concat();
    let (mut left, mut taken) = (len, 0u64);
    while left > 0 {
        // A client that stopped reading leaves the write pending: it is given a few seconds.
        let write = tokio::time::timeout(Duration::from_secs(3), conn.write_all(&framed));
        if !matches!(write.await, Ok(Ok(()))) {
            return;
        }
        taken += 64 * 1024;
        sent.fetch_max(taken, Ordering::SeqCst);
        left = left.saturating_sub(64 * 1024);
    }
    let _ = conn.write_all(b"0\r\n\r\n").await;
}

/// Closes with RST instead of FIN: SO_LINGER 0, then drop.
fn reset(conn: TcpStream) {
    let _ = conn.set_zero_linger();
    drop(conn);
}

/// One HTTP/1.1 request, head and body (by Content-Length, or chunked to its end); `None` when the
/// client closed the connection first.
async fn read_request(conn: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut tmp).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let body = &buf[head_end..];
        let done = match length {
            Some(n) => body.len() >= n,
            None if chunked => find(body, b"0\r\n\r\n").is_some(),
            None => true,
        };
        if done {
            return Some(buf);
        }
        let n = conn.read(&mut tmp).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// A loopback port that refuses connections for as long as this lives: bound, never listening.
pub struct Refusing {
    _socket: tokio::net::TcpSocket,
    pub addr: std::net::SocketAddr,
}

impl Refusing {
    pub fn new() -> Refusing {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind 127.0.0.1:0");
        let addr = socket.local_addr().expect("local addr");
        Refusing {
            _socket: socket,
            addr,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A filesystem mounted for one row, unmounted when dropped (the tests run as root).
pub struct Mount {
    path: PathBuf,
}

impl Mount {
    /// A tmpfs of `size` (e.g. "256k") at `path`.
    pub fn tmpfs(path: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(path).expect("mount point");
        mount(
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ],
            path,
        );
        Mount {
            path: path.to_path_buf(),
        }
    }

    /// `path` itself, made read-only for everyone, root included: a read-only bind mount on itself.
    pub fn read_only(path: &Path) -> Mount {
        mount(&["--bind"], path);
        let m = Mount {
            path: path.to_path_buf(),
        };
        mount(&["-o", "remount,bind,ro"], path);
        m
    }

    /// Fills the filesystem until a write fails with "no space left".
    pub fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path.join(".filler")).expect("filler file");
        let block = vec![0u8; 64 * 1024];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", self.path.display()),
            }
        }
        let _ = f.sync_all();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

fn mount(args: &[&str], path: &Path) {
    let p = path.to_str().expect("a UTF-8 temp path");
    let mut all: Vec<&str> = args.to_vec();
    if args.first() == Some(&"--bind") {
        all.push(p);
    }
    all.push(p);
    let out = std::process::Command::new("mount")
        .args(&all)
        .output()
        .expect("mount(8) runs");
    assert!(
        out.status.success(),
        "mount {all:?}: {} (the fault matrix needs root for its filesystem faults)",
        String::from_utf8_lossy(&out.stderr)
    );
}
