"""Fashion-MNIST from Debian's dataset-fashion-mnist package, as tensors."""

import gzip
import os

import numpy as np
import torch

ROOT = os.environ.get("FASHION_MNIST", "/usr/share/datasets/fashion-mnist")


def load(split: str):
    """(images [N, 1, 28, 28] in [0, 1], labels [N]) of `train` or `t10k`."""
    with gzip.open(os.path.join(ROOT, f"{split}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(os.path.join(ROOT, f"{split}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return torch.tensor(images / 255.0, dtype=torch.float32), torch.tensor(labels, dtype=torch.long)
