#!/usr/bin/env bash
# Proves the README's quick start on a stock Debian 12 machine: builds a fresh bookworm root
# with debootstrap from Debian's packages, adds only what the README assumes (a Rust toolchain
# copied from this host, build-essential, git, ca-certificates, python3), clones this
# repository's HEAD into it and runs the README's two commands exactly as written.
#
#   sudo scripts/check-fresh-debian.sh [WORK_DIR]
#
# Needs root (debootstrap, chroot, mounts) and takes many minutes (a cold release build and the
# whole test suite), so it is not part of the test command. The root trusts this host's CA
# certificates, so downloads work where a proxy re-signs them. Prints each step's time and
# exits with the first failing command's status. WORK_DIR (default: a new folder under
# /var/tmp) must not hold a root already (each check starts from a fresh one) and keeps the
# root and its logs afterwards; DEBIAN_MIRROR overrides the mirror.
set -euo pipefail

[ "$(id -u)" -eq 0 ] || { echo "check-fresh-debian: run as root (debootstrap and chroot need it)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "check-fresh-debian: install debootstrap (apt-get install debootstrap)" >&2; exit 1; }
command -v rustup >/dev/null || { echo "check-fresh-debian: no rustup toolchain on this host to copy" >&2; exit 1; }

repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /var/tmp/ferry-fresh-debian.XXXXXX)}
root="$work/root"
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$work"

started=$(date +%s)
step() { echo "== $(date -u +%H:%M:%S) (+$(($(date +%s) - started)) s) $*"; }

mounted=()
cleanup() {
  # Services the install script started inside the root (PostgreSQL) stop with the check.
  if [ -x "$root/usr/bin/pg_lsclusters" ] && mountpoint -q "$root/proc"; then
    chroot "$root" bash -c 'pg_lsclusters --no-header | while read -r v n _; do
      pg_ctlcluster "$v" "$n" stop 2>/dev/null; done' || true
  fi
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() {
  mkdir -p "$root$2"
  mount "${@:3}" "$1" "$root$2"
  mounted+=("$root$2")
}

[ ! -e "$root" ] || { echo "check-fresh-debian: $root exists; give a new WORK_DIR" >&2; exit 1; }
step "debootstrap bookworm into $root"
debootstrap --include=build-essential,git,ca-certificates,python3 bookworm "$root" "$mirror" \
  >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; exit 1; }

step "trusting this host's CA certificates and copying its Rust toolchain"
mkdir -p "$root/usr/local/share/ca-certificates"
cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
chroot "$root" update-ca-certificates >/dev/null
toolchain=$(rustup show active-toolchain | cut -d' ' -f1)
mkdir -p "$root/root/.rustup/toolchains" "$root/root/.cargo/bin"
cp -a "$(rustup toolchain list -v | grep "^$toolchain" | awk '{print $NF}')" "$root/root/.rustup/toolchains/"
printf 'default_toolchain = "%s"\nprofile = "minimal"\nversion = "12"\n' "$toolchain" >"$root/root/.rustup/settings.toml"
# As rustup installs it: rustup itself, and a proxy named after every tool of the toolchain
# (cargo, rustc, rustdoc, ...).
cp "$(command -v rustup)" "$root/root/.cargo/bin/rustup"
for tool in "$root/root/.rustup/toolchains/$toolchain/bin/"*; do
  ln -f "$root/root/.cargo/bin/rustup" "$root/root/.cargo/bin/$(basename "$tool")"
done
cp /etc/resolv.conf "$root/etc/resolv.conf"

step "cloning $(git -C "$repo" rev-parse --short HEAD) into the root"
rm -rf "$root/root/ferry"
git clone --quiet "$repo" "$root/root/ferry"

bind /proc /proc -t proc
bind /sys /sys --rbind
bind /dev /dev --rbind
mount --make-rslave "$root/dev"
mount --make-rslave "$root/sys"

in_root() {
  chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    bash -c "cd /root/ferry && $1"
}
# The two commands, copied from the README's quick start so that this check runs what it says.
install_and_demo=$(grep -m1 '^scripts/install-deps.sh' "$repo/README.md")
test_suite=$(grep -m1 '^cargo test --workspace' "$repo/README.md")

step "README command 1: $install_and_demo"
in_root "$install_and_demo" 2>&1 | tee "$work/command-1.log"
step "README command 2: $test_suite"
in_root "$test_suite" 2>&1 | tee "$work/command-2.log"
step "both README commands succeeded; logs in $work"
