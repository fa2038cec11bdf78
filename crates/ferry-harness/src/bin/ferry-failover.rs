//! `ferry-failover`: how long a federation is without a coordinator when its active server is
//! SIGKILLed. Starts PostgreSQL's database and Garage of its own, two `ferry server`
//! processes with one configuration, and nodes that know both; then, again and again, kills
//! the active server mid-round, times the standby's takeover (the lease's new epoch) and the
//! next accepted update (a new row in the open round), and starts the killed server again as a
//! standby. Prints each kill and the median and maximum.
//!
//! ```sh
//! cargo build --release -p ferry-cli -p ferry-harness
//! target/release/ferry-failover --kills 20 --lease 10
//! ```

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ferry_harness::{free_port, garage::Garage, postgres::Database};
use sqlx::{AnyPool, Row};

/// What to measure, from the command line.
struct Settings {
    ferry: PathBuf,
    kills: usize,
    lease: f64,
    nodes: usize,
}

fn settings() -> Result<Settings, String> {
    let mut settings = Settings {
        ferry: PathBuf::from("target/release/ferry"),
        kills: 20,
        lease: 10.0,
        nodes: 6,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<f64>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--ferry" => settings.ferry = PathBuf::from(&value),
            "--kills" => settings.kills = number()? as usize,
            "--lease" => settings.lease = number()?,
            "--nodes" => settings.nodes = number()? as usize,
            _ => {
                return Err(format!(
                    "unknown flag {flag}; flags: --ferry PATH --kills N --lease SECONDS --nodes N"
                ));
            }
        }
    }
    Ok(settings)
}

