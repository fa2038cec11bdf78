//! The real services Ferry's tests and measurements run against, each started or created
//! fresh for its caller and removed after it:
//!
//! - [`postgres`]: a database of one's own on the PostgreSQL server that
//!   `scripts/start-postgres.sh` runs (or `FERRY_TEST_POSTGRES_URL`).
//! - [`garage`]: a Garage S3 server on loopback, with a bucket and a key.
//! - [`process`]: whether a process a test did not start itself has ended.
//!
//! A service that is missing fails its caller with what to run: these are parts of the suite,
//! not options.

#![warn(missing_docs)]

pub mod garage;
pub mod postgres;
pub mod process;

/// A free TCP port on loopback (free when asked; nothing holds it after), never one this
/// process was given before: the system may hand a just-released port out again, and two
/// services started side by side (two Garages in parallel tests) must not be given the same.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("a free port on loopback");
        if given.insert(port) {
            return port;
        }
    }
}
