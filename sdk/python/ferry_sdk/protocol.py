"""Ferry's trainer protocol (docs/exec-trainer.md): one task per process (the task file's path
as the last argument), or, with ``FERRY_TRAINER=long-lived``, one task per stdin line and one
answer line per task on stdout."""

from __future__ import annotations

import json
import math
import os
import random
import sys
import traceback
from dataclasses import MISSING, dataclass, field, replace
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np

from .procedure import LocalProcedure, check_applied
from .tensors import FerryError, Model, check_trained, load_model, save_model


class _FromTaskJson:
    """Builds a task dataclass from the keys of a ``task.json`` object it declares."""

    @classmethod
    def from_json(cls, task: dict):
        """The task of a ``task.json`` object (keys the class does not declare are ignored)."""
        return cls(
            **{
                name: task.get(name, None if declared.default is MISSING else declared.default)
                for name, declared in cls.__dataclass_fields__.items()
                if declared.metadata.get("from_json", True)
            }
        )


@dataclass(frozen=True)
class Task(_FromTaskJson):
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
    #: A folder that outlives this process and the node agent for this task: save
    #: checkpoints there and resume from them when the task is started again.
    checkpoint_dir: Optional[str] = None
    #: SCAFFOLD only: a model file of the correction ``c - c_i`` that the SDK adds to every
    #: local gradient (Ferry keeps the node's ``c_i``).
    correction_in: Optional[str] = None
    #: The model's frozen tensors, by name (the run's ``frozen`` patterns): leave them out of
    #: the optimizer and return them unchanged, or Ferry refuses the update. The PyTorch front
    #: end does this itself (their ``requires_grad`` is off while ``train`` runs).
    frozen: Tuple[str, ...] = ()
    #: The strategy's local procedure for a NumPy loop (FedProx's term, FedNova's steps): pass
    #: each step's gradients through ``task.local.gradients(grads, model)``.
    local: Optional[LocalProcedure] = field(
        default=None, compare=False, repr=False, metadata={"from_json": False}
    )


@dataclass(frozen=True)
class EvaluateTask(_FromTaskJson):
    """A federated evaluation: score the round's global model on the node's held-out data."""

    round: int
    seed: int
    data_dir: Optional[str]


