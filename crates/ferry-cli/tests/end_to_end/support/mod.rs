//! What the end-to-end tests share: the `ferry` binary, a TLS server set up in a test's own
//! folder, client arguments, logs and waiting with a time limit.

pub mod chaos;
pub mod cli;
pub mod outage;
pub mod webdriver;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

pub fn ferry() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
    command.env_remove("FERRY_DATA").env_remove("FERRY_TOKEN");
    command
}

pub fn run_ok(args: &[&str]) -> Output {
    let out = ferry().args(args).output().expect("ferry starts");
    assert!(
        out.status.success(),
        "ferry {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub use ferry_harness::free_port;

pub fn spawn_logged(args: &[String], log: &Path) -> Child {
    spawn_logged_with_env::<&str>(args, log, &[])
}

/// `ferry ARGS` with `env` set, its stdout and stderr going to `log`.
pub fn spawn_logged_with_env<V: AsRef<std::ffi::OsStr>>(
    args: &[String],
    log: &Path,
    env: &[(&str, V)],
) -> Child {
    let file = fs::File::create(log).expect("log file");
    ferry()
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v.as_ref())))
        .stdout(Stdio::from(file.try_clone().expect("clone")))
        .stderr(Stdio::from(file))
        .spawn()
        .expect("ferry starts")
}

/// Waits (up to `limit`) for the server, the first of `processes`, to exit; asserts it
/// succeeded and returns its log, the first of `logs`.
pub fn server_succeeds(processes: &mut Killer, logs: &[PathBuf], limit: Duration) -> String {
    wait_for("the server to finish", limit, logs, || {
        matches!(processes.0[0].try_wait(), Ok(Some(_)))
    });
    let server_log = fs::read_to_string(&logs[0]).expect("server log");
    assert!(
        processes.0[0].wait().expect("status").success(),
        "{server_log}"
    );
    server_log
}

pub fn history(dir: &Path) -> Option<Value> {
    let text = fs::read_to_string(dir.join("history.json")).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn rounds_done(dir: &Path) -> usize {
    history(dir).map_or(0, |h| h["rounds"].as_array().map_or(0, Vec::len))
}

/// Waits for `done`, failing with the logs after `limit`.
pub fn wait_for(what: &str, limit: Duration, logs: &[PathBuf], mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            let text: Vec<String> = logs
                .iter()
                .map(|p| {
                    format!(
                        "--- {}\n{}",
                        p.display(),
                        fs::read_to_string(p).unwrap_or_default()
                    )
                })
                .collect();
            panic!("timed out waiting for {what}\n{}", text.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A plain HTTP/1.1 GET on loopback: `(status code, body)`.
pub fn http_get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    http_request(port, "GET", path, &auth, "", API_ANSWERS_WITHIN)
}

/// A plain HTTP/1.1 POST of a JSON `body` on loopback with extra `headers` lines (each ending
/// in CRLF): `(status code, body)`.
pub fn http_post(port: u16, path: &str, headers: &str, body: &str) -> (u16, String) {
    http_request(port, "POST", path, headers, body, API_ANSWERS_WITHIN)
}

/// How long a Ferry HTTP API may take to answer in these tests.
const API_ANSWERS_WITHIN: Duration = Duration::from_secs(10);

/// Sends one HTTP/1.1 request with a JSON `body` (empty: none) and extra `headers` lines to
/// loopback `port`, and reads the answer, waiting at most `limit` for each read: `(status code,
/// body)`.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
    limit: Duration,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("HTTP reachable");
    stream.set_read_timeout(Some(limit)).expect("timeout");
    let content = if body.is_empty() {
        String::new()
    } else {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}{content}\
         Connection: close\r\n\r\n{body}"
    );
    stream.write_all(request.as_bytes()).expect("request");
    // Read until the declared length has arrived (a server may keep the connection open
    // after all), or to the end of the stream when none is declared.
    let mut response = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).expect("response");
        response.extend_from_slice(&buf[..n]);
        if n == 0 || answer_complete(&response) {
            break;
        }
    }
    let response = String::from_utf8_lossy(&response);
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}

/// Whether `response` holds its headers and as many body bytes as its Content-Length says.
fn answer_complete(response: &[u8]) -> bool {
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
    head.lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .is_some_and(|length| response.len() >= end + 4 + length)
}

