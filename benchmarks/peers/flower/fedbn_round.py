"""Flower's half of the FedBN workload: `examples/pytorch`'s FashionNet (a CNN with BatchNorm)
over the site folders `make_shares.py` writes. Each virtual node keeps its own BatchNorm
tensors (FedBN): it trains with them, and every round it scores the new global model with them
on its own `test.pt` (federated evaluation over every node). The runtime is Flower's
simulation (Ray, one CPU per virtual client: as many at once as the machine has cores).

The run is paired with a Ferry run of the same sites (`--replay RUN/history.json`):

- each round's sampled clients train the shares of the nodes Ferry's round had;
- it uses Ferry's training settings and each node's shuffle seed;
- the initial model is the one `examples/pytorch/init_model.py` writes.

A node's BatchNorm is kept in a folder, by node. Under the pairing, the Flower client that
trains node n's share changes from round to round, so Flower's own per-client state
(`context.state`) would file it under the wrong node. Prints one JSON line: the whole run's
seconds, seconds per round after the first (training, aggregation and the federated
evaluation), the federated accuracy by round, and the peak RSS of this process's tree.

    python fedbn_round.py --sites 'data/site-*' --replay RUN/history.json

Run with the interpreter of a virtual environment holding flwr[simulation]==1.42.0, made with
--system-site-packages for Debian's torch (`run.sh` makes it)."""

import argparse
import glob
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "noopbench"))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "examples", "pytorch"))

from measure import simulate  # noqa: E402
from pairing import Replay, assign  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", required=True, help="the site folders, as a glob pattern")
    parser.add_argument("--replay", required=True, help="the paired Ferry run's history.json")
    args = parser.parse_args()
    started = time.time()

    folders = sorted(glob.glob(args.sites))  # Ferry's node order: folder names, sorted
    replay = Replay(args.replay)
    ferry = replay.config
    rounds = len(replay.nodes)
    if ferry["clients"] != len(folders):
        raise SystemExit(f"{args.sites} matches {len(folders)} folders; the Ferry run had {ferry['clients']} nodes")

    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerAppComponents, ServerConfig
    from noopbench.server_app import TimedFedAvg

    from arrays import arrays_of, load_arrays
    from net import FashionNet

    torch.manual_seed(0)  # the initial model of examples/pytorch/init_model.py
    initial = FashionNet().state_dict()
    batch_norm = tuple(
        f"{name}." for name, module in FashionNet().named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
    )
    kept = tempfile.mkdtemp(prefix="flower-fedbn-")

    def own(node):
        """Node `node`'s BatchNorm tensors: the initial ones until it has trained."""
        path = os.path.join(kept, f"{node}.pt")
        if os.path.exists(path):
            return torch.load(path)
        return {k: v for k, v in initial.items() if k.startswith(batch_norm)}

    def model_of(parameters, node):
        model = FashionNet()
        load_arrays(model, parameters)
        model.load_state_dict(own(node), strict=False)
        return model

    class Node(NumPyClient):
        def __init__(self, node):
            self.node = node

        def fit(self, parameters, config):
            torch.set_num_threads(1)
            node = int(config["node"])
            model = model_of(parameters, node)
            share = torch.load(os.path.join(folders[node], "train.pt"))
            images, labels = share["images"], share["labels"]
            optimizer = torch.optim.SGD(model.parameters(), lr=ferry["lr"], momentum=ferry["momentum"],
                                        weight_decay=ferry["weight_decay"])
            generator = torch.Generator().manual_seed(replay.seed(int(config["round"]), node))
            model.train()
            for _ in range(ferry["epochs"]):
                for batch in torch.randperm(len(labels), generator=generator).split(ferry["batch_size"]):
                    optimizer.zero_grad()
                    torch.nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
                    optimizer.step()
            torch.save({k: v for k, v in model.state_dict().items() if k.startswith(batch_norm)},
                       os.path.join(kept, f"{node}.pt"))
            return arrays_of(model), len(labels), {}

        def evaluate(self, parameters, config):
            torch.set_num_threads(1)
            model = model_of(parameters, self.node)
            held_out = torch.load(os.path.join(folders[self.node], "test.pt"))
            model.eval()
            with torch.no_grad():
                logits = model(held_out["images"])
            loss = torch.nn.functional.cross_entropy(logits, held_out["labels"]).item()
            accuracy = (logits.argmax(1) == held_out["labels"]).float().mean().item()
            return loss, len(held_out["labels"]), {"accuracy": accuracy}

    def client_fn(context: Context):
        return Node(int(context.node_config["partition-id"])).to_client()

    accuracy = {}

    class Strategy(TimedFedAvg):
        """FedAvg whose sampled clients train the replayed round's nodes; the federated
        accuracy is the example-weighted mean over every node."""

        def configure_fit(self, server_round, parameters, client_manager):
            chosen = super().configure_fit(server_round, parameters, client_manager)
            return assign(chosen, server_round, replay.nodes[server_round - 1])

        def aggregate_evaluate(self, server_round, results, failures):
            examples = sum(r.num_examples for _, r in results)
            accuracy[server_round] = sum(r.num_examples * r.metrics["accuracy"] for _, r in results) / examples
            return super().aggregate_evaluate(server_round, results, failures)

    times_file = os.path.join(kept, "round-times.txt")

    def server_fn(context: Context):
        sampled = len(replay.nodes[0])
        strategy = Strategy(
            times_file=times_file, fraction_fit=sampled / len(folders), fraction_evaluate=1.0,
            min_fit_clients=sampled, min_evaluate_clients=len(folders),
            min_available_clients=len(folders),
            initial_parameters=ndarrays_to_parameters([v.numpy() for v in initial.values()]))
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    per_round, mean, peak_mb = simulate(server_fn, ClientApp(client_fn=client_fn), len(folders), times_file)
    print(json.dumps({
        "system": "flower-1.42.0-simulation-pytorch-fedbn",
        "nodes": len(folders),
        "rounds": rounds,
        "run_s": time.time() - started,
        "round_s": per_round,
        "mean_round_s": mean,
        "accuracy": accuracy.get(rounds),
        "accuracy_by_round": accuracy,
        "peak_rss_mb": peak_mb,
    }))


if __name__ == "__main__":
    main()
