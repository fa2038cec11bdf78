"""Flower's half of the deployed-round workload: a SuperLink and N SuperNodes on loopback
(insecure gRPC, Flower's default), the no-op App of `noopbench/` run for R rounds of FedAvg
over one f32 tensor of P values. Prints one JSON line: seconds per round after the first, and
the peak RSS of the SuperLink's process tree (with the ServerApp it starts), of one
SuperNode's tree (with its ClientApp), and of everything.

    python deployed_round.py --nodes 10 --params 10000000 --rounds 3

Run with the interpreter of a virtual environment holding flwr==1.42.0 (run.sh makes one)."""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from measure import tree_rss

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port} after {seconds} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="flower-bench-")
    # The SuperLink and SuperNodes start Flower's other executables by name.
    env = dict(os.environ, FLWR_HOME=os.path.join(work, "flwr-home"),
               PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    link_port = free_port()
    os.makedirs(env["FLWR_HOME"])
    with open(os.path.join(env["FLWR_HOME"], "config.toml"), "w") as f:
        f.write(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    log = open(os.path.join(work, "flower.log"), "w")
    procs = []

    def start(cmd):
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=work, start_new_session=True))
        return procs[-1]

    try:
        # Flower 1.42 serves its Fleet, Control and runtime APIs over HTTP on one port.
        link = start([os.path.join(BIN, "flower-superlink"), "--insecure",
                      "--port", str(link_port)])
        wait_port(link_port)
        nodes = [start([os.path.join(BIN, "flower-supernode"), "--insecure",
                        "--superlink", f"127.0.0.1:{link_port}",
                        "--port", str(free_port()),
                        "--node-config", f"partition-id={i}"])
                 for i in range(args.nodes)]
        times_file = os.path.join(work, "round-times.txt")
        app = os.path.join(work, "noopbench")
        shutil.copytree(os.path.join(HERE, "noopbench"), app)
        config = (f'num-server-rounds={args.rounds} params={args.params} nodes={args.nodes} '
                  f'times-file="{times_file}"')
        submitted = time.time()
        subprocess.run([os.path.join(BIN, "flwr"), "run", app, "bench", "--run-config", config],
                       env=env, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=work)
        peak_link = peak_node = peak_all = 0
        deadline = submitted + args.timeout
        rounds = []
        while time.time() < deadline:
            link_rss = tree_rss(link.pid)
            node_rss = [tree_rss(n.pid) for n in nodes]
            peak_link = max(peak_link, link_rss)
            peak_node = max([peak_node] + node_rss)
            peak_all = max(peak_all, link_rss + sum(node_rss))
            if os.path.exists(times_file):
                with open(times_file) as f:
                    rounds = [line.split() for line in f if line.strip()]
                if len(rounds) >= args.rounds:
                    break
            time.sleep(0.2)
        if len(rounds) < args.rounds:
            raise SystemExit(f"only {len(rounds)} of {args.rounds} rounds in {args.timeout} s; "
                             f"see {log.name}")
        ends = [float(r[1]) for r in rounds]
        per_round = [b - a for a, b in zip(ends, ends[1:])]
        print(json.dumps({
            "system": "flower-1.42.0",
            "nodes": args.nodes,
            "params": args.params,
            "first_round_s": ends[0] - submitted,
            "round_s": per_round,
            "mean_round_s": sum(per_round) / len(per_round) if per_round else None,
            "peak_rss_superlink_tree_mb": peak_link / 1e6,
            "peak_rss_supernode_tree_mb": peak_node / 1e6,
            "peak_rss_all_mb": peak_all / 1e6,
        }))
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
        log.close()


if __name__ == "__main__":
    main()
