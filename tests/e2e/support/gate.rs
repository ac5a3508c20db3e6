//! A gate in front of a server: a small TCP relay the test owns, so that a store can be taken away
//! from keyrotd and given back without stopping the server and starting it again on the same port
//! (which another process may have taken in between).
//!
//! Open, the gate relays every connection to the server. [`Gate::close`] cuts the connections it
//! relays (keyrotd's pooled keep-alive connections included) and from then on accepts each new one
//! and drops it at once: to a client the server is unreachable, as if it had gone down. The server
//! keeps its data, and the test can still read it directly. [`Gate::open`] relays again.
//!
//! [`Gate::retarget`] points the gate at another upstream (a server started again on a new port), and
//! [`Gate::on`] listens on an address other than loopback (a host-side veth address that a replica in
//! its own network namespace can reach).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

pub struct Gate {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    upstream: Mutex<SocketAddr>,
    open: AtomicBool,
    stop: AtomicBool,
    /// Both ends of every relayed connection, so that closing the gate can cut them.
    live: Mutex<Vec<(TcpStream, TcpStream)>>,
}

impl Gate {
    /// A gate on a loopback port of its own, open, relaying to `upstream`.
    pub fn new(upstream: SocketAddr) -> Gate {
        Gate::on([127, 0, 0, 1].into(), upstream)
    }

    /// A gate on a port of its own at `ip` (which must be an address of this host), open, relaying
    /// to `upstream`.
    pub fn on(ip: std::net::IpAddr, upstream: SocketAddr) -> Gate {
        let listener = TcpListener::bind((ip, 0))
            .unwrap_or_else(|e| panic!("bind a gate on {ip} (port 0): {e}"));
        let addr = listener.local_addr().expect("the gate's address");
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            open: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            live: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        thread::spawn(move || accept_loop(listener, s));
        Gate { addr, shared }
    }

    /// New connections go to `upstream` from now on (the relayed ones are cut).
    pub fn retarget(&self, upstream: SocketAddr) {
        *self.shared.upstream.lock().unwrap() = upstream;
        self.cut_live();
    }

    /// `http://127.0.0.1:PORT` of the gate.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server becomes unreachable through the gate, existing connections included.
    pub fn close(&self) {
        self.shared.open.store(false, Ordering::SeqCst);
        self.cut_live();
    }

    fn cut_live(&self) {
        let live = std::mem::take(&mut *self.shared.live.lock().unwrap());
        for (a, b) in live {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    /// The server is reachable through the gate again.
    pub fn open(&self) {
        self.shared.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.close();
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if !shared.open.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let upstream = *shared.upstream.lock().unwrap();
        let Ok(server) = TcpStream::connect(upstream) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
            shared.live.lock().unwrap().push((c, s));
        }
        relay(client, server);
    }
}

/// Copies both ways on two threads; an end that finishes half-closes the other side.
fn relay(client: TcpStream, server: TcpStream) {
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    thread::spawn(move || pump(client, server2));
    thread::spawn(move || pump(server, client2));
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
