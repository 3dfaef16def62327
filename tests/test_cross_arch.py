"""Cross-architecture benchmark (issue 35, ``benchmarks/cross_arch_fashion_mnist.py``): its ``--smoke`` end to
end in a subprocess (exit 0, the results schema exactly, nothing under ``benchmarks/results/``), and its
within-class diversity measure against a float64 reference. Select with ``pytest -k cross_arch``."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "cross_arch_fashion_mnist.py"
RESULTS = REPO / "benchmarks" / "results"
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("cross_arch_fashion_mnist", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ca = _load_benchmark()


# ------------------------------------------------------------------------------------ diversity


def _reference_diversity(features, labels, real_features, real_labels) -> float:
    """Plain-Python float64: per class, mean over pairs i < j of the Euclidean distance, ratio, mean over classes."""
    def spread(rows):
        pairs = list(itertools.combinations(rows, 2))
        return sum(math.dist(a, b) for a, b in pairs) / len(pairs)

    ratios = []
    for c in sorted(set(labels)):
        syn = [f for f, y in zip(features, labels) if y == c]
        real = [f for f, y in zip(real_features, real_labels) if y == c]
        ratios.append(spread(syn) / spread(real))
    return sum(ratios) / len(ratios)


def test_within_class_diversity_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(9, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    real = torch.randn(14, 5, generator=g, dtype=torch.float64) * 2.0 + 0.5
    real_labels = torch.tensor([0] * 5 + [1] * 4 + [2] * 5)
    got = ca.within_class_diversity(feats, labels, real, real_labels)
    ref = _reference_diversity(feats.tolist(), labels.tolist(), real.tolist(), real_labels.tolist())
    assert got == pytest.approx(ref, rel=1e-12)
    # float32 features are measured in float64 too
    assert ca.within_class_diversity(feats.float(), labels, real.float(), real_labels) == pytest.approx(ref, rel=1e-6)
    assert ca.mean_pairwise_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])) == pytest.approx(10.0 / 3)


def test_within_class_diversity_identical_images_give_zero_and_real_against_itself_one():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(30, 6, generator=g, dtype=torch.float64)
    real_labels = torch.arange(3).repeat_interleave(10)
    repeated = torch.cat([real[real_labels == c][:1].expand(4, -1) for c in range(3)])  # one image, 4 times
    assert ca.within_class_diversity(repeated, torch.arange(3).repeat_interleave(4), real, real_labels) == 0.0
    assert ca.within_class_diversity(real, real_labels, real, real_labels) == pytest.approx(1.0, abs=1e-12)
    # a random subset of the real images scores about 1 (the mean pairwise distance is unbiased)
    big = torch.randn(3000, 8, generator=g, dtype=torch.float64)
    big_labels = torch.arange(3).repeat_interleave(1000)
    subset = torch.cat([torch.arange(c * 1000, c * 1000 + 1000)[torch.randperm(1000, generator=g)[:40]] for c in range(3)])
    assert ca.within_class_diversity(big[subset], big_labels[subset], big, big_labels) == pytest.approx(1.0, abs=0.1)


def test_within_class_diversity_needs_two_images_per_class():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="ipc >= 2"):
        ca.within_class_diversity(x, torch.tensor([0, 1, 2]), x, torch.tensor([0, 1, 2]))


def test_teacher_feature_space_is_the_input_of_the_last_linear_scaled_by_the_real_images():
    torch.manual_seed(0)
    teachers = [nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3)),
                nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Tanh(), nn.Linear(4, 3))]
    images, real = torch.randn(5, 1, 4, 4), torch.randn(7, 1, 4, 4)
    syn_f, real_f = ca.teacher_feature_space(teachers, images, real)
    scale = [t[:3](real).double().norm(dim=1).mean() for t in teachers]
    torch.testing.assert_close(syn_f, torch.cat([t[:3](images).double() / s for t, s in zip(teachers, scale)], 1))
    assert all(float(real_f[:, a:b].norm(dim=1).mean()) == pytest.approx(1.0) for a, b in ((0, 6), (6, 10)))
    assert all(not h for t in teachers for m in t.modules() for h in (m._forward_pre_hooks,))  # hooks removed


# ------------------------------------------------------------------------------------- schema


def _assert_float(value, where):
    assert isinstance(value, float) and math.isfinite(value), f"{where}: {value!r}"


def _assert_stats(d, where):
    assert isinstance(d, dict) and set(d) == {"mean", "std", "per_seed"}, f"{where}: {d!r}"
    _assert_float(d["mean"], f"{where}.mean")
    _assert_float(d["std"], f"{where}.std")
    assert isinstance(d["per_seed"], list) and d["per_seed"], where
    for v in d["per_seed"]:
        _assert_float(v, f"{where}.per_seed")


def assert_schema(result: dict) -> None:
    """Issue 35's schema, written out independently of the benchmark's own validate_result."""
    assert set(result) == {"command", "teachers", "ipc", "labels", "evaluators", "random_real", "rows", "best"}
    assert isinstance(result["command"], str) and result["command"]
    assert isinstance(result["teachers"], list) and result["teachers"]
    for t in result["teachers"]:
        assert set(t) == {"name", "top1"} and isinstance(t["name"], str)
        _assert_float(t["top1"], "teachers.top1")
    assert isinstance(result["ipc"], int) and not isinstance(result["ipc"], bool)
    assert isinstance(result["labels"], str) and result["labels"]
    evaluators = result["evaluators"]
    assert isinstance(evaluators, list) and evaluators and all(isinstance(e, str) for e in evaluators)
    assert set(result["random_real"]) == set(evaluators)
    for e, s in result["random_real"].items():
        _assert_stats(s, f"random_real.{e}")
    assert isinstance(result["rows"], list) and result["rows"]
    for row in result["rows"]:
        assert set(row) - {"diagnostics"} == {"recipe", "per_evaluator", "mean_over_evaluators",
                                              "min_margin_vs_random", "hard_label_in", "within_class_diversity"}
        for k, v in row.get("diagnostics", {}).items():  # extra key beside the schema (gvbsm_hf.image_diagnostics)
            _assert_float(v, f"{row['recipe']}.diagnostics.{k}")
        assert isinstance(row["recipe"], str)
        assert set(row["per_evaluator"]) == set(evaluators)
        for e, s in row["per_evaluator"].items():
            _assert_stats(s, f"{row['recipe']}.{e}")
        for k in ("mean_over_evaluators", "min_margin_vs_random", "hard_label_in", "within_class_diversity"):
            _assert_float(row[k], f"{row['recipe']}.{k}")
        means = [row["per_evaluator"][e]["mean"] for e in evaluators]
        assert row["mean_over_evaluators"] == pytest.approx(sum(means) / len(means), abs=1e-3)
        margins = [row["per_evaluator"][e]["mean"] - result["random_real"][e]["mean"] for e in evaluators]
        assert row["min_margin_vs_random"] == pytest.approx(min(margins), abs=2e-3)
    assert set(result["best"]) == {"recipe", "mean_over_evaluators", "min_margin_vs_random"}
    assert isinstance(result["best"]["recipe"], str)
    _assert_float(result["best"]["mean_over_evaluators"], "best.mean_over_evaluators")
    _assert_float(result["best"]["min_margin_vs_random"], "best.min_margin_vs_random")
    best = max(result["rows"], key=lambda r: r["mean_over_evaluators"])
    assert result["best"]["recipe"] == best["recipe"]


def _fake_saved(evaluators):
    saved = {"random_real": {"per_evaluator": {e: [50.0, 52.0] for e in evaluators}}}
    for i, name in enumerate(["gvbsm_authors", "rded"]):
        saved[name] = {"per_evaluator": {e: [55.0 + i + j, 56.0 + i] for j, e in enumerate(evaluators)},
                       "hard_label_in": 30.0 + i, "within_class_diversity": 0.5 + i / 10}
    return saved


def test_build_result_has_the_schema_and_validate_rejects_deviations():
    evaluators = ["convnet128_in", "vit_tiny_p4"]
    result = ca.build_result("python x", [{"name": "convnet32", "top1": 80.0}], 2, "soft", evaluators,
                             _fake_saved(evaluators))
    assert_schema(result)
    ca.validate_result(result)
    assert result["best"]["recipe"] == "rded" and result["rows"][1]["min_margin_vs_random"] == pytest.approx(5.5)
    bad = [dict(result, extra=1), {k: v for k, v in result.items() if k != "best"}, dict(result, ipc=2.0),
           dict(result, teachers=[{"name": "t", "top1": float("nan")}]),
           dict(result, rows=[{**result["rows"][0], "hard_label_in": None}]),
           dict(result, random_real={"convnet128_in": result["random_real"]["convnet128_in"]})]
    for b in bad:
        with pytest.raises(ValueError):
            ca.validate_result(b)


def test_best_is_a_distilled_row_not_a_variant_of_the_random_subset():
    """A second random draw or the random subset under other labels can top the table; ``best`` names the best
    distilled set (a table of random-subset variants alone still names one)."""
    evaluators = ["convnet128_in", "vit_tiny_p4"]
    saved = _fake_saved(evaluators)
    saved["random_real_logit_norm"] = {**saved["rded"], "recipe": "random_real_logit_norm",
                                       "per_evaluator": {e: [99.0] for e in evaluators}}
    result = ca.build_result("python x", [{"name": "c", "top1": 80.0}], 2, "soft", evaluators, saved)
    means = {r["recipe"]: r["mean_over_evaluators"] for r in result["rows"]}
    assert max(means, key=means.get) == "random_real_logit_norm"
    assert result["best"]["recipe"] == max((n for n in means if not n.startswith("random_real")), key=means.get)
    only = {k: v for k, v in saved.items() if k.startswith("random_real")}
    assert ca.build_result("python x", [], 2, "soft", evaluators, only)["best"]["recipe"] == "random_real_logit_norm"


def test_rows_carry_their_image_diagnostics_as_an_extra_key():
    evaluators = ["convnet128_in"]
    saved = _fake_saved(evaluators)
    saved["rded"]["diagnostics"] = {"contrast_syn": 0.25, "contrast_real": 0.5}
    result = ca.build_result("python x", [{"name": "convnet32", "top1": 80.0}], 2, "soft", evaluators, saved)
    assert_schema(result)
    ca.validate_result(result)
    assert result["rows"][1]["diagnostics"] == {"contrast_syn": 0.25, "contrast_real": 0.5}
    assert "diagnostics" not in result["rows"][0]
    table = ca.markdown(result).splitlines()
    assert table[-2].startswith("| real images | 0.500 |") and table[-1].startswith("| rded | 0.250 |")
    assert "| images | contrast |" in ca.markdown(result) and "| images |" not in ca.markdown(
        ca.build_result("python x", [{"name": "c", "top1": 80.0}], 2, "soft", evaluators, _fake_saved(evaluators)))
    result["rows"][1]["diagnostics"]["contrast_syn"] = "low"
    with pytest.raises(ValueError, match="diagnostics.contrast_syn"):
        ca.validate_result(result)


def test_smoke_arguments_stay_small():
    assert ca.SMOKE["seeds"] == [0] and ca.SMOKE["epochs"] <= 2 and 1 <= len(ca.SMOKE["evaluators"]) <= 2
    assert set(ca.SMOKE["evaluators"]) <= set(ca.EVALUATORS) and ca.HARD_EVALUATOR in ca.SMOKE["evaluators"]
    assert set(ca.RECIPES) == {"sre2l", "gvbsm_authors", "gvbsm_hf_v0", "rded", "edc_style", "feature_regression",
                               "rded_kcenter", "feature_regression_kcenter_init", "random_real_draw1", "gvbsm_real_init",
                               "gvbsm_real_init_tv", "gvbsm_real_init_instance",
                               "gvbsm_real_init_tv_instance", "gvbsm_real_init_tv_instance_strong", "random_real",
                               "gvbsm_authors_no_bn", "gvbsm_authors_no_conv", "gvbsm_authors_no_dd",
                               "gvbsm_authors_first_layer_1", "gvbsm_authors_convnet_teachers",
                               "random_real_relabel_1", "random_real_relabel_2", "random_real_relabel_3",
                               "random_real_logit_norm"}
    for name in ("gvbsm_real_init", "gvbsm_real_init_tv", "gvbsm_real_init_instance", "gvbsm_real_init_tv_instance",
                 "gvbsm_real_init_tv_instance_strong"):
        method, flags, options = ca.RECIPES[name]  # the remedy rows: G-VBSM, authors' protocol, from real images
        assert method == "gvbsm" and options["syn_init"] == "real" and flags[flags.index("--syn_protocol") + 1] == "authors"
        assert (options.get("syn_tv_weight", 0) > 0) == ("tv" in name)
        assert (options.get("syn_r_instance", 0) > 0) == ("instance" in name) == ("--stats_instance" in flags)
    strong, weak = ca.RECIPES["gvbsm_real_init_tv_instance_strong"][2], ca.RECIPES["gvbsm_real_init_tv_instance"][2]
    assert strong["syn_tv_weight"] > weak["syn_tv_weight"] and strong["syn_r_instance"] >= 10 * weak["syn_r_instance"]
    method, flags, options = ca.RECIPES["edc_style"]
    assert method == "gvbsm" and options["syn_init"] == "rded" and options["syn_class_weight"] == 0.5
    assert flags[flags.index("--stats_per_class") + 1] == "true"
    # the coverage rows: whole images (one per stored image), k-center over 1000 candidates per class
    for name, want_method, init in (("rded_kcenter", "rded", None),
                                    ("feature_regression_kcenter_init", "feature_regression", "rded")):
        method, flags, options = ca.RECIPES[name]
        assert method == want_method and options.get("syn_init") == init
        assert options["syn_rded_selection"] == "kcenter" and options["syn_rded_candidates"] == 1000
        assert options["syn_rded_factor"] == 1 and options["syn_rded_crop_scale"] == [1.0, 1.0]
    assert ca.RECIPES["feature_regression_kcenter_init"][1] == ca.RECIPES["feature_regression"][1]
    # another random draw: the baseline's method with another selection seed, nothing else changed
    assert ca.RECIPES["random_real_draw1"] == (ca.RANDOM, ["--syn_seed", "1"], {})


# --------------------------------------------------------------------------------------- smoke


def _results_snapshot() -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(RESULTS)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in RESULTS.rglob("*") if p.is_file()}


def test_cross_arch_smoke(tmp_path):
    out = tmp_path / "cross_arch.json"
    before = _results_snapshot()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--output", str(out)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert _results_snapshot() == before, "--smoke wrote under benchmarks/results/"
    assert not (RESULTS / "cross_arch_fashion_mnist.json").exists() or \
        "cross_arch_fashion_mnist.json" in before
    result = json.loads(out.read_text())
    assert_schema(result)
    assert result["evaluators"] == ca.SMOKE["evaluators"] and result["ipc"] == ca.SMOKE["ipc"]
    assert [r["recipe"] for r in result["rows"]] == ca.SMOKE["recipes"]
    assert len(result["teachers"]) == 1 and result["teachers"][0]["name"] == "convnet32"
    assert all({"contrast_syn", "contrast_real", "instance_mean_distance"} <= set(r["diagnostics"])
               for r in result["rows"])


def test_smoke_refuses_an_output_under_results():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--output", str(RESULTS / "x.json")], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "writes nothing under" in proc.stderr
    assert not (RESULTS / "x.json").exists()


def test_every_row_passes_the_pipelines_parse_time_validation():
    """Each row's command line is a valid recipe (options checked before any compute), with its method and
    that method's own options as the row declares them (zoo names stand in for the teacher folders)."""
    from gvbsm_hf.pipeline import parse_recipe
    from gvbsm_hf.recover.config import parse_method_args

    args = argparse.Namespace(teachers=["convnet32", "convnet32_d2", "convnet128", "shufflenetv2_050"], ipc=10, syn_iterations=1000, epochs=100,
                              seeds=[0], evaluators=ca.EVALUATORS, stats_max_samples=10000, extra=[], hard_label_seeds=[0])
    for name, (method, _, options) in ca.RECIPES.items():
        recipe = parse_recipe(ca.run_argv(args, name, Path("unused")))
        assert recipe.synthesis.syn_method == method, name
        parsed = parse_method_args(recipe.synthesis.method_args or {}).get(method, {})  # the YAML's options + the row's
        assert {k: parsed.get(k) for k in options} == options, name
        assert recipe.synthesis.syn_teachers == (args.teachers[:3] if name == "gvbsm_authors_convnet_teachers" else None), name
        k = ca.RELABEL_ENSEMBLE.get(name)
        assert recipe.relabel.relabel_teachers == (args.teachers[:k] if k else None), name
        assert recipe.relabel.relabel_logit_norm == (name == "random_real_logit_norm"), name


