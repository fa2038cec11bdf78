//! The Python SDK (`sdk/python`) driving real runs of `ferry simulate --trainer-cmd`: a numpy
//! trainer on a model of f16, f64 and integer tensors, a trainer whose mistake the SDK refuses
//! before anything is uploaded, and a PyTorch module with BatchNorm whose final model loads
//! back with `strict=True`.
//!
//! Needs the `.venv` that `scripts/install-deps.sh` makes (numpy, torch, safetensors).

use crate::support;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Output,
};

use support::{history, python3, sdk_path};

/// `python -c script` with the SDK importable; fails the test with its stderr.
fn python(script: &str) {
    support::run_python(script, &[("PYTHONPATH", &sdk_path())]);
}

/// `ferry simulate` over two empty node folders with the trainer `python3 trainer.py` in
/// long-lived mode, starting from `initial`, with `extra` options.
fn simulate(dir: &Path, trainer: &str, initial: &Path, extra: &[&str]) -> Output {
    fs::create_dir_all(dir).expect("run folder");
    let script = dir.join("trainer.py");
    fs::write(&script, trainer).expect("trainer");
    for i in 0..2 {
        fs::create_dir_all(dir.join(format!("nodes/site-{i}"))).expect("node folder");
    }
    support::ferry()
        .env("PYTHONPATH", sdk_path())
        .args(["simulate", "--rounds", "2", "--trainer-mode", "long-lived"])
        .arg("--trainer-cmd")
        .arg(format!("{} {}", python3(), script.display()))
        .arg("--node-data")
        .arg(dir.join("nodes/*"))
        .arg("--initial-model")
        .arg(initial)
        .arg("--out")
        .arg(dir.join("run"))
        .args(extra)
        .output()
        .expect("simulate runs")
}

const NUMPY_TRAINER: &str = r#"import numpy as np
import ferry_sdk

def train(model, task):
    out = {}
    for name, array in model.items():
        if np.issubdtype(array.dtype, np.floating):
            out[name] = (array + 0.5 * (1 - array.astype(np.float64))).astype(array.dtype)
    return ferry_sdk.TrainResult(out, num_examples=5, metrics={"train_loss": 0.1})

def evaluate(model, task):
    # Scores by how far head.bias has come from -1 to 1; site-1 holds three times the data.
    examples = 30 if task.data_dir.endswith("1") else 10
    return ferry_sdk.EvaluateResult(examples, loss=0.2, accuracy=(float(model["head.bias"].mean()) + 1) / 2)

ferry_sdk.run(train, evaluate)
"#;

#[test]
fn a_numpy_trainer_written_with_the_sdk_trains_and_its_mistakes_are_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let initial = tmp.path().join("init.safetensors");
    python(&format!(
        "import numpy as np, ferry_sdk\nferry_sdk.save_model({{'enc.weight': \
             np.zeros((4, 3), np.float16), 'head.bias': np.full(3, -1.0), \
             'steps': np.array(5, np.int64)}}, '{}')\n",
        initial.display()
    ));
    let good = tmp.path().join("good");
    let out = simulate(&good, NUMPY_TRAINER, &initial, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h = history(&good.join("run")).expect("history.json");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert!(rounds.iter().all(|r| r["participants"] == 2), "{rounds:?}");
    // Without a central test set every round is evaluated by the nodes: head.bias goes
    // -1 -> 0 -> 0.5, so the nodes score 0.5 then 0.75, over 10 + 30 examples.
    let federated: Vec<(f64, u64)> = rounds
        .iter()
        .map(|r| {
            let f = &r["federated"];
            (
                f["accuracy"].as_f64().expect("accuracy"),
                f["num_examples"].as_u64().expect("examples"),
            )
        })
        .collect();
    assert_eq!(federated, [(0.5, 40), (0.75, 40)], "{rounds:?}");
    assert_eq!(h["final"]["federated"]["accuracy_max"], 0.75);
    python(&format!(
        "import numpy as np, ferry_sdk\nm = ferry_sdk.load_model('{}')\n\
             assert m['enc.weight'].dtype == np.float16 and int(m['steps']) == 5, m\n\
             assert np.allclose(m['enc.weight'].astype(float), 0.75, atol=1e-3), m\n\
             assert np.allclose(m['head.bias'], 0.5), m\n",
        good.join("run/model.safetensors").display()
    ));

    // A trainer that returns a tensor of the wrong shape is stopped in Python, naming it.
    let bad = tmp.path().join("bad");
    let wrong = NUMPY_TRAINER.replace(
        "    return ferry_sdk.TrainResult(",
        "    out['enc.weight'] = np.zeros((2, 3), np.float16)\n    return ferry_sdk.TrainResult(",
    );
    let out = simulate(&bad, &wrong, &initial, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("tensor 'enc.weight' has shape [2, 3], the model's is [4, 3]"),
        "{stderr}"
    );
}

