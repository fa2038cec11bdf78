//! The dashboard in a real browser: Debian's `chromium` driven through `chromedriver`
//! (both installed by `scripts/install-deps.sh`) over a real deployment (the `ferry` binary
//! as a TLS server and client processes on loopback). The round counter and the accuracy
//! chart advance without a reload; a killed node shows as offline; a token created on the
//! Operate page enrols a new node; a node named like markup shows as text; a cross-site or
//! tokenless action is refused; the Stop button ends the run. Screenshots land in
//! `target/tmp/dashboard-screenshots/`.
//!
//! Needs the MNIST subset that `scripts/install-deps.sh` installs.

use crate::support;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use support::{
    Killer, TestServer,
    cli::{mnist_logreg, simulate},
    client_args, free_port, http_get, http_post, rounds_done, share_args, share_client_args,
    spawn_logged, token_client_args, until_listening, wait_for,
    webdriver::Browser,
};

/// A node name that is markup: it must reach the page as text.
const MARKUP_NAME: &str = "<img src=x onerror=alert(1)>";

/// `chromedriver` on a free loopback port, stopped on drop.
struct Driver(Child, u16);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_driver() -> Driver {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver runs (scripts/install-deps.sh installs chromium-driver)");
    until_listening(port, "chromedriver", Duration::from_secs(20));
    Driver(child, port)
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    dir
}

fn screenshot(page: &Browser, name: &str) {
    let png = page.screenshot().expect("screenshot");
    std::fs::write(screenshots().join(name), png).expect("save screenshot");
}

fn eval(page: &Browser, script: &str) -> Value {
    page.execute(script)
}

