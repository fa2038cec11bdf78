"""What the SDK's tests share: a round's task files in a temporary folder, and the SDK's
``run`` driven in either of Ferry's trainer modes within the test's own process."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

# The SDK is tested from its folder, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ferry_sdk  # noqa: E402


def numpy_model() -> dict:
    """A model with float tensors of three dtypes, a 0-d tensor and an integer counter."""
    return {
        "enc.weight": np.arange(12, dtype=np.float32).reshape(4, 3) / 10,
        "enc.half": np.ones((2, 2), dtype=np.float16),
        "head.bias": np.array([-1.0, 0.0, 1.0]),
        "scale": np.array(2.0, dtype=np.float32),
        "steps": np.array(5, dtype=np.int64),
    }


class Round:
    """One task's files, as a node writes them before it starts the trainer."""

    def __init__(self, folder: Path, model: dict, kind: str = "train", round: int = 1):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.model_in = folder / "model_in.safetensors"
        self.model_out = folder / "model_out.safetensors"
        self.result_out = folder / "result.json"
        ferry_sdk.save_model(model, str(self.model_in))
        self.task = {
            "kind": kind,
            "round": round,
            "epochs": 1,
            "batch_size": 32,
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 0.0,
            "seed": 7,
            "procedure": "local_sgd",
            "mu": 0.0,
            "data_dir": str(folder / "data"),
            "model_in": str(self.model_in),
            "model_out": str(self.model_out),
            "result_out": str(self.result_out),
            "a_key_from_a_newer_ferry": True,
        }
        self.task_file = folder / "task.json"
        self.task_file.write_text(json.dumps(self.task))

    def result(self) -> dict:
        return json.loads(self.result_out.read_text())

    def trained(self) -> dict:
        return ferry_sdk.load_model(str(self.model_out))


@pytest.fixture
def make_round(tmp_path):
    """Builds a ``Round`` in its own folder under the test's temporary folder."""
    counter = iter(range(1000))

    def make(model=None, kind="train", round=1) -> Round:
        return Round(tmp_path / f"task-{next(counter)}", numpy_model() if model is None else model, kind, round)

    return make


@pytest.fixture
def per_round(monkeypatch):
    """Runs ``run(*args)`` as Ferry's per-round mode does: the task file is the program's last
    argument."""

    def serve(run, *args, task: Round, **kwargs) -> None:
        monkeypatch.delenv("FERRY_TRAINER", raising=False)
        monkeypatch.setattr(sys, "argv", ["trainer.py", str(task.task_file)])
        run(*args, **kwargs)

    return serve


@pytest.fixture
def long_lived(monkeypatch, capsys):
    """Runs ``run(*args)`` as Ferry's long-lived mode does: one task per stdin line; returns
    the answer lines the trainer printed, one per task."""

    def serve(run, *args, tasks, **kwargs) -> list:
        monkeypatch.setenv("FERRY_TRAINER", "long-lived")
        lines = "".join(json.dumps(t.task) + "\n" for t in tasks)
        monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
        run(*args, **kwargs)
        printed = capsys.readouterr().out.splitlines()
        return [json.loads(line) for line in printed if line.startswith("{")]

    return serve