const TORCH_MODEL: &str = r#"import torch
def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
"#;

/// Writes `net.py` (`TORCH_MODEL`) into `dir` and its initial model as `init.safetensors`;
/// returns that model's path and a maker of Python scripts that import torch, `net` and the
/// SDK's PyTorch front end before their `body`.
fn torch_net(dir: &Path) -> (PathBuf, impl Fn(&str) -> String) {
    fs::write(dir.join("net.py"), TORCH_MODEL).expect("model");
    let initial = dir.join("init.safetensors");
    let root = dir.display().to_string();
    let with_net = move |body: &str| {
        format!(
            "import sys; sys.path.insert(0, '{root}')\nimport torch, net\nfrom ferry_sdk import pytorch\n{body}"
        )
    };
    python(&with_net(&format!(
        "pytorch.save_initial_model(net.make(), '{}')",
        initial.display()
    )));
    (initial, with_net)
}

/// FedBN's pattern: the BatchNorm layer (`1.*`) is personal, so it stays on each node.
#[test]
fn a_pytorch_module_with_batchnorm_trains_through_the_sdk_and_loads_back_strictly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (initial, with_net) = torch_net(tmp.path());
    let trainer = with_net(
        "import ferry_sdk\n\
         module = net.make()\n\
         def train(module, task):\n\
         \x20   torch.manual_seed(task.seed)\n\
         \x20   x = torch.randn(64, 4); y = x[:, :3] * 2\n\
         \x20   opt = torch.optim.SGD(module.parameters(), lr=0.1)\n\
         \x20   for _ in range(20):\n\
         \x20       opt.zero_grad(); loss = ((module(x) - y) ** 2).mean(); loss.backward(); opt.step()\n\
         \x20   return (None, 64, {'train_loss': float(loss)})\n\
         pytorch.run(module, train)\n",
    );
    let out = simulate(tmp.path(), &trainer, &initial, &["--personal", "1.*"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h = history(&tmp.path().join("run")).expect("history.json");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert!(rounds.iter().all(|r| r["participants"] == 2), "{rounds:?}");
    assert!(
        rounds.iter().all(|r| r["accuracy"].is_null()),
        "no central test set"
    );
    // The trainer has no evaluate function: the nodes say so and the run goes on.
    assert!(
        rounds.iter().all(|r| r["federated"].is_null()),
        "{rounds:?}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("2 node(s) could not evaluate") && stdout.contains("no evaluate function"),
        "{stdout}"
    );
    python(&with_net(&format!(
        "m = pytorch.load_into(net.make(), '{}', strict=True)\n\
             start = net.make()\n\
             assert not torch.equal(m[0].weight, start[0].weight), 'trained'\n\
             assert int(m[1].num_batches_tracked) == 0, 'integer tensors are not averaged'\n\
             assert torch.equal(m[1].weight, start[1].weight), 'personal: never averaged'\n\
             from safetensors.torch import load_file\n\
             own = [load_file('{}/run/nodes/node-%d/personal.safetensors' % i) for i in (0, 1)]\n\
             assert set(own[0]) == {{'1.weight', '1.bias', '1.running_mean', '1.running_var', '1.num_batches_tracked'}}, own[0]\n\
             assert not torch.equal(own[0]['1.running_mean'], own[1]['1.running_mean']), 'each node its own'\n\
             assert not torch.equal(own[0]['1.running_mean'], start[1].running_mean), 'trained on the node'\n",
        tmp.path().join("run/model.safetensors").display(),
        tmp.path().display()
    )));
}

/// Frozen tensors travel down and never back: a PyTorch loop that trains every parameter it
/// is given leaves the frozen one alone (the SDK takes it out of the optimizer), the final
/// model holds it as it started, the updates are smaller by it, and a pattern that names no
/// tensor is refused at start.
#[test]
fn a_frozen_tensor_reaches_every_node_and_never_moves() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (initial, with_net) = torch_net(tmp.path());
    let trainer = with_net(
        "def train(module, task):\n\
         \x20   torch.manual_seed(task.seed)\n\
         \x20   x = torch.randn(64, 4); y = x[:, :3] * 2\n\
         \x20   opt = torch.optim.SGD(module.parameters(), lr=0.1)\n\
         \x20   for _ in range(5):\n\
         \x20       opt.zero_grad(); loss = ((module(x) - y) ** 2).mean(); loss.backward(); opt.step()\n\
         \x20   return (None, 64, {'train_loss': float(loss)})\n\
         pytorch.run(net.make(), train)\n",
    );
    let bytes_up = |dir: &Path, extra: &[&str]| -> u64 {
        let out = simulate(dir, &trainer, &initial, extra);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let h = history(&dir.join("run")).expect("history.json");
        h["rounds"][0]["bytes_up"].as_u64().expect("bytes_up")
    };
    let frozen_dir = tmp.path().join("frozen");
    let with_frozen = bytes_up(&frozen_dir, &["--frozen", "0.weight"]);
    let without = bytes_up(&tmp.path().join("plain"), &[]);
    // 0.weight is 3 x 4 float32 values, 48 bytes, in each of the round's two updates.
    assert!(
        without >= with_frozen + 2 * 48,
        "{without} bytes up without, {with_frozen} with 0.weight frozen"
    );
    python(&with_net(&format!(
        "m = pytorch.load_into(net.make(), '{}', strict=True)\n\
         start = net.make()\n\
         assert torch.equal(m[0].weight, start[0].weight), 'frozen: never moved'\n\
         assert not torch.equal(m[1].weight, start[1].weight), 'the rest trained'\n",
        frozen_dir.join("run/model.safetensors").display()
    )));
    let refused = simulate(
        &tmp.path().join("typo"),
        &trainer,
        &initial,
        &["--frozen", "0.wieght"],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("'0.wieght'"),
        "{stderr}"
    );
}

