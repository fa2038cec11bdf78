"""Runs a command and prints one JSON line: the peak summed RSS (MB) of its whole process tree,
sampled every 0.2 s, its wall time and exit status; the command's output goes to stderr.

    python3 tree_peak.py -- ferry simulate ..."""

import json
import subprocess
import sys
import time

from measure import tree_rss


def main():
    command = sys.argv[2:] if sys.argv[1:2] == ["--"] else sys.argv[1:]
    if not command:
        raise SystemExit(__doc__)
    started = time.time()
    process = subprocess.Popen(command, stdout=sys.stderr)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        time.sleep(0.2)
    print(json.dumps({"peak_rss_mb": peak / 1e6, "wall_s": time.time() - started, "rc": process.returncode}))


if __name__ == "__main__":
    main()
