"""The federation's initial model: LoRA adapters for the base model (A at random from the seed,
B zero, so the adapted model starts as the base), carrying the base model's SHA-256."""

from __future__ import annotations

import argparse

from ferry_sdk import pytorch

import gpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("base", help="the base model file every site holds")
    parser.add_argument("out", help="the initial model file to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pytorch.save_initial_model(gpt.Adapters(args.seed, gpt.base_sha256(args.base)), args.out)


if __name__ == "__main__":
    main()
