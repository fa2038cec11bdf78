"""Trains the base model once, on the licences' English, and puts a copy of it in every site's
folder: each node keeps its own copy, which the federation pins by its SHA-256. Writes
``DATA/base.safetensors`` and ``DATA/sites/*/base.safetensors``."""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import time

import torch
from safetensors.torch import save_file

import gpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", help="the folder prepare.py wrote")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    with open(os.path.join(args.data, "base.bin"), "rb") as f:
        text = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    base = {k: v.requires_grad_(True) for k, v in gpt.init_base(args.seed).items()}
    opt = torch.optim.AdamW(base.values(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    g = torch.Generator().manual_seed(args.seed)
    started = time.time()
    for step in range(1, args.steps + 1):
        opt.zero_grad()
        loss = gpt.loss(base, None, gpt.batch(text, args.batch_size, g))
        loss.backward()
        opt.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps:
            print(f"base step {step}/{args.steps}: {loss.item() / 0.6931:.3f} bits per byte ({time.time() - started:.0f} s)", flush=True)
    path = os.path.join(args.data, "base.safetensors")
    save_file({k: v.detach().contiguous() for k, v in base.items()}, path)
    for site in sorted(glob.glob(os.path.join(args.data, "sites", "*"))):
        shutil.copyfile(path, os.path.join(site, "base.safetensors"))
    size = os.path.getsize(path)
    print(f"base model: {sum(v.numel() for v in base.values())} parameters, {size} bytes, sha256 {gpt.base_sha256(path).hex()}")


if __name__ == "__main__":
    main()
