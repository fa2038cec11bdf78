"""Simulations started from Python: ``ferry simulate`` runs the federation while every virtual
node's tasks come back to functions of the calling process. Needs the ``ferry`` binary the
README's test command builds first (``target/release/ferry``, or under ``$CARGO_TARGET_DIR``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ferry_sdk
from ferry_sdk import pytorch

ROOT = Path(__file__).resolve().parents[3]
FERRY = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target") / "release" / "ferry"


@pytest.fixture
def ferry():
    assert FERRY.is_file(), f"{FERRY} is missing: build it first (cargo build --release)"
    return str(FERRY)


@pytest.fixture
def sites(tmp_path):
    """Two node folders and a three-weight initial model."""
    for name in ("site-0", "site-1"):
        (tmp_path / "nodes" / name).mkdir(parents=True)
    ferry_sdk.save_model({"w": np.zeros(3, np.float32)}, str(tmp_path / "init.safetensors"))
    return tmp_path


def test_the_callers_functions_train_every_virtual_node_and_the_history_comes_back(sites, ferry):
    seen = []
    printed = []

    def train(model, task):
        seen.append(os.path.basename(task.data_dir))
        return ferry_sdk.TrainResult({"w": model["w"] + 1}, num_examples=5)

    def evaluate(model, task):
        return ferry_sdk.EvaluateResult(10, loss=0.1, accuracy=float(model["w"][0]) / 4)

    result = ferry_sdk.simulate(
        train, evaluate, node_data=str(sites / "nodes" / "*"),
        initial_model=str(sites / "init.safetensors"), rounds=2, out=str(sites / "run"),
        ferry=ferry, echo=printed.append, seed=5,
    )
    # The functions ran here, in this process: two nodes, two rounds.
    assert sorted(seen) == ["site-0", "site-0", "site-1", "site-1"]
    assert [r["participants"] for r in result.rounds] == [2, 2]
    assert result.federated_accuracy == [0.25, 0.5]
    assert result.history["config"]["seed"] == 5
    assert np.allclose(ferry_sdk.load_model(result.model_path)["w"], 2.0)
    assert any(line.startswith("round   2/2") for line in printed), printed


def test_a_run_ferry_refuses_raises_with_ferrys_message(sites, ferry):
    with pytest.raises(ferry_sdk.FerryError, match="unknown strategy 'nonsense'"):
        ferry_sdk.simulate(
            lambda model, task: (model, 1), node_data=str(sites / "nodes" / "*"),
            initial_model=str(sites / "init.safetensors"), strategy="nonsense", ferry=ferry,
            echo=lambda line: None,
        )


def test_a_pytorch_module_is_simulated_from_python(sites, ferry):
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    pytorch.save_initial_model(net, str(sites / "torch.safetensors"))

    def train(module, task):
        x = torch.randn(16, 2)
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            ((module(x) - x.sum(1, keepdim=True)) ** 2).mean().backward()
            opt.step()
        return None, 16, {}

    result = pytorch.simulate(
        torch.nn.Linear(2, 1), train, node_data=str(sites / "nodes" / "*"),
        initial_model=str(sites / "torch.safetensors"), rounds=2, ferry=ferry,
        echo=lambda line: None,
    )
    trained = pytorch.load_into(torch.nn.Linear(2, 1), result.model_path)
    assert not torch.equal(trained.weight, net.weight)


def test_a_simulation_runs_from_python_dash_c_as_from_a_notebook(sites, ferry):
    code = (
        "import numpy as np, ferry_sdk\n"
        "r = ferry_sdk.simulate(lambda m, t: ({'w': m['w'] - 1}, 3), node_data='nodes/*', "
        f"initial_model='init.safetensors', rounds=1, ferry={ferry!r})\n"
        "print('final weight', float(ferry_sdk.load_model(r.model_path)['w'][0]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "sdk" / "python"))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=sites, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "round   1/1" in out.stdout and "final weight -1.0" in out.stdout, out.stdout