def test_ensemble_size_rows_relabel_with_the_first_k_teachers_and_refuse_a_set_too_small():
    four = ["runs/t/convnet128", "runs/t/convnet32", "runs/t/convnet32_d2", "runs/t/shufflenetv2_050"]
    assert [ca.relabel_teachers(f"random_real_relabel_{k}", four) for k in (1, 2, 3)] == [four[:1], four[:2], four[:3]]
    assert ca.relabel_teachers("random_real", four) == []
    with pytest.raises(SystemExit, match="needs more than 3"):
        ca.relabel_teachers("random_real_relabel_3", four[:3])


def test_teacher_family_row_synthesises_from_the_convnets_and_refuses_a_one_family_set():
    """The teacher-family row keeps the ConvNet teachers of the folders given (relabelling keeps all); a set of one
    family would make it the plain row under another name, so it stops before any compute with the fix."""
    four = ["runs/t/convnet128", "runs/t/convnet32", "runs/t/convnet32_d2", "runs/t/shufflenetv2_050"]
    assert ca.syn_teachers("gvbsm_authors_convnet_teachers", four) == four[:3]
    assert ca.syn_teachers("gvbsm_authors", four) == []
    for one_family in (four[:3], four[3:]):
        with pytest.raises(SystemExit, match="teachers of more than one family"):
            ca.syn_teachers("gvbsm_authors_convnet_teachers", one_family)


