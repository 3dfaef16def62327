"""Honest scores next to top-1 (docs/method.md "Scores"), computed from evaluate-stage rows.

A row is what :func:`gvbsm_hf.evaluate.stage.summarise` writes to ``evaluate/results.json``:
``{"method", "labels", "evaluator", "ipc", "mean", "std", "n", "protocol", "seeds", "per_seed"}``
with accuracies in percent; ``labels`` is ``"soft"`` (the method's own labels and loss: "any" in
DD-Ranking's notation), ``"hard"`` (plain cross-entropy on the ground truth, ``evaluate_hard_labels``)
or ``"stored_views"`` (not used here). For every method and evaluator:

* **top-1**: the ``soft`` row as it is (mean, sample std, per seed).
* **random-subset margin** ``Δ_rand = top-1(method) − top-1(random_real)`` in points: the
  difference of the mean top-1 of the two ``soft`` rows of the same evaluator and IPC, over the
  seeds both rows have (all of them in a complete run), with the per-seed differences.
* **hard-label accuracy**: the ``hard`` row (None when hard labels were not evaluated).
* **label-robust score** (DD-Ranking style), per seed ``s`` of the three rows, accuracies as
  fractions::

      HLR_s = Acc_real,hard − Acc_syn,hard,s      IOR_s = Acc_syn,soft,s − Acc_rdm,soft,s
      a_s   = λ IOR_s − (1 − λ) HLR_s             LRS_s = (e^{a_s} − e^{−1}) / (e − e^{−1}),  λ = 0.5

  reported as mean and sample std (``ddof = 1``; 0 for one seed) over seeds; ``Acc_real,hard`` is
  ``full_real_hard_top1`` (a student trained on the full real train split with hard labels under
  the same protocol; one number, or one per seed). HLR and IOR are reported in points, LRS in
  ``[0, 1]``. None when a needed row or ``full_real_hard_top1`` is missing.

These use gvbsm-hf's protocol (fixed hyper-parameters, last epoch): they are not comparable with the
DD-Ranking leaderboard, which tunes the learning rate and takes the best epoch.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import GVBSMError

__all__ = ["LRS_LAMBDA", "label_robust_score", "scores"]

LRS_LAMBDA = 0.5
"""λ of the label-robust score (DD-Ranking's default weight)."""


def label_robust_score(hlr: float, ior: float, lam: float = LRS_LAMBDA) -> float:
    """``(e^a − e^{−1}) / (e − e^{−1})`` with ``a = lam * ior − (1 − lam) * hlr``; ``hlr``, ``ior`` as fractions."""
    a = lam * float(ior) - (1.0 - lam) * float(hlr)
    return (math.exp(a) - math.exp(-1.0)) / (math.exp(1.0) - math.exp(-1.0))


def _stats(values: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()) if arr.size else float("nan"),
            "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "n": int(arr.size),
            "seeds": [int(s) for s in seeds], "per_seed": [float(v) for v in arr]}


def _by_seed(row: Mapping[str, Any]) -> dict[int, float]:
    seeds, values = list(row.get("seeds") or []), list(row.get("per_seed") or [])
    if len(seeds) != len(values):
        raise GVBSMError(f"Row {row.get('method')}/{row.get('labels')}/{row.get('evaluator')} has {len(seeds)} seeds "
                         f"but {len(values)} per-seed values: pass rows written by the evaluate stage.")
    return {int(s): float(v) for s, v in zip(seeds, values)}


def _full_real(full_real_hard_top1, seed: int) -> float | None:
    if full_real_hard_top1 is None:
        return None
    if isinstance(full_real_hard_top1, Mapping):
        value = full_real_hard_top1.get(seed, full_real_hard_top1.get(str(seed)))
        return None if value is None else float(value)
    return float(full_real_hard_top1)


def scores(
    rows: Sequence[Mapping[str, Any]],
    full_real_hard_top1: float | Mapping[int, float] | None = None,
    *,
    random_method: str = "random_real",
    lam: float = LRS_LAMBDA,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per-method scores of evaluate-stage ``rows`` (module docstring): ``{method: {evaluator: {...}}}``.

    Each entry: ``ipc``; ``top1`` (the ``soft`` row: mean, std, n, seeds, per_seed); ``random_margin``
    (``mean`` = difference of the mean top-1 in points over the common seeds, plus ``per_seed``
    differences, their ``std``, ``seeds``; None without a ``random_method`` row); ``hard_label``
    (the ``hard`` row's statistics, None without one); ``hlr``, ``ior`` (points) and ``lrs`` (in
    ``[0, 1]``), each with mean, std, per_seed over the seeds all three rows share (None when a row
    or ``full_real_hard_top1`` is missing). ``full_real_hard_top1``: top-1 (%) of a student
    trained on the full real train split with hard labels, one number or ``{seed: top-1}``.
    Methods with no ``soft`` row (only hard or stored-views rows) are left out.
    """
    if not 0.0 <= float(lam) <= 1.0:
        raise GVBSMError(f"lam={lam} must lie in [0, 1].")
    table: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for row in rows:
        key = (str(row["method"]), str(row["labels"]), str(row["evaluator"]))
        if key in table:
            raise GVBSMError(f"Two rows for (method, labels, evaluator) = {key}: pass the rows of one evaluation.")
        table[key] = row
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (method, labels, evaluator), row in table.items():
        if labels != "soft":
            continue
        soft = _by_seed(row)
        entry: dict[str, Any] = {"ipc": row.get("ipc"), "top1": _stats(list(soft.values()), list(soft))}
        rnd_row = table.get((random_method, "soft", evaluator))
        if rnd_row is not None and rnd_row.get("ipc") != row.get("ipc"):
            rnd_row = None  # another IPC is another protocol
        rnd = _by_seed(rnd_row) if rnd_row is not None else {}
        common = [s for s in soft if s in rnd]
        entry["random_margin"] = None
        if common:
            a = np.asarray([soft[s] for s in common], dtype=np.float64)
            b = np.asarray([rnd[s] for s in common], dtype=np.float64)
            diffs = _stats(list(a - b), common)
            entry["random_margin"] = {**diffs, "mean": float(a.mean() - b.mean())}
        hard_row = table.get((method, "hard", evaluator))
        hard = _by_seed(hard_row) if hard_row is not None else {}
        entry["hard_label"] = _stats(list(hard.values()), list(hard)) if hard else None
        entry["hlr"] = entry["ior"] = entry["lrs"] = None
        lrs_seeds = [s for s in common if s in hard and _full_real(full_real_hard_top1, s) is not None]
        if lrs_seeds:
            hlr = [_full_real(full_real_hard_top1, s) - hard[s] for s in lrs_seeds]  # points
            ior = [soft[s] - rnd[s] for s in lrs_seeds]
            lrs = [label_robust_score(h / 100.0, i / 100.0, lam) for h, i in zip(hlr, ior)]  # as fractions
            entry["hlr"] = _stats(hlr, lrs_seeds)
            entry["ior"] = _stats(ior, lrs_seeds)
            entry["lrs"] = _stats(lrs, lrs_seeds)
        out.setdefault(method, {})[evaluator] = entry
    return out
