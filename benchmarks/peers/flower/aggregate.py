"""Flower's half of the FedAvg aggregation workload: N synthetic updates of one f32 tensor of
P values, aggregated by Flower's own `aggregate` (the function its FedAvg strategy calls), as
`ferry bench aggregate` aggregates them. Prints one JSON line: seconds for the aggregation and
this process's peak RSS (the updates, as Flower's server holds them before aggregating, are
counted in both).

    python aggregate.py --updates 20 --params 10000000"""

import argparse
import json
import resource
import time

import numpy as np
from flwr.server.strategy.aggregate import aggregate


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000)
    args = parser.parse_args()
    results = [
        ([np.random.default_rng(i).uniform(-0.01, 0.01, args.params).astype(np.float32)],
         100 + i)
        for i in range(args.updates)
    ]
    began = time.perf_counter()
    mean = aggregate(results)
    seconds = time.perf_counter() - began
    assert mean[0].shape == (args.params,)
    print(json.dumps({
        "system": "flower-1.42.0",
        "updates": args.updates,
        "params": args.params,
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
    }))


if __name__ == "__main__":
    main()