/// FedProx, FedNova and SCAFFOLD reach a PyTorch loop that knows none of them: the SDK adds
/// the proximal term or SCAFFOLD's correction to the gradients and counts the steps, and each
/// node keeps its control variate with Ferry, so every node's update is taken and each strategy
/// ends with its own model. The loop draws its data from NumPy's global generator (seeded from
/// the operating system when a process starts) and its dropout from PyTorch's without seeding
/// either: the SDK does, so each strategy run twice gives the same model.
#[test]
fn fedprox_fednova_and_scaffold_reach_a_pytorch_loop_that_knows_none_of_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fs::write(tmp.path().join("net.py"), TORCH_MODEL).expect("model");
    let initial = tmp.path().join("init.safetensors");
    let header = format!(
        "import sys; sys.path.insert(0, '{}')\nimport torch, net\nfrom ferry_sdk import pytorch\n",
        tmp.path().display()
    );
    python(&format!(
        "{header}pytorch.save_initial_model(net.make(), '{}')",
        initial.display()
    ));
    // Each site fits its own target, so that the strategies' corrections matter.
    let trainer = format!(
        "{header}import numpy as np\ndef train(module, task):\n\
         \x20   site = 1.0 if task.data_dir.endswith('1') else -1.0\n\
         \x20   x = torch.from_numpy(np.random.randn(64, 4)).float(); y = x[:, :3] * 2 + site\n\
         \x20   opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=task.momentum)\n\
         \x20   for _ in range(10 if site > 0 else 30):\n\
         \x20       opt.zero_grad(); out = torch.nn.functional.dropout(module(x), 0.2)\n\
         \x20       loss = ((out - y) ** 2).mean(); loss.backward(); opt.step()\n\
         \x20   return (None, 64, {{'train_loss': float(loss)}})\n\
         pytorch.run(net.make(), train)\n"
    );
    let mut models = Vec::new();
    for strategy in [
        &["--strategy", "fedavg"][..],
        &["--strategy", "fedprox", "--mu", "1.0"],
        &["--strategy", "fednova"],
        &["--strategy", "scaffold"],
    ] {
        let dir = tmp.path().join(strategy[1]);
        let again = tmp.path().join(format!("{}-again", strategy[1]));
        assert!(
            simulate(&again, &trainer, &initial, strategy)
                .status
                .success()
        );
        let out = simulate(&dir, &trainer, &initial, strategy);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{strategy:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let h = history(&dir.join("run")).expect("history.json");
        let rounds = h["rounds"].as_array().expect("rounds");
        assert!(
            rounds.iter().all(|r| r["participants"] == 2),
            "{strategy:?}: no node failed: {rounds:?}\n{stdout}"
        );
        let model = fs::read(dir.join("run/model.safetensors")).expect("model");
        assert!(
            model == fs::read(again.join("run/model.safetensors")).expect("model"),
            "{strategy:?}: the same run twice, the same model"
        );
        models.push(model);
    }
    assert_ne!(models[0], models[1], "FedProx is not FedAvg");
    assert_ne!(models[0], models[2], "FedNova is not FedAvg");
    assert_ne!(models[0], models[3], "SCAFFOLD is not FedAvg");
    // Each node kept its own control variate with Ferry, moved by its two rounds.
    let controls: Vec<Vec<u8>> = (0..2)
        .map(|i| {
            fs::read(tmp.path().join(format!(
                "scaffold/run/nodes/node-{i}/scaffold-control.safetensors"
            )))
            .expect("the node's control variate")
        })
        .collect();
    assert_ne!(controls[0], controls[1]);
}

