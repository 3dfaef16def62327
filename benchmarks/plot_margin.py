"""Picture of the margin benchmark (issue 15): every row of ``benchmarks/results/margin_fashion_mnist.json``
as a bar (mean ± std over the student seeds), grouped by student protocol, each group against the random
subset of its own protocol (dashed line) and, where measured, the whole train set trained for the same
optimiser steps (dotted line).

    pip install -e ".[plot]"   # matplotlib
    python benchmarks/plot_margin.py --results benchmarks/results/margin_fashion_mnist.json \\
        --out docs/images/margin_fashion_mnist.png
    python benchmarks/plot_margin.py --smoke   # the committed results, drawn into a temporary folder (deleted)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results/margin_fashion_mnist.json")
    p.add_argument("--out", default="docs/images/margin_fashion_mnist.png")
    p.add_argument("--ipc", nargs="+", default=None, help="IPC values to draw (default: all in the file).")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long check (tests/test_benchmarks.py): the picture goes to a temporary folder, "
                        "deleted, unless --out is given")
    args = p.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="plot-margin-smoke-") as tmp:
            p.set_defaults(out=str(Path(tmp) / "margin.png"))
            _draw(p.parse_args())
    else:
        _draw(args)


def _draw(args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit('plot_margin.py needs matplotlib: pip install -e ".[plot]"') from e

    data = json.loads(Path(args.results).read_text())
    ipcs = args.ipc or sorted(data["ipc"], key=int)
    missing = [i for i in ipcs if i not in data["ipc"]]
    if missing:
        raise SystemExit(f"IPC {missing} not in {args.results} (it has {sorted(data['ipc'], key=int)})")
    groups_per_ipc = {i: _groups(data["ipc"][i]) for i in ipcs}
    heights = [sum(len(rows) + 1 for _, rows, _, _ in g) for g in groups_per_ipc.values()]
    fig, axes = plt.subplots(len(ipcs), 1, figsize=(9, 0.22 * sum(heights) + 1.2 * len(ipcs)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, ipc in zip(axes[:, 0], ipcs):
        y, ticks, labels = 0, [], []
        for k, (student, rows, random_mean, reference) in enumerate(groups_per_ipc[ipc]):
            color = colors[k % len(colors)]
            top = y
            for row in rows:
                ax.barh(y, row["mean"], xerr=row["std"], color=color, alpha=0.75, height=0.8, capsize=2)
                ticks.append(y)
                labels.append(row["recipe"])
                y += 1
            if random_mean is not None:
                ax.plot([random_mean] * 2, [top - 0.5, y - 0.5], "--", color="black", lw=1.2)
            if reference is not None:
                ax.plot([reference] * 2, [top - 0.5, y - 0.5], ":", color="red", lw=1.5)
            ax.text(1.0, (top + y - 1) / 2, f" {student}", transform=ax.get_yaxis_transform(), va="center",
                    fontsize=8, color=color)
            y += 1
        ax.set_yticks(ticks, labels, fontsize=7)
        ax.invert_yaxis()
        lows = [r["mean"] for _, rows, _, _ in groups_per_ipc[ipc] for r in rows]
        ax.set_xlim(max(0.0, min(lows) - 3), max(lows) + 3)
        ax.set_title(f"Fashion-MNIST IPC {ipc}: top-1 % (last epoch, 3 student seeds); dashed: random subset, "
                     "same protocol; dotted: whole train set, same steps", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def _groups(res: dict) -> list[tuple[str, list[dict], float | None, float | None]]:
    """(student protocol, its rows sorted by accuracy, its random subset's mean, the whole-train-set reference)."""
    by_student: dict[str, list[dict]] = {}
    for row in res["rows"]:
        by_student.setdefault(row["student"], []).append(row)
    randoms = res.get("random_real_by_student", {})
    references = {r["student"]: r["mean"] for r in res.get("full_train_set_references", [])}
    return [(student, sorted(rows, key=lambda r: -r["mean"]), randoms.get(student, {}).get("mean"),
             references.get(student)) for student, rows in by_student.items()]


if __name__ == "__main__":
    main()
