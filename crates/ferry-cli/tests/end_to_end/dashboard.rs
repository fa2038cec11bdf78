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

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use support::{
    Killer, TestServer, client_args, free_port, http_post, rounds_done, share_args,
    share_client_args, spawn_logged, token_client_args, until_listening, wait_for,
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

async fn browser(driver: &Driver) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1300,1000"]}),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.1))
        .await
        .expect("a headless chromium session")
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    dir
}

async fn screenshot(page: &Client, name: &str) {
    let png = page.screenshot().await.expect("screenshot");
    std::fs::write(screenshots().join(name), png).expect("save screenshot");
}

async fn eval(page: &Client, script: &str) -> Value {
    page.execute(script, Vec::new()).await.expect("script runs")
}

/// Polls `script` in the page until it returns true, for at most `limit`.
async fn until(page: &Client, what: &str, limit: Duration, script: &str) {
    let deadline = Instant::now() + limit;
    loop {
        if eval(page, script).await == Value::Bool(true) {
            return;
        }
        if Instant::now() > deadline {
            let _ = screenshot(page, "timed-out.png").await;
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
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
async fn open(page: &Client, home: &str, page_name: &str) {
    page.goto(&format!("{home}#{page_name}"))
        .await
        .expect("open a page");
    until(
        page,
        page_name,
        Duration::from_secs(20),
        &format!("return !document.getElementById('page-{page_name}').hidden;"),
    )
    .await;
}

/// Clicks the element `css` selects.
async fn click(page: &Client, css: &str) {
    page.find(Locator::Css(css))
        .await
        .expect("element on the page")
        .click()
        .await
        .expect("click");
}

/// Types `text` into the element `css` selects.
async fn type_into(page: &Client, css: &str, text: &str) {
    page.find(Locator::Css(css))
        .await
        .expect("field on the page")
        .send_keys(text)
        .await
        .expect("type");
}

const NODES_SCRIPT: &str = "return [...document.querySelectorAll('#nodes-table tbody tr')]\
    .map(r => ({name: r.cells[0].textContent, status: r.cells[1].textContent}));";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_a_deployed_run_in_a_real_browser() {
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
    let page = browser(&driver).await;
    let home = format!("http://127.0.0.1:{}/", server.api_port);
    page.goto(&home).await.expect("open the dashboard");
    let counter = "return Number(document.getElementById('round-counter').textContent) || 0;";
    let points = "return Number(document.getElementById('accuracy-chart').dataset.points) || 0;";
    until(
        &page,
        "the first round on the page",
        Duration::from_secs(30),
        "return Number(document.getElementById('round-counter').textContent) >= 1;",
    )
    .await;

    // What the page weighed and when its first chart was drawn (reported, not asserted).
    let weight = eval(
        &page,
        "return {first_chart_ms: performance.getEntriesByName('ferry-first-chart')[0].startTime, \
         bytes: performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))\
         .reduce((s, e) => s + (e.transferSize || e.encodedBodySize || 0), 0)};",
    )
    .await;
    eprintln!("dashboard page: {weight}");

    // Live: the counter and the chart move while the page stays the same document.
    eval(&page, "window.ferryProbe = 'same page'; return true;").await;
    let (round0, points0) = (eval(&page, counter).await, eval(&page, points).await);
    until(
        &page,
        "the round counter and the chart to advance",
        Duration::from_secs(60),
        &format!(
            "return Number(document.getElementById('round-counter').textContent) > {round0} \
             && Number(document.getElementById('accuracy-chart').dataset.points) > {points0};"
        ),
    )
    .await;
    assert_eq!(
        eval(&page, "return window.ferryProbe;").await,
        json!("same page"),
        "the page reloaded"
    );
    screenshot(&page, "overview.png").await;

    // Nodes: the markup name is text, and nothing it says ran.
    click(&page, "a[href='#nodes']").await;
    until(
        &page,
        "three nodes listed",
        Duration::from_secs(20),
        "return document.querySelectorAll('#nodes-table tbody tr').length === 3;",
    )
    .await;
    let nodes = eval(&page, NODES_SCRIPT).await;
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
        )
        .await,
        json!(0)
    );
    assert!(page.get_alert_text().await.is_err(), "an alert opened");
    // Federated evaluation reaches each node's row.
    until(
        &page,
        "a node's federated accuracy",
        Duration::from_secs(30),
        "return [...document.querySelectorAll('#nodes-table tbody tr')]\
         .some(r => r.cells[8].textContent.endsWith('%'));",
    )
    .await;
    screenshot(&page, "nodes.png").await;

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
    )
    .await;
    screenshot(&page, "nodes-offline.png").await;

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
    open(&page, &home, "operate").await;
    type_into(&page, "#admin-token", &admin).await;
    click(&page, "#admin-form button").await;
    type_into(&page, "#token-name", "site-new").await;
    click(&page, "#token-create").await;
    until(
        &page,
        "the new token",
        Duration::from_secs(20),
        "return document.getElementById('new-token').textContent.startsWith('ferry-');",
    )
    .await;
    let token = eval(
        &page,
        "return document.getElementById('new-token').textContent;",
    )
    .await;
    screenshot(&page, "operate.png").await;
    let mut newcomer = token_client_args(&server, token.as_str().expect("token text"), "new");
    newcomer.extend(share_args("logreg", 3, 1, 60));
    logs.push(dir.join("client-new.log"));
    processes
        .0
        .push(spawn_logged(&newcomer, logs.last().expect("log")));
    open(&page, &home, "nodes").await;
    until(
        &page,
        "site-new online",
        Duration::from_secs(60),
        &format!("return {};", node_shows("site-new", "online")),
    )
    .await;

    // The Stop button (two clicks) ends the run after the current round.
    open(&page, &home, "operate").await;
    for _ in 0..2 {
        click(&page, "#stop-run").await;
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
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        status.success(),
        "the server failed: {}",
        std::fs::read_to_string(&logs[0]).unwrap_or_default()
    );
    let history = support::history(&server.out).expect("history.json");
    assert_eq!(history["final"]["stop"], "stopped", "{}", history["final"]);
    let _ = page.close().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_runs_and_a_live_simulation_in_a_real_browser() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let runs = tmp.path().join("runs");
    let out = |name: &str| runs.join(name).to_str().expect("utf-8").to_string();
    let simulate = |extra: &[&str]| {
        let mut args = vec![
            "simulate",
            "--dataset",
            "mnist-subset",
            "--model",
            "logreg",
            "--rounds",
            "4",
        ];
        args.extend_from_slice(extra);
        support::run_ok(&args);
    };
    simulate(&[
        "--clients",
        "20",
        "--fraction",
        "0.5",
        "--dp-noise-multiplier",
        "0.8",
        "--dp-adaptive-clip",
        "--dp-epsilon-budget",
        "20",
        "--out",
        &out("private"),
    ]);
    simulate(&[
        "--clients",
        "10",
        "--aggregator",
        "krum",
        "--out",
        &out("krum"),
    ]);
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
    let page = browser(&driver).await;
    let home = format!("http://127.0.0.1:{port}/");

    // A private run: epsilon and the clip norm, round by round.
    page.goto(&format!("{home}?run=private#safety"))
        .await
        .expect("private run");
    until(
        &page,
        "the epsilon chart",
        Duration::from_secs(20),
        "return document.getElementById('epsilon-chart').dataset.points === '4' \
         && document.getElementById('clip-chart').dataset.points === '4';",
    )
    .await;
    screenshot(&page, "privacy.png").await;

    // A Krum run: who the rule left out in each round.
    page.goto(&format!("{home}?run=krum#safety"))
        .await
        .expect("krum run");
    until(
        &page,
        "the excluded nodes",
        Duration::from_secs(20),
        "return !document.getElementById('robust-panel').hidden \
         && document.querySelectorAll('#excluded-table tbody tr').length === 4;",
    )
    .await;

    // Comparison: every run on one chart.
    open(&page, &home, "compare").await;
    until(
        &page,
        "three runs compared",
        Duration::from_secs(20),
        "return document.querySelectorAll('#compare-picks input').length === 3 \
         && Number(document.getElementById('compare-chart').dataset.points) === 28;",
    )
    .await;
    screenshot(&page, "compare.png").await;

    // A thousand nodes, sortable, with a failure message that is markup shown as text.
    page.goto(&format!("{home}?run=fleet#nodes"))
        .await
        .expect("fleet run");
    until(
        &page,
        "a thousand nodes",
        Duration::from_secs(30),
        "return document.querySelectorAll('#nodes-table tbody tr').length === 1000;",
    )
    .await;
    let sorted = eval(
        &page,
        "const t0 = performance.now();\
         document.querySelector('#nodes-table th[data-key=rounds]').click();\
         document.querySelector('#nodes-table th[data-key=rounds]').click();\
         return {ms: performance.now() - t0, first: document.querySelector('#nodes-table tbody tr').dataset.node,\
                 reason: document.querySelector('#nodes-table tbody tr[data-node=\"vehicle-0000\"] td.reason').textContent};",
    )
    .await;
    eprintln!("sorting 1000 nodes twice: {sorted}");
    assert_eq!(sorted["reason"], "round 20: <script>alert(2)</script>");
    assert_eq!(
        eval(
            &page,
            "return document.querySelectorAll('main script').length;"
        )
        .await,
        json!(0)
    );
    screenshot(&page, "nodes-1000.png").await;
    open(&page, &format!("{home}?run=fleet"), "classes").await;
    until(
        &page,
        "the class heatmap",
        Duration::from_secs(20),
        "return document.getElementById('class-heatmap').dataset.cells === '200';",
    )
    .await;
    screenshot(&page, "classes.png").await;

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
    page.goto(&format!("http://127.0.0.1:{live_port}/"))
        .await
        .expect("live simulation");
    until(
        &page,
        "a round of the simulation",
        Duration::from_secs(60),
        "return Number(document.getElementById('round-counter').textContent) >= 1;",
    )
    .await;
    eval(&page, "window.ferryProbe = 'same page'; return true;").await;
    until(
        &page,
        "another round of the simulation",
        Duration::from_secs(60),
        "return Number(document.getElementById('round-counter').textContent) >= 3 \
         && window.ferryProbe === 'same page';",
    )
    .await;
    screenshot(&page, "simulation.png").await;
    let status = processes.0[1].wait().expect("simulation ends");
    assert!(status.success(), "the simulation failed");
    let _ = page.close().await;
}
