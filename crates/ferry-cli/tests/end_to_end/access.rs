//! Who may talk to a deployed server: unknown tokens, plain HTTP on the TLS port and nodes
//! whose token was revoked are refused, each with a message that says what to do.
//!
//! Needs the MNIST subset that `scripts/install-deps.sh` installs.

use crate::support;

use std::{fs, time::Duration};

use support::{Killer, TestServer, client_args, ferry, run_ok, share_args, spawn_logged, wait_for};

#[test]
fn unknown_tokens_and_plain_http_are_refused_with_a_clear_message() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = TestServer::new(
        tmp.path(),
        &[],
        false,
        "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nmin_clients = 1\n",
    );
    let log = tmp.path().join("server.log");
    let _server = Killer(vec![server.spawn(&log)]);
    let client = |extra: &[&str]| {
        let mut args = vec![
            "client",
            "--dataset",
            "mnist-subset",
            "--model",
            "logreg",
            "--give-up-after",
            "20",
        ];
        args.extend_from_slice(extra);
        ferry().args(&args).output().expect("client runs")
    };
    let url = server.url();
    let state = tmp.path().join("node");
    let ca = server.ca();
    let out = client(&[
        "--server",
        &url,
        "--ca",
        &ca,
        "--token",
        "ferry-forged",
        "--state-dir",
        state.to_str().expect("utf-8"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("refused this node") && stderr.contains("ferry token create"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Plain HTTP to the TLS port: a raw HTTP/1.1 request gets no HTTP answer, only the TLS
    // layer's refusal (an alert record, 0x15, or a closed connection).
    let answer = raw_exchange(
        server.port,
        b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "plain HTTP got an answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // ... and a node speaking gRPC over plain HTTP/2 never gets in: it enrols nowhere and
    // says why it gave up.
    let plain = format!("http://127.0.0.1:{}", server.port);
    let out = ferry()
        .args(["client", "--dataset", "mnist-subset", "--model", "logreg"])
        .args(["--server", &plain, "--token", &server.token("plain")])
        .args(["--give-up-after", "2", "--state-dir"])
        .arg(tmp.path().join("plain"))
        .output()
        .expect("client runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains("enrolled"), "{stdout}");
    assert!(stderr.contains("server unreachable"), "{stderr}");
    // Without --ca an https address is refused before any connection.
    let out = client(&[
        "--server",
        &url,
        "--token",
        "x",
        "--state-dir",
        state.to_str().expect("utf-8"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--ca"), "{stderr}");
    let server_log = fs::read_to_string(&log).unwrap_or_default();
    assert!(!server_log.contains("panicked"), "{server_log}");
}

/// Sends `request` on a plain TCP connection to loopback `port` and returns what comes back
/// before the server closes (or 10 s pass).
fn raw_exchange(port: u16, request: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(request).expect("request");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer
}

#[test]
fn a_revoked_node_is_shut_out_on_its_next_call() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Rounds need two nodes, so the one node here only heartbeats and polls.
    let server = TestServer::new(
        tmp.path(),
        &[],
        false,
        "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nmin_clients = 2\nheartbeat = 1\n",
    );
    let log = tmp.path().join("server.log");
    let mut processes = Killer(vec![server.spawn(&log)]);
    let node_log = tmp.path().join("node.log");
    let mut args = client_args(&server, "site-r");
    args.extend(share_args("logreg", 2, 0, 60));
    processes.0.push(spawn_logged(&args, &node_log));
    let logs = [log, node_log.clone()];
    wait_for("the node to enrol", Duration::from_secs(60), &logs, || {
        fs::read_to_string(&node_log).is_ok_and(|l| l.contains("enrolled as node"))
    });
    let out = run_ok(&[
        "token",
        "revoke",
        "--name",
        "site-r",
        "--store",
        &server.store,
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("revoked 'site-r'"),
        "{out:?}"
    );
    wait_for("the node to stop", Duration::from_secs(60), &logs, || {
        matches!(processes.0[1].try_wait(), Ok(Some(_)))
    });
    let status = processes.0[1].wait().expect("node status");
    let said = fs::read_to_string(&node_log).expect("node log");
    assert!(!status.success(), "{said}");
    assert!(
        said.contains("has been revoked") && said.contains("ask the operator for a new token"),
        "{said}"
    );
    // Revoking a name that was never created is an error, naming it.
    let out = ferry()
        .args([
            "token",
            "revoke",
            "--name",
            "nobody",
            "--store",
            &server.store,
        ])
        .output()
        .expect("ferry runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nobody"),
        "{out:?}"
    );
}
