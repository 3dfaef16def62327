"""Cross-architecture benchmark (issue 35 "Distilled sets that transfer"): does a distilled set beat a random
real subset of the same size on EVERY evaluator, not only on the network it was distilled with? Fashion-MNIST
IPC 10, one fixed teacher set, 3 student seeds, last epoch.

Columns: the evaluators (``EVALUATORS``, zoo backbones of ``gvbsm_hf.backbones``): ``convnet128_in``
(the dataset-distillation literature's ConvNet-128 with instance norm), ``convnet128_nn`` (no
normalisation), ``resnet18_cifar``, ``mobilenetv2_100``, ``shufflenetv2_100`` (full width, CIFAR stems) and
``vit_tiny_p4`` (timm ViT, patch 4). Every evaluator trains under the same student protocol (the recipe's:
soft labels of the teacher ensemble on every augmented batch, ``eval_students`` in one pipeline run per
row, so the views and labels of a seed are the same for every evaluator; with ``relabel_mode: stored``
the same stored views and labels).

Rows (``RECIPES``; every one through the library's pipeline, ``recipes/fashion_mnist/gvbsm_ipc10.yaml`` with
the overrides below, one output folder per row under ``--work-dir``; a method's own options go to the
pipeline as ``--method_args '{"<method>": {...}}'``):

* ``sre2l``: SRe2L (cross-entropy + BN matching, one teacher);
* ``gvbsm_authors``: G-VBSM, the authors' synthesis protocol (``syn_protocol: authors``, round robin);
* ``gvbsm_hf_v0``: G-VBSM, gvbsm-hf 0.1's synthesis protocol (``syn_protocol: gvbsm_hf_v0``, uniform);
* ``rded``: RDED selection (the ensemble's most typical real crops, 0.5-1 of the image, one per image);
* ``edc_style``: G-VBSM from RDED crops (``syn_init: rded``) with soft category-aware matching
  (``stats_per_class: true``, ``syn_class_weight: 0.5``);
* ``feature_regression``: feature regression from random real images (the margin benchmark's row);
* ``rded_kcenter``: selection without optimisation, whole real images covering the teachers' penultimate
  feature space (``syn_rded_selection: kcenter`` over 1000 candidates per class, docs/method.md);
* ``feature_regression_kcenter_init``: feature regression started from those k-center picks;
* ``gvbsm_real_init``: G-VBSM (authors' protocol) started from random real images (``syn_init: real``);
* ``gvbsm_real_init_tv``: the same with the total-variation prior (``syn_tv_weight``, docs/method.md Eq. 18);
* ``gvbsm_real_init_instance``: the same with per-instance BN statistic matching (``syn_r_instance``,
  ``stats_instance: true``, docs/method.md Eq. 19);
* ``gvbsm_real_init_tv_instance``: both remedies at once; ``gvbsm_real_init_tv_instance_strong``: both at
  weights that move their terms (``TV_WEIGHT_STRONG``, ``INSTANCE_WEIGHT_STRONG``);
* ``random_real_draw1``: another random real subset (``syn_seed: 1``): how far two random draws lie apart
  under this protocol, the scale against which every other row's margin is read;
* each component's share in ``gvbsm_authors`` (issue 35 item 3), one change each: ``gvbsm_authors_no_bn``
  (``syn_r_bn: 0``, no BN statistic matching), ``gvbsm_authors_no_conv`` (``syn_r_conv: 0``, no Conv
  statistic matching), ``gvbsm_authors_no_dd`` (``syn_dd: false``, no data densification),
  ``gvbsm_authors_first_layer_1`` (``syn_first_layer_multiplier: 1``, the first layer weighted like the
  others) and ``gvbsm_authors_convnet_teachers`` (synthesis from the ConvNet teachers only,
  ``syn_teachers``: the teacher family; relabelling keeps every teacher); the initialisation's share is
  ``gvbsm_real_init``;
* the relabel ensemble (the paper's Table 3 and Table 6, on the random subset's images, whose synthesis costs
  nothing): ``random_real_relabel_1`` / ``_2`` / ``_3`` (soft labels of the first 1, 2, 3 teachers as given,
  ``relabel_teachers``; ``random_real`` itself is all four) and ``random_real_logit_norm``
  (``relabel_logit_norm: true``, docs/method.md Eq. 13);

and the baseline ``random_real`` (a random real subset, same teachers, labels, students and seeds).
Each row reports its ``mean_over_evaluators``, ``min_margin_vs_random`` (its worst evaluator against the
random subset on that evaluator), ``hard_label_in`` (the set with its hard labels on ``convnet128_in``,
``--hard-label-seeds``: how much of the result is the images and how much the soft labels) and
``within_class_diversity`` (:func:`within_class_diversity` in the teachers' penultimate feature space:
1 is as spread as real images of the class, 0 is one image repeated), and, beside the issue's schema, the
extra key ``diagnostics``: :func:`gvbsm_hf.image_diagnostics.diagnose` of its images against the same real
images (docs/method.md "Image diagnostics": pixel mean and contrast, saturated pixels, high-frequency power,
per-instance activation statistics in the teachers, within-class distances). ``best``: the distilled row (not a
variant of the random subset: another draw, other labels) with the highest ``mean_over_evaluators``.

Teachers: the four-teacher set of ``benchmarks/margin_fashion_mnist.py`` (trained by
``benchmarks/squeeze_fashion_mnist.py``, see ``benchmarks/fidelity_fashion_mnist.py``)::

    python benchmarks/cross_arch_fashion_mnist.py --teachers runs/fm_teachers/convnet128 runs/fm_teachers/convnet32 \\
        runs/fm_teachers/convnet32_d2 runs/fm_teachers/shufflenetv2_050
    python benchmarks/cross_arch_fashion_mnist.py --teachers ... --recipes rded edc_style   # another process
    python benchmarks/cross_arch_fashion_mnist.py --teachers ... --collect
    python benchmarks/cross_arch_fashion_mnist.py --teachers ... --recipes <new row> \\
        --resume-from benchmarks/results/cross_arch_fashion_mnist.json   # a fresh clone: keep the committed rows

Each finished row is saved to ``--work-dir/rows/`` at once (a killed benchmark resumes where it stopped;
``--collect`` merges whatever has run). Writes ``--output``
(``benchmarks/results/cross_arch_fashion_mnist.json``, schema: :func:`validate_result`) and a markdown table
beside it. The full table is many CPU hours (6 rows + the random subset, 6 evaluators x 3 seeds x 300
epochs each): run it on a GPU.

    python benchmarks/cross_arch_fashion_mnist.py --smoke   # well under a minute (tests/test_cross_arch.py)

``--smoke``: one teacher folder (ConvNet-32, one epoch on 200 scikit-learn digits, 16 px, trained by the
pipeline's squeeze stage), IPC 2, the rows ``gvbsm_authors`` and ``rded`` and the random subset at 2
synthesis iterations, the evaluators ``convnet128_in`` and ``vit_tiny_p4``, one student epoch and seed
(``SMOKE``); everything in a temporary folder that is deleted, the JSON validated in memory and written
only to ``--output`` when given (never under ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import torch
from torch import nn

# the measures live in the library (docs/method.md "Image diagnostics"); the rest of gvbsm_hf is imported inside
# the functions that need it (as in the other benchmarks): --help and the unit tests of the diversity measure
# (tests/test_cross_arch.py) load this file without the pipeline
from gvbsm_hf.image_diagnostics import (diagnose, mean_pairwise_distance, teacher_feature_space,  # noqa: F401
                                        within_class_diversity)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "fashion_mnist" / "gvbsm_ipc10.yaml"
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_OUTPUT = RESULTS / "cross_arch_fashion_mnist.json"

EVALUATORS = ["convnet128_in", "convnet128_nn", "resnet18_cifar", "mobilenetv2_100", "shufflenetv2_100", "vit_tiny_p4"]
HARD_EVALUATOR = "convnet128_in"
RANDOM = "random_real"

# the authors' student protocol for every row and evaluator (as benchmarks/margin_fashion_mnist.py's AUTHORS)
STUDENT = ["--cutmix_prob", "1.0", "--cutmix_ce_label", "original"]
RDED_CROPS = {"syn_rded_factor": 1, "syn_rded_crop_scale": [0.5, 1.0]}  # margin_fashion_mnist.py's RDED_CROPS
TV_WEIGHT = 0.1  # syn_tv_weight of the gvbsm_real_init_tv row
INSTANCE_WEIGHT = 0.05  # syn_r_instance of the gvbsm_real_init_instance row (5 x syn_r_bn)
# the _strong row: weights large enough to move the terms (at 0.05 the instance term stayed at 1.7-1.8)
TV_WEIGHT_STRONG, INSTANCE_WEIGHT_STRONG = 0.3, 1.0
# k-center coverage of the teachers' penultimate features over 1000 whole real images per class (margin_fashion_mnist.py's
# KCENTER + FULL_IMAGES: the best selection rule of the margin benchmark)
KCENTER_FULL = {"syn_rded_factor": 1, "syn_rded_crop_scale": [1.0, 1.0], "syn_rded_selection": "kcenter",
                "syn_rded_candidates": 1000}
FR_FLAGS = ["--syn_protocol", "authors", "--syn_augment", "per_image_rrc", "--stats_augment", "authors",
            "--syn_crop_scale", "0.5", "1.0", "--syn_lr", "0.01"]

# name: (syn_method, recipe flags, that method's own options -> --method_args '{"<method>": {...}}')
RECIPES: dict[str, tuple[str, list[str], dict[str, Any]]] = {
    "sre2l": ("sre2l", ["--syn_protocol", "authors"], {}),
    "gvbsm_authors": ("gvbsm", ["--syn_protocol", "authors"], {"syn_backbone_choice": "round_robin"}),
    "gvbsm_hf_v0": ("gvbsm", ["--syn_protocol", "gvbsm_hf_v0"], {"syn_backbone_choice": "uniform"}),
    "rded": ("rded", ["--syn_protocol", "authors"], dict(RDED_CROPS)),
    "edc_style": ("gvbsm", ["--syn_protocol", "authors", "--stats_per_class", "true"],
                  {"syn_init": "rded", **RDED_CROPS, "syn_class_weight": 0.5}),
    "feature_regression": ("feature_regression", FR_FLAGS, {"syn_init": "real"}),
    # selection by coverage, and feature regression started from it (the margin benchmark's best rows)
    "rded_kcenter": ("rded", ["--syn_protocol", "authors"], dict(KCENTER_FULL)),
    "feature_regression_kcenter_init": ("feature_regression", FR_FLAGS, {"syn_init": "rded", **KCENTER_FULL}),
    # remedies (issue 35 item 3): G-VBSM (authors' protocol) from random real images, and with the
    # total-variation prior (docs/method.md Eq. 18) on top
    "gvbsm_real_init": ("gvbsm", ["--syn_protocol", "authors"], {"syn_backbone_choice": "round_robin", "syn_init": "real"}),
    "gvbsm_real_init_tv": ("gvbsm", ["--syn_protocol", "authors"],
                           {"syn_backbone_choice": "round_robin", "syn_init": "real", "syn_tv_weight": TV_WEIGHT}),
    "gvbsm_real_init_instance": ("gvbsm", ["--syn_protocol", "authors", "--stats_instance", "true"],
                                 {"syn_backbone_choice": "round_robin", "syn_init": "real",
                                  "syn_r_instance": INSTANCE_WEIGHT}),
    "gvbsm_real_init_tv_instance": ("gvbsm", ["--syn_protocol", "authors", "--stats_instance", "true"],
                                    {"syn_backbone_choice": "round_robin", "syn_init": "real", "syn_tv_weight": TV_WEIGHT,
                                     "syn_r_instance": INSTANCE_WEIGHT}),
    "gvbsm_real_init_tv_instance_strong": ("gvbsm", ["--syn_protocol", "authors", "--stats_instance", "true"],
                                           {"syn_backbone_choice": "round_robin", "syn_init": "real",
                                            "syn_tv_weight": TV_WEIGHT_STRONG, "syn_r_instance": INSTANCE_WEIGHT_STRONG}),
    # each component's share in gvbsm_authors: one change each (docs/method.md Eqs. 6, 10, 5; the first-layer weight)
    **{f"gvbsm_authors_{suffix}": ("gvbsm", ["--syn_protocol", "authors"], {"syn_backbone_choice": "round_robin", **change})
       for suffix, change in {"no_bn": {"syn_r_bn": 0.0}, "no_conv": {"syn_r_conv": 0.0}, "no_dd": {"syn_dd": False},
                              "first_layer_1": {"syn_first_layer_multiplier": 1.0},
                              "convnet_teachers": {}}.items()},  # the teacher family: SYN_TEACHER_FILTER
    # the relabel ensemble's size and logit normalisation, on the random subset's images (RELABEL_ENSEMBLE)
    "random_real_relabel_1": (RANDOM, [], {}),
    "random_real_relabel_2": (RANDOM, [], {}),
    "random_real_relabel_3": (RANDOM, [], {}),
    "random_real_logit_norm": (RANDOM, ["--relabel_logit_norm", "true"], {}),
    # another random subset (syn_seed 1): the baseline's own draw-to-draw spread, the scale of every margin
    "random_real_draw1": (RANDOM, ["--syn_seed", "1"], {}),
    RANDOM: (RANDOM, [], {}),  # the baseline (``random_real`` of the results), not a row
}

# rows that synthesise from a subset of the teachers (``--syn_teachers``; relabelling keeps all): row -> keep(teacher)
SYN_TEACHER_FILTER: dict[str, Callable[[str], bool]] = {
    "gvbsm_authors_convnet_teachers": lambda teacher: Path(teacher).name.startswith("convnet"),
}


# rows relabelled by the first k teachers as given (``--relabel_teachers``; synthesis unchanged): row -> k
RELABEL_ENSEMBLE: dict[str, int] = {"random_real_relabel_1": 1, "random_real_relabel_2": 2, "random_real_relabel_3": 3}


def relabel_teachers(name: str, teachers: Sequence[str]) -> list[str]:
    """The ``--relabel_teachers`` of row ``name`` (empty: the whole ensemble); refuses a set too small for the row."""
    if name not in RELABEL_ENSEMBLE:
        return []
    k = RELABEL_ENSEMBLE[name]
    if k >= len(teachers):
        raise SystemExit(f"row {name} relabels with the first {k} teachers, so it needs more than {k} (got "
                         f"{len(teachers)}: it would be random_real under another name); pass the margin benchmark's four.")
    return list(teachers[:k])


def syn_teachers(name: str, teachers: Sequence[str]) -> list[str]:
    """The ``--syn_teachers`` of row ``name`` (empty: every teacher synthesises); refuses a filter that keeps
    no teacher or every teacher (the row would not be what its name says)."""
    if name not in SYN_TEACHER_FILTER:
        return []
    kept = [t for t in teachers if SYN_TEACHER_FILTER[name](t)]
    if not kept or len(kept) == len(teachers):
        raise SystemExit(f"row {name} synthesises from a subset of the teachers, but {teachers} gives "
                         f"{len(kept)} of {len(teachers)}: pass teachers of more than one family (the ConvNets and "
                         "another), e.g. the margin benchmark's four.")
    return kept


# --smoke (module docstring); explicit flags still win
SMOKE = {"ipc": 2, "recipes": ["gvbsm_authors", "rded"], "evaluators": ["convnet128_in", "vit_tiny_p4"],
         "syn_iterations": 2, "epochs": 1, "seeds": [0], "hard_label_seeds": [0], "stats_max_samples": 64,
         "real_per_class": 20,
         "extra": [("--dataset_name digits --max_train_samples 200 --max_eval_samples 100 --student convnet32 "
                    "--per_device_train_batch_size 20 --accept_unhealthy_synthesis true")]}

STATS_KEYS = {"mean": float, "std": float, "per_seed": list}
ROW_KEYS = {"recipe": str, "per_evaluator": dict, "mean_over_evaluators": float, "min_margin_vs_random": float,
            "hard_label_in": float, "within_class_diversity": float}
EXTRA_ROW_KEYS = {"diagnostics"}  # beside the schema: {measure: float} (gvbsm_hf.image_diagnostics.diagnose)
TOP_KEYS = {"command": str, "teachers": list, "ipc": int, "labels": str, "evaluators": list, "random_real": dict,
            "rows": list, "best": dict}
BEST_KEYS = {"recipe": str, "mean_over_evaluators": float, "min_margin_vs_random": float}


# ------------------------------------------------------------------------------------- diversity


def set_diversity(folder: Path, method: str, teachers: Sequence[nn.Module], real: tuple[torch.Tensor, torch.Tensor]) -> float:
    """:func:`within_class_diversity` of the shipped images of ``method`` in the pipeline folder ``folder``."""
    from gvbsm_hf.data import DatasetSpec
    from gvbsm_hf.stage import method_folder
    from gvbsm_hf.synthetic_set import SyntheticSet

    spec = DatasetSpec.from_dict(json.loads((folder / "data_spec.json").read_text()))
    syn = SyntheticSet.load(folder / "recover" / method_folder(method))
    syn_f, real_f = teacher_feature_space(teachers, syn.shipped_images(spec), spec.normalize(real[0]))
    return within_class_diversity(syn_f, syn.labels, real_f, real[1])


def set_diagnostics(folder: Path, method: str, teachers: Sequence[nn.Module],
                    real: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """:func:`gvbsm_hf.image_diagnostics.diagnose` of the shipped images of ``method`` in the pipeline folder
    ``folder`` against the real reference ``real`` (the row's extra key ``diagnostics``)."""
    from gvbsm_hf.data import DatasetSpec
    from gvbsm_hf.stage import method_folder
    from gvbsm_hf.synthetic_set import SyntheticSet

    spec = DatasetSpec.from_dict(json.loads((folder / "data_spec.json").read_text()))
    syn = SyntheticSet.load(folder / "recover" / method_folder(method))
    return diagnose(syn.uint8_images(spec), syn.labels, real[0], real[1], teachers, spec)


def real_reference(argv: list[str], per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` seeded real train images per class (uint8) and labels: the diversity reference, loaded
    as the pipeline loads the recipe ``argv``'s data."""
    from gvbsm_hf.data import class_balanced_indices, get_dataset_spec, load_image_dataset, to_uint8_tensors
    from gvbsm_hf.recipe import parse_recipe

    r = parse_recipe(argv)
    d = r.data
    dataset = load_image_dataset(
        d.dataset_name, config_name=d.dataset_config_name, image_column=d.image_column, label_column=d.label_column,
        train_split=d.train_split, validation_split=d.validation_split, max_train_samples=d.max_train_samples,
        max_eval_samples=d.max_eval_samples, seed=r.training.seed, image_size=d.image_size, channels=d.channels)
    spec = get_dataset_spec(dataset, d.dataset_name, image_size=d.image_size, channels=d.channels)
    train = dataset["train"]
    return to_uint8_tensors(train.select(class_balanced_indices(train["label"], n_per_class=per_class, seed=0)), spec)


# ------------------------------------------------------------------------------------------ runs


def run_argv(args: argparse.Namespace, name: str, work: Path) -> list[str]:
    """The pipeline's command line of row ``name`` (all evaluators, soft labels)."""
    method, flags, options = RECIPES[name]
    argv = ["--config", str(RECIPE), "--teachers", *args.teachers, "--ipc", str(args.ipc),
            "--syn_iterations", str(args.syn_iterations), "--syn_checkpoint_every", str(max(1, args.syn_iterations // 5)),
            "--num_train_epochs", str(args.epochs), "--eval_seeds", *map(str, args.seeds),
            "--eval_students", *args.evaluators, "--evaluate_hard_labels", "false", "--relabel_export_views", "false",
            "--stats_max_samples", str(args.stats_max_samples),
            "--stages", "squeeze", "record", "recover", "relabel", "evaluate", *STUDENT,
            "--syn_method", method, *flags, "--baselines", method, "--output_dir", str(work / name), *_extra(args)]
    subset, ensemble = syn_teachers(name, args.teachers), relabel_teachers(name, args.teachers)
    argv += ["--syn_teachers", *subset] if subset else []
    argv += ["--relabel_teachers", *ensemble] if ensemble else []
    return argv + (["--method_args", json.dumps({method: options})] if options else [])


def hard_argv(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """``argv`` re-run for the hard-label row on :data:`HARD_EVALUATOR` only: the evaluate stage alone, on
    the images the first run made (its finished soft runs are reused)."""
    stages = argv.index("--stages")
    argv = argv[:stages] + ["--stages", "evaluate"] + argv[stages + 6:]
    return argv + ["--eval_students", HARD_EVALUATOR, "--evaluate_hard_labels", "true",
                   "--hard_label_seeds", *map(str, args.hard_label_seeds)]


def _run(args: argparse.Namespace, work: Path, name: str, teachers: list, real,
         teacher_info: list[dict[str, Any]]) -> None:
    from gvbsm_hf.pipeline import parse_recipe, run_pipeline

    saved = work / "rows" / f"{name}.json"
    if saved.exists():
        row = json.loads(saved.read_text())
        if set(args.evaluators) <= set(row["per_evaluator"]) and (name == RANDOM or row.get("hard_label_in") is not None):
            return
    method = RECIPES[name][0]
    argv = run_argv(args, name, work)
    t0 = time.perf_counter()
    summary = run_pipeline(parse_recipe(argv))
    soft = {r["evaluator"]: r["per_seed"] for r in summary["results"] if r["method"] == method and r["labels"] == "soft"}
    missing = sorted(set(args.evaluators) - set(soft))
    if missing:
        raise RuntimeError(f"{name}: the pipeline returned no soft-label row for {missing}")
    row: dict[str, Any] = {"recipe": name, "method": method, "per_evaluator": {e: soft[e] for e in args.evaluators},
                           "hard_label_in": None, "within_class_diversity": None}
    row["within_class_diversity"] = set_diversity(work / name, method, teachers, real)
    row["diagnostics"] = set_diagnostics(work / name, method, teachers, real)
    if name != RANDOM:
        hard_summary = run_pipeline(parse_recipe(hard_argv(args, argv)))
        hard = [r for r in hard_summary["results"]
                if r["method"] == method and r["labels"] == "hard" and r["evaluator"] == HARD_EVALUATOR]
        if not hard:
            raise RuntimeError(f"{name}: the pipeline returned no hard-label row for {HARD_EVALUATOR}")
        row["hard_label_in"] = mean(hard[0]["per_seed"])
    row.update(invocation=_invocation(), argv=argv, wall_time_s=round(time.perf_counter() - t0, 1),
               teachers=teacher_info)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(row, indent=2) + "\n")
    print(f"{name}: " + ", ".join(f"{e} {mean(v):.2f}" for e, v in row["per_evaluator"].items())
          + f"; diversity {row['within_class_diversity']:.3f}"
          + ("" if row["hard_label_in"] is None else f"; hard labels ({HARD_EVALUATOR}) {row['hard_label_in']:.2f}"),
          flush=True)


def _restore_rows(results: Path, work: Path) -> None:
    """Write the rows (and the random subset) of a results file of this benchmark back as saved-row files,
    where missing: a fresh clone then extends the committed table instead of replacing it."""
    data = json.loads(results.read_text())
    out = work / "rows"
    out.mkdir(parents=True, exist_ok=True)
    restored = [{"recipe": RANDOM, "method": RANDOM, "hard_label_in": None, "within_class_diversity": None,
                 "per_evaluator": {e: s["per_seed"] for e, s in data["random_real"].items()}}]
    restored += [{"recipe": r["recipe"], "method": RECIPES[r["recipe"]][0], "hard_label_in": r["hard_label_in"],
                  "within_class_diversity": r["within_class_diversity"], **_diagnostics_of(r),
                  "per_evaluator": {e: s["per_seed"] for e, s in r["per_evaluator"].items()}} for r in data["rows"]]
    for row in restored:
        path = out / f"{row['recipe']}.json"
        if not path.exists():
            path.write_text(json.dumps({**row, "invocation": data["command"], "restored_from": str(results),
                                        "teachers": data["teachers"]}, indent=2)
                            + "\n")


# ---------------------------------------------------------------------------------------- collect


def _diagnostics_of(row: dict) -> dict[str, Any]:
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
                     "within_class_diversity": round(float(s["within_class_diversity"]), 4), **_diagnostics_of(s)})
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


def teacher_set(folders: Sequence[str]) -> list[dict[str, Any]]:
    """``[{"name", "top1"}]`` of the teacher folders (their squeeze-stage accuracy, in %)."""
    from gvbsm_hf.teacher import load_teacher

    teachers = []
    for folder in folders:
        acc = load_teacher(folder).config.get("accuracy")
        if acc is None:
            raise RuntimeError(f"teacher folder {folder} records no accuracy (config.json 'accuracy'): train it with "
                               "the squeeze stage (teacher_epochs >= 1) so that its top-1 can be reported")
        teachers.append({"name": Path(folder).name, "top1": round(100.0 * float(acc), 2)})
    return teachers


def saved_rows(work: Path) -> dict[str, dict]:
    """``{recipe: row}`` of the rows saved under ``work/rows/``."""
    rows = [json.loads(f.read_text()) for f in sorted((work / "rows").glob("*.json"))]
    return {row["recipe"]: row for row in rows}


def check_same_teachers(saved: dict[str, dict], teachers: list[dict[str, Any]], work: Path) -> None:
    """Every saved row was made with ``teachers`` (rows record their teacher set; a re-made set differs across
    CPUs, docs/results.md): a table compares its rows with ONE random subset under the same teachers."""
    other = sorted(name for name, row in saved.items() if row.get("teachers") not in (None, teachers))
    if other:
        raise RuntimeError(f"rows {other} in {work / 'rows'} were made with another teacher set "
                           f"({saved[other[0]]['teachers']}) than --teachers ({teachers}): give this teacher set its own "
                           "--work-dir and --output, so that every row is compared with a random subset under the same "
                           "teachers.")


def collect(args: argparse.Namespace, work: Path) -> dict:
    from gvbsm_hf.recipe import parse_recipe

    teachers = teacher_set(args.teachers)
    saved = saved_rows(work)
    check_same_teachers(saved, teachers, work)
    invocations = []  # the commands that ran the rows (one per process), then this one
    for s in saved.values():
        if s.get("invocation") and s["invocation"] not in invocations:
            invocations.append(s["invocation"])
    r = parse_recipe(run_argv(args, RANDOM, work))
    labels = f"soft ({r.relabel.relabel_mode}, {r.training.loss_type})"
    if _invocation() not in invocations:
        invocations.append(_invocation())
    result = build_result(" && ".join(invocations), teachers, args.ipc, labels, args.evaluators, saved)
    validate_result(result)
    return result


# ------------------------------------------------------------------------------------------- main


def _invocation() -> str:
    return "python benchmarks/cross_arch_fashion_mnist.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _extra(args: argparse.Namespace) -> list[str]:
    return [tok for item in args.extra for tok in shlex.split(item)]


def benchmark(args: argparse.Namespace) -> dict:
    from gvbsm_hf.teacher import load_teacher

    work = Path(args.work_dir)
    if args.resume_from:
        _restore_rows(Path(args.resume_from), work)
    if not args.collect:
        teacher_info = teacher_set(args.teachers)
        check_same_teachers(saved_rows(work), teacher_info, work)  # before any compute
        for name in args.recipes:  # every row's command line, so a row the teachers cannot make stops here
            run_argv(args, name, work)
        teachers = [load_teacher(f).eval() for f in args.teachers]
        real = real_reference(run_argv(args, RANDOM, work), args.real_per_class)
        for name in [RANDOM, *args.recipes]:
            _run(args, work, name, teachers, real, teacher_info)
    return collect(args, work)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", nargs="+", default=None, help="Teacher folders (the fixed teacher set); required.")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--recipes", nargs="+", default=[n for n in RECIPES if n != RANDOM],
                   choices=[n for n in RECIPES if n != RANDOM], help="Rows to run (the random subset always runs).")
    p.add_argument("--evaluators", nargs="+", default=EVALUATORS, help="Evaluator backbones (the columns).")
    p.add_argument("--syn-iterations", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=300, help="Student epochs (last epoch reported).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--hard-label-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help=f"Seeds of each row's hard-label run on {HARD_EVALUATOR} (hard_label_in).")
    p.add_argument("--stats-max-samples", type=int, default=10000)
    p.add_argument("--real-per-class", type=int, default=500,
                   help="Real train images per class of the diversity reference.")
    p.add_argument("--work-dir", default="runs/cross_arch_fashion_mnist")
    p.add_argument("--collect", action="store_true", help="Only merge the saved rows into --output.")
    p.add_argument("--resume-from", default=None,
                   help="A results file of this benchmark (e.g. the committed one): its rows are written back to "
                        "--work-dir/rows/ where missing, so a fresh clone extends the table instead of replacing it.")
    p.add_argument("--output", "--out", dest="output", default=None,
                   help=f"Results JSON (default {DEFAULT_OUTPUT.relative_to(REPO)}; --smoke: none unless given).")
    p.add_argument("--extra", nargs="*", default=[], help="More recipe overrides for every run, quoted.")
    p.add_argument("--smoke", action="store_true", help="seconds-long check of the code path (module docstring; "
                   f"{SMOKE}, unless given); nothing kept under benchmarks/results/")
    args = p.parse_args()
    if not args.smoke:
        if not args.teachers:
            p.error("--teachers is required")
        result = benchmark(args)
        out = Path(args.output or DEFAULT_OUTPUT)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return
    if args.output and Path(args.output).resolve().is_relative_to(RESULTS.resolve()):
        p.error(f"--smoke writes nothing under {RESULTS}: give another --output")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cross-arch-smoke-") as tmp:
        p.set_defaults(**SMOKE, work_dir=str(Path(tmp) / "runs"))
        args = p.parse_args()
        from margin_fashion_mnist import smoke_teachers  # the sibling script's teacher set (one for all smokes)

        args.teachers = args.teachers or smoke_teachers(Path(tmp), _extra(args))
        result = benchmark(args)  # validated (validate_result) before it is returned
    print(markdown(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"smoke OK in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