/// `examples/numpy`'s sites in `dir` (`nodes` folders under `data/`, `per_node` training and
/// `test_per_node` held-out Fashion-MNIST rows each) and its initial model,
/// `init.safetensors`; returns the example's folder.
fn numpy_sites(dir: &Path, nodes: u32, per_node: u32, test_per_node: u32) -> PathBuf {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/numpy");
    let script = |file: &str, args: &[&str]| {
        support::run_sdk_script(&example.join(file), args, Some(dir));
    };
    let (nodes, per_node, test) = (
        nodes.to_string(),
        per_node.to_string(),
        test_per_node.to_string(),
    );
    script(
        "make_sites.py",
        &[
            "--nodes",
            &nodes,
            "--per-node",
            &per_node,
            "--test-per-node",
            &test,
        ],
    );
    script("init_model.py", &["init.safetensors"]);
    example
}

/// `ferry simulate` in `dir` of `numpy_sites`' sites with the example's trainer in long-lived
/// mode from `init.safetensors`, at learning rate 0.02, with `extra` options.
fn numpy_simulate(dir: &Path, example: &Path, extra: &[&str]) -> Output {
    support::ferry()
        .current_dir(dir)
        .env("PYTHONPATH", sdk_path())
        .args(["simulate", "--trainer-cmd"])
        .arg(format!(
            "{} {}",
            python3(),
            example.join("train.py").display()
        ))
        .args([
            "--trainer-mode",
            "long-lived",
            "--node-data",
            "data/*",
            "--initial-model",
            "init.safetensors",
            "--lr",
            "0.02",
        ])
        .args(extra)
        .output()
        .expect("simulate runs")
}

