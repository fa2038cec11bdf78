//! A TCP relay to a service (PostgreSQL) that a test can take down for a while, as a restart
//! of that service looks to its clients: every open connection is cut, and new ones are
//! closed as soon as they open, until the outage ends.

use std::{
    io,
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

/// The relay, listening on a loopback port of its own.
pub struct Outage {
    /// Where clients connect instead of the service.
    pub port: u16,
    down: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

/// Copies `from` into `to` until either side closes, then closes both.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

impl Outage {
    /// Relays loopback connections to `upstream`.
    pub fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let down = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (is_down, streams) = (down.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if is_down.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (Ok(client_copy), Ok(server_copy)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                if let Ok(mut open) = streams.lock() {
                    open.extend(client.try_clone());
                    open.extend(server.try_clone());
                }
                std::thread::spawn(move || pump(client, server_copy));
                std::thread::spawn(move || pump(server, client_copy));
            }
        });
        Self { port, down, open }
    }

    /// Cuts every connection and refuses new ones for `how_long`, then relays again.
    pub fn outage(&self, how_long: Duration) {
        self.down.store(true, Ordering::SeqCst);
        if let Ok(mut open) = self.open.lock() {
            for stream in open.drain(..) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        std::thread::sleep(how_long);
        self.down.store(false, Ordering::SeqCst);
    }
}
