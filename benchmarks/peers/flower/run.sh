#!/usr/bin/env bash
# Ferry and Flower side by side on this machine, in one invocation: installs Flower (pinned,
# flwr[simulation]==1.42.0) in a private virtual environment the first time, builds Ferry,
# runs every workload on both and prints one table with both figures and their ratio.
#
#   benchmarks/peers/flower/run.sh            # everything, about 10 minutes on 2 cores
#   NODES=20 PARAMS=10000000 ONLY=deployed benchmarks/peers/flower/run.sh
#
# Workloads (ONLY= one of them to run it alone):
#   deployed    a deployed round, NODES x PARAMS on loopback, no-op training, every node a
#               process of its own on both sides (Flower: insecure HTTP, its default; Ferry: TLS)
#   simulated   simulated no-op rounds, 100 nodes x 1M and 10 x 10M (Flower: its Ray runtime)
#   aggregate   FedAvg of 100 x 1M and 20 x 10M updates (Flower: its `aggregate` function)
#   train       LeNet images/s at batch 64 (PyTorch from Debian's python3-torch)
#   lenet       simulated LeNet rounds on Fashion-MNIST, 10 nodes, 1 epoch, central test
#               (Flower: PyTorch on its Ray runtime; Ferry: `ferry simulate` with its defaults)
#   owncode     your own PyTorch code on many virtual nodes: examples/many-nodes' LeNet on
#               Fashion-MNIST split by Dirichlet(0.5) into OWN_NODES (1000) nodes, 10% per
#               round, OWN_ROUNDS (50) rounds (Ferry: `ferry simulate --trainer-cmd` with a pool
#               of one worker per core; Flower: the same shares, nodes and seeds on Ray)
#   fedbn       your own PyTorch code with BatchNorm kept on each node (FedBN):
#               examples/pytorch's FashionNet on FEDBN_SITES (300) site folders, 10% per
#               round, 10 rounds, every node scoring every round's model (federated
#               evaluation); Flower: the same sites, nodes and seeds, BatchNorm kept per node
# Results, command, machine and date go to docs/benchmarks/vs-flower.md by hand.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
venv=${FLOWER_VENV:-$root/target/flower-venv}
nodes=${NODES:-10}
params=${PARAMS:-10000000}
rounds=${ROUNDS:-3}
only=${ONLY:-}
ferry=$root/target/release/ferry
results=$(mktemp)
trap 'rm -f "$results"' EXIT

if [ ! -x "$venv/bin/flwr" ]; then
  echo "installing Flower 1.42.0 into $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install --quiet "flwr[simulation]==1.42.0" "numpy<2"
fi
(cd "$root" && cargo build --release --quiet -p ferry-cli)
wants() { [ -z "$only" ] || [ "$only" = "$1" ]; }
# One result line: workload label, then the Flower JSON and the Ferry JSON. Each workload runs
# Ferry's half first: Ray's processes take seconds to go after a Flower simulation returns.
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$results"; }

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%F)"
if wants deployed; then
  echo "deployed round, $nodes nodes x $params parameters ..."
  ours=$("$ferry" bench round --clients "$nodes" --params "$params" --json | tail -1)
  record "deployed $nodes x $params" \
    "$("$venv/bin/python" "$here/deployed_round.py" --nodes "$nodes" --params "$params" --rounds "$rounds" | tail -1)" \
    "$ours"
fi
if wants simulated; then
  for shape in "100 1000000" "10 10000000"; do
    set -- $shape
    echo "simulated no-op round, $1 nodes x $2 parameters ..."
    ours=$("$ferry" bench sim-round --nodes "$1" --params "$2" --rounds "$rounds" --json | tail -1)
    record "simulated $1 x $2" \
      "$("$venv/bin/python" "$here/simulated_round.py" --nodes "$1" --params "$2" --rounds "$rounds" 2>/dev/null | tail -1)" \
      "$ours"
  done
fi
if wants aggregate; then
  for shape in "100 1000000" "20 10000000"; do
    set -- $shape
    echo "FedAvg aggregation, $1 updates x $2 parameters ..."
    ours=$("$ferry" bench aggregate --clients "$1" --params "$2" --json | tail -1)
    record "aggregate $1 x $2" \
      "$("$venv/bin/python" "$here/aggregate.py" --updates "$1" --params "$2" | tail -1)" \
      "$ours"
  done
