"""Flower's half of the own-code simulation: the virtual nodes of a `ferry simulate
--node-data pooled --clients N` run (the node folders Ferry split, so both sides train on the
same shares), each training `examples/many-nodes`' LeNet with the same local SGD, in Flower's
simulation runtime (Ray, one CPU per virtual client: as many at once as the machine has
cores). FedAvg samples `--fraction` of the nodes each round. With `--replay RUN/history.json`
the run is paired with Ferry's: the clients Flower samples train the shares of the nodes that
Ferry's run had in each round, with Ferry's training settings and each node's shuffle seed
(the run seed mixed with the round, then with the node, as Ferry hands its trainer), so the
two runs differ only in the runtime and in how FedAvg's sums are rounded. Every `--evaluate-every` rounds the
global model is scored on the pooled test set (the union of the nodes' `test.csv`, which is
what Ferry's federated evaluation over every node reports). Prints one JSON line: seconds per
round after the first (without the central evaluations), the accuracies, and the peak RSS of
this process's tree.

    python own_code_round.py --node-dirs 'RUN/data/node-*' --test pooled/test.csv \
        --rounds 30 --fraction 0.1 --epochs 2 --batch-size 32 --lr 0.05 --momentum 0.9

Run with the interpreter of a virtual environment holding flwr[simulation]==1.42.0, made with
--system-site-packages for Debian's torch (`run.sh` makes it)."""

import argparse
import glob
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "..", "..", "examples", "many-nodes")
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "noopbench"))
sys.path.insert(0, EXAMPLE)

from measure import simulate  # noqa: E402
from pairing import Replay, assign  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node-dirs", required=True, help="the node folders, as a glob pattern")
    parser.add_argument("--test", required=True, help="the pooled test.csv")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--evaluate-every", type=int, default=10)
    parser.add_argument("--replay", help="a Ferry run's history.json: train its rounds' nodes")
    args = parser.parse_args()

    folders = sorted(glob.glob(args.node_dirs), key=lambda f: int(f.rsplit("-", 1)[1]))
    if not folders:
        raise SystemExit(f"--node-dirs {args.node_dirs} matches no folder")

    replay = Replay(args.replay) if args.replay else None
    if replay:
        ferry = replay.config
        args.epochs, args.batch_size, args.lr = ferry["epochs"], ferry["batch_size"], ferry["lr"]
        args.momentum, args.weight_decay = ferry["momentum"], ferry["weight_decay"]
        if len(replay.nodes) < args.rounds:
            raise SystemExit(f"--replay has {len(replay.nodes)} rounds; --rounds is {args.rounds}")

    import time

    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerAppComponents, ServerConfig
    from noopbench.server_app import TimedFedAvg

    import local
    import rows
    from arrays import arrays_of, load_arrays
    from lenet import LeNet

    class Node(NumPyClient):
        def __init__(self, node):
            self.node = node

        def fit(self, parameters, config):
            torch.set_num_threads(1)
            node = int(config.get("node", self.node))
            images, labels = rows.load(folders[node], "train.csv")
            model = LeNet()
            load_arrays(model, parameters)
            loss = local.local_sgd(
                model, images, labels, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                momentum=args.momentum, weight_decay=args.weight_decay,
                generator=torch.Generator().manual_seed(node_seed(int(config["round"]), node)))
            return arrays_of(model), len(labels), {"train_loss": loss}

    def node_seed(round_, node):
        return replay.seed(round_, node) if replay else round_ * len(folders) + node

    def client_fn(context: Context):
        node = int(context.node_config["partition-id"])
        return Node(node).to_client()

    test = rows.load(os.path.dirname(args.test) or ".", os.path.basename(args.test))
    accuracy, evaluation_s = {}, {}

    def evaluate(server_round, parameters, config):
        if server_round == 0 or (server_round % args.evaluate_every and server_round != args.rounds):
            return None
        started = time.time()
        model = LeNet()
        load_arrays(model, parameters)
        loss, accuracy[server_round] = local.score(model, *test)
        evaluation_s[server_round] = time.time() - started
        return loss, {"accuracy": accuracy[server_round]}

    class Strategy(TimedFedAvg):
        """FedAvg whose sampled clients train the replayed round's nodes, if any."""

        def configure_fit(self, server_round, parameters, client_manager):
            chosen = super().configure_fit(server_round, parameters, client_manager)
            nodes = replay.nodes[server_round - 1] if replay else [None] * len(chosen)
            return assign(chosen, server_round, nodes)

    times_file = os.path.join(tempfile.mkdtemp(prefix="flower-own-code-"), "round-times.txt")

    def server_fn(context: Context):
        torch.manual_seed(0)  # the same initial LeNet as examples/many-nodes/init_model.py
        sampled = max(1, round(args.fraction * len(folders)))
        strategy = Strategy(
            times_file=times_file, fraction_fit=args.fraction, fraction_evaluate=0.0,
            min_fit_clients=sampled, min_available_clients=len(folders),
            initial_parameters=ndarrays_to_parameters(arrays_of(LeNet())), evaluate_fn=evaluate)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    per_round, _, peak_mb = simulate(server_fn, ClientApp(client_fn=client_fn), len(folders), times_file)
    # The time between two rounds' ends includes the central evaluation after the earlier one.
    per_round = [s - evaluation_s.get(earlier, 0.0) for earlier, s in enumerate(per_round, start=1)]
    print(json.dumps({
        "system": "flower-1.42.0-simulation-pytorch",
        "nodes": len(folders),
        "rounds": args.rounds,
        "round_s": per_round,
        "mean_round_s": sum(per_round) / len(per_round),
        "accuracy": accuracy.get(args.rounds),
        "accuracy_by_round": accuracy,
        "replayed": bool(replay),
        "peak_rss_mb": peak_mb,
    }))


if __name__ == "__main__":
    main()
