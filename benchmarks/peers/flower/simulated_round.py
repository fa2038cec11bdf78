"""Flower's half of the simulated no-op round: N virtual SuperNodes in Flower's simulation
runtime (Ray), the no-op App of `noopbench/` (FedAvg over every node, one f32 tensor of P
values, a ClientApp that returns what it received) for R rounds. Prints one JSON line: seconds
per round after the first, and the peak RSS of this process's tree (the driver, Ray's
processes and its workers).

    python simulated_round.py --nodes 100 --params 1000000 --rounds 3

Run with the interpreter of a virtual environment holding flwr[simulation]==1.42.0."""

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "noopbench"))
sys.path.insert(0, HERE)

from measure import simulate  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerAppComponents, ServerConfig
    from noopbench.client_app import app as client_app
    from noopbench.server_app import TimedFedAvg

    times_file = os.path.join(tempfile.mkdtemp(prefix="flower-sim-"), "round-times.txt")

    def server_fn(context: Context):
        weights = np.random.default_rng(1).uniform(-0.01, 0.01, args.params).astype(np.float32)
        strategy = TimedFedAvg(
            times_file=times_file,
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=args.nodes,
            min_available_clients=args.nodes,
            initial_parameters=ndarrays_to_parameters([weights]),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    per_round, mean, peak_mb = simulate(server_fn, client_app, args.nodes, times_file)
    print(json.dumps({
        "system": "flower-1.42.0-simulation",
        "nodes": args.nodes,
        "params": args.params,
        "round_s": per_round,
        "mean_round_s": mean,
        "peak_rss_mb": peak_mb,
    }))


if __name__ == "__main__":
    main()
