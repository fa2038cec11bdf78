"""A Ferry node's trainer for FashionNet, written with the Python SDK: each round, local SGD
on the node's own share (`DATA_DIR/train.pt`) from the global model Ferry loaded into the
module. Run by `ferry client --trainer-cmd "/usr/bin/python3 train.py"` (add
`--trainer-mode long-lived` to start it once for the whole run)."""

import os
import sys

import torch
from ferry_sdk import pytorch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from net import FashionNet  # noqa: E402

torch.set_num_threads(1)
_shares = {}


def share(data_dir):
    """The node's examples, read once per process."""
    if data_dir not in _shares:
        _shares[data_dir] = torch.load(os.path.join(data_dir, "train.pt"))
    return _shares[data_dir]


def train(module, task):
    examples = share(task.data_dir)
    images, labels = examples["images"], examples["labels"]
    optimizer = torch.optim.SGD(
        module.parameters(), lr=task.lr, momentum=task.momentum, weight_decay=task.weight_decay
    )
    generator = torch.Generator().manual_seed(task.seed)
    module.train()
    total, batches = 0.0, 0
    for _ in range(task.epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(task.batch_size):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
    return (None, len(labels), {"train_loss": total / max(batches, 1)})


pytorch.run(FashionNet(), train)
