"""Flower's half of the simulated LeNet round: 10 virtual SuperNodes in Flower's simulation
runtime (Ray, one CPU each), each training LeNet (train_speed.py's network, PyTorch from
Debian's python3-torch) for 1 epoch on an IID tenth of Fashion-MNIST's training set (batch 64,
SGD lr 0.01, momentum 0.9, weight decay 1e-5, the settings of `ferry simulate`'s defaults),
FedAvg over all of them, and the global model scored on the 10,000 test images after every
round. Prints one JSON line: seconds per round after the first, the last round's accuracy, and
the peak RSS of this process's tree.

    python lenet_round.py --nodes 10 --rounds 3
        (the virtual environment's interpreter, made with --system-site-packages for torch)"""

import argparse
import gzip
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "noopbench"))

from measure import simulate  # noqa: E402

DATA = "/usr/share/datasets/fashion-mnist"


def idx(name):
    with gzip.open(os.path.join(DATA, name)) as f:
        raw = f.read()
    import numpy as np
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    import torch
    from torch import nn
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerAppComponents, ServerConfig
    from noopbench.server_app import TimedFedAvg
    from arrays import arrays_of, load_arrays
    from train_speed import LeNet

    train_x = torch.tensor(idx("train-images-idx3-ubyte.gz"), dtype=torch.float32).div(255).unsqueeze(1)
    train_y = torch.tensor(idx("train-labels-idx1-ubyte.gz"), dtype=torch.int64)
    test_x = torch.tensor(idx("t10k-images-idx3-ubyte.gz"), dtype=torch.float32).div(255).unsqueeze(1)
    test_y = torch.tensor(idx("t10k-labels-idx1-ubyte.gz"), dtype=torch.int64)
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
    shares = order.chunk(args.nodes)

    class Node(NumPyClient):
        def __init__(self, share):
            self.share = share

        def fit(self, parameters, config):
            torch.set_num_threads(1)
            model = LeNet()
            load_arrays(model, parameters)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                                        weight_decay=1e-5)
            loss_fn = nn.CrossEntropyLoss()
            mine = self.share[torch.randperm(len(self.share))]
            for start in range(0, len(mine), 64):
                batch = mine[start:start + 64]
                optimizer.zero_grad()
                loss_fn(model(train_x[batch]), train_y[batch]).backward()
                optimizer.step()
            return arrays_of(model), len(mine), {}

    def client_fn(context: Context):
        return Node(shares[int(context.node_config["partition-id"])]).to_client()

    accuracy = [None]

    def evaluate(server_round, parameters, config):
        model = LeNet()
        load_arrays(model, parameters)
        with torch.no_grad():
            logits = model(test_x)
        accuracy[0] = float((logits.argmax(1) == test_y).float().mean())
        return float(nn.functional.cross_entropy(logits, test_y)), {"accuracy": accuracy[0]}

    times_file = os.path.join(tempfile.mkdtemp(prefix="flower-lenet-"), "round-times.txt")

    def server_fn(context: Context):
        torch.manual_seed(0)
        strategy = TimedFedAvg(
            times_file=times_file, fraction_fit=1.0, fraction_evaluate=0.0,
            min_fit_clients=args.nodes, min_available_clients=args.nodes,
            initial_parameters=ndarrays_to_parameters(arrays_of(LeNet())), evaluate_fn=evaluate)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    per_round, mean, peak_mb = simulate(server_fn, ClientApp(client_fn=client_fn), args.nodes,
                                        times_file)
    print(json.dumps({
        "system": "flower-1.42.0-simulation-pytorch",
        "nodes": args.nodes,
        "round_s": per_round,
        "mean_round_s": mean,
        "accuracy": accuracy[0],
        "peak_rss_mb": peak_mb,
    }))


if __name__ == "__main__":
    main()