/// Runs `ferry ARGS` to completion; its standard output.
fn ferry_ok(ferry: &Path, args: &[&str]) -> String {
    let out = Command::new(ferry).args(args).output().expect("ferry runs");
    assert!(
        out.status.success(),
        "ferry {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `ferry ARGS` in the background, logging to `log`.
fn spawn(ferry: &Path, args: &[String], log: &Path, env: &[(&'static str, String)]) -> Child {
    let file = std::fs::File::create(log).expect("log");
    Command::new(ferry)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::from(file.try_clone().expect("log")))
        .stderr(Stdio::from(file))
        .spawn()
        .expect("ferry starts")
}

/// What the store shows at one look.
struct Seen {
    /// The lease's epoch.
    epoch: i64,
    /// Its holder.
    holder: String,
    /// The open round.
    round: i64,
    /// Updates accepted in it.
    accepted: i64,
}

/// The lease's epoch and holder, and the open round with the updates accepted in it.
async fn look(pool: &AnyPool) -> Option<Seen> {
    let lease = sqlx::query("SELECT epoch, holder FROM lease WHERE id = 1")
        .fetch_optional(pool)
        .await
        .ok()??;
    let round: i64 = sqlx::query("SELECT round FROM run WHERE id = 1")
        .fetch_optional(pool)
        .await
        .ok()??
        .try_get(0)
        .ok()?;
    let accepted: i64 = sqlx::query("SELECT COUNT(*) FROM accepted WHERE round = $1")
        .bind(round)
        .fetch_one(pool)
        .await
        .ok()?
        .try_get(0)
        .ok()?;
    Some(Seen {
        epoch: lease.try_get(0).ok()?,
        holder: lease.try_get(1).ok()?,
        round,
        accepted,
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[tokio::main]
async fn main() {
    let settings = settings().unwrap_or_else(|e| {
        eprintln!("ferry-failover: {e}");
        std::process::exit(2)
    });
    let ferry = std::fs::canonicalize(&settings.ferry).unwrap_or_else(|e| {
        eprintln!(
            "ferry-failover: {} ({e}); build it with cargo build --release -p ferry-cli",
            settings.ferry.display()
        );
        std::process::exit(2)
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let database = Database::create().await;
    let garage = Garage::start();
    let certs = dir.join("certs");
    ferry_ok(&ferry, &["certs", "--out", certs.to_str().expect("utf-8")]);
    let ports = [free_port(), free_port()];
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{}\"\nstore = \"{}\"\nblobs = \"{}\"\nuploads = \"{}\"\nout = \"{}\"\n\
             [s3]\nendpoint = \"{}\"\nregion = \"{}\"\n[lease]\nseconds = {}\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\n[run]\n\
             dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = {n}\nmin_clients = {m}\n\
             min_results = {m}\nrounds = 100000\nlocal-epochs = 5\nround_timeout = 30\n\
             heartbeat = 1\noffline_after = 5\nretry-backoff = 1\n",
            ports[0],
            database.url(),
            garage.url("federation"),
            dir.join("uploads").display(),
            dir.join("run").display(),
            garage.endpoint,
            ferry_harness::garage::REGION,
            settings.lease,
            certs.join("server.pem").display(),
            certs.join("server.key").display(),
            n = settings.nodes,
            m = settings.nodes.div_ceil(2),
        ),
    )
    .expect("config");
    let env = garage.env();
    let server_args = |i: usize| -> Vec<String> {
        vec![
            "server".into(),
            "--config".into(),
            config.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", ports[i]),
        ]
    };
    let url = |i: usize| format!("https://127.0.0.1:{}", ports[i]);
    let mut starts = [0usize; 2];
    let mut start = |i: usize| -> Child {
        starts[i] += 1;
        spawn(
            &ferry,
            &server_args(i),
            &dir.join(format!("server-{i}-{}.log", starts[i])),
            &env,
        )
    };
    let mut servers = [start(0), start(1)];
    let mut nodes = Vec::new();
    for i in 0..settings.nodes {
        let token = ferry_ok(
            &ferry,
            &[
                "token",
                "create",
                "--name",
                &format!("site-{i}"),
                "--store",
                &database.url(),
            ],
        );
        let args: Vec<String> = [
            "client",
            "--server",
            &format!("{},{}", url(0), url(1)),
            "--ca",
            certs.join("ca.pem").to_str().expect("utf-8"),
            "--token",
            &token,
            "--state-dir",
            dir.join(format!("node-{i}")).to_str().expect("utf-8"),
            "--dataset",
            "mnist-subset",
            "--model",
            "logreg",
            "--partition",
            "iid",
            "--num-partitions",
            &settings.nodes.to_string(),
            "--partition-index",
            &i.to_string(),
            "--give-up-after",
            "600",
        ]
        .map(String::from)
        .to_vec();
        nodes.push(spawn(
            &ferry,
            &args,
            &dir.join(format!("node-{i}.log")),
            &[],
        ));
    }
    sqlx::any::install_default_drivers();
    let pool = AnyPool::connect(&database.url()).await.expect("store");
    let wait_until = async |what: &str, limit: Duration, done: &dyn Fn(&Seen) -> bool| {
        let started = Instant::now();
        loop {
            if let Some(seen) = look(&pool).await
                && done(&seen)
            {
                return (started.elapsed(), seen);
            }
            assert!(
                started.elapsed() < limit,
                "no {what} within {limit:?}; logs in {}",
                dir.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    wait_until("round 3", Duration::from_secs(300), &|s| s.round >= 3).await;
    println!("| kill | round | takeover (s) | next accepted update (s) |");
    println!("|---|---|---|---|");
    let (mut takeovers, mut resumes) = (Vec::new(), Vec::new());
    for kill in 1..=settings.kills {
        // Land the kill at a different point of the round each time.
        tokio::time::sleep(Duration::from_millis(300 + (kill as u64 * 379) % 1500)).await;
        let (_, before) = wait_until("a lease", Duration::from_secs(60), &|_| true).await;
        let active = (0..2)
            .find(|&i| before.holder == url(i))
            .expect("the holder is one of the pair");
        servers[active].kill().expect("SIGKILL");
        let killed = Instant::now();
        let _ = servers[active].wait();
        let Seen {
            epoch,
            round,
            accepted,
            ..
        } = look(&pool).await.expect("the store");
        let (takeover, _) =
            wait_until("takeover", Duration::from_secs(120), &|s| s.epoch > epoch).await;
        wait_until("an accepted update", Duration::from_secs(120), &|s| {
            (s.round == round && s.accepted > accepted) || (s.round > round && s.accepted > 0)
        })
        .await;
        let resumed = killed.elapsed();
        println!(
            "| {kill} | {round} | {:.2} | {:.2} |",
            takeover.as_secs_f64(),
            resumed.as_secs_f64()
        );
        takeovers.push(takeover.as_secs_f64());
        resumes.push(resumed.as_secs_f64());
        servers[active] = start(active);
        // The next kill lands in a later round.
        wait_until("the next round", Duration::from_secs(300), &|s| {
            s.round > round
        })
        .await;
    }
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "\n{} kills, lease {} s: takeover median {:.2} s, max {:.2} s; next accepted update \
         median {:.2} s, max {:.2} s",
        settings.kills,
        settings.lease,
        median(&mut takeovers.clone()),
        max(&takeovers),
        median(&mut resumes.clone()),
        max(&resumes)
    );
    for mut child in servers.into_iter().chain(nodes) {
        let _ = child.kill();
        let _ = child.wait();
    }
}
