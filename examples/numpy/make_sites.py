"""Writes Fashion-MNIST as CSV sites, one folder per node with its own train.csv and test.csv:
`python3 make_sites.py --nodes 3 --per-node 2000 --test-per-node 500 --out data`. Reads the
files of Debian's dataset-fashion-mnist package (or $FASHION_MNIST)."""

import argparse
import gzip
import os

import numpy as np

ROOT = os.environ.get("FASHION_MNIST", "/usr/share/datasets/fashion-mnist")


def load(split):
    with gzip.open(os.path.join(ROOT, f"{split}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(os.path.join(ROOT, f"{split}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--nodes", type=int, default=3)
parser.add_argument("--per-node", type=int, default=2000)
parser.add_argument("--test-per-node", type=int, default=500)
parser.add_argument("--out", default="data")
args = parser.parse_args()
for split, file, per_node in (("train", "train.csv", args.per_node), ("t10k", "test.csv", args.test_per_node)):
    images, labels = load(split)
    order = np.random.default_rng(0).permutation(len(labels))
    for node in range(args.nodes):
        part = order[node * per_node:(node + 1) * per_node]
        folder = os.path.join(args.out, f"site-{node}")
        os.makedirs(folder, exist_ok=True)
        rows = np.column_stack([labels[part], images[part]])
        np.savetxt(os.path.join(folder, file), rows, fmt="%d", delimiter=",")
        print(f"{folder}/{file}: {len(part)} examples")
