//! A TCP proxy in front of the shared broker, for network faults that must
//! not disturb anyone else: `freeze` is a silent cut (bytes vanish, no FIN,
//! no RST — what a dead link or a stateful firewall dropping the flow looks
//! like); `thaw` closes the frozen connections and lets new ones through.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct State {
    frozen: AtomicBool,
    stopped: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

impl State {
    fn close_all(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// The proxy; stops (and closes everything) when dropped.
pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
}

impl Proxy {
    /// Forward 127.0.0.1:<port> to `upstream`.
    pub fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let s = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let s = s.clone();
                std::thread::spawn(move || serve(client, upstream, s));
            }
        });
        Self { port, state }
    }

    /// The shared broker's URL, through this proxy.
    pub fn url(&self, broker_url: &str) -> String {
        let (scheme, rest) = broker_url.split_once("://").unwrap();
        let (userinfo, after) = rest.rsplit_once('@').unwrap_or(("", rest));
        let path = after.find('/').map_or("", |i| &after[i..]);
        let at = if userinfo.is_empty() { "" } else { "@" };
        format!("{scheme}://{userinfo}{at}127.0.0.1:{}{path}", self.port)
    }

    /// Silently drop every byte in both directions, keeping sockets open.
    pub fn freeze(&self) {
        self.state.frozen.store(true, Ordering::SeqCst);
    }

    /// End a freeze: the frozen connections are dead (their streams lost
    /// bytes), so they are closed; new ones are forwarded again.
    pub fn thaw(&self) {
        self.state.frozen.store(false, Ordering::SeqCst);
        self.state.close_all();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.state.close_all();
        // Wake the accept loop so it sees the stop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(client: TcpStream, upstream: SocketAddr, state: Arc<State>) {
    state
        .conns
        .lock()
        .unwrap()
        .push(client.try_clone().unwrap());
    if state.frozen.load(Ordering::SeqCst) {
        // Accepted but never answered, like a peer behind a dead link.
        return pipe(client, None, state);
    }
    let Ok(server) = TcpStream::connect(upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    state
        .conns
        .lock()
        .unwrap()
        .push(server.try_clone().unwrap());
    let (c2, s2, st) = (
        client.try_clone().unwrap(),
        server.try_clone().unwrap(),
        state.clone(),
    );
    std::thread::spawn(move || pipe(s2, Some(c2), st));
    pipe(client, Some(server), state);
}

/// Copy `from` to `to` until either side closes; while frozen, read and
/// discard.
fn pipe(mut from: TcpStream, mut to: Option<TcpStream>, state: Arc<State>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if state.frozen.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(to) = to.as_mut() {
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    if let Some(to) = to {
        let _ = to.shutdown(Shutdown::Both);
    }
}
