//! The relays of `ferry bench fleet --relays R`: real `ferry relay` processes between the
//! load generator's nodes and the server, each enrolled with its own relay token, serving
//! its share of the nodes over loopback TLS.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ferry_server::store::{IdentityKind, Store};

/// The running relays: their processes and the ports their nodes dial.
pub struct Relays {
    children: Vec<Child>,
    /// The port of each relay.
    pub ports: Vec<u16>,
}

impl Relays {
    /// Enrols and starts `count` relays above the server on `server_port`, with their
    /// folders and logs under `dir`; returns once each listens.
    pub fn start(dir: &Path, count: usize, server_port: u16) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let tokens = runtime.block_on(async {
            let store = Store::open(&crate::bench::round::store_url(dir)).await?;
            let mut tokens = Vec::with_capacity(count);
            for i in 0..count {
                let name = format!("relay-{i}");
                tokens.push(store.create_token_for(&name, IdentityKind::Relay).await?);
            }
            anyhow::Ok(tokens)
        })?;
        let certs = dir.join("certs");
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let mut relays = Self {
            children: Vec::new(),
            ports: Vec::new(),
        };
        for (i, token) in tokens.iter().enumerate() {
            let port = crate::demo::free_port()?;
            let log = std::fs::File::create(dir.join(format!("relay-{i}.log")))?;
            let child = Command::new(std::env::current_exe()?)
                .args([
                    "relay",
                    "--upstream",
                    &format!("https://localhost:{server_port}"),
                    "--ca",
                    &path(&certs.join("ca.pem")),
                    "--cert",
                    &path(&certs.join("server.pem")),
                    "--key",
                    &path(&certs.join("server.key")),
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--data-dir",
                    &path(&dir.join(format!("relay-{i}"))),
                ])
                .env("FERRY_TOKEN", token)
                .env(
                    "FERRY_LOG",
                    std::env::var("FERRY_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("cannot start a relay process")?;
            relays.children.push(child);
            relays.ports.push(port);
        }
        for (i, &port) in relays.ports.iter().enumerate() {
            let began = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if began.elapsed() > Duration::from_secs(60) {
                    bail!("relay {i} did not listen; see relay-{i}.log");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(relays)
    }

    /// Each relay's peak resident memory so far, in MB.
    pub fn peak_mb(&self) -> Vec<f64> {
        self.children
            .iter()
            .map(|c| {
                crate::bench::proc_status_bytes_of(&c.id().to_string(), "VmHWM:").unwrap_or(0)
                    as f64
                    / 1e6
            })
            .collect()
    }

    /// Waits for the relays to end (they stop once the run has, after telling their nodes).
    pub fn wait(mut self) -> Result<()> {
        for (i, child) in self.children.iter_mut().enumerate() {
            let status = child.wait()?;
            if !status.success() {
                bail!("relay {i} failed ({status}); see relay-{i}.log");
            }
        }
        Ok(())
    }
}
