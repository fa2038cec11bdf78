//! `ferry bench fleet` at a small size: a real server process and a process of real node
//! agents over loopback TLS; every round closes with its whole cohort, the default abuse
//! limits refuse nothing, and the figures land in the CSV files.

use crate::support;

#[test]
fn bench_fleet_closes_every_round_and_writes_its_figures() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("fleet");
    let printed = support::run_ok(&[
        "bench",
        "fleet",
        "--nodes",
        "40",
        "--per-round",
        "10",
        "--params",
        "1000",
        "--rounds",
        "3",
        "--per-connection",
        "1",
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.contains("rounds completed 3 of 3"), "{printed}");
    assert!(printed.contains("agents that failed: 0"), "{printed}");
    // The default abuse limits turn no healthy node away.
    assert!(
        printed.contains("refused by the server: nothing"),
        "{printed}"
    );
    // Counted over the whole run (the recorder resets its counters at every round's
    // snapshot): at least one connection per node.
    let opened: usize = printed
        .lines()
        .find_map(|l| l.strip_prefix("connections accepted by the server: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(opened >= 40, "{printed}");
    let rounds = std::fs::read_to_string(out.join("rounds.csv")).expect("rounds.csv");
    let rows: Vec<Vec<&str>> = rounds
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 3, "{rounds}");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row[0], (i + 1).to_string());
        assert_eq!(row[2], "10", "every round folds its whole cohort: {rounds}");
        let sockets: usize = row[10].parse().expect("sockets");
        assert!(sockets >= 40, "one connection per node: {rounds}");
    }
    let rpc = std::fs::read_to_string(out.join("rpc.csv")).expect("rpc.csv");
    for method in ["Enrol", "PullTask", "Download", "Upload"] {
        let calls: u64 = rpc
            .lines()
            .find(|l| l.starts_with(&format!("{method},")))
            .and_then(|l| l.rsplit(',').next())
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        assert!(calls > 0, "{method}: {rpc}");
    }
    let enrolled = rpc
        .lines()
        .find(|l| l.starts_with("Enrol,"))
        .and_then(|l| l.rsplit(',').next())
        .expect("Enrol row");
    assert_eq!(enrolled, "40", "{rpc}");
}
