//! `ferry relay`: an aggregation relay between nodes and the server (see docs/scale-out.md).
//! Settings come from flags, or a TOML file whose keys are the flags' names; a flag given
//! overrides the file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use ferry_client::connection::ServerAddress;
use ferry_relay::RelaySettings;
use ferry_server::TlsPem;
use serde::Deserialize;

/// Options of `ferry relay`.
#[derive(Args, Debug)]
pub struct RelayArgs {
    /// Relay settings file (TOML: listen, upstream, ca, data-dir, and [tls] cert and key).
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Where nodes dial the relay, HOST:PORT [default: 0.0.0.0:7443].
    #[arg(long)]
    pub listen: Option<String>,
    /// The server above the relay, https://HOST:PORT; with standby servers every address,
    /// comma-separated.
    #[arg(long)]
    pub upstream: Option<String>,
    /// CA certificate that signed the server's certificate.
    #[arg(long, value_name = "CA.pem")]
    pub ca: Option<PathBuf>,
    /// The relay's own certificate, which nodes check (with --key).
    #[arg(long, value_name = "CERT.pem", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The relay's private key.
    #[arg(long, value_name = "KEY.pem", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Serve nodes without TLS (loopback addresses only; for tests and demos).
    #[arg(long)]
    pub insecure: bool,
    /// One-time relay token from `ferry token create --relay` (only needed the first time).
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Folder where the relay keeps its credential, store and blobs [default: ferry-relay].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// The relay's settings file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RelayFile {
    listen: Option<String>,
    upstream: Option<String>,
    ca: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    tls: Option<RelayTls>,
}

/// The relay's certificate and key.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RelayTls {
    cert: PathBuf,
    key: PathBuf,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

fn settings(args: RelayArgs) -> Result<RelaySettings> {
    let file: RelayFile = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("config file {} is not a relay's", path.display()))?
        }
        None => RelayFile::default(),
    };
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| "0.0.0.0:7443".into());
    let listen = listen.parse().with_context(|| {
        format!("listen = '{listen}' is not HOST:PORT (for example 0.0.0.0:7443)")
    })?;
    let Some(upstream) = args.upstream.or(file.upstream) else {
        bail!("no upstream: pass --upstream https://SERVER:PORT (or set upstream in --config)");
    };
    let ca = args.ca.or(file.ca);
    let tls = match (args.cert.zip(args.key), file.tls, args.insecure) {
        (_, _, true) => None,
        (Some((cert, key)), _, false) | (None, Some(RelayTls { cert, key }), false) => {
            Some(TlsPem {
                cert: read(&cert, "relay certificate")?,
                key: read(&key, "relay key")?,
                client_ca: None,
            })
        }
        (None, None, false) => bail!(
            "no TLS certificate for the relay: pass --cert and --key (`ferry certs` makes \
             them), or --insecure on loopback"
        ),
    };
    Ok(RelaySettings {
        listen,
        tls,
        upstream: ServerAddress {
            url: upstream,
            ca_pem: ca
                .as_deref()
                .map(|p| read(p, "CA certificate"))
                .transpose()?,
            identity: None,
        },
        token: args.token,
        data_dir: args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("ferry-relay")),
    })
}

/// Runs `ferry relay` until the run above it ends or it is stopped (Ctrl-C, SIGTERM).
pub fn run(args: RelayArgs) -> Result<()> {
    let settings = settings(args)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let stopped = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async {
                    match term.as_mut() {
                        Some(term) => { term.recv().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {}
            }
        };
        match ferry_relay::run(settings, stopped).await? {
            Some(reason) => println!("ferry relay: the run ended ({reason})"),
            None => println!("ferry relay: stopped"),
        }
        Ok(())
    })
}
