"""The whole example, end to end: the sites' text, the base model (trained once), the
federated adapters (FedAvg of A and B, and FFA-LoRA, where A stays frozen and only B moves)
through ``ferry simulate``, and beside them each site's local-only adapter and a centrally
trained one with the same budget; then every model's held-out bits per byte on every site's
text, and the bytes each round moved against the base model's size. Prints a table and writes
``OUT/results.json``. ``--quick`` is the tests' short variant."""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpt  # noqa: E402


def find_ferry(given):
    for candidate in (given, os.environ.get("FERRY_BIN"), os.path.join(HERE, "../../target/release/ferry"), shutil.which("ferry")):
        if candidate and os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise SystemExit("ferry not found: pass --ferry, set FERRY_BIN, or install the ferry wheel")


def child_env(steps_per_epoch):
    env = dict(os.environ, LORA_STEPS_PER_EPOCH=str(steps_per_epoch))
    sdk = os.path.normpath(os.path.join(HERE, "../../sdk/python"))
    if os.path.isdir(os.path.join(sdk, "ferry_sdk")):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [sdk, env.get("PYTHONPATH")]))
    return env


def run(args, env=None, quiet=False):
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    if not quiet:
        print(done.stdout.rstrip()[-600:])
    return done.stdout


def simulate(ferry, cfg, out, extra=()):
    """One federated run of the adapters; returns its history."""
    started = time.time()
    run([ferry, "simulate", "--trainer-cmd", f"{sys.executable} {os.path.join(HERE, 'train.py')}",
         "--trainer-mode", "long-lived", "--node-data", os.path.join(cfg.out, "data", "sites", "*"),
         "--initial-model", os.path.join(cfg.out, "init.safetensors"), "--rounds", str(cfg.rounds),
         "--local-epochs", "1", "--lr", str(cfg.lr), "--evaluate-every", str(cfg.rounds),
         "--server-lr", str(cfg.server_lr), "--seed", "0", "--out", out, *extra],
        env=child_env(cfg.steps), quiet=True)
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    history["wall_s"] = time.time() - started
    return history


def text(path):
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def scores(base, adapters, sites):
    """Bits per byte on each site's held-out text, and on their union."""
    out = {name: gpt.bits_per_byte(base, adapters, t["test"])[0] for name, t in sites.items()}
    out["union"] = sum(out.values()) / len(sites)  # equal held-out sizes
    return out


def adapters_from(path):
    a = gpt.Adapters()
    a.load_state_dict(load_file(path), strict=True)
    return a


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="lora-run")
    parser.add_argument("--ferry")
    parser.add_argument("--quick", action="store_true", help="a short variant, for the tests")
    parser.add_argument("--rounds", type=int, default=12, help="federated rounds")
    parser.add_argument("--steps", type=int, default=10, help="each site's Adam steps per round")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--server-lr", type=float, default=1.0, help="FedAvg's server learning rate")
    cfg = parser.parse_args()
    cfg.base_steps = 800
    if cfg.quick:
        cfg.base_steps, cfg.rounds, cfg.steps = 40, 2, 2
    ferry = find_ferry(cfg.ferry)
    data = os.path.join(cfg.out, "data")
    began = time.time()
    torch.manual_seed(0)
    if not os.path.exists(os.path.join(data, "base.safetensors")):
        sizes = ["--train-bytes", "20000", "--test-bytes", "4000"] if cfg.quick else []
        run([sys.executable, os.path.join(HERE, "prepare.py"), "--out", data, *sizes])
        run([sys.executable, os.path.join(HERE, "train_base.py"), data, "--steps", str(cfg.base_steps)])
    base_path = os.path.join(data, "base.safetensors")
    base = load_file(base_path)
    run([sys.executable, os.path.join(HERE, "init_adapters.py"), base_path, os.path.join(cfg.out, "init.safetensors")], env=child_env(cfg.steps), quiet=True)
    sites = {os.path.basename(d): {s: text(os.path.join(d, f"{s}.bin")) for s in ("train", "test")}
             for d in sorted(glob.glob(os.path.join(data, "sites", "*")))}
    budget = cfg.rounds * cfg.steps  # one site's gradient steps in the federated runs
    results = {"settings": {"rounds": cfg.rounds, "steps_per_round": cfg.steps, "lr": cfg.lr,
                            "server_lr": cfg.server_lr,
                            "base_steps": cfg.base_steps, "rank": gpt.RANK, "width": gpt.WIDTH,
                            "layers": gpt.LAYERS, "context": gpt.CONTEXT}}
    results["base"] = scores(base, None, sites)
    g = torch.Generator().manual_seed(1)
    for name, t in sites.items():
        local = adapters_from(os.path.join(cfg.out, "init.safetensors"))
        gpt.train_steps(base, local, t["train"], budget, cfg.lr, 16, g)
        results[f"local:{name}"] = scores(base, local, sites)
    central = adapters_from(os.path.join(cfg.out, "init.safetensors"))
    union = torch.cat([t["train"] for t in sites.values()])
    gpt.train_steps(base, central, union, budget * len(sites), cfg.lr, 16, g)
    results["central"] = scores(base, central, sites)
    rounds = {}
    for label, extra in (("fedavg", ()), ("ffa-lora", ("--frozen", "*.lora_A"))):
        out = os.path.join(cfg.out, label)
        history = simulate(ferry, cfg, out, extra)
        results[label] = scores(base, adapters_from(os.path.join(out, "model.safetensors")), sites)
        r = history["rounds"]
        n = sum(x["participants"] for x in r)
        rounds[label] = {"up_per_node": sum(x["bytes_up"] for x in r) / n,
                         "down_per_node": sum(x["bytes_down"] for x in r) / n,
                         "wall_s": history["wall_s"]}
    base_bytes = os.path.getsize(base_path)
    results["bytes"] = {"base_model": base_bytes, **rounds}
    for label in rounds:
        moved = rounds[label]["up_per_node"] + rounds[label]["down_per_node"]
        rounds[label]["share_of_base"] = moved / base_bytes
    results["wall_s"] = time.time() - began
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    names = list(sites) + ["union"]
    print("\nheld-out bits per byte (lower is better)")
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in ["base", *[f"local:{s}" for s in sites], "fedavg", "ffa-lora", "central"]:
        print(f"| {row} | " + " | ".join(f"{results[row][n]:.3f}" for n in names) + " |")
    for label, r in rounds.items():
        print(f"{label}: {r['up_per_node']:.0f} B up and {r['down_per_node']:.0f} B down per node per round, "
              f"{100 * r['share_of_base']:.2f}% of the base model's {base_bytes} B; {r['wall_s']:.0f} s")
    best_local = min(results[f"local:{s}"]["union"] for s in sites)
    print(f"federated (fedavg) on the union: {results['fedavg']['union']:.3f}, best local-only {best_local:.3f}, "
          f"central {results['central']['union']:.3f}; whole study {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
