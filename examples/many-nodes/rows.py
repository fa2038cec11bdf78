"""A node's examples as this example stores them: a CSV file with a header line and then one
row per image, the class label and 784 pixel values from 0 to 255 (the format `pool.py` writes
and `ferry simulate --node-data DIR --clients N` splits row by row)."""

import os

import numpy as np
import torch


def load(data_dir: str, name: str):
    """(images [N, 1, 28, 28] in [0, 1], labels [N]) from `data_dir/name`."""
    path = os.path.join(data_dir, name)
    rows = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.uint8, ndmin=2)
    if rows.shape[0] == 0:
        raise ValueError(f"{path} holds no examples")
    if rows.shape[1] != 785:
        raise ValueError(f"{path}: rows have {rows.shape[1]} columns; expected a label and 784 pixels")
    images = torch.tensor(rows[:, 1:], dtype=torch.float32).div(255).reshape(-1, 1, 28, 28)
    return images, torch.tensor(rows[:, 0], dtype=torch.long)


def save(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes uint8 `images` [N, 28, 28] and `labels` [N] as rows of `path`."""
    table = np.concatenate([labels.reshape(-1, 1), images.reshape(len(labels), -1)], axis=1)
    header = ",".join(["label"] + [f"p{i}" for i in range(784)])
    np.savetxt(path, table, fmt="%d", delimiter=",", header=header, comments="")
