//! `ferry demo`: a whole deployment on this machine — fresh certificates and tokens, a TLS
//! server and N client processes on loopback, each client holding one share of Fashion-MNIST —
//! with the server's progress shown, and everything shut down at the end.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use ferry_server::store::Store;

/// Options of `ferry demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Client processes to start.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Rounds to run.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Dataset the clients split between them.
    #[arg(long, default_value = "fashion-mnist")]
    pub dataset: String,
    /// How the dataset is split across clients.
    #[arg(long, default_value = "dirichlet:0.5")]
    pub partition: String,
    /// Model to train.
    #[arg(long, default_value = "lenet")]
    pub model: String,
    /// Strategy.
    #[arg(long, default_value = "fedavg")]
    pub strategy: String,
    /// Seed of the split, the initial model and selection.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder for certificates, state, logs and results [default: runs/demo-<timestamp>].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Kills every child still running when the demo ends, however it ends.
struct Processes(Vec<(String, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("cannot find a free loopback port")?
        .port())
}

fn log_file(path: &Path) -> Result<(Stdio, Stdio)> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok((file.try_clone()?.into(), file.into()))
}

fn server_config(args: &DemoArgs, dir: &Path, port: u16, api_port: u16) -> String {
    let path = |p: &str| dir.join(p).display().to_string();
    format!(
        "listen = \"127.0.0.1:{port}\"\nstore = \"sqlite:{}\"\nblobs = \"{}\"\nout = \"{}\"\n\n\
         [api]\nlisten = \"127.0.0.1:{api_port}\"\nadmin-token-file = \"{}\"\n\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\n\n\
         [run]\ndataset = \"{}\"\nmodel = \"{}\"\nstrategy = \"{}\"\nclients = {}\nmin_clients = {}\n\
         rounds = {}\nseed = {}\nround_timeout = 300\nmin_results = 1\n",
        path("ferry.db"),
        path("blobs"),
        path("results"),
        path("admin-token"),
        path("certs/server.pem"),
        path("certs/server.key"),
        args.dataset,
        args.model,
        args.strategy,
        args.clients,
        args.clients,
        args.rounds,
        args.seed,
    )
}

/// Runs `ferry demo`.
pub fn run(args: DemoArgs) -> Result<()> {
    if args.clients == 0 || args.rounds == 0 {
        bail!("--clients and --rounds must be at least 1");
    }
    // Fail early, with the install hint, if the data is missing.
    let kind: ferry_ml::data::DatasetKind = args.dataset.parse()?;
    kind.load(None)?;
    let dir = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "demo-{}",
            chrono::Local::now().format("%Y%m%d-%H%M%S")
        ))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    crate::certs::generate(
        &dir.join("certs"),
        &["localhost".into(), "127.0.0.1".into()],
        &[],
    )?;
    let (port, api_port) = (free_port()?, free_port()?);
    let config = dir.join("server.toml");
    std::fs::write(&config, server_config(&args, &dir, port, api_port))?;
    let store_url = format!("sqlite:{}", dir.join("ferry.db").display());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tokens = runtime.block_on(async {
        let store = Store::open(&store_url).await?;
        let mut tokens = Vec::new();
        for i in 0..args.clients {
            tokens.push(store.create_token(&format!("demo-site-{i}")).await?);
        }
        anyhow::Ok(tokens)
    })?;
    println!(
        "ferry demo: a TLS server and {} client processes on 127.0.0.1:{port}, {} split {} across them; working folder {}",
        args.clients,
        args.dataset,
        args.partition,
        dir.display()
    );
    println!(
        "dashboard: http://127.0.0.1:{api_port}/ while the demo runs (admin token in {}); \
         afterwards `ferry dashboard {}`",
        dir.join("admin-token").display(),
        dir.display()
    );
    let exe = std::env::current_exe().context("cannot find the ferry binary")?;
    let mut processes = Processes(Vec::new());
    let server = Command::new(&exe)
        .args(["server", "--config"])
        .arg(&config)
        .env("FERRY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(log_file(&dir.join("server.log"))?.1)
        .spawn()
        .context("cannot start the server")?;
    processes.0.push(("server".into(), server));
    for (i, token) in tokens.iter().enumerate() {
        let (out, err) = log_file(&dir.join(format!("client-{i}.log")))?;
        let child = Command::new(&exe)
            .args([
                "client",
                "--server",
                &format!("https://localhost:{port}"),
                "--ca",
            ])
            .arg(dir.join("certs/ca.pem"))
            .arg("--state-dir")
            .arg(dir.join(format!("node-{i}")))
            .args([
                "--dataset",
                &args.dataset,
                "--model",
                &args.model,
                "--partition",
                &args.partition,
            ])
            .args([
                "--num-partitions",
                &args.clients.to_string(),
                "--partition-index",
                &i.to_string(),
            ])
            .args(["--seed", &args.seed.to_string(), "--give-up-after", "60"])
            .env("FERRY_TOKEN", token)
            .env("FERRY_LOG", "warn")
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start client {i}"))?;
        processes.0.push((format!("client {i}"), child));
    }
    let started = Instant::now();
    // Relay the server's round lines until it exits.
    if let Some(stdout) = processes.0[0].1.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("  server | {line}");
        }
    }
    let status = processes.0[0].1.wait()?;
    if !status.success() {
        bail!(
            "the server stopped with {status}; see {}",
            dir.join("server.log").display()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for (name, child) in processes.0.iter_mut().skip(1) {
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        match child.try_wait()? {
            Some(status) if status.success() => {}
            Some(status) => println!("warning: {name} exited with {status}"),
            None => println!("warning: {name} did not stop by itself; stopping it"),
        }
    }
    drop(processes);
    println!(
        "demo done in {:.0} s: results (history.json, accuracy.svg, model.safetensors) in {}, logs in {}",
        started.elapsed().as_secs_f64(),
        dir.join("results").display(),
        dir.display()
    );
    Ok(())
}
