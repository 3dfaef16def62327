"""What a finished run prints: the results table with the margin over the random real subset
(docs/method.md "Scores") and one generated sentence saying what the margins mean.

Both read evaluate-stage rows (``evaluate/results.json``: ``method, labels, evaluator, ipc, mean, std,
n, seeds, per_seed``, accuracies in percent).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

__all__ = ["MARGIN_NOISE", "explain_margins", "format_results_table", "random_margins"]

# a margin inside +-MARGIN_NOISE points is read as "no difference" (one seed of a 100-image student
# moves by about this much: docs/results.md)
MARGIN_NOISE = 1.0


def _margin(row: Mapping[str, Any], rnd: Mapping[str, Any]) -> float | None:
    """Mean over the seeds both rows have of (row - random subset), in points; None without a common seed."""
    mine, theirs = dict(zip(row["seeds"], row["per_seed"])), dict(zip(rnd["seeds"], rnd["per_seed"]))
    common = [s for s in mine if s in theirs]
    return sum(mine[s] - theirs[s] for s in common) / len(common) if common else None


def random_margins(rows: Sequence[Mapping[str, Any]], random_method: str = "random_real") -> list[float | None]:
    """Per row, its margin over the random subset of the same evaluator (hard-label rows against the
    random subset's hard row, the others against its soft row); None for the random rows themselves
    and where no random row or common seed exists."""
    randoms = {(r["labels"], r["evaluator"]): r for r in rows if r["method"] == random_method}
    out: list[float | None] = []
    for row in rows:
        rnd = randoms.get(("hard" if row["labels"] == "hard" else "soft", row["evaluator"]))
        out.append(None if rnd is None or row["method"] == random_method else _margin(row, rnd))
    return out


def format_results_table(rows: Sequence[Mapping[str, Any]], random_method: str = "random_real") -> str:
    """Markdown table of evaluation rows (method, labels, evaluator, IPC, top-1 mean ± std) with the margin over
    the random real subset: the row's mean minus the ``random_method`` row's mean over the seeds both have, same
    evaluator; hard-label rows against the random subset's hard-label row, the others against its soft row
    (docs/method.md "Scores")."""
    lines = ["| method | labels | evaluator | IPC | top-1 % (last epoch) | vs random subset | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row, margin in zip(rows, random_margins(rows, random_method)):
        shown = "" if margin is None else f"{margin:+.2f}"
        lines.append(f"| {row['method']} | {row['labels']} | {row['evaluator']} | {row['ipc']} | "
                     f"{row['mean']:.2f} ± {row['std']:.2f} | {shown} | {row['n']} |")
    return "\n".join(lines)


def _verdict(margin: float) -> str:
    if margin > MARGIN_NOISE:
        return f"{margin:.1f} points above"
    if margin < -MARGIN_NOISE:
        return f"{-margin:.1f} points below"
    return f"level with ({margin:+.1f})"


def explain_margins(rows: Sequence[Mapping[str, Any]], method: str | None = None,
                    random_method: str = "random_real") -> str:
    """One or two sentences on the ``soft`` rows of ``method`` (the first non-random method when None):
    its margin over a random real subset of the same size with the same labels, per student, and what
    that pattern means. Empty when there is nothing to compare (no random subset evaluated)."""
    soft = [(row, m) for row, m in zip(rows, random_margins(rows, random_method))
            if row["labels"] == "soft" and m is not None]
    method = method or next((row["method"] for row, _ in soft), None)
    mine = [(row["evaluator"], m, row["n"]) for row, m in soft if row["method"] == method]
    if not mine:
        return ""
    parts = "; ".join(f"on {student} {_verdict(m)}" for student, m, _ in mine)
    seeds = min(n for _, _, n in mine)
    first = (f"The {method} set against a random real subset of the same size with the same soft labels: {parts} "
             f"({seeds} seed{'s' if seeds != 1 else ''}; a margin within {MARGIN_NOISE:g} point is read as no difference).")
    above = [s for s, m, _ in mine if m > MARGIN_NOISE]
    below = [s for s, m, _ in mine if m < -MARGIN_NOISE]
    if len(above) == len(mine):
        then = "The synthesis adds what every student here can use: the distilled set is worth its compute."
    elif not above and not below:
        then = ("It is as good as a random subset, no better: with soft labels most of the accuracy comes from the "
                "teachers' labels, not the images (docs/results.md).")
    elif len(below) == len(mine):
        then = ("At this budget a random real subset is the better choice; docs/results.md lists the recipes that "
                "beat it.")
    elif not below:
        then = (f"The images help {', '.join(above)} and are level with a random subset on the other students: "
                "worth using where they help.")
    else:
        worst = min(m for _, m, _ in mine)
        why = ("a gap this small on one seed needs more seeds (`eval_seeds`) before it means much"
               if seeds == 1 and worst >= -2 * MARGIN_NOISE else "what they carry does not transfer to every architecture")
        then = (f"The images do worse on {', '.join(below)}: {why}; check the student you will train "
                "(docs/results.md, cross-architecture table).")
    return f"{first} {then}"