/// The NumPy example's trainer served by a pool of 1 and of 2 processes, and by a process per
/// node: the same model each time (which process serves which node changes nothing), and the
/// pool's processes are as many as asked.
#[test]
fn the_worker_count_never_changes_the_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let example = numpy_sites(tmp.path(), 4, 300, 100);
    let model = |workers: &str| -> (Vec<u8>, String) {
        let out = format!("run-{workers}");
        let done = numpy_simulate(
            tmp.path(),
            &example,
            &["--trainer-workers", workers, "--rounds", "2", "--out", &out],
        );
        let stdout = String::from_utf8_lossy(&done.stdout).to_string();
        assert!(
            done.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&done.stderr)
        );
        let bytes = fs::read(tmp.path().join(&out).join("model.safetensors")).expect("model");
        (bytes, stdout)
    };
    let (one, said) = model("1");
    assert!(
        said.contains("1 long-lived process(es) serving every node"),
        "{said}"
    );
    let (two, _) = model("2");
    let (per_node, said) = model("per-node");
    assert!(said.contains("a long-lived process per node"), "{said}");
    assert!(one == two && two == per_node, "the models differ");
}

/// Prints, as JSON, each site model's accuracy (`run/cross-site/<i>.safetensors`) on each
/// site's `data/*/test.csv`, in folder order, computed with NumPy alone.
const RESCORE: &str = "\
import glob, json, numpy as np
from ferry_sdk.tensors import load_model
sites = sorted(glob.glob('data/*'))
out = {}
for own in range(len(sites)):
    m = load_model(f'run/cross-site/{own}.safetensors')
    w = next(t for t in m.values() if t.ndim == 2).astype(np.float64)
    b = next(t for t in m.values() if t.ndim == 1).astype(np.float64)
    cells = []
    for site in sites:
        rows = np.loadtxt(site + '/test.csv', delimiter=',', ndmin=2)
        x = rows[:, 1:] / 255.0 if rows[:, 1:].max() > 1 else rows[:, 1:]
        cells.append(float(((x @ w + b).argmax(axis=1) == rows[:, 0]).mean()))
    out[str(own)] = cells
print(json.dumps(out))
";

