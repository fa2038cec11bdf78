//! `ferry bench tls`: what this machine's loopback TLS can move with the TLS stack Ferry's
//! gRPC uses (rustls with ring, TLS 1.3) and no Ferry logic: bytes written into TLS streams
//! on 127.0.0.1 and read out at the other end, over one stream and over N in parallel. A
//! deployed round's throughput is a share of this ceiling.

use std::{path::Path, sync::Arc, time::Instant};

use anyhow::{Context, Result};
use clap::Args;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{
    TlsAcceptor, TlsConnector,
    rustls::{
        self, ClientConfig, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    },
};

/// Options of `ferry bench tls`.
#[derive(Args, Debug)]
pub struct TlsArgs {
    /// Parallel streams of the second measurement (the first uses one).
    #[arg(long, default_value_t = 10)]
    pub streams: usize,
    /// Megabytes written into each stream.
    #[arg(long, default_value_t = 400)]
    pub megabytes: usize,
    /// Bytes per write, as the gRPC transfers' chunks.
    #[arg(long, default_value_t = 1 << 20)]
    pub chunk_bytes: usize,
}

/// A loopback TLS pair: the fleet server's own TLS settings and a client's.
pub struct Loopback {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl Loopback {
    /// Both ends from the certificates `ferry certs` wrote to `certs` for `localhost`
    /// (`ca.pem`, `server.pem`, `server.key`).
    pub fn new(certs: &Path) -> Result<Self> {
        let read = |name: &str| {
            std::fs::read(certs.join(name)).with_context(|| format!("cannot read {name}"))
        };
        let mut server = ferry_server::tls_config(&ferry_server::TlsPem {
            cert: read("server.pem")?,
            key: read("server.key")?,
            client_ca: None,
        })?;
        // The writing side never reads; session tickets left unread in its socket would make
        // its close a reset that can cut off the reader's last bytes.
        server.send_tls13_tickets = 0;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(certs.join("ca.pem")).context("CA")? {
            roots.add(ca.context("CA")?)?;
        }
        let client =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// Gigabytes per second moved by `streams` parallel TLS streams each carrying `bytes` in
    /// `chunk`-byte writes, handshakes excluded: from the first write until the server has
    /// read the last byte.
    pub async fn throughput(&self, streams: usize, bytes: usize, chunk: usize) -> Result<f64> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let acceptor = self.acceptor.clone();
        let readers = tokio::spawn(async move {
            let mut reads = Vec::new();
            for _ in 0..streams {
                let (tcp, _) = listener.accept().await?;
                tcp.set_nodelay(true)?;
                let mut tls = acceptor.accept(tcp).await?;
                reads.push(tokio::spawn(async move {
                    let mut buffer = vec![0u8; 1 << 16];
                    let mut total = 0usize;
                    loop {
                        let n = tls.read(&mut buffer).await?;
                        if n == 0 {
                            return anyhow::Ok(total);
                        }
                        total += n;
                    }
                }));
            }
            anyhow::Ok(reads)
        });
        let mut writers = Vec::new();
        for _ in 0..streams {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from("localhost")?;
            match self.connector.connect(name, tcp).await {
                Ok(tls) => writers.push(tls),
                // The server's side says why a handshake failed.
                Err(e) => {
                    readers.await??;
                    return Err(e.into());
                }
            }
        }
        let reads = readers.await??;
        let payload = vec![7u8; chunk];
        let started = Instant::now();
        let writes: Vec<_> = writers
            .into_iter()
            .map(|mut tls| {
                let payload = payload.clone();
                tokio::spawn(async move {
                    let mut left = bytes;
                    while left > 0 {
                        let n = left.min(payload.len());
                        tls.write_all(&payload[..n]).await?;
                        left -= n;
                    }
                    tls.shutdown().await?;
                    anyhow::Ok(())
                })
            })
            .collect();
        for write in writes {
            write.await??;
        }
        let mut received = 0;
        for read in reads {
            received += read.await??;
        }
        let seconds = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            received == streams * bytes,
            "{received} bytes arrived of {}",
            streams * bytes
        );
        Ok(received as f64 / seconds / 1e9)
    }
}

/// Runs the benchmark.
pub fn run(args: TlsArgs) -> Result<()> {
    anyhow::ensure!(
        args.streams >= 1 && args.megabytes >= 1 && args.chunk_bytes >= 1,
        "--streams, --megabytes and --chunk-bytes must be at least 1"
    );
    let tmp = tempfile::tempdir()?;
    crate::certs::generate(tmp.path(), &["localhost".into()], &[])?;
    let loopback = Loopback::new(tmp.path())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let bytes = args.megabytes * 1_000_000;
    println!(
        "loopback TLS 1.3 (rustls + ring, as Ferry's gRPC), {} MB per stream in {} kB writes",
        args.megabytes,
        args.chunk_bytes / 1024
    );
    for streams in [1, args.streams] {
        let gbps = runtime.block_on(loopback.throughput(streams, bytes, args.chunk_bytes))?;
        println!("{streams:>3} stream(s)   {gbps:.2} GB/s");
    }
    Ok(())
}
