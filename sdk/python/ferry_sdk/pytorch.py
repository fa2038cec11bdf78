"""PyTorch: train an ``nn.Module`` directly, and move state dicts in and out of Ferry's model
files. Needs ``torch`` and ``safetensors``; bf16 tensors work here (numpy has no bf16)."""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import Checkpoint
from .procedure import HookedSteps, check_applied
from .simulation import Simulation, simulate_served
from .protocol import (
    EvaluateResult,
    EvaluateTask,
    Served,
    Task,
    TrainResult,
    _evaluation,
    _result,
    serve_tasks,
    write_evaluation,
    write_result,
)
from .tensors import FerryError

TorchTrainFn = Callable[[torch.nn.Module, Task], Union[TrainResult, tuple]]
TorchEvaluateFn = Callable[[torch.nn.Module, EvaluateTask], Union[EvaluateResult, tuple]]


def save_initial_model(model: Union[torch.nn.Module, Mapping[str, torch.Tensor]], path: str) -> None:
    """Writes a module's ``state_dict`` (or a state dict) as the run's initial model file."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    save_file({name: t.detach().cpu().contiguous() for name, t in state.items()}, path)


def load_into(module: torch.nn.Module, path: str, strict: bool = True) -> torch.nn.Module:
    """Loads a Ferry model file (a run's ``model.safetensors``) into ``module``; with
    ``strict=True`` every key must match."""
    module.load_state_dict(load_file(path), strict=strict)
    return module


def check_state(global_state: Dict[str, torch.Tensor], trained: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The trained state to write: every floating-point tensor of the global model with the
    same shape and dtype, finite; integer tensors are the global model's. Raises
    :class:`FerryError` naming the tensor at fault."""
    out = {}
    for name, reference in global_state.items():
        if not reference.is_floating_point():
            out[name] = reference
            continue
        if name not in trained:
            raise FerryError(f"the trained model lacks tensor '{name}' {list(reference.shape)}")
        tensor = trained[name].detach().cpu()
        if tensor.shape != reference.shape:
            raise FerryError(
                f"tensor '{name}' has shape {list(tensor.shape)}, the model's is {list(reference.shape)}"
            )
        if tensor.dtype != reference.dtype:
            raise FerryError(f"tensor '{name}' has dtype {tensor.dtype}, the model's is {reference.dtype}")
        if not torch.isfinite(tensor).all():
            raise FerryError(f"tensor '{name}' holds NaN or infinity")
        out[name] = tensor.contiguous()
    unknown = sorted(set(trained) - set(global_state))
    if unknown:
        raise FerryError(f"the trained model has tensors the global model lacks: {unknown}")
    return out


def _freeze(module: torch.nn.Module, names) -> list:
    """Turns off ``requires_grad`` of the module's parameters named in ``names`` (the task's
    frozen tensors) that had it on, so no optimizer moves them; returns those parameters, to
    turn it on again after the task. A frozen tensor that is a buffer has no gradient anyway."""
    wanted = set(names or ())
    frozen = [p for name, p in module.named_parameters() if name in wanted and p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return frozen


def _served(module: torch.nn.Module, train: TorchTrainFn, evaluate: Optional[TorchEvaluateFn], seed: bool) -> Served:
    """How tasks reach ``train`` and ``evaluate`` working on ``module`` (see :func:`run`)."""

    def serve(train_fn: TorchTrainFn, task_json: dict) -> None:
        global_state = load_file(task_json["model_in"])
        module.load_state_dict(global_state, strict=True)
        task = Task.from_json(task_json)
        correction = load_file(task.correction_in) if task.correction_in else None
        hooks = HookedSteps(module, task.procedure, task.mu, correction)
        frozen = _freeze(module, task.frozen)
        try:
            result = _result(train_fn(module, task))
        finally:
            hooks.remove()
            for parameter in frozen:
                parameter.requires_grad_(True)
        check_applied(
            task.procedure,
            task.mu,
            hooks.steps,
            result.metrics,
            "train the module passed to train (no backward pass through it was seen)",
        )
        trained = check_state(global_state, module.state_dict())
        write_result(task_json, result)
        save_file(trained, task_json["model_out"])

    def score(evaluate_fn: TorchEvaluateFn, task_json: dict) -> None:
        module.load_state_dict(load_file(task_json["model_in"]), strict=True)
        with torch.no_grad():
            result = _evaluation(evaluate_fn(module, EvaluateTask.from_json(task_json)))
        write_evaluation(task_json, result)

    return Served(train, evaluate, serve, score, seed)


def run(
    module: torch.nn.Module,
    train: TorchTrainFn,
    evaluate: Optional[TorchEvaluateFn] = None,
    *,
    seed: bool = True,
) -> None:
    """Serves Ferry's trainer protocol: each round, the global model is loaded into ``module``
    (``strict=True``), ``train(module, task)`` trains it in place and returns
    ``TrainResult(model=None, num_examples, metrics)`` (or ``(None, n, metrics)``), and the
    module's checked ``state_dict`` is written back. For a federated evaluation the global
    model is loaded the same way and ``evaluate(module, task)`` scores it (under
    ``torch.no_grad()``), returning ``EvaluateResult(num_examples, loss, accuracy, metrics)``.
    The strategy's local procedure needs nothing from ``train``: under FedProx, gradient hooks
    add ``mu * (w - w_global)`` to every trainable parameter's gradient, under SCAFFOLD the
    correction ``c - c_i``, and the backward passes through the module are counted as FedNova's
    and SCAFFOLD's ``steps`` (unless ``train`` reports its own). Before each task, Python's,
    NumPy's and PyTorch's generators are seeded from the task's seed, so that dropout and
    shuffles repeat for the same seed; pass ``seed=False`` to seed them yourself."""
    serve_tasks(_served(module, train, evaluate, seed))


def simulate(
    module: torch.nn.Module,
    train: TorchTrainFn,
    evaluate: Optional[TorchEvaluateFn] = None,
    *,
    seed_generators: bool = True,
    **settings,
) -> Simulation:
    """:func:`ferry_sdk.simulate` for a PyTorch module: every virtual node's tasks reach
    ``train`` and ``evaluate`` as :func:`run` hands them over, in this process."""
    return simulate_served(_served(module, train, evaluate, seed_generators), **settings)
