"""The ServerApp: FedAvg over every node, one f32 tensor of `params` values, no evaluation;
the wall-clock time at the end of each round's aggregation goes to `times-file`."""

import time

import numpy as np
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg


class TimedFedAvg(FedAvg):
    def __init__(self, times_file, **kwargs):
        super().__init__(**kwargs)
        self.times_file = times_file

    def aggregate_fit(self, server_round, results, failures):
        aggregated = super().aggregate_fit(server_round, results, failures)
        with open(self.times_file, "a") as f:
            f.write(f"{server_round} {time.time():.6f} {len(results)} {len(failures)}\n")
        return aggregated


def server_fn(context: Context):
    config = context.run_config
    nodes = int(config["nodes"])
    weights = np.random.default_rng(1).uniform(-0.01, 0.01, int(config["params"])).astype(np.float32)
    strategy = TimedFedAvg(
        times_file=str(config["times-file"]),
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=nodes,
        min_available_clients=nodes,
        initial_parameters=ndarrays_to_parameters([weights]),
    )
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=int(config["num-server-rounds"])))


app = ServerApp(server_fn=server_fn)
