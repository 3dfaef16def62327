"""The printed results: margins over the random subset and the sentence saying what they mean."""

from __future__ import annotations

import pytest

from gvbsm_hf.report import MARGIN_NOISE, explain_margins, format_results_table, random_margins


def _row(method: str, student: str, per_seed: list[float], labels: str = "soft", seeds: list[int] | None = None) -> dict:
    seeds = list(range(len(per_seed))) if seeds is None else seeds
    mean = sum(per_seed) / len(per_seed)
    return {"method": method, "labels": labels, "evaluator": student, "ipc": 10, "mean": mean, "std": 0.0,
            "n": len(per_seed), "seeds": seeds, "per_seed": per_seed}


def _rows(margins: dict[str, float]) -> list[dict]:
    rows = []
    for student, m in margins.items():
        rows += [_row("gvbsm", student, [70.0 + m, 72.0 + m]), _row("random_real", student, [70.0, 72.0])]
    return rows


def test_margins_use_common_seeds_and_matching_label_rows():
    rows = [_row("gvbsm", "a", [80.0, 81.0, 90.0], seeds=[0, 1, 5]), _row("random_real", "a", [79.0, 79.5], seeds=[0, 1]),
            _row("gvbsm", "a", [50.0], labels="hard"), _row("random_real", "a", [60.0], labels="hard"),
            _row("gvbsm", "a", [79.0, 80.0], labels="stored_views"), _row("gvbsm", "b", [70.0])]
    got = random_margins(rows)
    assert got[0] == pytest.approx(((80 - 79) + (81 - 79.5)) / 2)  # seed 5 has no partner
    assert got[1] is None  # the random row itself
    assert got[2] == pytest.approx(-10.0)  # hard against hard
    assert got[4] == pytest.approx(((79 - 79) + (80 - 79.5)) / 2)  # stored views against the soft random row
    assert got[5] is None  # no random subset for student b
    table = format_results_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and "| +1.25 |" in table[2] and "| -10.00 |" in table[4]


@pytest.mark.parametrize(("margins", "expect"), [
    ({"convnet128": 2.0, "convnet128_in": 1.5}, "worth its compute"),
    ({"convnet128": 0.5, "convnet128_in": -0.9}, "as good as a random subset, no better"),
    ({"convnet128": -3.0, "convnet128_in": -1.5}, "a random real subset is the better choice"),
    ({"convnet128": 2.0, "convnet128_in": 0.0}, "help convnet128 and are level"),
    ({"convnet128": -0.3, "convnet128_in": -19.6}, "worse on convnet128_in: what they carry does not transfer"),
    ({"convnet128": 0.7, "convnet128_in": -1.2}, "worse on convnet128_in: what they carry does not transfer"),
])
def test_explanation_follows_the_margins(margins, expect):
    text = explain_margins(_rows(margins))
    assert expect in text
    for student, m in margins.items():  # every student with its margin, rounded as printed
        shown = f"{abs(m):.1f} points {'above' if m > 0 else 'below'}" if abs(m) > MARGIN_NOISE else f"level with ({m:+.1f})"
        assert f"on {student} {shown}" in text
    assert "2 seeds" in text


def test_a_small_gap_on_one_seed_asks_for_seeds():
    rows = [_row("gvbsm", "a", [77.3]), _row("random_real", "a", [76.6]),
            _row("gvbsm", "b", [75.8]), _row("random_real", "b", [77.0])]
    text = explain_margins(rows)
    assert "on a level with (+0.7)" in text and "on b 1.2 points below" in text and "1 seed;" in text
    assert "worse on b: a gap this small on one seed needs more seeds" in text
    rows[2] = _row("gvbsm", "b", [70.0])  # -7: not noise
    assert "does not transfer" in explain_margins(rows)


def test_explanation_names_the_requested_method_and_is_empty_without_a_random_subset():
    rows = _rows({"convnet128": -2.0}) + [_row("sre2l", "convnet128", [75.0, 77.0])]
    assert explain_margins(rows).startswith("The gvbsm set")
    assert "sre2l set" in explain_margins(rows, method="sre2l") and "5.0 points above" in explain_margins(rows, "sre2l")
    assert explain_margins([_row("gvbsm", "convnet128", [70.0])]) == ""
