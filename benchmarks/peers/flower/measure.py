"""Measurements shared by the Flower-side scripts: the RSS of a process tree, its peak sampled
in the background while a workload runs, and the time per round from the ServerApp's
times file."""

import os
import threading
import time


def tree_rss(root_pid):
    """RSS in bytes of a process and all its descendants (from /proc)."""
    children = {}
    rss = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


class PeakTree:
    """Samples the RSS of this process's tree every 0.2 s while the `with` block runs;
    `peak_mb` holds the highest sum seen."""

    def __enter__(self):
        self.peak = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    @property
    def peak_mb(self):
        return self.peak / 1e6


def simulate(server_fn, client_app, nodes, times_file):
    """Runs a ServerApp from `server_fn` with `client_app` on `nodes` virtual SuperNodes of
    Flower's Ray runtime (one CPU each: as many at once as this machine has cores); returns
    the seconds between consecutive rounds' ends (after the first), their mean, and the
    process tree's peak RSS in MB."""
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    with PeakTree() as memory:
        run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=client_app,
                       num_supernodes=nodes,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    with open(times_file) as f:
        ends = [float(line.split()[1]) for line in f if line.strip()]
    per_round = [b - a for a, b in zip(ends, ends[1:])]
    mean = sum(per_round) / len(per_round) if per_round else None
    return per_round, mean, memory.peak_mb
