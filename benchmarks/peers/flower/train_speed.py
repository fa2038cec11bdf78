"""PyTorch's half of the training-speed workload: LeNet (NIID-Bench's CNN, the network of
`ferry bench train --model lenet`) on synthetic 28x28 images, forward + backward + SGD step
(momentum 0.9, weight decay 1e-5), batch 64, measured for a few seconds on one thread and on
every core. Prints one JSON line of images per second.

    /usr/bin/python3 train_speed.py        # Debian's python3-torch"""

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "examples", "many-nodes"))
from lenet import LeNet  # noqa: E402  (the network of examples/many-nodes)


def images_per_second(threads, batch, seconds):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LeNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
    loss_fn = nn.CrossEntropyLoss()
    images = torch.rand(batch * 8, 1, 28, 28)
    labels = torch.randint(0, 10, (batch * 8,))

    def epoch():
        for start in range(0, len(images), batch):
            optimizer.zero_grad()
            loss = loss_fn(model(images[start:start + batch]), labels[start:start + batch])
            loss.backward()
            optimizer.step()

    epoch()  # warm-up
    began, done = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        epoch()
        done += len(images)
    return done / (time.perf_counter() - began)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(json.dumps({
        "system": f"pytorch-{torch.__version__}",
        "batch": args.batch_size,
        "one_thread_img_s": images_per_second(1, args.batch_size, args.seconds),
        "all_cores_img_s": images_per_second(cores, args.batch_size, args.seconds),
        "cores": cores,
    }))


if __name__ == "__main__":
    main()
