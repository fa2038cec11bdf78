"""A byte-level GPT small enough to train on two CPU cores, with LoRA adapters on its attention
projections. The base model's weights stay on each node (a plain tensor dict, never handed to
Ferry); the adapters are the only tensors Ferry moves. No tokenizer: the vocabulary is the 256
byte values."""

from __future__ import annotations

import hashlib
import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

CONTEXT = 64  # bytes a window sees
WIDTH = 64  # model width
HEADS = 4
LAYERS = 2
RANK = 2  # LoRA rank
ALPHA = 4.0  # LoRA scale numerator: the adapter's output is scaled by ALPHA / RANK
ADAPTED = ("q", "v")  # the attention projections that carry adapters


def base_shapes() -> Dict[str, tuple]:
    """Every base tensor's shape, by name."""
    shapes = {"tok": (256, WIDTH), "pos": (CONTEXT, WIDTH), "norm.w": (WIDTH,), "norm.b": (WIDTH,)}
    for i in range(LAYERS):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[p + ln + ".w"] = (WIDTH,)
            shapes[p + ln + ".b"] = (WIDTH,)
        for proj in ("q", "k", "v", "o"):
            shapes[p + proj] = (WIDTH, WIDTH)
        shapes[p + "fc1"] = (4 * WIDTH, WIDTH)
        shapes[p + "fc2"] = (WIDTH, 4 * WIDTH)
    return shapes


def init_base(seed: int) -> Dict[str, torch.Tensor]:
    """A freshly initialised base model."""
    g = torch.Generator().manual_seed(seed)
    base = {}
    for name, shape in base_shapes().items():
        if name.endswith(".w"):
            base[name] = torch.ones(shape)
        elif name.endswith(".b"):
            base[name] = torch.zeros(shape)
        else:
            std = 0.02 if len(shape) == 2 and name in ("tok", "pos") else 1 / math.sqrt(shape[-1])
            base[name] = torch.randn(shape, generator=g) * std
    return base


def base_sha256(path: str) -> bytes:
    """The base model file's SHA-256, as the federation pins it."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()


class Adapter(nn.Module):
    """LoRA's pair for one projection: ``B @ A`` added to it, A drawn at random, B from zero."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(RANK, WIDTH, generator=generator) / math.sqrt(WIDTH))
        self.lora_B = nn.Parameter(torch.zeros(WIDTH, RANK))


class BlockAdapters(nn.Module):
    def __init__(self, generator: torch.Generator):
        super().__init__()
        for proj in ADAPTED:
            self.add_module(proj, Adapter(generator))


class Adapters(nn.Module):
    """The tensors Ferry moves: every adapter, and the base model's hash (a uint8 buffer, which
    Ferry carries and never averages), so that a node can tell that its base is the
    federation's."""

    def __init__(self, seed: int = 0, base_hash: bytes = bytes(32)):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList([BlockAdapters(g) for _ in range(LAYERS)])
        self.register_buffer("base_sha256", torch.tensor(list(base_hash), dtype=torch.uint8))


def _layer_norm(x, base, name):
    return F.layer_norm(x, (WIDTH,), base[name + ".w"], base[name + ".b"])


def _project(x, base, adapters, i, proj):
    y = x @ base[f"blocks.{i}.{proj}"].t()
    if adapters is not None and proj in ADAPTED:
        a = getattr(adapters.blocks[i], proj)
        y = y + (x @ a.lora_A.t() @ a.lora_B.t()) * (ALPHA / RANK)
    return y


def logits(base: Dict[str, torch.Tensor], adapters, x: torch.Tensor) -> torch.Tensor:
    """Next-byte logits for a batch of byte windows ``x`` [batch, time]."""
    b, t = x.shape
    h = base["tok"][x] + base["pos"][:t]
    mask = torch.full((t, t), float("-inf")).triu(1)
    for i in range(LAYERS):
        n = _layer_norm(h, base, f"blocks.{i}.ln1")
        q, k, v = (_project(n, base, adapters, i, p).view(b, t, HEADS, -1).transpose(1, 2) for p in "qkv")
        att = (q @ k.transpose(-2, -1)) / math.sqrt(WIDTH // HEADS) + mask
        out = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, WIDTH)
        h = h + _project(out, base, adapters, i, "o")
        n = _layer_norm(h, base, f"blocks.{i}.ln2")
        h = h + F.gelu(n @ base[f"blocks.{i}.fc1"].t()) @ base[f"blocks.{i}.fc2"].t()
    return _layer_norm(h, base, "norm") @ base["tok"].t()


def loss(base, adapters, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of windows of CONTEXT + 1 bytes."""
    out = logits(base, adapters, windows[:, :-1])
    return F.cross_entropy(out.reshape(-1, 256), windows[:, 1:].reshape(-1))


def batch(data: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` random windows of CONTEXT + 1 bytes of ``data``."""
    starts = torch.randint(0, len(data) - CONTEXT - 1, (size,), generator=generator)
    return torch.stack([data[s : s + CONTEXT + 1] for s in starts.tolist()]).long()


@torch.no_grad()
def bits_per_byte(base, adapters, data: torch.Tensor) -> tuple:
    """Held-out bits per byte and next-byte accuracy over ``data``, cut into consecutive
    windows (each byte after a window's first is predicted once)."""
    starts = range(0, len(data) - CONTEXT - 1, CONTEXT)
    windows = torch.stack([data[s : s + CONTEXT + 1] for s in starts]).long()
    total, correct = 0.0, 0
    for chunk in windows.split(64):
        out = logits(base, adapters, chunk[:, :-1])
        total += F.cross_entropy(out.reshape(-1, 256), chunk[:, 1:].reshape(-1), reduction="sum").item()
        correct += (out.argmax(-1) == chunk[:, 1:]).sum().item()
    count = windows.shape[0] * CONTEXT
    return total / count / math.log(2), correct / count, count


def train_steps(base, adapters, data, steps: int, lr: float, batch_size: int, generator) -> float:
    """``steps`` Adam steps on the adapters' trainable parameters; the mean loss."""
    params = [p for p in adapters.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        value = loss(base, adapters, batch(data, batch_size, generator))
        value.backward()
        opt.step()
        losses.append(value.item())
    return sum(losses) / max(len(losses), 1)
