"""Splits Fashion-MNIST's training set into one folder per node, as sites would hold their
own data: `python3 make_shares.py --nodes 3 --per-node 2000 --out data` writes
data/site-0/train.pt, data/site-1/train.pt, ..."""

import argparse
import os

import torch

import data

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--nodes", type=int, default=3)
parser.add_argument("--per-node", type=int, default=2000)
parser.add_argument("--out", default="data")
args = parser.parse_args()
images, labels = data.load("train")
order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
for node in range(args.nodes):
    part = order[node * args.per_node:(node + 1) * args.per_node]
    folder = os.path.join(args.out, f"site-{node}")
    os.makedirs(folder, exist_ok=True)
    torch.save({"images": images[part], "labels": labels[part]}, os.path.join(folder, "train.pt"))
    print(f"{folder}: {len(part)} examples")
