"""Checkpoints: a training loop stopped part-way and started again on the same task ends with
the very model, optimizer state and running figures an uninterrupted loop ends with."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import ferry_sdk
from ferry_sdk import pytorch
from ferry_sdk.checkpoint import CHECKPOINT_FILE


class Stopped(Exception):
    """Stands in for the process being killed."""


def make_task(checkpoint_dir, epochs=2):
    return ferry_sdk.Task(
        round=3, epochs=epochs, batch_size=8, lr=0.05, momentum=0.9, weight_decay=0.0, seed=11,
        procedure="local_sgd", mu=0.0, data_dir=None, checkpoint_dir=checkpoint_dir,
    )


def train(task, stop_at=None, every_steps=4, examples=80):
    """Two epochs of SGD with momentum over a shuffled set, a dropout layer, and draws from
    Python's and NumPy's generators, each seeded from the task as a fresh process would; raises
    Stopped once `stop_at` steps are done."""
    torch.manual_seed(task.seed)
    random.seed(task.seed)
    np.random.seed(task.seed)
    generator = torch.Generator().manual_seed(task.seed)
    data = torch.Generator().manual_seed(0)
    x = torch.randn(examples, 4, generator=data)
    y = x.sum(1, keepdim=True)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(module.parameters(), lr=task.lr, momentum=task.momentum)
    checkpoint = pytorch.Checkpoint(task, module, optimizer, every_steps=every_steps, generators=[generator])
    for _ in checkpoint.epochs():
        for batch in checkpoint.batches(torch.randperm(examples, generator=generator).split(task.batch_size)):
            if checkpoint.step == stop_at:
                raise Stopped()
            optimizer.zero_grad()
            noise = random.random() * 1e-3 + float(np.random.rand()) * 1e-3
            loss = torch.nn.functional.mse_loss(module(x[batch]) + noise, y[batch])
            loss.backward()
            optimizer.step()
            checkpoint.values["loss_sum"] = checkpoint.values.get("loss_sum", 0.0) + loss.item()
    return module.state_dict(), optimizer.state_dict(), checkpoint


def assert_same_states(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("stop_at", [6, 10, 13, 19])
def test_a_loop_stopped_and_started_again_ends_as_an_uninterrupted_one(tmp_path, stop_at):
    whole, whole_optimizer, whole_checkpoint = train(make_task(None))
    folder = tmp_path / "task"
    folder.mkdir()
    with pytest.raises(Stopped):
        train(make_task(str(folder)), stop_at=stop_at)
    assert (folder / CHECKPOINT_FILE).exists()
    resumed, resumed_optimizer, checkpoint = train(make_task(str(folder)))
    assert checkpoint.resumed and checkpoint.step == whole_checkpoint.step == 20
    assert_same_states(whole, resumed)
    momentum = [s["momentum_buffer"] for s in whole_optimizer["state"].values()]
    assert all(
        torch.equal(m, s["momentum_buffer"])
        for m, s in zip(momentum, resumed_optimizer["state"].values())
    )
    assert checkpoint.values == whole_checkpoint.values


def test_a_loop_stopped_twice_still_ends_as_an_uninterrupted_one(tmp_path):
    whole, _, _ = train(make_task(None))
    for stop_at in (5, 15):
        with pytest.raises(Stopped):
            train(make_task(str(tmp_path)), stop_at=stop_at)
    resumed, _, checkpoint = train(make_task(str(tmp_path)))
    assert checkpoint.resumed
    assert_same_states(whole, resumed)


def test_without_a_folder_nothing_is_saved_and_a_half_written_save_is_never_read(tmp_path):
    _, _, checkpoint = train(make_task(None))
    assert not checkpoint.resumed
    (tmp_path / (CHECKPOINT_FILE + ".partial")).write_bytes(b"cut short")
    _, _, fresh = train(make_task(str(tmp_path)), every_steps=1000)
    assert not fresh.resumed


def test_a_checkpoint_past_the_data_it_is_given_is_refused(tmp_path):
    with pytest.raises(Stopped):
        train(make_task(str(tmp_path)), stop_at=9)
    with pytest.raises(ferry_sdk.FerryError, match="the data changed"):
        train(make_task(str(tmp_path)), examples=32)


@pytest.mark.parametrize("settings", [{"every_steps": 0}, {"every_steps": 2.5}, {"every_seconds": 0}])
def test_a_schedule_that_never_saves_is_refused(settings):
    module = torch.nn.Linear(2, 1)
    with pytest.raises(ferry_sdk.FerryError, match="every_"):
        pytorch.Checkpoint(make_task(None), module, **settings)
