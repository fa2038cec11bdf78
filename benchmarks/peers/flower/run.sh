#!/usr/bin/env bash
# Ferry and Flower side by side on this machine, in one invocation: installs Flower (pinned,
# flwr[simulation]==1.42.0) in a private virtual environment the first time, builds Ferry,
# runs the same workload on both and prints one table with both figures and their ratio.
#
#   benchmarks/peers/flower/run.sh            # 10 nodes x 10M parameters, 3 Flower rounds
#   NODES=20 PARAMS=10000000 benchmarks/peers/flower/run.sh
#
# Workloads covered so far: the deployed round (N nodes x P parameters on loopback, no-op
# training), every node a process of its own on both sides. Flower runs its default insecure
# HTTP transport; Ferry runs TLS. Results and the machine go to docs/benchmarks/vs-flower.md by
# hand.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
venv=${FLOWER_VENV:-$root/target/flower-venv}
nodes=${NODES:-10}
params=${PARAMS:-10000000}
rounds=${ROUNDS:-3}

if [ ! -x "$venv/bin/flwr" ]; then
  echo "installing Flower 1.42.0 into $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install --quiet "flwr[simulation]==1.42.0" "numpy<2"
fi
(cd "$root" && cargo build --release --quiet -p ferry-cli)

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%F)"
echo "deployed round, $nodes nodes x $params parameters, no-op training, loopback"
flower=$("$venv/bin/python" "$here/deployed_round.py" --nodes "$nodes" --params "$params" --rounds "$rounds" | tail -1)
ferry=$("$root/target/release/ferry" bench round --clients "$nodes" --params "$params" --json | tail -1)
python3 - "$flower" "$ferry" <<'PY'
import json, sys
flower, ferry = (json.loads(a) for a in sys.argv[1:])
rows = [
    ("time per round (s)", flower["mean_round_s"], ferry["round_s"]),
    ("coordinator peak RSS (MB)", flower["peak_rss_superlink_tree_mb"], ferry["peak_rss_coordinator_mb"]),
    ("one node's peak RSS (MB)", flower["peak_rss_supernode_tree_mb"], ferry["peak_rss_node_mb"]),
    ("all processes (MB)", flower["peak_rss_all_mb"],
     ferry["peak_rss_coordinator_mb"] + ferry["peak_rss_nodes_mb"]),
]
print(f"{'':28}{'Flower 1.42':>14}{'Ferry':>12}{'Flower/Ferry':>14}")
for name, f, r in rows:
    print(f"{name:28}{f:>14.2f}{r:>12.2f}{f / r:>13.1f}x")
print("Flower's coordinator is its SuperLink with the ServerApp, a node a SuperNode with its "
      "ClientApp (process trees); Ferry's all-processes figure sums each process's own peak")
print(f"Ferry moved {ferry['throughput_gbps']:.2f} GB/s, "
      f"{100 * ferry['throughput_gbps'] / ferry['tls_ceiling_gbps']:.0f}% of the loopback TLS "
      f"ceiling ({ferry['tls_ceiling_gbps']:.2f} GB/s)")
PY
