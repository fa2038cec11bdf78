"""The ``ferry`` wheel as a new Python user gets it: built with maturin, installed into a fresh
virtual environment (no system packages, no package index: its numpy and safetensors come
from the wheelhouse ``scripts/install-deps.sh`` fills), where ``ferry`` is on the
environment's ``bin`` and ``import ferry_sdk`` works; then the NumPy example's simulation runs
through it, from the shell and from ``ferry_sdk.simulate``. Needs what
``scripts/install-deps.sh`` installs (maturin, the wheelhouse, Fashion-MNIST)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
VENV = ROOT / ".venv"
WHEELHOUSE = VENV / "wheelhouse"
EXAMPLE = ROOT / "examples" / "numpy"


def run(args, cwd=None, env=None, timeout=900) -> str:
    """Runs ``args``; fails the test with its output if it fails; returns its stdout."""
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A fresh virtual environment with only the built wheel (and its dependencies) installed."""
    maturin = VENV / "bin" / "maturin"
    assert maturin.is_file(), f"{maturin} is missing: run scripts/install-deps.sh first"
    assert list(WHEELHOUSE.glob("numpy-*.whl")), f"{WHEELHOUSE} lacks numpy: run scripts/install-deps.sh"
    root = tmp_path_factory.mktemp("wheel")
    run([maturin, "build", "--release", "--locked", "--offline", "--out", root / "dist"], cwd=ROOT / "sdk" / "python")
    wheels = list((root / "dist").glob("ferry-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = root / "env"
    run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", env_dir])
    python = env_dir / "bin" / "python"
    run([python, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", WHEELHOUSE, wheels[0]])
    return env_dir


def user_env(env_dir: Path) -> dict:
    """The environment of a user of ``env_dir``: its ``bin`` first on PATH, and nothing of this
    checkout's (no PYTHONPATH to the SDK's folder, no target/ on PATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FERRY_BIN", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}:/usr/bin:/bin"
    return env


def test_the_wheel_puts_ferry_on_the_environments_path_and_the_sdk_in_it(fresh):
    env = user_env(fresh)
    assert (fresh / "bin" / "ferry").is_file()
    assert "ferry" in run(["ferry", "--version"], env=env)
    where = run([fresh / "bin" / "python", "-c", "import ferry_sdk; print(ferry_sdk.__file__)"], env=env, cwd=fresh)
    assert where.startswith(str(fresh)), where


def test_the_numpy_example_runs_through_the_installed_wheel(fresh, tmp_path):
    env = user_env(fresh)
    python = fresh / "bin" / "python"
    run([python, EXAMPLE / "make_sites.py", "--nodes", "3", "--per-node", "600", "--test-per-node", "200", "--out", "data"], cwd=tmp_path, env=env)
    run([python, EXAMPLE / "init_model.py", "init.safetensors"], cwd=tmp_path, env=env)
    run(
        ["ferry", "simulate", "--trainer-cmd", f"{python} {EXAMPLE / 'train.py'}", "--trainer-mode", "long-lived",
         "--node-data", "data/*", "--initial-model", "init.safetensors", "--rounds", "3", "--lr", "0.02", "--out", "run"],
        cwd=tmp_path, env=env,
    )
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    federated = [r["federated"]["accuracy"] for r in history["rounds"]]
    assert len(federated) == 3 and federated[-1] > 0.6, federated
    # The same loop from Python, as a notebook would call it (no script file), with the
    # environment's bin off PATH: ferry is found beside the environment's Python.
    # train.py calls ferry_sdk.run at import; load its functions without running it.
    source = (EXAMPLE / "train.py").read_text().replace("ferry_sdk.run(train, evaluate)", "")
    (tmp_path / "loop.py").write_text(source)
    script = (
        "import ferry_sdk, loop\n"
        "r = ferry_sdk.simulate(loop.train, loop.evaluate, node_data='data/*', "
        "initial_model='init.safetensors', rounds=2, lr=0.02, out='from-python')\n"
        "print(r.federated_accuracy[-1])\n"
    )
    env_off_path = dict(env, PATH="/usr/bin:/bin")
    accuracy = float(run([python, "-c", script], cwd=tmp_path, env=env_off_path).strip().splitlines()[-1])
    assert accuracy > 0.6, accuracy
