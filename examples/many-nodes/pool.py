"""Writes Fashion-MNIST (Debian's dataset-fashion-mnist package) as one pooled folder, for
`ferry simulate --node-data pooled --clients N --partition ...` to split into N virtual
nodes: `pooled/train.csv` (60,000 images) and `pooled/test.csv` (10,000), in `rows.py`'s
format.

    python3 pool.py --out pooled [--limit N]

`--limit N` keeps the first N images of each set (for quick tries and tests)."""

import argparse
import gzip
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rows  # noqa: E402

ROOT = os.environ.get("FASHION_MNIST", "/usr/share/datasets/fashion-mnist")


def idx(name: str) -> np.ndarray:
    """An IDX file of the dataset as an array."""
    path = os.path.join(ROOT, name)
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: install Debian's dataset-fashion-mnist package "
                         "(scripts/install-deps.sh does) or set FASHION_MNIST to its folder")
    with gzip.open(path) as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="pooled")
    parser.add_argument("--limit", type=int, help="keep the first N images of each set")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for split, name in (("train", "train.csv"), ("t10k", "test.csv")):
        images = idx(f"{split}-images-idx3-ubyte.gz")[: args.limit]
        labels = idx(f"{split}-labels-idx1-ubyte.gz")[: args.limit]
        rows.save(os.path.join(args.out, name), images, labels)
        print(f"{args.out}/{name}: {len(labels)} images")


if __name__ == "__main__":
    main()
