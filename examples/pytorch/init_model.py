"""Writes the run's initial model: `python3 init_model.py init.safetensors`."""

import sys

import torch
from ferry_sdk import pytorch

from net import FashionNet

torch.manual_seed(0)
pytorch.save_initial_model(FashionNet(), sys.argv[1] if len(sys.argv) > 1 else "init.safetensors")
