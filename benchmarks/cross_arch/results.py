"""The results document of ``benchmarks/cross_arch_fashion_mnist.py`` (issue 35's schema): built from the saved
rows, validated, and rendered as the markdown tables beside it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import mean, stdev
from typing import Any

from .rows import RANDOM, RECIPES

STATS_KEYS = {"mean": float, "std": float, "per_seed": list}
ROW_KEYS = {"recipe": str, "per_evaluator": dict, "mean_over_evaluators": float, "min_margin_vs_random": float,
            "hard_label_in": float, "within_class_diversity": float}
EXTRA_ROW_KEYS = {"diagnostics"}  # beside the schema: {measure: float} (gvbsm_hf.image_diagnostics.diagnose)
TOP_KEYS = {"command": str, "teachers": list, "ipc": int, "labels": str, "evaluators": list, "random_real": dict,
            "rows": list, "best": dict}
BEST_KEYS = {"recipe": str, "mean_over_evaluators": float, "min_margin_vs_random": float}


def diagnostics_of(row: dict) -> dict[str, Any]:
    """``{"diagnostics": {...}}`` (rounded) when the saved row has them (a row saved before they existed has
    none), else ``{}``: the results row's extra key beside the issue's schema."""
    d = row.get("diagnostics")
    return {"diagnostics": {k: round(float(v), 6) for k, v in d.items()}} if d else {}


def _stats(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    return {"mean": round(mean(values), 3), "std": round(stdev(values), 3) if len(values) > 1 else 0.0,
            "per_seed": [round(v, 3) for v in values]}


def build_result(command: str, teachers: list[dict], ipc: int, labels: str, evaluators: list[str],
                 saved: dict[str, dict]) -> dict[str, Any]:
    """The results document (:func:`validate_result`) from the saved rows (``{recipe: row}``, the random
    subset under ``random_real``); rows lacking an evaluator are left out."""
    if RANDOM not in saved or not set(evaluators) <= set(saved[RANDOM]["per_evaluator"]):
        raise RuntimeError(f"the random subset ({RANDOM}) has not run on every evaluator {evaluators}: run it first")
    random_real = {e: _stats(saved[RANDOM]["per_evaluator"][e]) for e in evaluators}
    rows = []
    for name in [n for n in RECIPES if n != RANDOM and n in saved]:
        s = saved[name]
        if not set(evaluators) <= set(s["per_evaluator"]) or s.get("hard_label_in") is None:
            print(f"{name}: not on every evaluator or without its hard-label row; left out", flush=True)
            continue
        per = {e: _stats(s["per_evaluator"][e]) for e in evaluators}
        rows.append({"recipe": name, "per_evaluator": per,
                     "mean_over_evaluators": round(mean(per[e]["mean"] for e in evaluators), 3),
                     "min_margin_vs_random": round(min(per[e]["mean"] - random_real[e]["mean"] for e in evaluators), 3),
                     "hard_label_in": round(float(s["hard_label_in"]), 3),
                     "within_class_diversity": round(float(s["within_class_diversity"]), 4), **diagnostics_of(s)})
    if not rows:
        raise RuntimeError("no row has run on every evaluator yet")
    # the best distilled set: rows of the random subset itself (another draw, other labels) are baselines
    distilled = [r for r in rows if RECIPES[r["recipe"]][0] != RANDOM] or rows
    best = max(distilled, key=lambda r: r["mean_over_evaluators"])
    return {"command": command, "teachers": teachers, "ipc": int(ipc), "labels": labels, "evaluators": list(evaluators),
            "random_real": random_real, "rows": rows,
            "best": {k: best[k] for k in ("recipe", "mean_over_evaluators", "min_margin_vs_random")}}


def _check(value: Any, kind: type, where: str) -> None:
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind in (int, float) else isinstance(value, kind)
    if kind is float and ok and not math.isfinite(value):
        ok = False
    if not ok:
        raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")


def _check_keys(d: Any, keys: dict[str, type], where: str) -> None:
    _check(d, dict, where)
    if set(d) != set(keys):
        raise ValueError(f"{where}: keys {sorted(d)} != {sorted(keys)}")
    for k, kind in keys.items():
        _check(d[k], kind, f"{where}.{k}")


def _check_stats(d: Any, where: str) -> None:
    _check_keys(d, STATS_KEYS, where)
    if not d["per_seed"]:
        raise ValueError(f"{where}.per_seed is empty")
    for i, v in enumerate(d["per_seed"]):
        _check(v, float, f"{where}.per_seed[{i}]")


def validate_result(result: Any) -> None:
    """Raise ``ValueError`` unless ``result`` has exactly the schema of issue 35::

        {"command": str, "teachers": [{"name": str, "top1": float}], "ipc": int, "labels": str,
         "evaluators": [str], "random_real": {EVALUATOR: {"mean": float, "std": float, "per_seed": [float]}},
         "rows": [{"recipe": str, "per_evaluator": {EVALUATOR: {...}}, "mean_over_evaluators": float,
                   "min_margin_vs_random": float, "hard_label_in": float, "within_class_diversity": float}],
         "best": {"recipe": str, "mean_over_evaluators": float, "min_margin_vs_random": float}}

    A row may also hold the extra key ``diagnostics`` (:data:`EXTRA_ROW_KEYS`, ``{measure: float}``).
    """
    _check_keys(result, TOP_KEYS, "result")
    for i, t in enumerate(result["teachers"]):
        _check_keys(t, {"name": str, "top1": float}, f"teachers[{i}]")
    evaluators = result["evaluators"]
    if not evaluators or not all(isinstance(e, str) for e in evaluators):
        raise ValueError(f"evaluators: expected a non-empty list of str, got {evaluators!r}")
    if set(result["random_real"]) != set(evaluators):
        raise ValueError(f"random_real: keys {sorted(result['random_real'])} != evaluators {sorted(evaluators)}")
    for e, s in result["random_real"].items():
        _check_stats(s, f"random_real.{e}")
    if not result["rows"]:
        raise ValueError("rows is empty")
    for i, row in enumerate(result["rows"]):
        _check_keys({k: v for k, v in row.items() if k not in EXTRA_ROW_KEYS}, ROW_KEYS, f"rows[{i}]")
        for k, v in row.get("diagnostics", {}).items():
            _check(v, float, f"rows[{i}].diagnostics.{k}")
        if set(row["per_evaluator"]) != set(evaluators):
            raise ValueError(f"rows[{i}].per_evaluator: keys {sorted(row['per_evaluator'])} != {sorted(evaluators)}")
        for e, s in row["per_evaluator"].items():
            _check_stats(s, f"rows[{i}].per_evaluator.{e}")
    _check_keys(result["best"], BEST_KEYS, "best")
    if result["best"]["recipe"] not in {r["recipe"] for r in result["rows"]}:
        raise ValueError(f"best.recipe {result['best']['recipe']!r} is not a row")


def markdown(result: dict) -> str:
    evs = result["evaluators"]
    lines = ["| row | " + " | ".join(evs) + " | mean | min margin vs random | hard labels (convnet128_in) | "
             "within-class diversity |", "| --- |" + " --- |" * (len(evs) + 4)]
    lines.append(f"| {RANDOM} | " + " | ".join(f"{result['random_real'][e]['mean']:.2f} ± "
                                               f"{result['random_real'][e]['std']:.2f}" for e in evs)
                 + f" | {mean(result['random_real'][e]['mean'] for e in evs):.2f} | 0 |  |  |")
    for r in result["rows"]:
        lines.append(f"| {r['recipe']} | " + " | ".join(f"{r['per_evaluator'][e]['mean']:.2f} ± "
                                                      f"{r['per_evaluator'][e]['std']:.2f}" for e in evs)
                     + f" | {r['mean_over_evaluators']:.2f} | {r['min_margin_vs_random']:+.2f} | "
                       f"{r['hard_label_in']:.2f} | {r['within_class_diversity']:.3f} |")
    return "\n".join(lines) + "\n" + diagnostics_markdown(result["rows"])


DIAGNOSTIC_COLUMNS = ("contrast", "saturated_fraction", "high_frequency_share", "instance_mean_distance",
                      "instance_std_distance", "instance_mean_spread_ratio", "within_class_diversity")
"""The measures of :func:`diagnostics_markdown` (docs/method.md "Image diagnostics", Eq. 13-17)."""


def diagnostics_markdown(rows: Sequence[dict]) -> str:
    """A second table: each row's image diagnostics (:data:`DIAGNOSTIC_COLUMNS`), and a ``real images`` line
    with the real reference's values (``_real``; 0 / 1 for the measures relative to real); empty when no row
    has diagnostics."""
    rows = [r for r in rows if r.get("diagnostics")]
    if not rows:
        return ""

    def cell(d: dict, key: str, side: str) -> str:
        value = d.get(f"{key}_{side}", d.get(key) if side == "syn" else None)
        if value is None and side == "real":
            value = {"instance_mean_distance": 0.0, "instance_std_distance": 0.0}.get(key, 1.0)
        return "" if value is None else f"{float(value):.3f}"

    lines = ["", "| images | " + " | ".join(DIAGNOSTIC_COLUMNS) + " |", "| --- |" + " --- |" * len(DIAGNOSTIC_COLUMNS)]
    lines.append("| real images | " + " | ".join(cell(rows[0]["diagnostics"], k, "real") for k in DIAGNOSTIC_COLUMNS)
                 + " |")
    lines += [f"| {r['recipe']} | " + " | ".join(cell(r["diagnostics"], k, "syn") for k in DIAGNOSTIC_COLUMNS) + " |"
              for r in rows]
    return "\n".join(lines) + "\n"