fi
if wants train; then
  echo "LeNet training speed ..."
  lenet=$("$ferry" bench train --model lenet | tail -1)
  record "train lenet" \
    "$(/usr/bin/python3 "$here/train_speed.py" | tail -1)" \
    "$(echo "$lenet" | awk '{printf "{\"one_thread_img_s\": %s, \"all_cores_img_s\": %s}", $3, $4}')"
fi
if wants lenet; then
  echo "simulated LeNet rounds on Fashion-MNIST ..."
  out=$(mktemp -d)
  /usr/bin/time -f '%M' -o "$out/rss" "$ferry" simulate --clients 10 --rounds "$rounds" \
    --out "$out/run" > /dev/null
  ours=$(python3 -c 'import json, sys
h = json.load(open(sys.argv[1] + "/run/history.json"))
later = [r["wall_s"] for r in h["rounds"][1:]]
print(json.dumps({"round_s": sum(later) / len(later), "accuracy": h["rounds"][-1]["accuracy"],
                  "peak_rss_mb": int(open(sys.argv[1] + "/rss").read()) * 1024 / 1e6}))' "$out")
  record "lenet 10 nodes" \
    "$("$venv/bin/python" "$here/lenet_round.py" --nodes 10 --rounds "$rounds" 2>/dev/null | tail -1)" \
    "$ours"
  rm -rf "$out"
fi
if wants owncode; then
  own_nodes=${OWN_NODES:-1000}
  own_rounds=${OWN_ROUNDS:-50}
  echo "your own PyTorch LeNet, $own_nodes virtual nodes, $own_rounds rounds ..."
  out=$(mktemp -d)
  example=$root/examples/many-nodes
  py=$root/.venv/bin/python3
  PYTHONPATH=$root/sdk/python "$py" "$example/pool.py" --out "$out/pooled" > /dev/null
  PYTHONPATH=$root/sdk/python "$py" "$example/init_model.py" "$out/init.safetensors"
  memory=$(cd "$out" && PYTHONPATH=$root/sdk/python python3 "$here/tree_peak.py" -- "$ferry" simulate \
    --trainer-cmd "$py $example/train.py" --trainer-mode long-lived --node-data pooled \
    --clients "$own_nodes" --partition dirichlet:0.5 --fraction 0.1 --rounds "$own_rounds" \
    --initial-model init.safetensors --local-epochs 2 --batch-size 32 --lr 0.05 \
    --evaluate-every 10 --evaluate-fraction 1 --out run 2> /dev/null | tail -1)
  ours=$(python3 -c 'import json, sys
h = json.load(open(sys.argv[1] + "/run/history.json"))
later = [r["wall_s"] for r in h["rounds"][1:]]
print(json.dumps({"round_s": sum(later) / len(later), "accuracy": h["rounds"][-1]["federated"]["accuracy"],
                  "peak_rss_mb": json.loads(sys.argv[2])["peak_rss_mb"]}))' "$out" "$memory")
  record "owncode $own_nodes nodes" \
    "$("$venv/bin/python" "$here/own_code_round.py" --node-dirs "$out/run/data/node-*" \
        --test "$out/pooled/test.csv" --rounds "$own_rounds" --replay "$out/run/history.json" 2>/dev/null | tail -1)" \
    "$ours"
  rm -rf "$out"
fi

if wants fedbn; then
  sites=${FEDBN_SITES:-300}
  echo "your own PyTorch CNN with personal BatchNorm, $sites sites, 10 rounds ..."
  out=$(mktemp -d)
  example=$root/examples/pytorch
  py=$root/.venv/bin/python3
  (cd "$out" && PYTHONPATH=$root/sdk/python "$py" "$example/make_shares.py" --nodes "$sites" \
    --per-node 150 --test-per-node $((10000 / sites < 30 ? 10000 / sites : 30)) --out data > /dev/null \
    && PYTHONPATH=$root/sdk/python "$py" "$example/init_model.py" init.safetensors)
  memory=$(cd "$out" && PYTHONPATH=$root/sdk/python python3 "$here/tree_peak.py" -- "$ferry" simulate \
    --trainer-cmd "$py $example/train.py" --trainer-mode long-lived --node-data 'data/*' \
    --initial-model init.safetensors --personal 'features.1.*,features.5.*' --fraction 0.1 \
    --rounds 10 --lr 0.05 --out run 2> /dev/null | tail -1)
  ours=$(python3 -c 'import json, sys
h, m = json.load(open(sys.argv[1] + "/run/history.json")), json.loads(sys.argv[2])
print(json.dumps({"run_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"],
                  "accuracy": h["rounds"][-1]["federated"]["accuracy"]}))' "$out" "$memory")
  record "fedbn $sites sites" \
    "$("$venv/bin/python" "$here/fedbn_round.py" --sites "$out/data/site-*" \
        --replay "$out/run/history.json" 2>/dev/null | tail -1)" \
    "$ours"
  rm -rf "$out"
fi

python3 - "$results" <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1]):
    label, flower, ferry = line.rstrip("\n").split("\t")
    f, r = json.loads(flower), json.loads(ferry)
    kind = label.split()[0]
    if kind == "deployed":
        rows += [
            (f"{label}: s per round", f["mean_round_s"], r["round_s"], True),
            (f"{label}: coordinator MB", f["peak_rss_superlink_tree_mb"], r["peak_rss_coordinator_mb"], True),
            (f"{label}: one node MB", f["peak_rss_supernode_tree_mb"], r["peak_rss_node_mb"], True),
            (f"{label}: all processes MB", f["peak_rss_all_mb"], r["peak_rss_coordinator_mb"] + r["peak_rss_nodes_mb"], True),
        ]
        ceiling = 100 * r["throughput_gbps"] / r["tls_ceiling_gbps"]
        rows.append((f"{label}: Ferry GB/s, % of TLS ceiling {r['tls_ceiling_gbps']:.2f}",
                     None, r["throughput_gbps"], ceiling))
    elif kind == "simulated":
        rows += [(f"{label}: s per round", f["mean_round_s"], r["round_s"], True),
                 (f"{label}: peak MB", f["peak_rss_mb"], r["peak_rss_mb"], True)]
    elif kind == "aggregate":
        rows += [(f"{label}: seconds", f["seconds"], r["seconds"], True),
                 (f"{label}: peak MB", f["peak_rss_mb"], r["peak_rss_mb"], True)]
    elif kind == "owncode":
        rows += [(f"{label}: s per round (both: your PyTorch code)", f["mean_round_s"], r["round_s"], True),
                 (f"{label}: peak MB, all processes", f["peak_rss_mb"], r["peak_rss_mb"], True),
                 (f"{label}: test accuracy after the last round", f["accuracy"], r["accuracy"], False)]
    elif kind == "fedbn":
        rows += [(f"{label}: whole run, s (both: your PyTorch code)", f["run_s"], r["run_s"], True),
                 (f"{label}: peak MB, all processes", f["peak_rss_mb"], r["peak_rss_mb"], True),
                 (f"{label}: federated accuracy after the last round", f["accuracy"], r["accuracy"], False)]
    elif kind == "lenet":
        rows += [(f"{label}: s per round (Flower column: with PyTorch)", f["mean_round_s"], r["round_s"], True),
                 (f"{label}: peak MB", f["peak_rss_mb"], r["peak_rss_mb"], True),
                 (f"{label}: test accuracy after the last round", f["accuracy"], r["accuracy"], False)]
    elif kind == "train":
        rows += [(f"LeNet img/s, 1 thread (Flower column: PyTorch)", f["one_thread_img_s"], r["one_thread_img_s"], False),
                 (f"LeNet img/s, all cores (Flower column: PyTorch)", f["all_cores_img_s"], r["all_cores_img_s"], False)]
print(f"{'':58}{'Flower':>12}{'Ferry':>12}{'ratio':>10}")
for name, f, r, lower_is_better in rows:
    if f is None:
        print(f"{name:58}{'':>12}{r:>12.2f}{lower_is_better:>9.0f}%")
        continue
    ratio = f / r if lower_is_better else r / f
    digits = 4 if "accuracy" in name else 2
    print(f"{name:58}{f:>12.{digits}f}{r:>12.{digits}f}{ratio:>9.{digits - 1}f}x")
print("ratio: how many times faster or smaller Ferry is (above 1: Ferry ahead)")
PY
echo "raw results (workload, Flower, Ferry):"
cat "$results"
