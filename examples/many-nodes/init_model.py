"""Writes the run's initial LeNet: `python3 init_model.py init.safetensors`."""

import os
import sys

import torch
from ferry_sdk import pytorch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lenet import LeNet  # noqa: E402

torch.manual_seed(0)
pytorch.save_initial_model(LeNet(), sys.argv[1] if len(sys.argv) > 1 else "init.safetensors")
