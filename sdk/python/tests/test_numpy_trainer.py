"""The numpy front end: both trainer modes, and every check the SDK makes on what ``train``
and ``evaluate`` return before anything reaches Ferry."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

import ferry_sdk
from conftest import numpy_model


def halfway_to_one(model, task):
    """Moves every float tensor half way to 1 in its own dtype; reports the task it saw."""
    out = {}
    for name, array in model.items():
        if np.issubdtype(array.dtype, np.floating):
            out[name] = (array + 0.5 * (1 - array.astype(np.float64))).astype(array.dtype)
    return ferry_sdk.TrainResult(out, num_examples=12, metrics={"train_loss": 0.25, "round": task.round})


def score(model, task):
    return ferry_sdk.EvaluateResult(30, loss=0.5, accuracy=float(model["scale"]) / 4, metrics={"f1": 0.4})


def test_per_round_mode_trains_writes_the_model_and_the_result(make_round, per_round):
    task = make_round(round=3)
    per_round(ferry_sdk.run, halfway_to_one, task=task)
    trained = task.trained()
    start = numpy_model()
    assert set(trained) == set(start)
    assert trained["enc.half"].dtype == np.float16 and np.all(trained["enc.half"] == 1)
    assert trained["head.bias"].dtype == np.float64
    assert np.allclose(trained["head.bias"], [0.0, 0.5, 1.0])
    assert trained["scale"].shape == () and float(trained["scale"]) == 1.5
    # Integer tensors are carried from the global model, whatever train did.
    assert trained["steps"].dtype == np.int64 and int(trained["steps"]) == 5
    assert task.result() == {"num_examples": 12, "metrics": {"train_loss": 0.25, "round": 3}}


def test_per_round_mode_serves_an_evaluation(make_round, per_round):
    task = make_round(kind="evaluate")
    per_round(ferry_sdk.run, halfway_to_one, score, task=task)
    assert task.result() == {"num_examples": 30, "loss": 0.5, "accuracy": 0.5, "metrics": {"f1": 0.4}}
    assert not task.model_out.exists()


def test_long_lived_mode_answers_every_task_and_survives_a_failing_one(make_round, long_lived):
    calls = []

    def train(model, task):
        calls.append(task.round)
        if task.round == 2:
            raise RuntimeError("out of data")
        return halfway_to_one(model, task)

    tasks = [make_round(round=1), make_round(round=2), make_round(kind="evaluate", round=2), make_round(round=3)]
    answers = long_lived(ferry_sdk.run, train, score, tasks=tasks)
    assert calls == [1, 2, 3]
    assert answers[0] == {"ferry": "done"}
    assert answers[1] == {"ferry": "error", "message": "RuntimeError: out of data"}
    assert answers[2:] == [{"ferry": "done"}, {"ferry": "done"}]
    assert tasks[0].result()["num_examples"] == 12 and tasks[3].trained()["head.bias"][0] == 0.0
    assert not tasks[1].model_out.exists() and not tasks[1].result_out.exists()
    assert tasks[2].result()["accuracy"] == 0.5


def test_a_node_without_evaluate_says_so(make_round, long_lived):
    answers = long_lived(ferry_sdk.run, halfway_to_one, tasks=[make_round(kind="evaluate")])
    assert answers[0]["ferry"] == "error"
    assert "no evaluate function" in answers[0]["message"]


def test_the_task_carries_the_server_settings_and_ignores_unknown_keys(make_round, per_round):
    seen = []

    def train(model, task):
        seen.append(task)
        return halfway_to_one(model, task)

    task = make_round(round=4)
    per_round(ferry_sdk.run, train, task=task)
    (got,) = seen
    assert (got.round, got.epochs, got.batch_size, got.lr, got.seed, got.procedure) == (4, 1, 32, 0.1, 7, "local_sgd")
    assert got.data_dir.endswith("data")


def returning(**changes):
    """A train function whose model is ``halfway_to_one``'s with ``changes`` applied (None
    deletes a tensor), and whose count and metrics can be replaced."""
    examples = changes.pop("num_examples", 12)
    metrics = changes.pop("metrics", {"train_loss": 0.1})

    def train(model, task):
        out = halfway_to_one(model, task).model
        for name, value in changes.items():
            if value is None:
                del out[name]
            else:
                out[name] = value
        return ferry_sdk.TrainResult(out, examples, metrics)

    return train


@pytest.mark.parametrize(
    "train, message",
    [
        (returning(**{"enc.weight": np.zeros((3, 4), np.float32)}), "tensor 'enc.weight' has shape [3, 4], the model's is [4, 3]"),
        (returning(**{"enc.weight": np.zeros((4, 3), np.float64)}), "tensor 'enc.weight' has dtype float64, the model's is float32"),
        (returning(**{"head.bias": np.array([0.0, np.nan, 1.0])}), "tensor 'head.bias' holds NaN or infinity"),
        (returning(**{"scale": np.array(np.inf, np.float32)}), "tensor 'scale' holds NaN or infinity"),
        (returning(**{"enc.half": None}), "the trained model lacks tensor 'enc.half' [2, 2]"),
        (returning(**{"extra": np.zeros(2, np.float32)}), "the trained model has tensors the global model lacks: ['extra']"),
        (returning(num_examples=0), "num_examples must be an integer >= 1, got 0"),
        (returning(num_examples=2.5), "num_examples must be an integer >= 1, got 2.5"),
        (returning(metrics={"train_loss": float("nan")}), "metric 'train_loss' must be a finite number"),
        (returning(metrics={"note": "fine"}), "metric 'note' must be a finite number, got 'fine'"),
        (lambda model, task: ["not", "a", "result"], "train must return TrainResult(model, num_examples, metrics)"),
        (lambda model, task: ferry_sdk.TrainResult([1, 2], 3), "train must return a dict of arrays, got list"),
    ],
)
def test_what_train_returns_is_checked_before_anything_is_written(make_round, per_round, train, message):
    task = make_round()
    with pytest.raises(ferry_sdk.FerryError) as refused:
        per_round(ferry_sdk.run, train, task=task)
    assert message in str(refused.value)
    assert not task.model_out.exists() and not task.result_out.exists()


def test_a_tuple_result_is_taken_as_a_train_result(make_round, per_round):
    task = make_round()
    per_round(ferry_sdk.run, lambda model, t: (halfway_to_one(model, t).model, 9), task=task)
    assert task.result() == {"num_examples": 9, "metrics": {}}


@pytest.mark.parametrize(
    "result, message",
    [
        (ferry_sdk.EvaluateResult(10, loss=0.1, accuracy=1.5), "accuracy must be a share in [0, 1], got 1.5"),
        (ferry_sdk.EvaluateResult(10, loss=0.1, accuracy=-0.1), "accuracy must be a share in [0, 1], got -0.1"),
        (ferry_sdk.EvaluateResult(10, loss=float("inf"), accuracy=0.5), "loss must be a finite number"),
        (ferry_sdk.EvaluateResult(0, loss=0.1, accuracy=0.5), "num_examples must be an integer >= 1, got 0"),
        (ferry_sdk.EvaluateResult(10, 0.1, 0.5, {"f1": float("nan")}), "metric 'f1' must be a finite number"),
        ("0.5", "evaluate must return EvaluateResult(num_examples, loss, accuracy, metrics)"),
    ],
)
def test_what_evaluate_returns_is_checked(make_round, per_round, result, message):
    task = make_round(kind="evaluate")
    with pytest.raises(ferry_sdk.FerryError) as refused:
        per_round(ferry_sdk.run, halfway_to_one, lambda model, t: result, task=task)
    assert message in str(refused.value)
    assert not task.result_out.exists()


def test_model_files_round_trip_every_dtype_and_zero_d_tensors(tmp_path):
    path = str(tmp_path / "m.safetensors")
    model = numpy_model()
    model["transposed"] = np.arange(6, dtype=np.float32).reshape(2, 3).T
    ferry_sdk.save_model(model, path)
    back = ferry_sdk.load_model(path)
    assert set(back) == set(model)
    for name, array in model.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        assert np.array_equal(back[name], array), name


def test_each_task_seeds_python_and_numpy_so_a_long_lived_trainer_repeats_itself(make_round, long_lived):
    drawn = []

    def train(model, task):
        drawn.append((random.random(), float(np.random.rand())))
        return model, 1, {}

    first, second = make_round(), make_round()
    random.seed(1)
    np.random.seed(1)
    assert long_lived(ferry_sdk.run, train, tasks=[first, second]) == [{"ferry": "done"}] * 2
    # Both tasks carry seed 7: the second draws what the first drew.
    assert drawn[0] == drawn[1]


def pulled_to_zero(model, task, steps=4):
    """``steps`` steps of gradient descent on ``0.5 * |w|^2`` for ``head.bias``, each step's
    gradient passed through the task's local procedure."""
    w = model["head.bias"].copy()
    for _ in range(steps):
        grads = task.local.gradients({"head.bias": w.copy()}, {"head.bias": w})
        w = w - task.lr * grads["head.bias"]
    return ferry_sdk.TrainResult({**model, "head.bias": w}, num_examples=4)


