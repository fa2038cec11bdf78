"""A Ferry node's trainer for FashionNet, written with the Python SDK: each round, local SGD
on the node's own share (`DATA_DIR/train.pt`) from the global model Ferry loaded into the
module; for a federated evaluation, the global model scored on the node's held-out examples
(`DATA_DIR/test.pt`). Run by `ferry client --trainer-cmd "/usr/bin/python3 train.py"` (add
`--trainer-mode long-lived` to start it once for the whole run)."""

import os
import sys

import torch
import ferry_sdk
from ferry_sdk import pytorch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from net import FashionNet  # noqa: E402

torch.set_num_threads(1)
# A process may serve many nodes (`ferry simulate`'s pool of workers): the shares of the 16
# folders used last are kept, the others read again when their node's next task comes.
training_shares = ferry_sdk.SiteCache(lambda folder: torch.load(os.path.join(folder, "train.pt")), max_sites=16)
held_out_shares = ferry_sdk.SiteCache(lambda folder: torch.load(os.path.join(folder, "test.pt")), max_sites=16)


def train(module, task):
    share = training_shares(task.data_dir)
    images, labels = share["images"], share["labels"]
    optimizer = torch.optim.SGD(
        module.parameters(), lr=task.lr, momentum=task.momentum, weight_decay=task.weight_decay
    )
    generator = torch.Generator().manual_seed(task.seed)
    # Saved every 30 seconds in the task's checkpoint folder: a trainer or node killed
    # mid-round resumes from the last save when the task is started again.
    checkpoint = pytorch.Checkpoint(task, module, optimizer, every_seconds=30, generators=[generator])
    module.train()
    for _ in checkpoint.epochs():
        for batch in checkpoint.batches(torch.randperm(len(labels), generator=generator).split(task.batch_size)):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            checkpoint.values["loss_sum"] = checkpoint.values.get("loss_sum", 0.0) + loss.item()
    return (None, len(labels), {"train_loss": checkpoint.values.get("loss_sum", 0.0) / max(checkpoint.step, 1)})


def evaluate(module, task):
    held_out = held_out_shares(task.data_dir)
    images, labels = held_out["images"], held_out["labels"]
    module.eval()
    logits = module(images)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    correct = (logits.argmax(1) == labels).float().mean().item()
    return ferry_sdk.EvaluateResult(num_examples=len(labels), loss=loss, accuracy=correct)


pytorch.run(FashionNet(), train, evaluate)
