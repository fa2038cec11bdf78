"""Splits Fashion-MNIST into one folder per node, as sites would hold their own data:
`python3 make_shares.py --nodes 3 --per-node 2000 --test-per-node 500 --out data` writes
data/site-0/train.pt (training examples) and data/site-0/test.pt (the site's held-out examples,
for federated evaluation), data/site-1/..., and so on. With `--labels-per-node K` the training
shares are label-skewed instead (NIID-Bench's #C=K): each site holds K classes (site i always
class i mod 10, the others drawn with seed 0) and every class's training images are split evenly
among the sites holding it; `--per-node` is then ignored and the held-out shares stay drawn from
the whole test set."""

import argparse
import os

import torch

import data

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--nodes", type=int, default=3)
parser.add_argument("--per-node", type=int, default=2000)
parser.add_argument("--test-per-node", type=int, default=500)
parser.add_argument("--out", default="data")
parser.add_argument("--labels-per-node", type=int, metavar="K", help="label-skewed training shares")
args = parser.parse_args()


def label_skewed(labels, nodes, k):
    """Each node's training indices when node i holds class i mod 10 and k - 1 classes drawn
    from the others, every class split evenly among the nodes holding it."""
    if not 1 <= k <= 10:
        raise SystemExit(f"--labels-per-node must be 1 to 10, got {k}")
    draw = torch.Generator().manual_seed(0)
    held = []
    for node in range(nodes):
        others = [c for c in range(10) if c != node % 10]
        picked = torch.randperm(len(others), generator=draw)[: k - 1].tolist()
        held.append([node % 10] + [others[i] for i in picked])
    parts = [[] for _ in range(nodes)]
    for c in range(10):
        holders = [node for node in range(nodes) if c in held[node]]
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=draw)]
        for j, piece in enumerate(members.tensor_split(len(holders)) if holders else []):
            parts[holders[j]].append(piece)
    return [torch.cat(p) for p in parts], held


for split, file, per_node in (("train", "train.pt", args.per_node), ("t10k", "test.pt", args.test_per_node)):
    images, labels = data.load(split)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    skewed = None
    if split == "train" and args.labels_per_node:
        skewed, held = label_skewed(labels, args.nodes, args.labels_per_node)
    for node in range(args.nodes):
        part = skewed[node] if skewed else order[node * per_node:(node + 1) * per_node]
        folder = os.path.join(args.out, f"site-{node}")
        os.makedirs(folder, exist_ok=True)
        torch.save({"images": images[part], "labels": labels[part]}, os.path.join(folder, file))
        classes = f", classes {sorted(held[node])}" if skewed else ""
        print(f"{folder}/{file}: {len(part)} examples{classes}")
