"""Splits Fashion-MNIST into one folder per node, as sites would hold their own data:
`python3 make_shares.py --nodes 3 --per-node 2000 --test-per-node 500 --out data` writes
data/site-0/train.pt (training examples) and data/site-0/test.pt (the site's held-out examples,
for federated evaluation), data/site-1/..., and so on."""

import argparse
import os

import torch

import data

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--nodes", type=int, default=3)
parser.add_argument("--per-node", type=int, default=2000)
parser.add_argument("--test-per-node", type=int, default=500)
parser.add_argument("--out", default="data")
args = parser.parse_args()
for split, file, per_node in (("train", "train.pt", args.per_node), ("t10k", "test.pt", args.test_per_node)):
    images, labels = data.load(split)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    for node in range(args.nodes):
        part = order[node * per_node:(node + 1) * per_node]
        folder = os.path.join(args.out, f"site-{node}")
        os.makedirs(folder, exist_ok=True)
        torch.save({"images": images[part], "labels": labels[part]}, os.path.join(folder, file))
        print(f"{folder}/{file}: {len(part)} examples")