def test_rows_of_another_teacher_set_are_refused_with_the_fix(tmp_path):
    """A table compares every row with one random subset under the same teachers: a saved row made with other
    teachers (a set re-made on another CPU differs by a few hundredths) stops the run before any compute."""
    mine = [{"name": "convnet128", "top1": 90.37}, {"name": "convnet32", "top1": 86.18}]
    theirs = [{"name": "convnet128", "top1": 90.28}, {"name": "convnet32", "top1": 86.18}]
    saved = {"random_real": {"recipe": "random_real", "teachers": mine},
             "rded": {"recipe": "rded", "teachers": theirs},
             "sre2l": {"recipe": "sre2l"}}  # saved before rows recorded their teachers: accepted
    with pytest.raises(RuntimeError, match=r"rows \['rded'\].*its own --work-dir and --output"):
        ca.check_same_teachers(saved, mine, tmp_path)
    ca.check_same_teachers({k: v for k, v in saved.items() if k != "rded"}, mine, tmp_path)
    (tmp_path / "rows").mkdir()
    for name, row in saved.items():
        (tmp_path / "rows" / f"{name}.json").write_text(json.dumps(row))
    assert ca.saved_rows(tmp_path) == saved


@pytest.mark.parametrize("recipe_file, row", [("rded_transfer_ipc10.yaml", "rded"),
                                              ("feature_regression_transfer_ipc10.yaml", "feature_regression")])
