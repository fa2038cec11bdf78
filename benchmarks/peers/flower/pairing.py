"""Pairing a Flower run with a Ferry run of the same nodes (`--replay RUN/history.json`): the
nodes each of Ferry's rounds had, its settings, and each node's shuffle seed as Ferry hands it
to its trainer, so that the two runs differ only in the runtime and in how FedAvg's sums are
rounded."""

import json

_MASK = (1 << 64) - 1


def mix_seed(seed, stream):
    """Ferry's seed mixing (`ferry_core::seed::mix_seed`, SplitMix64's finaliser)."""
    z = seed ^ (((stream + 1) * 0x9E3779B97F4A7C15) & _MASK)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


class Replay:
    """A finished Ferry run, read from its `history.json`: `nodes[r - 1]` are the nodes whose
    updates round r aggregated, `config` its settings."""

    def __init__(self, path):
        with open(path) as f:
            history = json.load(f)
        self.nodes = [[int(node) for node in r["contributors"]] for r in history["rounds"]]
        self.config = history["config"]

    def seed(self, server_round, node):
        """The seed Ferry's trainer got for `node` in `server_round`: the run seed mixed with
        the round, then with the node."""
        return mix_seed(mix_seed(self.config["seed"], server_round), node)


def assign(chosen, server_round, nodes):
    """FedAvg's `chosen` (client, FitIns) pairs for `server_round`, each client told the round
    and the node whose share it trains (`nodes`, in order; a `None` leaves the client its own
    partition), and as many clients as `nodes`. FedAvg hands every client one shared FitIns, so
    each gets its own here."""
    from flwr.common import FitIns

    if len(nodes) > len(chosen):
        raise SystemExit(f"round {server_round}: {len(nodes)} nodes to replay, {len(chosen)} clients sampled")
    return [
        (client, FitIns(fit.parameters, {"round": server_round, **({} if node is None else {"node": node})}))
        for (client, fit), node in zip(chosen, nodes)
    ]
