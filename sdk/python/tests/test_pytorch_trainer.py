"""The PyTorch front end: a module trained in place in both trainer modes, the checks on its
state dict, and model files in and out of PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ferry_sdk
from ferry_sdk import pytorch


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def fit(module, task):
    torch.manual_seed(task.seed)
    x = torch.randn(32, 4)
    y = x[:, :3] * 2
    opt = torch.optim.SGD(module.parameters(), lr=task.lr)
    for _ in range(5):
        opt.zero_grad()
        loss = ((module(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    return None, 32, {"train_loss": float(loss)}


def torch_round(make_round, module):
    """A round whose global model is ``module``'s state."""
    state = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    return make_round(model=state)


def test_per_round_mode_trains_the_module_and_writes_its_checked_state(make_round, per_round):
    start = make_net()
    task = torch_round(make_round, start)
    per_round(pytorch.run, make_net(), fit, task=task)
    trained = task.trained()
    assert set(trained) == set(start.state_dict())
    assert not np.allclose(trained["0.weight"], start[0].weight.detach().numpy())
    # BatchNorm's integer counter is the global model's, not the one training moved.
    assert int(trained["1.num_batches_tracked"]) == 0
    assert task.result()["num_examples"] == 32 and task.result()["metrics"]["train_loss"] > 0


def test_long_lived_mode_loads_each_round_into_the_module_and_scores_under_no_grad(make_round, long_lived):
    module = make_net()
    grads = []

    def evaluate(module, task):
        grads.append(torch.is_grad_enabled())
        return ferry_sdk.EvaluateResult(8, loss=0.3, accuracy=0.75)

    first = torch_round(make_round, make_net())
    evaluation = torch_round(make_round, make_net())
    evaluation.task["kind"] = "evaluate"
    second = torch_round(make_round, make_net())
    answers = long_lived(pytorch.run, module, fit, evaluate, tasks=[first, evaluation, second])
    assert answers == [{"ferry": "done"}] * 3
    assert grads == [False]
    assert evaluation.result()["accuracy"] == 0.75
    # Each round starts from that round's global model, not from the module's last state.
    assert np.array_equal(first.trained()["0.weight"], second.trained()["0.weight"])


def breaking(change):
    """A train function that trains, then applies ``change`` to the module."""

    def train(module, task):
        fit(module, task)
        change(module)
        return None, 32, {}

    return train


def poison(module):
    with torch.no_grad():
        module[0].bias[1] = float("nan")


def retype(module):
    module[0].bias.data = module[0].bias.data.double()


def reshape(module):
    module[0].weight = torch.nn.Parameter(torch.zeros(3, 5))


def add_tensor(module):
    module.register_buffer("extra", torch.zeros(2))


def drop_tensor(module):
    del module[1].running_var
    module[1].register_buffer("running_var", None)


@pytest.mark.parametrize(
    "change, message",
    [
        (poison, "tensor '0.bias' holds NaN or infinity"),
        (retype, "tensor '0.bias' has dtype torch.float64, the model's is torch.float32"),
        (reshape, "tensor '0.weight' has shape [3, 5], the model's is [3, 4]"),
        (add_tensor, "the trained model has tensors the global model lacks: ['extra']"),
        (drop_tensor, "the trained model lacks tensor '1.running_var' [3]"),
    ],
)
def test_the_state_dict_is_checked_before_anything_is_written(make_round, per_round, change, message):
    task = torch_round(make_round, make_net())
    with pytest.raises(ferry_sdk.FerryError) as refused:
        per_round(pytorch.run, make_net(), breaking(change), task=task)
    assert message in str(refused.value)
    assert not task.model_out.exists() and not task.result_out.exists()


