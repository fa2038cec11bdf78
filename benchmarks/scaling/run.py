"""Scaling curves of the deployed round: `ferry bench round` against the number of nodes (1M
parameters) and against the model size (10 nodes), every node a process of its own. Prints a
Markdown table and writes two SVG charts (round time and coordinator peak memory) into
docs/benchmarks/.

    python3 benchmarks/scaling/run.py                 # after cargo build --release -p ferry-cli
    python3 benchmarks/scaling/run.py --quick         # fewer points"""

import argparse
import json
import os
import subprocess

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FERRY = os.path.join(ROOT, "target", "release", "ferry")
DOCS = os.path.join(ROOT, "docs", "benchmarks")


def bench(nodes, params):
    out = subprocess.run([FERRY, "bench", "round", "--clients", str(nodes), "--params", str(params),
                          "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def chart(path, title, x_label, points, series):
    """A line chart as plain SVG: `points` are x values, `series` (name, y values, unit, colour)
    each on its own y scale (left and right axes)."""
    width, height, left, right, top, bottom = 640, 360, 70, 70, 40, 50
    xs = points
    x_min, x_max = min(xs), max(xs)

    def px(x):
        return left + (x - x_min) / (x_max - x_min or 1) * (width - left - right)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">{x_label}</text>']
    for x in xs:
        parts.append(f'<text x="{px(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:g}</text>')
    for side, (name, ys, unit, colour) in zip(("left", "right"), series):
        y_max = max(ys) * 1.1 or 1

        def py(y):
            return height - bottom - y / y_max * (height - top - bottom)

        axis_x = left if side == "left" else width - right
        parts.append(f'<line x1="{axis_x}" y1="{top}" x2="{axis_x}" y2="{height - bottom}" stroke="{colour}"/>')
        for i in range(5):
            y = y_max * i / 4
            anchor, dx = ("end", -6) if side == "left" else ("start", 6)
            parts.append(f'<text x="{axis_x + dx}" y="{py(y) + 4:.1f}" text-anchor="{anchor}" '
                         f'fill="{colour}">{y:.3g}</text>')
        label_x = 16 if side == "left" else width - 16
        parts.append(f'<text x="{label_x}" y="{height / 2}" fill="{colour}" text-anchor="middle" '
                     f'transform="rotate(-90 {label_x} {height / 2})">{name} ({unit})</text>')
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in zip(xs, ys):
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def sweep(label, runs):
    print(f"\n{label}\n")
    print("| nodes | parameters | round s | GB moved | GB/s | coordinator MB | model sizes | node MB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for nodes, params in runs:
        r = bench(nodes, params)
        moved = 2 * nodes * params * 4 / 1e9
        model_mb = params * 4 / 1e6
        rows.append(r)
        print(f"| {nodes} | {params:,} | {r['round_s']:.2f} | {moved:.2f} | {moved / r['round_s']:.2f} | "
              f"{r['peak_rss_coordinator_mb']:.0f} | {r['peak_rss_coordinator_mb'] / model_mb:.1f} | "
              f"{r['peak_rss_node_mb']:.0f} |", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    node_counts = [1, 10, 50] if args.quick else [1, 2, 5, 10, 20, 50, 100]
    sizes = [1_000_000, 10_000_000] if args.quick else [1_000_000, 3_000_000, 10_000_000,
                                                       30_000_000, 100_000_000]
    by_nodes = sweep("against nodes, 1M parameters", [(n, 1_000_000) for n in node_counts])
    chart(os.path.join(DOCS, "scaling-nodes.svg"),
          "Deployed round, 1M parameters: time and coordinator memory against nodes", "nodes",
          node_counts,
          [("round time", [r["round_s"] for r in by_nodes], "s", "#1f77b4"),
           ("coordinator peak RSS", [r["peak_rss_coordinator_mb"] for r in by_nodes], "MB", "#d62728")])
    by_size = sweep("against model size, 10 nodes", [(10, p) for p in sizes])
    chart(os.path.join(DOCS, "scaling-params.svg"),
          "Deployed round, 10 nodes: time and coordinator memory against model size",
          "parameters (millions)", [p / 1e6 for p in sizes],
          [("round time", [r["round_s"] for r in by_size], "s", "#1f77b4"),
           ("coordinator peak RSS", [r["peak_rss_coordinator_mb"] for r in by_size], "MB", "#d62728")])


if __name__ == "__main__":
    main()