/// Polls `script` in the page until it returns true, for at most `limit`.
fn until(page: &Browser, what: &str, limit: Duration, script: &str) {
    let deadline = Instant::now() + limit;
    loop {
        if eval(page, script) == Value::Bool(true) {
            return;
        }
        if Instant::now() > deadline {
            if let Ok(png) = page.screenshot() {
                let _ = std::fs::write(screenshots().join("timed-out.png"), png);
            }
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A page script: whether the nodes table shows `name` as `status`.
fn node_shows(name: &str, status: &str) -> String {
    format!(
        "[...document.querySelectorAll('#nodes-table tbody tr')].some(r => \
         r.cells[0].textContent === '{name}' && r.cells[1].textContent === '{status}')"
    )
}

/// Opens the dashboard's page `page_name` (by its address, as a bookmark would).
fn open(page: &Browser, home: &str, page_name: &str) {
    page.goto(&format!("{home}#{page_name}"));
    until(
        page,
        page_name,
        Duration::from_secs(20),
        &format!("return !document.getElementById('page-{page_name}').hidden;"),
    );
}

const NODES_SCRIPT: &str = "return [...document.querySelectorAll('#nodes-table tbody tr')]\
    .map(r => ({name: r.cells[0].textContent, status: r.cells[1].textContent}));";

#[test]
fn the_dashboard_follows_a_deployed_run_in_a_real_browser() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let server = TestServer::new(
        dir,
        &["--hosts", "localhost,127.0.0.1"],
        false,
        "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = 3\nmin_clients = 2\n\
         rounds = 500\nseed = 0\nround_timeout = 10\nmin_results = 2\nheartbeat = 1\n\
         offline_after = 3\nevaluate_every = 2\nevaluate_fraction = 1.0\n",
    );
    let mut logs = vec![dir.join("server.log")];
    let mut processes = Killer(vec![server.spawn(&logs[0])]);
    for i in 0..2 {
        logs.push(dir.join(format!("client-{i}.log")));
        let args = share_client_args(&server, "logreg", 3, i, 60);
        processes.0.push(spawn_logged(&args, &logs[i + 1]));
    }
    let mut markup = client_args(&server, MARKUP_NAME);
    markup.extend(share_args("logreg", 3, 2, 60));
    logs.push(dir.join("client-markup.log"));
    processes.0.push(spawn_logged(&markup, &logs[3]));
    wait_for("round 1", Duration::from_secs(120), &logs, || {
        rounds_done(&server.out) >= 1
    });

    let driver = start_driver();
    let page = Browser::start(driver.1);
    let home = format!("http://127.0.0.1:{}/", server.api_port);
    page.goto(&home);
    let counter = "return Number(document.getElementById('round-counter').textContent) || 0;";
    let points = "return Number(document.getElementById('accuracy-chart').dataset.points) || 0;";
    until(
        &page,
        "the first round on the page",
        Duration::from_secs(30),
        "return Number(document.getElementById('round-counter').textContent) >= 1;",
    );

    // What the page weighed and when its first chart was drawn (reported, not asserted).
    let weight = eval(
        &page,
        "return {first_chart_ms: performance.getEntriesByName('ferry-first-chart')[0].startTime, \
         bytes: performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))\
         .reduce((s, e) => s + (e.transferSize || e.encodedBodySize || 0), 0)};",
    );
    eprintln!("dashboard page: {weight}");

    // Live: the counter and the chart move while the page stays the same document.
    eval(&page, "window.ferryProbe = 'same page'; return true;");
    let (round0, points0) = (eval(&page, counter), eval(&page, points));
    until(
        &page,
        "the round counter and the chart to advance",
        Duration::from_secs(60),
        &format!(
            "return Number(document.getElementById('round-counter').textContent) > {round0} \
             && Number(document.getElementById('accuracy-chart').dataset.points) > {points0};"
        ),
    );
    assert_eq!(
        eval(&page, "return window.ferryProbe;"),
        json!("same page"),
        "the page reloaded"
    );
    screenshot(&page, "overview.png");

    // Nodes: the markup name is text, and nothing it says ran.
    page.click("a[href='#nodes']");
    until(
        &page,
        "three nodes listed",
        Duration::from_secs(20),
        "return document.querySelectorAll('#nodes-table tbody tr').length === 3;",
    );
    let nodes = eval(&page, NODES_SCRIPT);
    assert!(
        nodes
            .as_array()
            .expect("rows")
            .iter()
            .any(|n| n["name"] == MARKUP_NAME),
        "{nodes}"
    );
    assert_eq!(
        eval(
            &page,
            "return document.querySelectorAll('main img').length;"
        ),
        json!(0)
    );
    assert_eq!(page.alert_text(), None, "an alert opened");
    // Federated evaluation reaches each node's row.
    until(
        &page,
        "a node's federated accuracy",
        Duration::from_secs(30),
        "return [...document.querySelectorAll('#nodes-table tbody tr')]\
         .some(r => r.cells[8].textContent.endsWith('%'));",
    );
    screenshot(&page, "nodes.png");

    // A node killed shows as offline, without a reload.
    processes.0[2].kill().expect("kill site-1");
    until(
        &page,
        "site-1 offline",
        Duration::from_secs(30),
        &format!(
            "return {} && {};",
            node_shows("site-1", "offline"),
            node_shows("site-0", "online")
        ),
    );
    screenshot(&page, "nodes-offline.png");

    // Actions are refused across sites and without the admin token.
    let admin = server.admin_token();
    let auth = format!("Authorization: Bearer {admin}\r\n");
    let body = r#"{"name":"intruder"}"#;
    let port = server.api_port;
    let cross_site = format!("{auth}Origin: http://evil.example\r\n");
    let refused = |path: &str, headers: &str, body: &str| http_post(port, path, headers, body).0;
    assert_eq!(refused("/dashboard/v1/tokens", &cross_site, body), 403);
    assert_eq!(refused("/dashboard/v1/tokens", "", body), 401);
    assert_eq!(
        refused("/dashboard/v1/stop", "Sec-Fetch-Site: cross-site\r\n", "{}"),
        403
    );

    // A token created on the Operate page enrols a new node.
    open(&page, &home, "operate");
    page.type_into("#admin-token", &admin);
    page.click("#admin-form button");
    page.type_into("#token-name", "site-new");
    page.click("#token-create");
    until(
        &page,
        "the new token",
        Duration::from_secs(20),
        "return document.getElementById('new-token').textContent.startsWith('ferry-');",
    );
    let token = eval(
        &page,
        "return document.getElementById('new-token').textContent;",
    );
    screenshot(&page, "operate.png");
    let mut newcomer = token_client_args(&server, token.as_str().expect("token text"), "new");
    newcomer.extend(share_args("logreg", 3, 1, 60));
    logs.push(dir.join("client-new.log"));
    processes
        .0
        .push(spawn_logged(&newcomer, logs.last().expect("log")));
    open(&page, &home, "nodes");
    until(
        &page,
        "site-new online",
        Duration::from_secs(60),
        &format!("return {};", node_shows("site-new", "online")),
    );

    // The Stop button (two clicks) ends the run after the current round.
    open(&page, &home, "operate");
    for _ in 0..2 {
        page.click("#stop-run");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = processes.0[0].try_wait().expect("server state") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop after the Stop button"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success(),
        "the server failed: {}",
        std::fs::read_to_string(&logs[0]).unwrap_or_default()
    );
    let history = support::history(&server.out).expect("history.json");
    assert_eq!(history["final"]["stop"], "stopped", "{}", history["final"]);
    drop(page);
}

/// A finished run's history with `nodes` nodes, a tenth of them contributing to each of
/// `rounds` rounds, and per-class accuracy for 10 classes.
fn fleet_history(nodes: usize, rounds: u32) -> Value {
    let records: Vec<Value> = (1..=rounds)
        .map(|round| {
            let cohort: Vec<String> = (0..nodes / 10)
                .map(|i| format!("vehicle-{:04}", (i * 10 + round as usize) % nodes))
                .collect();
            json!({
                "round": round, "accuracy": 0.5 + 0.02 * f64::from(round), "loss": 1.0,
                "class_accuracy": (0..10).map(|c| f64::from(c) / 10.0).collect::<Vec<_>>(),
                "participants": cohort.len(), "failures": 1, "bytes_up": 1_000_000,
                "bytes_down": 1_000_000, "wall_s": 1.0, "train_loss": 1.0,
                "strategy_state_bytes": 0, "contributors": cohort,
                "failed": [{"node": "vehicle-0000", "reason": "<script>alert(2)</script>"}],
            })
        })
        .collect();
    json!({"config": {"strategy": "fedavg", "rounds": rounds}, "rounds": records, "final": null})
}

#[test]
fn finished_runs_and_a_live_simulation_in_a_real_browser() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let runs = tmp.path().join("runs");
    let out = |name: &str| runs.join(name).to_str().expect("utf-8").to_string();
    simulate(
        &runs.join("private"),
        &mnist_logreg(&[
            "--rounds",
            "4",
            "--clients",
            "20",
            "--fraction",
            "0.5",
            "--dp-noise-multiplier",
            "0.8",
            "--dp-adaptive-clip",
            "--dp-epsilon-budget",
            "20",
        ]),
    );
    simulate(
        &runs.join("krum"),
        &mnist_logreg(&[
            "--rounds",
            "4",
            "--clients",
            "10",
            "--aggregator",
            "krum",
            "--cross-site",
            "local",
        ]),
    );
    std::fs::create_dir_all(runs.join("fleet")).expect("fleet run folder");
    std::fs::write(
        runs.join("fleet/history.json"),
        fleet_history(1000, 20).to_string(),
    )
    .expect("fleet history");

    let port = free_port();
    let mut processes = Killer(vec![spawn_logged(
        &[
            "dashboard".into(),
            runs.to_str().expect("utf-8").into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ],
        &tmp.path().join("dashboard.log"),
    )]);
    until_listening(port, "ferry dashboard", Duration::from_secs(60));
    let driver = start_driver();
    let page = Browser::start(driver.1);
    let home = format!("http://127.0.0.1:{port}/");

    // A private run: epsilon and the clip norm, round by round.
    page.goto(&format!("{home}?run=private#safety"));
    until(
        &page,
        "the epsilon chart",
        Duration::from_secs(20),
        "return document.getElementById('epsilon-chart').dataset.points === '4' \
         && document.getElementById('clip-chart').dataset.points === '4';",
    );
    screenshot(&page, "privacy.png");

    // A Krum run: who the rule left out in each round.
    page.goto(&format!("{home}?run=krum#safety"));
    until(
        &page,
        "the excluded nodes",
        Duration::from_secs(20),
        "return !document.getElementById('robust-panel').hidden \
         && document.querySelectorAll('#excluded-table tbody tr').length === 4;",
    );

    // The cross-site matrix: the global model and 10 sites' own models on 10 sites, on the
    // page and alone through the API; a run without one says how to get it.
    page.goto(&format!("{home}?run=krum#sites"));
    until(
        &page,
        "the cross-site heatmap",
        Duration::from_secs(20),
        "return !document.getElementById('tab-sites').hidden \
         && document.getElementById('sites-heatmap').dataset.cells === '110';",
    );
    screenshot(&page, "cross-site.png");
    let (status, body) = http_get(port, "/dashboard/v1/cross-site?run=krum", None);
    assert_eq!(status, 200, "{body}");
    let matrix: Value = serde_json::from_str(&body).expect("matrix JSON");
    assert_eq!(
        matrix["rows"].as_array().map(Vec::len),
        Some(11),
        "{matrix}"
    );
    let (status, body) = http_get(port, "/dashboard/v1/cross-site?run=private", None);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("ferry cross-site"), "{body}");

    // Comparison: every run on one chart.
    open(&page, &home, "compare");
    until(
        &page,
        "three runs compared",
        Duration::from_secs(20),
        "return document.querySelectorAll('#compare-picks input').length === 3 \
         && Number(document.getElementById('compare-chart').dataset.points) === 28;",
    );
    screenshot(&page, "compare.png");

    // A thousand nodes, sortable, with a failure message that is markup shown as text.
    page.goto(&format!("{home}?run=fleet#nodes"));
    until(
        &page,
        "a thousand nodes",
        Duration::from_secs(30),
        "return document.querySelectorAll('#nodes-table tbody tr').length === 1000;",
    );
    let sorted = eval(
        &page,
        "const t0 = performance.now();\
         document.querySelector('#nodes-table th[data-key=rounds]').click();\
         document.querySelector('#nodes-table th[data-key=rounds]').click();\
         return {ms: performance.now() - t0, first: document.querySelector('#nodes-table tbody tr').dataset.node,\
                 reason: document.querySelector('#nodes-table tbody tr[data-node=\"vehicle-0000\"] td.reason').textContent};",
    );
    eprintln!("sorting 1000 nodes twice: {sorted}");
    assert_eq!(sorted["reason"], "round 20: <script>alert(2)</script>");
    assert_eq!(
        eval(
            &page,
            "return document.querySelectorAll('main script').length;"
        ),
        json!(0)
    );
    screenshot(&page, "nodes-1000.png");
    open(&page, &format!("{home}?run=fleet"), "classes");
    until(
        &page,
        "the class heatmap",
        Duration::from_secs(20),
        "return document.getElementById('class-heatmap').dataset.cells === '200';",
    );
    screenshot(&page, "classes.png");

    // A simulation in progress: the counter moves while it runs, and the process ends.
    let live_port = free_port();
    processes.0.push(spawn_logged(
        &[
            "simulate",
            "--dataset",
            "mnist-subset",
            "--model",
            "lenet",
            "--clients",
            "4",
            "--rounds",
            "5",
            "--out",
            &out("live"),
            "--dashboard",
            &format!("127.0.0.1:{live_port}"),
        ]
        .map(String::from),
        &tmp.path().join("simulate.log"),
    ));
    until_listening(
        live_port,
        "ferry simulate --dashboard",
        Duration::from_secs(60),
    );
    page.goto(&format!("http://127.0.0.1:{live_port}/"));
    until(
        &page,
        "a round of the simulation",
        Duration::from_secs(60),
        "return Number(document.getElementById('round-counter').textContent) >= 1;",
    );
    eval(&page, "window.ferryProbe = 'same page'; return true;");
    until(
        &page,
        "another round of the simulation",
        Duration::from_secs(60),
        "return Number(document.getElementById('round-counter').textContent) >= 3 \
         && window.ferryProbe === 'same page';",
    );
    screenshot(&page, "simulation.png");
    let status = processes.0[1].wait().expect("simulation ends");
    assert!(status.success(), "the simulation failed");
    drop(page);
}