def test_initial_models_and_results_move_in_and_out_of_pytorch(tmp_path):
    path = str(tmp_path / "init.safetensors")
    net = make_net()
    pytorch.save_initial_model(net, path)
    back = pytorch.load_into(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)), path)
    for name, tensor in net.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    with pytest.raises(RuntimeError):
        pytorch.load_into(torch.nn.Linear(4, 3), path, strict=True)
    # bf16, which numpy lacks, passes through the PyTorch path.
    bf16 = {"w": torch.ones(2, 2, dtype=torch.bfloat16)}
    pytorch.save_initial_model(bf16, path)
    assert pytorch.check_state(bf16, {"w": torch.full((2, 2), 0.5, dtype=torch.bfloat16)})["w"].dtype == torch.bfloat16


def dropout_fit(module, task):
    """Trains through a dropout layer on inputs drawn from PyTorch's and NumPy's global
    generators, seeding nothing itself."""
    x = torch.randn(32, 4) + torch.tensor(np.random.rand(32, 4), dtype=torch.float32)
    opt = torch.optim.SGD(module.parameters(), lr=task.lr)
    module.train()
    for _ in range(3):
        opt.zero_grad()
        loss = (torch.nn.functional.dropout(module(x), 0.5) ** 2).mean()
        loss.backward()
        opt.step()
    return None, 32, {}


def trained_twice(make_round, per_round, **options):
    """The models of two runs of ``dropout_fit`` on the same task, the global generators left
    in different states before each, as two processes' would be."""
    models = []
    for scramble in (1, 2):
        task = torch_round(make_round, make_net())
        torch.manual_seed(1000 + scramble)
        np.random.seed(1000 + scramble)
        per_round(pytorch.run, make_net(), dropout_fit, task=task, **options)
        models.append(task.trained())
    return models


def test_the_same_task_trains_the_same_model_because_the_generators_are_seeded_from_it(make_round, per_round):
    first, second = trained_twice(make_round, per_round)
    for name in first:
        assert np.array_equal(first[name], second[name]), name


def test_a_trainer_that_seeds_itself_can_turn_the_seeding_off(make_round, per_round):
    first, second = trained_twice(make_round, per_round, seed=False)
    assert not np.array_equal(first["0.weight"], second["0.weight"])


def steps_fit(module, task, steps=5, metrics=None):
    """``steps`` SGD steps on a fixed regression; seeds nothing the SDK does not."""
    x = torch.linspace(-1, 1, 64).reshape(16, 4)
    y = x[:, :3] * 2
    opt = torch.optim.SGD(module.parameters(), lr=task.lr)
    for _ in range(steps):
        opt.zero_grad()
        ((module(x) - y) ** 2).mean().backward()
        opt.step()
    return None, 16, dict(metrics or {})


def proximal_by_hand(module, mu, steps=5):
    """The same loop with FedProx's term written into the loss, as a user would by hand."""
    anchor = [p.detach().clone() for p in module.parameters()]
    x = torch.linspace(-1, 1, 64).reshape(16, 4)
    y = x[:, :3] * 2
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((module(x) - y) ** 2).mean()
        loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(module.parameters(), anchor))
        loss.backward()
        opt.step()
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def procedure_round(make_round, procedure, mu=0.0):
    task = torch_round(make_round, make_net())
    task.task.update(procedure=procedure, mu=mu)
    task.task_file.write_text(json.dumps(task.task))
    return task


def test_fedprox_needs_no_user_code_the_sdk_adds_the_proximal_term(make_round, per_round):
    proximal = procedure_round(make_round, "proximal", mu=0.5)
    per_round(pytorch.run, make_net(), steps_fit, task=proximal)
    plain = procedure_round(make_round, "local_sgd")
    per_round(pytorch.run, make_net(), steps_fit, task=plain)
    by_hand = proximal_by_hand(make_net(), mu=0.5)
    for name in by_hand:
        if by_hand[name].dtype.kind == "f":  # integer counters are the global model's
            assert np.allclose(proximal.trained()[name], by_hand[name], atol=1e-6), name
    assert not np.allclose(proximal.trained()["0.weight"], plain.trained()["0.weight"], atol=1e-4)