@dataclass
class EvaluateResult:
    """What ``evaluate`` returns: the held-out examples scored (the node's weight in the
    federated result), their mean loss, the share predicted correctly, and any further named
    figures."""

    num_examples: int
    loss: float
    accuracy: float
    metrics: Dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What ``train`` returns: the trained model, the examples behind it (its FedAvg weight),
    and metrics to report (``train_loss``; FedNova's ``steps``)."""

    model: Model
    num_examples: int
    metrics: Dict[str, float] = field(default_factory=dict)


TrainFn = Callable[[Model, "Task"], Union["TrainResult", tuple]]
EvaluateFn = Callable[[Model, "EvaluateTask"], Union["EvaluateResult", tuple]]


def _result(returned: Union[TrainResult, tuple]) -> TrainResult:
    if isinstance(returned, TrainResult):
        return returned
    if isinstance(returned, tuple) and len(returned) in (2, 3):
        return TrainResult(*returned)
    raise FerryError("train must return TrainResult(model, num_examples, metrics)")


def _evaluation(returned: Union[EvaluateResult, tuple]) -> EvaluateResult:
    if isinstance(returned, EvaluateResult):
        return returned
    if isinstance(returned, tuple) and len(returned) in (3, 4):
        return EvaluateResult(*returned)
    raise FerryError("evaluate must return EvaluateResult(num_examples, loss, accuracy, metrics)")


def _check_examples(num_examples: int) -> None:
    if not (isinstance(num_examples, int) and num_examples >= 1):
        raise FerryError(f"num_examples must be an integer >= 1, got {num_examples!r}")


def _check_metrics(metrics: Dict[str, float]) -> None:
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FerryError(f"metric '{key}' must be a finite number, got {value!r}")


def write_evaluation(task_json: dict, result: EvaluateResult) -> None:
    """Checks an evaluation's figures and writes them where the task says."""
    _check_examples(result.num_examples)
    loss, accuracy = float(result.loss), float(result.accuracy)
    if not math.isfinite(loss):
        raise FerryError(f"loss must be a finite number, got {result.loss!r}")
    if not 0.0 <= accuracy <= 1.0:
        raise FerryError(f"accuracy must be a share in [0, 1], got {result.accuracy!r}")
    _check_metrics(result.metrics)
    figures = {
        "num_examples": result.num_examples,
        "loss": loss,
        "accuracy": accuracy,
        "metrics": {key: float(value) for key, value in result.metrics.items()},
    }
    with open(task_json["result_out"], "w") as out:
        json.dump(figures, out)


def write_result(task_json: dict, result: TrainResult) -> None:
    """Checks ``result``'s count and metrics and writes ``result.json`` where the task says."""
    _check_examples(result.num_examples)
    _check_metrics(result.metrics)
    with open(task_json["result_out"], "w") as out:
        json.dump({"num_examples": result.num_examples, "metrics": dict(result.metrics)}, out)


def serve_task(train: TrainFn, task_json: dict) -> None:
    """Runs ``train`` on one task over numpy arrays and writes the trained model and result
    where the task says, after checking them."""
    global_model = load_model(task_json["model_in"])
    copy = {name: array.copy() for name, array in global_model.items()}
    task = Task.from_json(task_json)
    correction = load_model(task.correction_in) if task.correction_in else None
    local = LocalProcedure(task.procedure, task.mu, global_model, correction)
    result = _result(train(copy, replace(task, local=local)))
    check_applied(
        task.procedure,
        task.mu,
        local.steps,
        result.metrics,
        "pass each step's gradients through task.local.gradients(grads, model)",
    )
    trained = check_trained(global_model, result.model)
    write_result(task_json, result)
    save_model(trained, task_json["model_out"])


def serve_evaluation_task(evaluate: EvaluateFn, task_json: dict) -> None:
    """Runs ``evaluate`` on the global model as numpy arrays and writes its checked figures."""
    model = load_model(task_json["model_in"])
    write_evaluation(task_json, _evaluation(evaluate(model, EvaluateTask.from_json(task_json))))


def seed_generators(seed: int) -> None:
    """Seeds Python's ``random``, NumPy's global generator and, when PyTorch is loaded,
    PyTorch's (CPU and GPUs) from a task's ``seed``, so that a run repeats bit for bit: dropout,
    shuffles and augmentations that draw from these generators draw the same numbers for the
    same task."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


@dataclass
class Served:
    """The user's functions and how each of Ferry's tasks reaches them: training tasks go to
    ``train``, federated-evaluation tasks to ``evaluate`` (a node without it reports that it
    cannot evaluate), each through ``serve`` or ``serve_evaluation`` (the numpy ones by
    default), the generators seeded from the task's seed first unless ``seed`` is off."""

    train: TrainFn
    evaluate: Optional[EvaluateFn] = None
    serve: Callable[[TrainFn, dict], None] = serve_task
    serve_evaluation: Callable[[EvaluateFn, dict], None] = serve_evaluation_task
    seed: bool = True

    def handle(self, task_json: dict) -> None:
        """Does one task; raises what went wrong."""
        if self.seed and task_json.get("seed") is not None:
            seed_generators(int(task_json["seed"]))
        if task_json.get("kind", "train") != "evaluate":
            self.serve(self.train, task_json)
        elif self.evaluate is None:
            raise FerryError(
                "Ferry asked this node to evaluate the global model, but the trainer has no "
                "evaluate function; pass one: run(train, evaluate)"
            )
        else:
            self.serve_evaluation(self.evaluate, task_json)

    def answer(self, line: str) -> dict:
        """Does the task of one long-lived protocol line; the answer line's object (a failure
        is reported as this node's for the round, its traceback printed to stderr)."""
        try:
            self.handle(json.loads(line))
            return {"ferry": "done"}
        except Exception as error:
            traceback.print_exc()
            return {"ferry": "error", "message": f"{type(error).__name__}: {error}"}


def run(
    train: TrainFn,
    evaluate: Optional[EvaluateFn] = None,
    *,
    serve: Callable[[TrainFn, dict], None] = serve_task,
    serve_evaluation: Callable[[EvaluateFn, dict], None] = serve_evaluation_task,
    seed: bool = True,
) -> None:
    """Serves Ferry's trainer protocol until Ferry stops the program: training tasks go to
    ``train``, federated-evaluation tasks to ``evaluate`` (a node without it reports that it
    cannot evaluate). ``serve`` and ``serve_evaluation`` handle one task each (the numpy ones
    by default). Before each task, the generators are seeded from the task's seed
    (:func:`seed_generators`); pass ``seed=False`` to seed them yourself."""
    serve_tasks(Served(train, evaluate, serve, serve_evaluation, seed))


def serve_tasks(served: Served) -> None:
    """Serves Ferry's trainer protocol with ``served`` until Ferry stops the program: the one
    task of a per-round process (its file is the last argument), or one task per stdin line in
    long-lived mode, each answered with one line."""
    if os.environ.get("FERRY_TRAINER") != "long-lived":
        with open(sys.argv[-1]) as f:
            served.handle(json.load(f))
        return
    for line in sys.stdin:
        print(json.dumps(served.answer(line)), flush=True)
