"""A node's trainer, written with Ferry's Python SDK: fine-tunes the LoRA adapters of the byte
GPT on the site's own text (``DATA_DIR/train.bin``) and scores them on its held-out text
(``DATA_DIR/test.bin``) in bits per byte. The base model is the site's own copy,
``DATA_DIR/base.safetensors``; a node whose copy differs from the federation's (by the SHA-256
the adapters carry) refuses to train or score, saying so."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

import ferry_sdk
import gpt
from ferry_sdk import pytorch

STEPS_PER_EPOCH = int(os.environ.get("LORA_STEPS_PER_EPOCH", "10"))
BATCH = 16

_cache = {}


def site(data_dir: str):
    """The site's base model and text, read once per process (a long-lived trainer keeps them)."""
    if data_dir not in _cache:
        path = os.path.join(data_dir, "base.safetensors")
        text = {}
        for split in ("train", "test"):
            with open(os.path.join(data_dir, f"{split}.bin"), "rb") as f:
                text[split] = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        _cache[data_dir] = (load_file(path), gpt.base_sha256(path), text)
    return _cache[data_dir]


def checked_base(adapters: gpt.Adapters, data_dir: str):
    """The site's base model, if it is the one the federation pinned."""
    base, sha, text = site(data_dir)
    pinned = bytes(adapters.base_sha256.tolist())
    if sha != pinned:
        raise ferry_sdk.FerryError(
            f"this node's base model ({os.path.join(data_dir, 'base.safetensors')}, sha256 "
            f"{sha.hex()[:16]}...) is not the federation's (sha256 {pinned.hex()[:16]}...): "
            "copy the federation's base.safetensors to this site"
        )
    return base, text


def train(adapters: gpt.Adapters, task):
    base, text = checked_base(adapters, task.data_dir)
    g = torch.Generator().manual_seed(task.seed)
    mean = gpt.train_steps(base, adapters, text["train"], task.epochs * STEPS_PER_EPOCH, task.lr, BATCH, g)
    return ferry_sdk.TrainResult(None, num_examples=len(text["train"]), metrics={"train_loss": mean})


def evaluate(adapters: gpt.Adapters, task):
    base, text = checked_base(adapters, task.data_dir)
    bpb, accuracy, count = gpt.bits_per_byte(base, adapters, text["test"])
    return ferry_sdk.EvaluateResult(count, loss=bpb, accuracy=accuracy, metrics={"bits_per_byte": bpb})


if __name__ == "__main__":
    pytorch.run(gpt.Adapters(), train, evaluate)