def test_fednova_steps_are_counted_unless_train_reports_its_own(make_round, per_round):
    counted = procedure_round(make_round, "normalized")
    per_round(pytorch.run, make_net(), lambda m, t: steps_fit(m, t, steps=7), task=counted)
    assert counted.result()["metrics"]["steps"] == 7
    own = procedure_round(make_round, "normalized")
    per_round(pytorch.run, make_net(), lambda m, t: steps_fit(m, t, metrics={"steps": 3}), task=own)
    assert own.result()["metrics"]["steps"] == 3
    plain = procedure_round(make_round, "local_sgd")
    per_round(pytorch.run, make_net(), steps_fit, task=plain)
    assert "steps" not in plain.result()["metrics"]


def test_a_long_lived_trainer_takes_each_tasks_hooks_off_after_it(make_round, long_lived):
    module = make_net()
    proximal = procedure_round(make_round, "proximal", mu=0.5)
    plain = procedure_round(make_round, "local_sgd")
    alone = procedure_round(make_round, "local_sgd")
    long_lived(pytorch.run, module, steps_fit, tasks=[proximal, plain])
    long_lived(pytorch.run, make_net(), steps_fit, tasks=[alone])
    # The plain task after a proximal one trains as a plain task alone does.
    assert np.array_equal(plain.trained()["0.weight"], alone.trained()["0.weight"])


def test_a_strategy_whose_procedure_was_never_applied_is_refused(make_round, per_round):
    proximal = procedure_round(make_round, "proximal", mu=0.5)
    with pytest.raises(ferry_sdk.FerryError, match="FedProx .* never applied"):
        per_round(pytorch.run, make_net(), lambda m, t: (None, 4, {}), task=proximal)
    normalized = procedure_round(make_round, "normalized")
    with pytest.raises(ferry_sdk.FerryError, match="FedNova"):
        per_round(pytorch.run, make_net(), lambda m, t: (None, 4, {}), task=normalized)
    assert not normalized.result_out.exists()


def test_scaffold_adds_the_correction_to_every_gradient_and_reports_the_steps(make_round, per_round, tmp_path):
    start = make_net()
    correction = {n: torch.full_like(p, 0.3) for n, p in start.named_parameters()}
    correction_file = tmp_path / "correction.safetensors"
    save_file({n: t.contiguous() for n, t in correction.items()}, str(correction_file))
    task = procedure_round(make_round, "scaffold")
    task.task["correction_in"] = str(correction_file)
    task.task_file.write_text(json.dumps(task.task))
    per_round(pytorch.run, make_net(), steps_fit, task=task)
    assert task.result()["metrics"]["steps"] == 5
    # The same loop with the correction added by hand.
    module = make_net()
    x = torch.linspace(-1, 1, 64).reshape(16, 4)
    y = x[:, :3] * 2
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        ((module(x) - y) ** 2).mean().backward()
        for n, p in module.named_parameters():
            p.grad += correction[n]
        opt.step()
    for n, p in module.named_parameters():
        assert np.allclose(task.trained()[n], p.detach().numpy(), atol=1e-6), n


def test_frozen_tensors_stay_as_received_and_train_again_in_the_next_task(make_round, long_lived):
    module = make_net()
    frozen = torch_round(make_round, make_net())
    frozen.task.update(frozen=["0.weight"])
    frozen.task_file.write_text(json.dumps(frozen.task))
    plain = torch_round(make_round, make_net())
    long_lived(pytorch.run, module, fit, tasks=[frozen, plain])
    start = make_net()
    assert np.array_equal(frozen.trained()["0.weight"], start[0].weight.detach().numpy())
    # (Under BatchNorm the linear bias gets no gradient; BatchNorm's own weight trains.)
    assert not np.allclose(frozen.trained()["1.weight"], start[1].weight.detach().numpy())
    # The next task, which freezes nothing, trains the weight again.
    assert not np.allclose(plain.trained()["0.weight"], start[0].weight.detach().numpy())
