"""Picture of the cross-architecture benchmark (issue 35): for every row of
``benchmarks/results/cross_arch_fashion_mnist.json``, its margin over the random real subset on each evaluator
(row mean minus the random subset's mean, same teachers, labels, students and seeds), one group of bars per
evaluator, the random subset's own accuracy under each evaluator's name. Error bars: the row's std over the
student seeds where there are several.

    pip install -e ".[plot]"   # matplotlib
    python benchmarks/plot_cross_arch.py --results benchmarks/results/cross_arch_fashion_mnist.json \\
        --out docs/images/cross_arch_fashion_mnist.png
    python benchmarks/plot_cross_arch.py --results benchmarks/results/cross_arch_fashion_mnist_teacherset2.json \
        --rows gvbsm_authors gvbsm_authors_no_bn gvbsm_authors_no_conv --style heatmap --out /tmp/shares.png
    python benchmarks/plot_cross_arch.py --smoke   # the committed results, drawn into a temporary folder (deleted)

``--rows`` picks rows (in that order; default all), ``--style heatmap`` draws the margins as a row x evaluator
grid with the numbers written in (readable for many rows), ``bars`` (default) one group of bars per evaluator.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def margins(result: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """``{row: {evaluator: (margin, std)}}``: each row's mean minus the random subset's mean per evaluator."""
    random_real = result["random_real"]
    return {r["recipe"]: {e: (r["per_evaluator"][e]["mean"] - random_real[e]["mean"], r["per_evaluator"][e]["std"])
                          for e in result["evaluators"]} for r in result["rows"]}


def pick_rows(result: dict, names: list[str] | None) -> dict:
    """``result`` with only the rows ``names`` (in that order; None: all); an unknown name is refused with the
    rows there are."""
    if not names:
        return result
    by_name = {r["recipe"]: r for r in result["rows"]}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"--rows {unknown} are not in the results; its rows: {sorted(by_name)}")
    return {**result, "rows": [by_name[n] for n in names]}


def draw_heatmap(result: dict, out: Path) -> Path:
    """Row x evaluator grid of the margins (points, diverging colours centred on 0), mean margin last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    evaluators = result["evaluators"]
    rows = margins(result)
    grid = np.array([[per[e][0] for e in evaluators] + [sum(per[e][0] for e in evaluators) / len(evaluators)]
                     for per in rows.values()])
    limit = max(float(np.abs(grid).max()), 1.0)
    fig, ax = plt.subplots(figsize=(1.3 * (len(evaluators) + 1) + 3.0, 0.42 * len(rows) + 1.6))
    image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:+.1f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(grid[i, j]) > 0.6 * limit else "black")
    ax.set_xticks(range(len(evaluators) + 1))
    ax.set_xticklabels([f"{e}\nrandom {result['random_real'][e]['mean']:.1f} %" for e in evaluators] + ["mean"],
                       fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(list(rows), fontsize=7)
    fig.colorbar(image, ax=ax, label="top-1 minus the random real subset (points)")
    ax.set_title(f"Fashion-MNIST IPC {result['ipc']}: margin over a random real subset", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw(result: dict, out: Path, style: str = "bars") -> Path:
    if style == "heatmap":
        try:
            return draw_heatmap(result, out)
        except ImportError as err:
            raise SystemExit('matplotlib is needed for the picture: pip install -e ".[plot]"') from err
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit('matplotlib is needed for the picture: pip install -e ".[plot]"') from err
    evaluators = result["evaluators"]
    rows = margins(result)
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(1.9 * len(evaluators) + 2.5, 4.8))
    cmap = plt.get_cmap("tab10")
    for k, (name, per) in enumerate(rows.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(evaluators))]
        ys = [per[e][0] for e in evaluators]
        err = [per[e][1] for e in evaluators]
        ax.bar(xs, ys, width=width, color=cmap(k % 10), label=name,
               yerr=err if any(err) else None, capsize=2 if any(err) else 0)
    ax.axhline(0.0, color="black", linewidth=1.0)
    ax.set_xticks(range(len(evaluators)))
    ax.set_xticklabels([f"{e}\nrandom {result['random_real'][e]['mean']:.1f} %" for e in evaluators], fontsize=8)
    ax.set_ylabel("top-1 minus the random real subset (points)")
    seeds = len(result["random_real"][evaluators[0]]["per_seed"])
    ax.set_title(f"Fashion-MNIST IPC {result['ipc']}: distilled sets against a random real subset, per evaluator "
                 f"({seeds} seed{'s' if seeds > 1 else ''}, last epoch)", fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results/cross_arch_fashion_mnist.json")
    p.add_argument("--out", default="docs/images/cross_arch_fashion_mnist.png")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long check (tests/test_benchmarks.py): the picture goes to a temporary folder, "
                        "deleted, unless --out is given")
    p.add_argument("--rows", nargs="+", default=None, help="Rows to draw, in this order (default: all).")
    p.add_argument("--style", choices=["bars", "heatmap"], default="bars")
    args = p.parse_args()
    result = pick_rows(json.loads(Path(args.results).read_text()), args.rows)
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="plot-cross-arch-smoke-") as tmp:
            p.set_defaults(out=str(Path(tmp) / "cross_arch.png"))
            args = p.parse_args()
            for style in ("bars", "heatmap"):
                print(f"wrote {draw(result, Path(args.out).with_stem(style), style)}")
    else:
        print(f"wrote {draw(result, Path(args.out), args.style)}")


if __name__ == "__main__":
    main()
