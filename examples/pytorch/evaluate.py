"""Scores a Ferry model file of FashionNet after loading it with `strict=True`:
`python3 evaluate.py run/model.safetensors` prints its accuracy on Fashion-MNIST's test set;
`python3 evaluate.py run/model.safetensors --held-out 'data/site-*'` prints it on the sites'
held-out examples together (each site's test.pt), what the run's federated evaluation scored."""

import argparse
import glob
import os

import torch
from ferry_sdk import pytorch

import data
from net import FashionNet, accuracy

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("model")
parser.add_argument("--held-out", metavar="PATTERN", help="site folders holding test.pt")
args = parser.parse_args()
model = pytorch.load_into(FashionNet(), args.model, strict=True)
if args.held_out:
    shares = [torch.load(os.path.join(d, "test.pt")) for d in sorted(glob.glob(args.held_out))]
    images = torch.cat([s["images"] for s in shares])
    labels = torch.cat([s["labels"] for s in shares])
    print(f"held-out accuracy {accuracy(model, images, labels):.4f} on {len(labels)} examples")
else:
    images, labels = data.load("t10k")
    print(f"test accuracy {accuracy(model, images, labels):.4f}")
