//! A Garage S3 server for one test or measurement: its own folder, ports on loopback, one
//! node with a layout applied, a bucket, and a key that may read and write it. Stopped and
//! removed when dropped.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The bucket every instance has.
pub const BUCKET: &str = "ferry-test";

/// The region the instance answers as.
pub const REGION: &str = "garage";

/// A running Garage.
#[derive(Debug)]
pub struct Garage {
    program: PathBuf,
    dir: tempfile::TempDir,
    child: Child,
    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The access key id.
    pub key_id: String,
    /// The secret key.
    pub secret: String,
}

/// The `garage` program: `FERRY_GARAGE`, else on `PATH`, else in `~/.cargo/bin`.
pub fn program() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FERRY_GARAGE") {
        return Some(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("garage"))
            .collect::<Vec<_>>()
    });
    let in_cargo = std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo/bin/garage"));
    on_path.chain(in_cargo).find(|path| path.is_file())
}

/// `bytes` random bytes as lowercase hex.
fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

impl Garage {
    /// Starts Garage and waits until its bucket takes writes; panics, saying what to run,
    /// when Garage is not installed or does not come up.
    pub fn start() -> Self {
        let program = program().unwrap_or_else(|| {
            panic!(
                "Garage (the S3 server these tests use) is not installed: run \
                 scripts/install-deps.sh, or `cargo install garage --version 2.5.0 --locked`, \
                 or set FERRY_GARAGE to its path"
            )
        });
        let dir = tempfile::tempdir().expect("a folder for Garage");
        let (s3, rpc, admin) = (crate::free_port(), crate::free_port(), crate::free_port());
        let config = format!(
            "metadata_dir = \"{meta}\"\n\
             data_dir = \"{data}\"\n\
             db_engine = \"sqlite\"\n\
             replication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_secret = \"{secret}\"\n\
             [s3_api]\n\
             s3_region = \"{REGION}\"\n\
             api_bind_addr = \"127.0.0.1:{s3}\"\n\
             root_domain = \".s3.garage.localhost\"\n\
             [admin]\n\
             api_bind_addr = \"127.0.0.1:{admin}\"\n\
             admin_token = \"{token}\"\n",
            meta = dir.path().join("meta").display(),
            data = dir.path().join("data").display(),
            secret = random_hex(32),
            token = random_hex(16),
        );
        std::fs::write(dir.path().join("garage.toml"), config).expect("Garage's configuration");
        let log = std::fs::File::create(dir.path().join("garage.log")).expect("Garage's log");
        let child = Command::new(&program)
            .arg("-c")
            .arg(dir.path().join("garage.toml"))
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let mut garage = Self {
            program,
            dir,
            child,
            endpoint: format!("http://127.0.0.1:{s3}"),
            key_id: format!("GK{}", random_hex(12)),
            secret: random_hex(32),
        };
        garage.set_up();
        if let Ok(Some(status)) = garage.child.try_wait() {
            panic!(
                "Garage exited after it came up ({status}); its log: {}",
                garage.log()
            );
        }
        garage
    }

    /// Waits for the node, gives it a layout, and makes the bucket and the key.
    fn set_up(&mut self) {
        let started = Instant::now();
        let node = loop {
            if let Some(id) = self.try_cli(&["node", "id", "-q"]) {
                break id;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("Garage exited ({status}); its log: {}", self.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "Garage did not answer within a minute; its log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let node = node.split('@').next().unwrap_or(&node).to_string();
        self.cli(&["layout", "assign", "-z", "local", "-c", "1G", &node]);
        self.cli(&["layout", "apply", "--version", "1"]);
        self.cli(&[
            "key",
            "import",
            "--yes",
            "-n",
            "ferry",
            &self.key_id.clone(),
            &self.secret.clone(),
        ]);
        self.cli(&["bucket", "create", BUCKET]);
        self.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "ferry",
        ]);
    }

    /// Runs a `garage` command against this instance; its output, or `None` when it failed.
    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let output = Command::new(&self.program)
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// Runs a `garage` command that must succeed.
    fn cli(&self, args: &[&str]) {
        // A layout just applied takes a moment to reach every table: a few tries.
        for _ in 0..50 {
            if self.try_cli(args).is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "`garage {}` failed; Garage's log: {}",
            args.join(" "),
            self.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    /// `s3://BUCKET/prefix` in this instance.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The environment a client (a `ferry server` process, object_store's S3 builder) reaches
    /// this instance with.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
    }

    /// The folder Garage keeps its data in (tests that corrupt an object reach it here).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