/// Waits until something listens on loopback `port`, for at most `limit`.
pub fn until_listening(port: u16, what: &str, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub struct Killer(pub Vec<Child>);

impl Drop for Killer {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A server set up for a test in its own folder: certificates from `ferry certs`, free ports,
/// a SQLite store, and `server.toml` with TLS, the operator API and the given `[run]` section.
pub struct TestServer {
    pub dir: PathBuf,
    pub certs: PathBuf,
    pub port: u16,
    pub api_port: u16,
    pub store: String,
    pub out: PathBuf,
    pub config: PathBuf,
}

impl TestServer {
    /// Writes everything; `cert_args` go to `ferry certs`, `client_ca` requires client
    /// certificates.
    pub fn new(dir: &Path, cert_args: &[&str], client_ca: bool, run: &str) -> Self {
        let certs = dir.join("certs");
        let mut args = vec!["certs", "--out", certs.to_str().expect("utf-8")];
        args.extend_from_slice(cert_args);
        run_ok(&args);
        let server = Self {
            dir: dir.to_path_buf(),
            port: free_port(),
            api_port: free_port(),
            store: format!("sqlite:{}", dir.join("ferry.db").display()),
            out: dir.join("run"),
            config: dir.join("server.toml"),
            certs,
        };
        let client_ca = if client_ca {
            format!(
                "client_ca = \"{}\"\n",
                server.certs.join("ca.pem").display()
            )
        } else {
            String::new()
        };
        fs::write(
            &server.config,
            format!(
                "listen = \"127.0.0.1:{}\"\nstore = \"{}\"\nblobs = \"{}\"\nout = \"{}\"\n\
                 [api]\nlisten = \"127.0.0.1:{}\"\nadmin_token_file = \"{}\"\n\
                 [tls]\ncert = \"{}\"\nkey = \"{}\"\n{client_ca}[run]\n{run}",
                server.port,
                server.store,
                dir.join("blobs").display(),
                server.out.display(),
                server.api_port,
                server.admin_token_file().display(),
                server.certs.join("server.pem").display(),
                server.certs.join("server.key").display(),
            ),
        )
        .expect("config");
        server
    }

    pub fn admin_token_file(&self) -> PathBuf {
        self.dir.join("admin-token")
    }

    pub fn admin_token(&self) -> String {
        fs::read_to_string(self.admin_token_file())
            .expect("admin token written")
            .trim()
            .to_string()
    }

    /// `ferry server --config server.toml`, logging to `log`.
    pub fn spawn(&self, log: &Path) -> Child {
        spawn_logged(&self.args(), log)
    }

    pub fn args(&self) -> Vec<String> {
        ["server", "--config", self.config.to_str().expect("utf-8")]
            .map(String::from)
            .to_vec()
    }

    /// A fresh enrolment token for `name`.
    pub fn token(&self, name: &str) -> String {
        let out = run_ok(&["token", "create", "--name", name, "--store", &self.store]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    pub fn ca(&self) -> String {
        self.certs
            .join("ca.pem")
            .to_str()
            .expect("utf-8")
            .to_string()
    }
}

/// `ferry client` arguments that enrol with a fresh token as `name` and keep the credential
/// in `node-<name>`.
pub fn client_args(server: &TestServer, name: &str) -> Vec<String> {
    let token = server.token(name);
    assert!(token.starts_with("ferry-"), "{token}");
    token_client_args(server, &token, name)
}

/// `ferry client` arguments that enrol with `token` and keep the credential in
/// `node-<folder>`.
pub fn token_client_args(server: &TestServer, token: &str, folder: &str) -> Vec<String> {
    [
        "client",
        "--server",
        &server.url(),
        "--ca",
        &server.ca(),
        "--token",
        token,
        "--state-dir",
        server
            .dir
            .join(format!("node-{folder}"))
            .to_str()
            .expect("utf-8"),
    ]
    .map(String::from)
    .to_vec()
}

/// `ferry client` arguments for node `index` of `nodes`: enrolled with a fresh token as
/// `site-<index>`, training the built-in `model` on its IID share of the MNIST subset, and
/// giving up after `give_up_s` seconds without the server.
pub fn share_client_args(
    server: &TestServer,
    model: &str,
    nodes: usize,
    index: usize,
    give_up_s: u32,
) -> Vec<String> {
    let mut args = client_args(server, &format!("site-{index}"));
    args.extend(share_args(model, nodes, index, give_up_s));
    args
}

/// The `ferry client` arguments that train the built-in `model` on share `index` of `nodes`
/// IID shares of the MNIST subset and give up after `give_up_s` seconds without the server.
pub fn share_args(model: &str, nodes: usize, index: usize, give_up_s: u32) -> Vec<String> {
    [
        "--dataset",
        "mnist-subset",
        "--model",
        model,
        "--partition",
        "iid",
        "--num-partitions",
        &nodes.to_string(),
        "--partition-index",
        &index.to_string(),
        "--give-up-after",
        &give_up_s.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Starts `server` (logging to `server-1.log`) and `nodes` built-in-trainer clients on IID
/// shares of the MNIST subset, each with its own token; returns the processes (server first)
/// and their logs.
pub fn start_share_fleet(
    server: &TestServer,
    model: &str,
    nodes: usize,
    give_up_s: u32,
) -> (Killer, Vec<PathBuf>) {
    let mut logs = vec![server.dir.join("server-1.log")];
    let mut processes = Killer(vec![server.spawn(&logs[0])]);
    spawn_share_clients(server, model, nodes, give_up_s, &mut processes, &mut logs);
    (processes, logs)
}

/// Starts `nodes` built-in clients (`client-<i>.log`), each with its share of the MNIST
/// subset, adding them to `processes` and `logs`.
pub fn spawn_share_clients(
    server: &TestServer,
    model: &str,
    nodes: usize,
    give_up_s: u32,
    processes: &mut Killer,
    logs: &mut Vec<PathBuf>,
) {
    for i in 0..nodes {
        let log = server.dir.join(format!("client-{i}.log"));
        let args = share_client_args(server, model, nodes, i, give_up_s);
        processes.0.push(spawn_logged(&args, &log));
        logs.push(log);
    }
}

/// Runs `server` expecting it to refuse its configuration at start; returns what it said.
pub fn refused_at_start(server: &TestServer) -> String {
    let out = ferry().args(server.args()).output().expect("server runs");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "the server started:\n{stderr}");
    stderr
}

/// Writes every `stride`-th example of the MNIST subset's training split (which is sorted by
/// digit), from `first`, as `label,pixel0,...,pixel783` rows with 0-255 pixel values.
pub fn write_csv(dir: &Path, first: usize, stride: usize) {
    let splits = ferry_ml::data::DatasetKind::MnistSubset
        .load(None)
        .expect("the MNIST subset is installed");
    fs::create_dir_all(dir).expect("data dir");
    for (data, file) in [(&splits.train, "train.csv"), (&splits.test, "test.csv")] {
        let mut text = String::new();
        for i in (first..data.len()).step_by(stride) {
            text.push_str(&data.labels[i].to_string());
            for p in data.image(i) {
                text.push(',');
                text.push_str(&((p * 255.0).round() as u32).to_string());
            }
            text.push('\n');
        }
        fs::write(dir.join(file), text).expect("csv");
    }
}

/// The Python the tests run: `.venv/bin/python3` in the repository, which
/// `scripts/install-deps.sh` makes over Debian's Python with numpy, torch, pytest and
/// safetensors.
pub fn python3() -> String {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python3");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/install-deps.sh first",
        venv.display()
    );
    venv.to_str().expect("utf-8").to_string()
}

/// Runs `python3 -c script` with `env` set, failing the test with its stderr if it fails.
pub fn run_python(script: &str, env: &[(&str, &Path)]) {
    python(&["-c".as_ref(), script.as_ref()], None, env);
}

/// The Python SDK's folder (`sdk/python`), to put on `PYTHONPATH`.
pub fn sdk_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/python")
}

/// Runs the Python file `script` with `args` in `cwd` (or here), the SDK importable; fails the
/// test with its stderr if it fails; returns its stdout.
pub fn run_sdk_script(script: &Path, args: &[&str], cwd: Option<&Path>) -> String {
    let args: Vec<&std::ffi::OsStr> = std::iter::once(script.as_os_str())
        .chain(args.iter().map(std::ffi::OsStr::new))
        .collect();
    python(&args, cwd, &[("PYTHONPATH", &sdk_path())])
}

/// Runs `python3 args` in `cwd` (or here) with `env` set; fails the test with its stderr
/// if it fails; returns its stdout.
pub fn python(args: &[&std::ffi::OsStr], cwd: Option<&Path>, env: &[(&str, &Path)]) -> String {
    let interpreter = python3();
    let mut command = Command::new(&interpreter);
    command.args(args).envs(env.iter().copied());
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    let out = command.output().expect("python runs");
    assert!(
        out.status.success(),
        "{interpreter} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A server set up in `dir` for a Python trainer's own model: the model file `init.safetensors`
/// saved from the tensors `tensors` (a Python dict, built with `numpy as np` or `torch` as
/// `library` says), `trainer` written as `trainer.py` (returned), and `run` after the
/// `initial_model` line of `[run]`.
pub fn own_model_server(
    dir: &Path,
    library: &str,
    tensors: &str,
    trainer: &str,
    run: &str,
) -> (TestServer, PathBuf) {
    let initial = dir.join("init.safetensors");
    let import = match library {
        "torch" => "import torch",
        _ => "import numpy as np",
    };
    run_python(
        &format!(
            "{import}\nfrom safetensors.{library} import save_file\nsave_file({tensors}, '{}')\n",
            initial.display()
        ),
        &[],
    );
    let trainer_path = dir.join("trainer.py");
    fs::write(&trainer_path, trainer).expect("trainer");
    let run = format!("initial_model = \"{}\"\n{run}", initial.display());
    (TestServer::new(dir, &[], false, &run), trainer_path)
}

/// Starts `server` (logging to `server.log` in `dir`) and `nodes` clients training with the
/// Python program `trainer`, given `arguments(i)` (`client-<i>.log`); returns the processes,
/// server first, and their logs in the same order.
pub fn python_trainer_fleet(
    server: &TestServer,
    dir: &Path,
    nodes: u64,
    trainer: &Path,
    arguments: impl Fn(u64) -> String,
) -> (Killer, Vec<PathBuf>) {
    let mut logs = vec![dir.join("server.log")];
    let mut processes = Killer(vec![server.spawn(&logs[0])]);
    for i in 0..nodes {
        let mut args = client_args(server, &format!("site-{i}"));
        args.extend([
            "--trainer-cmd".to_string(),
            format!("{} {} {}", python3(), trainer.display(), arguments(i)),
        ]);
        let log = dir.join(format!("client-{i}.log"));
        processes.0.push(spawn_logged(&args, &log));
        logs.push(log);
    }
    (processes, logs)
}
