"""Ferry's trainer protocol (docs/exec-trainer.md): one task per process (the task file's path
as the last argument), or, with ``FERRY_TRAINER=long-lived``, one task per stdin line and one
answer line per task on stdout."""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Union

from .tensors import FerryError, Model, check_trained, load_model, save_model


@dataclass(frozen=True)
class Task:
    """One round's training task, as the server sets it."""

    round: int
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    seed: int
    procedure: str
    mu: float
    data_dir: Optional[str]

    @classmethod
    def from_json(cls, task: dict) -> "Task":
        """The task of a ``task.json`` object."""
        return cls(**{name: task.get(name) for name in cls.__dataclass_fields__})


@dataclass
class TrainResult:
    """What ``train`` returns: the trained model, the examples behind it (its FedAvg weight),
    and metrics to report (``train_loss``; FedNova's ``steps``)."""

    model: Model
    num_examples: int
    metrics: Dict[str, float] = field(default_factory=dict)


TrainFn = Callable[[Model, "Task"], Union["TrainResult", tuple]]


def _result(returned: Union[TrainResult, tuple]) -> TrainResult:
    if isinstance(returned, TrainResult):
        return returned
    if isinstance(returned, tuple) and len(returned) in (2, 3):
        return TrainResult(*returned)
    raise FerryError("train must return TrainResult(model, num_examples, metrics)")


def write_result(task_json: dict, result: TrainResult) -> None:
    """Checks ``result``'s count and metrics and writes ``result.json`` where the task says."""
    if not (isinstance(result.num_examples, int) and result.num_examples >= 1):
        raise FerryError(f"num_examples must be an integer >= 1, got {result.num_examples!r}")
    for key, value in result.metrics.items():
        if not isinstance(value, (int, float)):
            raise FerryError(f"metric '{key}' must be a number, got {type(value).__name__}")
    with open(task_json["result_out"], "w") as out:
        json.dump({"num_examples": result.num_examples, "metrics": dict(result.metrics)}, out)


def serve_task(train: TrainFn, task_json: dict) -> None:
    """Runs ``train`` on one task over numpy arrays and writes the trained model and result
    where the task says, after checking them."""
    global_model = load_model(task_json["model_in"])
    copy = {name: array.copy() for name, array in global_model.items()}
    result = _result(train(copy, Task.from_json(task_json)))
    trained = check_trained(global_model, result.model)
    write_result(task_json, result)
    save_model(trained, task_json["model_out"])


def run(train: TrainFn, serve: Callable[[TrainFn, dict], None] = serve_task) -> None:
    """Serves Ferry's trainer protocol with ``train`` until Ferry stops the program; ``serve``
    handles one task (the numpy one by default)."""
    if os.environ.get("FERRY_TRAINER") != "long-lived":
        with open(sys.argv[-1]) as f:
            serve(train, json.load(f))
        return
    for line in sys.stdin:
        try:
            serve(train, json.loads(line))
            answer = {"ferry": "done"}
        except Exception as error:  # reported as this node's failure for the round
            traceback.print_exc()
            answer = {"ferry": "error", "message": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer), flush=True)