def numpy_procedure_round(make_round, procedure, mu=0.0):
    task = make_round()
    task.task.update(procedure=procedure, mu=mu)
    task.task_file.write_text(json.dumps(task.task))
    return task


def test_the_numpy_helper_adds_fedprox_term_and_counts_fednova_steps(make_round, per_round):
    start = numpy_model()["head.bias"]
    proximal = numpy_procedure_round(make_round, "proximal", mu=1.0)
    per_round(ferry_sdk.run, pulled_to_zero, task=proximal)
    # With mu = 1 the proximal term pulls back towards the global model: w <- w - lr*(w + (w - w0)).
    expected = start.copy()
    for _ in range(4):
        expected = expected - 0.1 * (expected + (expected - start))
    assert np.allclose(proximal.trained()["head.bias"], expected)
    normalized = numpy_procedure_round(make_round, "normalized")
    per_round(ferry_sdk.run, pulled_to_zero, task=normalized)
    assert normalized.result()["metrics"]["steps"] == 4
    assert np.allclose(normalized.trained()["head.bias"], start * 0.9**4)


def test_a_numpy_loop_that_skips_the_helper_is_told_so(make_round, per_round):
    proximal = numpy_procedure_round(make_round, "proximal", mu=0.01)
    with pytest.raises(ferry_sdk.FerryError, match="task.local.gradients"):
        per_round(ferry_sdk.run, halfway_to_one, task=proximal)
    normalized = numpy_procedure_round(make_round, "normalized")
    with pytest.raises(ferry_sdk.FerryError, match="FedNova"):
        per_round(ferry_sdk.run, halfway_to_one, task=normalized)


