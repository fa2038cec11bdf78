"""Scores a Ferry model file of FashionNet on Fashion-MNIST's test set, after loading it with
`strict=True`: `python3 evaluate.py run/model.safetensors` prints the accuracy."""

import sys

from ferry_sdk import pytorch

import data
from net import FashionNet, accuracy

model = pytorch.load_into(FashionNet(), sys.argv[1], strict=True)
images, labels = data.load("t10k")
print(f"test accuracy {accuracy(model, images, labels):.4f}")