/// `examples/numpy` as its README runs it: CSV sites made from Fashion-MNIST, a zero softmax
/// regression, and the SDK trainer simulated as every site, whose federated accuracy rises.
#[test]
fn the_numpy_example_learns_and_its_sites_evaluate_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let example = numpy_sites(tmp.path(), 3, 600, 200);
    let out = numpy_simulate(
        tmp.path(),
        &example,
        &["--rounds", "3", "--cross-site", "local", "--out", "run"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h = history(&tmp.path().join("run")).expect("history.json");
    let federated: Vec<f64> = h["rounds"]
        .as_array()
        .expect("rounds")
        .iter()
        .map(|r| {
            assert_eq!(r["federated"]["num_examples"], 600, "{r}");
            r["federated"]["accuracy"].as_f64().expect("accuracy")
        })
        .collect();
    assert!(
        federated[2] > federated[0] && federated[2] > 0.6,
        "{federated:?}"
    );
    // The cross-site matrix of a model of the user's own: every site fine-tunes the final
    // model with the SDK's train, and the SDK's evaluate scores every model on every site.
    let matrix = &h["final"]["cross_site"];
    assert_eq!(
        matrix["examples"],
        serde_json::json!([200, 200, 200]),
        "{matrix}"
    );
    let rows = matrix["rows"].as_array().expect("rows");
    let models: Vec<&str> = rows
        .iter()
        .map(|r| r["model"].as_str().expect("model"))
        .collect();
    assert_eq!(
        models,
        ["global", "local:0", "local:1", "local:2"],
        "{matrix}"
    );
    // Each site model's cells, scored again here in NumPy from the saved model and the site's
    // test.csv, without Ferry.
    let rescored: serde_json::Value = serde_json::from_str(&support::python(
        &["-c".as_ref(), RESCORE.as_ref()],
        Some(tmp.path()),
        &[("PYTHONPATH", &sdk_path())],
    ))
    .expect("the rescoring's JSON");
    for row in &rows[1..] {
        let own = row["model"]
            .as_str()
            .expect("model")
            .trim_start_matches("local:");
        for (site, cell) in row["accuracy"]
            .as_array()
            .expect("cells")
            .iter()
            .enumerate()
        {
            let again = rescored[own][site].as_f64().expect("rescored");
            let cell = cell.as_f64().expect("scored");
            assert!(
                (cell - again).abs() < 1e-9,
                "local:{own} on site {site}: {cell} vs {again}"
            );
        }
    }
    for (site, cell) in matrix["sites"]
        .as_array()
        .expect("sites")
        .iter()
        .zip(rows[0]["accuracy"].as_array().expect("cells"))
    {
        let site = site.as_str().expect("site");
        assert_eq!(
            cell, &h["final"]["federated"]["node_accuracy"][site],
            "{site}"
        );
    }
    // Computed on demand, the matrix is the final evaluation's again.
    let run = tmp.path().join("run");
    support::run_ok(&["cross-site", run.to_str().expect("utf-8")]);
    assert_eq!(
        &history(&run).expect("history.json")["final"]["cross_site"],
        matrix
    );
}

/// SCAFFOLD deployed with the user's own NumPy loop: every round takes both nodes' updates with
/// their control changes, and each node keeps its own control variate in its state folder.
#[test]
fn a_deployed_scaffold_run_reaches_a_numpy_loop_through_the_sdk() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let trainer = format!(
        "import sys; sys.path.insert(0, '{}')\n\
         import numpy as np, ferry_sdk\n\
         SITE = int(sys.argv[1])\n\
         def train(model, task):\n\
         \x20   w = model['w'].astype(np.float64)\n\
         \x20   for _ in range(3 + 5 * SITE):\n\
         \x20       grads = task.local.gradients({{'w': w - (2 * SITE - 1)}}, {{'w': w}})\n\
         \x20       w = w - task.lr * grads['w']\n\
         \x20   return ferry_sdk.TrainResult({{'w': w.astype(np.float32)}}, num_examples=10)\n\
         ferry_sdk.run(train)\n",
        sdk_path().display()
    );
    let (server, trainer) = support::own_model_server(
        dir,
        "numpy",
        "{'w': np.zeros(4, np.float32)}",
        &trainer,
        "clients = 2\nmin_clients = 2\nrounds = 3\nlr = 0.1\nstrategy = \"scaffold\"\n\
         evaluate_every = 0\nround_timeout = 60\n",
    );
    let (mut processes, logs) =
        support::python_trainer_fleet(&server, dir, 2, &trainer, |i| i.to_string());
    support::server_succeeds(&mut processes, &logs, std::time::Duration::from_secs(120));
    let h = history(&server.out).expect("history.json");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 3);
    assert!(rounds.iter().all(|r| r["participants"] == 2), "{rounds:?}");
    let controls: Vec<Vec<u8>> = (0..2)
        .map(|i| {
            fs::read(dir.join(format!("node-site-{i}/exec/scaffold-control.safetensors")))
                .expect("the node's control variate")
        })
        .collect();
    assert_ne!(controls[0], controls[1], "each node its own");
}