def test_shipped_transfer_recipes_synthesise_as_their_table_row(recipe_file, row):
    """The recipes shipped from the table (README) make their row's set: the same method, method options,
    synthesis protocol, labels and evaluators as the benchmark's command line (zoo teachers, trained by the recipe)."""
    from gvbsm_hf.methods import get_method
    from gvbsm_hf.pipeline import parse_recipe
    from gvbsm_hf.recover.config import parse_method_args

    shipped = parse_recipe(["--config", str(REPO / "recipes" / "fashion_mnist" / recipe_file)])
    args = argparse.Namespace(teachers=list(shipped.squeeze.teachers), ipc=10, syn_iterations=1000, epochs=300,
                              seeds=[0, 1, 2], evaluators=ca.EVALUATORS, stats_max_samples=10000, extra=[],
                              hard_label_seeds=[0])
    bench = parse_recipe(ca.run_argv(args, row, Path("unused")))
    method = ca.RECIPES[row][0]
    assert shipped.synthesis.syn_method == bench.synthesis.syn_method == method
    skip = {"method_args", "syn_checkpoint_every"}
    if get_method(method).select is not None:  # a selection runs no synthesis jobs: their layout is unused
        skip |= {"syn_classes_per_batch", "syn_slots_per_batch"}
    differ = {f: (getattr(shipped.synthesis, f), getattr(bench.synthesis, f)) for f in vars(bench.synthesis)
              if f not in skip and getattr(shipped.synthesis, f) != getattr(bench.synthesis, f)}
    assert not differ, differ
    options = parse_method_args(shipped.synthesis.method_args or {})[method]
    assert {k: options.get(k) for k in ca.RECIPES[row][2]} == ca.RECIPES[row][2]
    assert list(shipped.training.eval_students) == ca.EVALUATORS and shipped.relabel.relabel_mode == "stored"