def test_the_numpy_helper_adds_scaffolds_correction_and_counts_its_steps(make_round, per_round, tmp_path):
    start = numpy_model()["head.bias"]
    correction = {name: np.full_like(array, 0.5) for name, array in numpy_model().items()}
    ferry_sdk.save_model(correction, str(tmp_path / "correction.safetensors"))
    task = numpy_procedure_round(make_round, "scaffold")
    task.task["correction_in"] = str(tmp_path / "correction.safetensors")
    task.task_file.write_text(json.dumps(task.task))
    per_round(ferry_sdk.run, pulled_to_zero, task=task)
    expected = start.copy()
    for _ in range(4):
        expected = expected - 0.1 * (expected + 0.5)
    assert np.allclose(task.trained()["head.bias"], expected)
    assert task.result()["metrics"]["steps"] == 4


def test_q_fedavg_asks_for_the_loss_before_training_by_name(make_round, per_round):
    task = numpy_procedure_round(make_round, "loss_reporting")
    with pytest.raises(ferry_sdk.FerryError, match=r"metrics\['loss_before'\]"):
        per_round(ferry_sdk.run, halfway_to_one, task=task)
    reported = numpy_procedure_round(make_round, "loss_reporting")

    def with_loss(model, task):
        result = halfway_to_one(model, task)
        result.metrics["loss_before"] = 0.7
        return result

    per_round(ferry_sdk.run, with_loss, task=reported)
    assert reported.result()["metrics"]["loss_before"] == 0.7
