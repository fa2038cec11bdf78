"""Text for the example, from files every Debian machine has (nothing is downloaded): the base
model learns English from the licences in /usr/share/common-licenses; three sites each hold a
different kind of text (non-IID by domain): Python source from the standard library, C headers
from /usr/include, and Debian package changelogs. Writes ``OUT/base.bin`` and, per site,
``OUT/sites/<site>/train.bin`` and ``test.bin`` (raw bytes; the held-out text is the tail)."""

from __future__ import annotations

import argparse
import glob
import gzip
import os

SITES = {
    "python": ("/usr/lib/python3*/*.py", False),
    "c-headers": ("/usr/include/*.h", False),
    "changelogs": ("/usr/share/doc/*/changelog.Debian.gz", True),
}


def gather(pattern: str, gzipped: bool, size: int) -> bytes:
    """The first ``size`` bytes of the files matching ``pattern``, in name order, each cut to
    at most 16 KiB so that no single file dominates a domain."""
    out = bytearray()
    for path in sorted(glob.glob(pattern)):
        opener = gzip.open if gzipped else open
        try:
            with opener(path, "rb") as f:
                out += f.read(16 * 1024) + b"\n"
        except OSError:
            continue
        if len(out) >= size:
            break
    if len(out) < size:
        raise SystemExit(f"only {len(out)} bytes match {pattern}; {size} are needed")
    return bytes(out[:size])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data")
    parser.add_argument("--train-bytes", type=int, default=240_000, help="per site")
    parser.add_argument("--test-bytes", type=int, default=24_000, help="per site, held out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    base = gather("/usr/share/common-licenses/*", False, 200_000)
    with open(os.path.join(args.out, "base.bin"), "wb") as f:
        f.write(base)
    for site, (pattern, gzipped) in SITES.items():
        text = gather(pattern, gzipped, args.train_bytes + args.test_bytes)
        folder = os.path.join(args.out, "sites", site)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "train.bin"), "wb") as f:
            f.write(text[: args.train_bytes])
        with open(os.path.join(folder, "test.bin"), "wb") as f:
            f.write(text[args.train_bytes :])
        print(f"{site}: {args.train_bytes} bytes to train on, {args.test_bytes} held out")
    print(f"base text: {len(base)} bytes of licences")


if __name__ == "__main__":
    main()