def test_plot_picks_rows_in_the_order_given_and_refuses_unknown_ones():
    spec = importlib.util.spec_from_file_location("plot_cross_arch", REPO / "benchmarks" / "plot_cross_arch.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    result = {"evaluators": ["a", "b"], "random_real": {"a": {"mean": 50.0}, "b": {"mean": 40.0}},
              "rows": [{"recipe": name, "per_evaluator": {"a": {"mean": 50.0 + k, "std": 0.0},
                                                          "b": {"mean": 40.0 - k, "std": 0.0}}}
                       for k, name in enumerate(["x", "y", "z"])]}
    picked = plot.pick_rows(result, ["z", "x"])
    assert [r["recipe"] for r in picked["rows"]] == ["z", "x"]
    assert plot.margins(picked) == {"z": {"a": (2.0, 0.0), "b": (-2.0, 0.0)}, "x": {"a": (0.0, 0.0), "b": (0.0, 0.0)}}
    assert plot.pick_rows(result, None) is result
    with pytest.raises(SystemExit, match=r"\['w'\] are not in the results"):
        plot.pick_rows(result, ["x", "w"])


def test_component_share_rows_change_one_thing_of_the_authors_row():
    """Each share row is ``gvbsm_authors`` with exactly one option changed (or, for the teacher family, the same
    options with a teacher subset), so its margin against that row is that component's share."""
    method, flags, options = ca.RECIPES["gvbsm_authors"]
    changed = {}
    for name in [n for n in ca.RECIPES if n.startswith("gvbsm_authors_")]:
        m, f, o = ca.RECIPES[name]
        assert (m, f) == (method, flags), name
        changed[name] = {k: v for k, v in o.items() if options.get(k, None) != v}
    assert changed == {"gvbsm_authors_no_bn": {"syn_r_bn": 0.0}, "gvbsm_authors_no_conv": {"syn_r_conv": 0.0},
                       "gvbsm_authors_no_dd": {"syn_dd": False}, "gvbsm_authors_first_layer_1": {"syn_first_layer_multiplier": 1.0},
                       "gvbsm_authors_convnet_teachers": {}}
    assert set(ca.SYN_TEACHER_FILTER) == {"gvbsm_authors_convnet_teachers"}
