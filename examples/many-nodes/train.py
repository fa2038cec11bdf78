"""A Ferry node's trainer for LeNet, written with the Python SDK, for simulations where a few
long-lived processes serve many virtual nodes: every task names its node's folder
(`task.data_dir`, holding `train.csv` and `test.csv`), so one process trains any node. A
`SiteCache` keeps the data of the 64 folders used last; the model's state comes from the task
each time. Run by `ferry simulate --trainer-cmd "python3 train.py" --trainer-mode long-lived`."""

import os
import sys

import torch
import ferry_sdk
from ferry_sdk import pytorch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import local  # noqa: E402
import rows  # noqa: E402
from lenet import LeNet  # noqa: E402

torch.set_num_threads(1)
training_data = ferry_sdk.SiteCache(lambda folder: rows.load(folder, "train.csv"), max_sites=64)
held_out_data = ferry_sdk.SiteCache(lambda folder: rows.load(folder, "test.csv"), max_sites=64)


def train(module, task):
    images, labels = training_data(task.data_dir)
    loss = local.local_sgd(
        module, images, labels, epochs=task.epochs, batch_size=task.batch_size, lr=task.lr,
        momentum=task.momentum, weight_decay=task.weight_decay,
        generator=torch.Generator().manual_seed(task.seed),
    )
    return (None, len(labels), {"train_loss": loss})


def evaluate(module, task):
    images, labels = held_out_data(task.data_dir)
    loss, accuracy = local.score(module, images, labels)
    return ferry_sdk.EvaluateResult(num_examples=len(labels), loss=loss, accuracy=accuracy)


if __name__ == "__main__":
    pytorch.run(LeNet(), train, evaluate)
