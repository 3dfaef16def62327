"""Margin benchmark (issue 15): which distilled set beats a random real subset of the same size, under
the same protocol, on Fashion-MNIST IPC 1 / 10 / 50, one fixed teacher set, 3 student seeds, last epoch.

Every row goes through the library's pipeline (``recipes/fashion_mnist/gvbsm_ipc10.yaml`` with
``--ipc`` and the overrides below on top of the authors' protocol), one output folder per synthetic
set under ``--work-dir/ipc{N}/``; each run's rows are saved to ``--work-dir/rows/`` as soon as it ends,
so a killed benchmark resumes where it stopped, and ``--collect`` merges whatever has run.

Runs (``RUNS``): a synthetic set (``folder``), the recipe overrides that make it, the student
protocol (``authors``: the paper recipe's, i.e. crops 0.08-1, CutMix on every batch, gamma 0.1, cosine;
``edc``: the student options of docs/method.md "Beyond G-VBSM": EMA 0.99 evaluated, smoothing
schedule zeta 2, crops 0.5-1, gamma 0.025: EDC's train.sh values), and whether the random real subset is evaluated beside it
(``--baselines random_real``: same teachers, soft labels, student, epochs and seeds). Every run also
trains on hard labels (``evaluate_hard_labels``), which gives each row's ``hard_label_mean``.

The IPC's ``best`` is its most accurate row and ``random_real`` the random subset under that row's
student protocol (student options and epochs), so ``margin = best.mean - random_real.mean`` compares
like with like; every row also carries its own ``random_margin`` against the random subset of its own
protocol, and ``largest_margin`` names the row furthest above its own random subset. The runs
``random_real_draw{1,2}[_epochs_1000]`` draw the random subset again (``syn_seed`` 1, 2): they are not
baselines but the draw-to-draw spread, ``random_draws_by_student`` (each draw's mean over the student
seeds, with draw 0, the baseline, first). The runs ``full_train_set[_edc]_steps_2000`` train the
IPC-10 1000-epoch student (its optimiser steps, 2000 batches of 64) on the whole train set instead:
not rows nor baselines but ``full_train_set_references``, what the same training budget reaches when
the images are not the limit (``full_train_set_steps_4000`` with ``random_real_epochs_2000``: the same
at twice the steps, run with ``--seeds 0``).

    python benchmarks/margin_fashion_mnist.py --teachers runs/fm_teachers/convnet128 runs/fm_teachers/convnet32 \\
        runs/fm_teachers/convnet32_d2 runs/fm_teachers/shufflenetv2_050 --ipc 10
    python benchmarks/margin_fashion_mnist.py --teachers ... --ipc 1 50   # another process, another folder
    python benchmarks/margin_fashion_mnist.py --teachers ... --collect
    python benchmarks/margin_fashion_mnist.py --teachers ... --ipc 10 --runs <new row> \
        --resume-from benchmarks/results/margin_fashion_mnist.json   # a fresh clone: keep the committed rows

(teachers: see benchmarks/fidelity_fashion_mnist.py). Writes ``--out``
(``benchmarks/results/margin_fashion_mnist.json``) and a markdown table beside it.

    python benchmarks/margin_fashion_mnist.py --smoke   # seconds (tests/test_benchmarks.py); nothing kept

``--smoke``: one teacher folder (ConvNet-32, one epoch on 200 scikit-learn digits, trained by the
pipeline's squeeze stage), IPC 1, the runs ``gvbsm_authors`` (with its random subset) and
``rded_selection`` at 2 synthesis iterations, one student epoch and seed (``SMOKE``), then the
collection; everything in a temporary folder that is deleted.

A run's overrides are written as flags; the options of its method (``syn_init``, ``syn_rded_*``,
``syn_class_weight``, ...) go to the pipeline as one ``--method_args '{"<method>": {...}}'``
(``_group_method_options``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev

RECIPE = Path(__file__).parents[1] / "recipes" / "fashion_mnist" / "gvbsm_ipc10.yaml"

AUTHORS = ["--syn_protocol", "authors", "--syn_backbone_choice", "round_robin", "--cutmix_prob", "1.0",
           "--cutmix_ce_label", "original"]
STUDENT = {
    "authors": [],
    "edc": ["--student_ema_decay", "0.99", "--student_lr_smoothing", "2", "--student_crop_scale", "0.5", "1.0",
            "--gamma", "0.025"],
}
PER_IMAGE_RRC = ["--syn_augment", "per_image_rrc", "--stats_augment", "authors"]
RDED_CROPS = ["--syn_rded_factor", "1", "--syn_rded_crop_scale", "0.5", "1.0"]
RDED_INIT = ["--syn_init", "rded", *RDED_CROPS]
FULL_IMAGES = ["--syn_rded_crop_scale", "1.0", "1.0"]  # candidates are whole images (a tile: one image, resized)
EPOCHS_1000 = ["--num_train_epochs", "1000", "--evaluate_hard_labels", "false"]  # no hard-label row at this length
CLUSTER_CENTROID = ["--syn_rded_selection", "cluster_centroid", "--syn_rded_candidates", "1000"]
CLUSTER_LOWEST_CE = ["--syn_rded_selection", "cluster_lowest_ce", "--syn_rded_candidates", "1000"]
KCENTER = ["--syn_rded_selection", "kcenter", "--syn_rded_candidates", "1000"]
FACILITY_LOCATION = ["--syn_rded_selection", "facility_location", "--syn_rded_candidates", "1000"]
EPOCHS_300 = ["--num_train_epochs", "300", "--evaluate_hard_labels", "false"]  # IPC 50 converged (base: 50 epochs)
CLASS_AWARE = ["--stats_per_class", "true", "--syn_class_weight", "0.5"]
FEATURE_REGRESSION = ["--syn_init", "real", "--syn_augment", "per_image_rrc", "--stats_augment", "authors", "--syn_crop_scale", "0.5", "1.0",
                      "--syn_lr", "0.01"]  # Eq. 12 from random real images (the recipe says noise)
FR_KCENTER_INIT = ["--syn_init", "rded", "--syn_rded_factor", "1", *FULL_IMAGES, *KCENTER]


@dataclass(frozen=True)
class Run:
    """One pipeline call: the synthetic set in ``folder``, evaluated under ``student``."""

    name: str
    folder: str
    components: list[str]
    overrides: list[str] = field(default_factory=list)
    method: str = "gvbsm"
    student: str = "authors"
    with_random: bool = False
    draw: int = 0  # > 0: another random subset (syn_seed = draw), reported as the draw-to-draw spread, not a baseline
    reference: bool = False  # the whole train set, same student and optimiser steps: a reference, not a row or baseline


RUNS = {r.name: r for r in [
    Run("gvbsm_authors", "authors", [], with_random=True),
    Run("per_image_rrc", "per_image_rrc", ["per_image_rrc"], PER_IMAGE_RRC),
    Run("iterations_500", "it500", ["iterations=500"], ["--syn_iterations", "500"]),
    Run("iterations_2000", "it2000", ["iterations=2000"], ["--syn_iterations", "2000"]),
    Run("iterations_4000", "it4000", ["iterations=4000"], ["--syn_iterations", "4000"]),
    Run("per_image_rrc_iterations_2000", "rrc_it2000", ["per_image_rrc", "iterations=2000"],
        PER_IMAGE_RRC + ["--syn_iterations", "2000"]),
    Run("per_image_rrc_epochs_1000", "per_image_rrc", ["per_image_rrc", "student_epochs=1000"],
        PER_IMAGE_RRC + EPOCHS_1000),
    Run("random_real_epochs_1000", "random_ep1000", ["student_epochs=1000"], EPOCHS_1000, method="random_real"),
    Run("random_real_edc_epochs_1000", "random_edc_ep1000", ["edc_student", "student_epochs=1000"], EPOCHS_1000,
        method="random_real", student="edc"),
    Run("rded_selection", "rded_f1", ["rded_selection"], RDED_CROPS, method="rded"),
    Run("rded_selection_stitched", "rded_f2", ["rded_selection", "stitch_2x2"], [], method="rded"),
    Run("rded_stitched_full_images", "rded_f2_full", ["rded_selection", "stitch_2x2", "full_images"], FULL_IMAGES,
        method="rded"),
    Run("rded_stitched_full_images_epochs_1000", "rded_f2_full", ["rded_selection", "stitch_2x2", "full_images",
                                                                  "student_epochs=1000"],
        FULL_IMAGES + EPOCHS_1000, method="rded"),
    Run("stitched_random_full_images", "f2_random_full", ["stitch_2x2", "full_images", "no_selection"],
        FULL_IMAGES + ["--syn_rded_candidates", "40"], method="rded"),  # IPC 10: 40 candidates = 4 x ipc, all kept
    Run("rded_stitched_crops", "rded_f2_crops", ["rded_selection", "stitch_2x2", "crops_0.5-1"],
        ["--syn_rded_crop_scale", "0.5", "1.0"], method="rded"),
    Run("rded_init", "rded_init", ["rded_init"], RDED_INIT),
    Run("rded_cluster_centroid", "rded_cl_cen", ["rded_selection", "cluster_centroid"], RDED_CROPS + CLUSTER_CENTROID,
        method="rded"),
    Run("rded_selection_full_images", "rded_full", ["rded_selection", "full_images"],
        ["--syn_rded_factor", "1", *FULL_IMAGES], method="rded"),
    Run("rded_kcenter_full_images", "rded_kc_full", ["rded_selection", "kcenter", "full_images"],
        ["--syn_rded_factor", "1", *FULL_IMAGES, *KCENTER], method="rded"),
    Run("rded_kcenter_full_images_epochs_1000", "rded_kc_full", ["rded_selection", "kcenter", "full_images",
                                                                 "student_epochs=1000"],
        ["--syn_rded_factor", "1", *FULL_IMAGES, *KCENTER, *EPOCHS_1000], method="rded"),
    Run("rded_kcenter_full_images_epochs_300", "rded_kc_full", ["rded_selection", "kcenter", "full_images",
                                                                "student_epochs=300"],
        ["--syn_rded_factor", "1", *FULL_IMAGES, *KCENTER, *EPOCHS_300], method="rded"),
    Run("rded_facility_location_full_images", "rded_fl_full", ["rded_selection", "facility_location", "full_images"],
        ["--syn_rded_factor", "1", *FULL_IMAGES, *FACILITY_LOCATION], method="rded"),
    Run("rded_facility_location_full_images_epochs_1000", "rded_fl_full",
        ["rded_selection", "facility_location", "full_images", "student_epochs=1000"],
        ["--syn_rded_factor", "1", *FULL_IMAGES, *FACILITY_LOCATION, *EPOCHS_1000], method="rded"),
    Run("rded_facility_location_full_images_epochs_300", "rded_fl_full",
        ["rded_selection", "facility_location", "full_images", "student_epochs=300"],
        ["--syn_rded_factor", "1", *FULL_IMAGES, *FACILITY_LOCATION, *EPOCHS_300], method="rded"),
    Run("rded_facility_location_all_images", "rded_fl_all", ["rded_selection", "facility_location", "full_images",
                                                              "all_class_images"],
        ["--syn_rded_factor", "1", *FULL_IMAGES, "--syn_rded_selection", "facility_location",
         "--syn_rded_candidates", "6000"], method="rded"),  # Fashion-MNIST: 6000 train images per class
    Run("rded_kcenter_all_images", "rded_kc_all", ["rded_selection", "kcenter", "full_images", "all_class_images"],
        ["--syn_rded_factor", "1", *FULL_IMAGES, "--syn_rded_selection", "kcenter", "--syn_rded_candidates", "6000"],
        method="rded"),
    Run("rded_kcenter_all_images_epochs_1000", "rded_kc_all", ["rded_selection", "kcenter", "full_images",
                                                               "all_class_images", "student_epochs=1000"],
        ["--syn_rded_factor", "1", *FULL_IMAGES, "--syn_rded_selection", "kcenter", "--syn_rded_candidates", "6000",
         *EPOCHS_1000], method="rded"),
    Run("rded_boundary_full_images", "rded_boundary_full", ["rded_selection", "boundary", "full_images"],
        ["--syn_rded_factor", "1", *FULL_IMAGES, "--syn_rded_selection", "boundary", "--syn_rded_candidates", "1000"],
        method="rded"),
    Run("rded_boundary_full_images_epochs_1000", "rded_boundary_full", ["rded_selection", "boundary", "full_images",
                                                                        "student_epochs=1000"],
        ["--syn_rded_factor", "1", *FULL_IMAGES, "--syn_rded_selection", "boundary", "--syn_rded_candidates", "1000",
         *EPOCHS_1000], method="rded"),
    *[Run(f"random_real_draw{d}{suffix}", f"random_draw{d}{suffix}", [f"random subset draw {d}", *comp],
          ["--syn_seed", str(d), "--evaluate_hard_labels", "false", *extra], method="random_real", draw=d)
      for d in (1, 2) for suffix, comp, extra in [("", [], []), ("_epochs_1000", ["student_epochs=1000"], EPOCHS_1000)]],
    Run("rded_selection_full_images_epochs_300", "rded_full", ["rded_selection", "full_images", "student_epochs=300"],
        ["--syn_rded_factor", "1", *FULL_IMAGES, *EPOCHS_300], method="rded"),
    Run("random_real_epochs_300", "random_ep300", ["student_epochs=300"], EPOCHS_300, method="random_real"),
    Run("random_real_edc_epochs_300", "random_edc_ep300", ["edc_student", "student_epochs=300"], EPOCHS_300,
        method="random_real", student="edc"),
    Run("rded_boundary", "rded_boundary", ["rded_selection", "boundary"], RDED_CROPS + ["--syn_rded_selection", "boundary"],
        method="rded"),
    Run("rded_cluster_lowest_ce", "rded_cl_ce", ["rded_selection", "cluster_lowest_ce"], RDED_CROPS + CLUSTER_LOWEST_CE,
        method="rded"),
    Run("class_aware", "class_aware", ["class_aware_matching"], CLASS_AWARE),
    Run("bf16_autocast", "bf16", ["bf16_autocast_synthesis"], ["--syn_mixed_precision", "bf16"]),
    Run("edc_student", "authors", ["edc_student"], student="edc"),
    Run("per_image_rrc+edc_student", "per_image_rrc", ["per_image_rrc", "edc_student"], PER_IMAGE_RRC, student="edc"),
    Run("rded_selection+edc_student", "rded_f1", ["rded_selection", "edc_student"], RDED_CROPS, method="rded",
        student="edc"),
    Run("combination", "combination", ["per_image_rrc", "rded_init", "class_aware_matching", "edc_student"],
        PER_IMAGE_RRC + RDED_INIT + CLASS_AWARE, student="edc", with_random=True),
    Run("combination_no_class_aware", "combination_nca", ["per_image_rrc", "rded_init", "edc_student"],
        PER_IMAGE_RRC + RDED_INIT, student="edc"),
    Run("combination_no_class_aware_epochs_1000", "combination_nca",
        ["per_image_rrc", "rded_init", "edc_student", "student_epochs=1000"], PER_IMAGE_RRC + RDED_INIT + EPOCHS_1000,
        student="edc"),
    Run("per_image_rrc+rded_init", "combination_nca", ["per_image_rrc", "rded_init"], PER_IMAGE_RRC + RDED_INIT),
    Run("feature_regression", "fr", ["feature_regression"], FEATURE_REGRESSION, method="feature_regression"),
    Run("feature_regression_epochs_1000", "fr", ["feature_regression", "student_epochs=1000"],
        FEATURE_REGRESSION + EPOCHS_1000, method="feature_regression"),
    Run("feature_regression_kcenter_init", "fr_kc", ["feature_regression", "kcenter_init"],
        FEATURE_REGRESSION + FR_KCENTER_INIT, method="feature_regression"),
    Run("feature_regression_kcenter_init_epochs_1000", "fr_kc",
        ["feature_regression", "kcenter_init", "student_epochs=1000"], FEATURE_REGRESSION + FR_KCENTER_INIT + EPOCHS_1000,
        method="feature_regression"),
    Run("feature_regression_init_only", "fr_init", ["feature_regression", "iterations=0"],
        FEATURE_REGRESSION + ["--syn_iterations", "0"], method="feature_regression"),  # control: its start images
    Run("feature_regression_init_only_epochs_1000", "fr_init_ep1000", ["feature_regression", "iterations=0",
                                                                    "student_epochs=1000"],
        FEATURE_REGRESSION + ["--syn_iterations", "0"] + EPOCHS_1000, method="feature_regression"),
    Run("feature_regression_epochs_300", "fr", ["feature_regression", "student_epochs=300"],
        FEATURE_REGRESSION + EPOCHS_300, method="feature_regression"),
    Run("feature_regression_iterations_3000_epochs_1000", "fr_it3000",
        ["feature_regression", "iterations=3000", "student_epochs=1000"],
        FEATURE_REGRESSION + ["--syn_iterations", "3000"] + EPOCHS_1000, method="feature_regression"),
    Run("feature_regression_lr_0.05_epochs_1000", "fr_lr05", ["feature_regression", "syn_lr=0.05", "student_epochs=1000"],
        FEATURE_REGRESSION + ["--syn_lr", "0.05"] + EPOCHS_1000, method="feature_regression"),
    Run("feature_regression_student_crops_epochs_1000", "fr_crop008",
        ["feature_regression", "syn_crop_scale=0.08-1", "student_epochs=1000"],
        FEATURE_REGRESSION + ["--syn_crop_scale", "0.08", "1.0"] + EPOCHS_1000, method="feature_regression"),
    Run("feature_regression_staggered_pool_250_epochs_1000", "fr_stagger250",
        ["feature_regression", "syn_fr_stagger", "syn_fr_online_steps=250", "student_epochs=1000"],
        FEATURE_REGRESSION + ["--syn_fr_stagger", "true", "--syn_fr_online_steps", "250"] + EPOCHS_1000,
        method="feature_regression"),  # older pool networks of staggered ages
    Run("feature_regression_ensemble_targets_epochs_1000", "fr_ensemble",
        ["feature_regression", "syn_fr_targets=ensemble", "student_epochs=1000"],
        FEATURE_REGRESSION + ["--syn_fr_targets", "ensemble"] + EPOCHS_1000, method="feature_regression"),
    Run("feature_regression_syn_seed_1_epochs_1000", "fr_seed1", ["feature_regression", "syn_seed=1", "student_epochs=1000"],
        FEATURE_REGRESSION + ["--syn_seed", "1"] + EPOCHS_1000, method="feature_regression"),  # other start images
    Run("feature_regression_edc_student_epochs_1000", "fr", ["feature_regression", "edc_student", "student_epochs=1000"],
        FEATURE_REGRESSION + EPOCHS_1000, method="feature_regression", student="edc"),  # its crops (0.5-1) are FR's
    Run("feature_regression_one_job_epochs_300", "fr_one_job",
        ["feature_regression", "one_job (syn_slots_per_batch=ipc)", "student_epochs=300"],
        FEATURE_REGRESSION + ["--syn_slots_per_batch", "50"] + EPOCHS_300,
        method="feature_regression"),  # IPC 50: all 500 images regressed together, not in five 100-image jobs
    # the student of the IPC-10 1000-epoch rows (2000 steps of 64 views) fed the whole train set instead of 100
    # images: what the same training budget reaches when images are not the limit
    Run("full_train_set_steps_2000", "full_train", ["whole train set (6000 per class)", "max_steps=2000"],
        ["--ipc", "6000", "--max_steps", "2000"] + EPOCHS_1000, method="random_real", reference=True),
    Run("full_train_set_edc_steps_2000", "full_train_edc", ["whole train set (6000 per class)", "edc_student",
                                                            "max_steps=2000"],
        ["--ipc", "6000", "--max_steps", "2000"] + EPOCHS_1000, method="random_real", student="edc", reference=True),
    # a point of the budget curve (run with --seeds 0): twice the steps, whole train set against 100 images
    Run("full_train_set_steps_4000", "full_train_4000", ["whole train set (6000 per class)", "max_steps=4000"],
        ["--ipc", "6000", "--max_steps", "4000", "--num_train_epochs", "2000", "--evaluate_hard_labels", "false"],
        method="random_real", reference=True),
    Run("random_real_epochs_2000", "random_ep2000", ["student_epochs=2000"],
        ["--num_train_epochs", "2000", "--evaluate_hard_labels", "false"], method="random_real"),
    Run("per_image_rrc+cluster_init", "rrc_clinit", ["per_image_rrc", "rded_init", "cluster_centroid"],
        PER_IMAGE_RRC + RDED_INIT + CLUSTER_CENTROID),
]}
PLAN = {  # the runs of each IPC, in order (IPC 50 costs 5x IPC 10 per row: its essentials only)
    1: ["gvbsm_authors", "per_image_rrc", "rded_selection", "rded_init", "class_aware", "edc_student",
        "rded_selection+edc_student", "combination", "combination_no_class_aware",
        "combination_no_class_aware_epochs_1000", "random_real_edc_epochs_1000", "per_image_rrc_epochs_1000",
        "random_real_epochs_1000", "rded_stitched_full_images", "rded_stitched_full_images_epochs_1000",
        "rded_facility_location_full_images", "rded_facility_location_full_images_epochs_1000",
        "rded_boundary_full_images", "rded_boundary_full_images_epochs_1000", "random_real_draw1", "random_real_draw2",
        "random_real_draw1_epochs_1000", "random_real_draw2_epochs_1000", "feature_regression", "feature_regression_epochs_1000"],
    10: ["gvbsm_authors", "per_image_rrc", "rded_selection", "rded_init", "edc_student", "combination",
         "per_image_rrc+edc_student",
         "bf16_autocast", "iterations_2000", "class_aware", "rded_selection+edc_student",
         "combination_no_class_aware", "iterations_500", "iterations_4000", "per_image_rrc_iterations_2000",
         "rded_selection_stitched", "rded_cluster_centroid", "rded_cluster_lowest_ce", "per_image_rrc+rded_init",
         "per_image_rrc+cluster_init", "rded_boundary", "per_image_rrc_epochs_1000", "random_real_epochs_1000",
         "rded_selection_full_images", "rded_stitched_full_images", "rded_stitched_full_images_epochs_1000",
         "rded_stitched_crops", "stitched_random_full_images", "rded_kcenter_full_images",
         "rded_kcenter_full_images_epochs_1000", "rded_facility_location_full_images",
         "rded_facility_location_full_images_epochs_1000", "rded_facility_location_all_images",
         "rded_kcenter_all_images", "rded_kcenter_all_images_epochs_1000",
         "rded_boundary_full_images", "rded_boundary_full_images_epochs_1000", "random_real_draw1", "random_real_draw2", "feature_regression", "feature_regression_epochs_1000", "feature_regression_init_only",
         "feature_regression_init_only_epochs_1000", "feature_regression_kcenter_init",
         "feature_regression_kcenter_init_epochs_1000", "feature_regression_iterations_3000_epochs_1000",
         "feature_regression_lr_0.05_epochs_1000", "feature_regression_student_crops_epochs_1000",
         "feature_regression_staggered_pool_250_epochs_1000", "feature_regression_ensemble_targets_epochs_1000",
         "feature_regression_syn_seed_1_epochs_1000", "random_real_edc_epochs_1000",
         "feature_regression_edc_student_epochs_1000", "full_train_set_steps_2000",
         "full_train_set_edc_steps_2000", "random_real_draw1_epochs_1000", "random_real_draw2_epochs_1000",
         "full_train_set_steps_4000", "random_real_epochs_2000"],
    50: ["gvbsm_authors", "combination", "rded_selection+edc_student", "per_image_rrc", "rded_selection_full_images",
         "rded_stitched_full_images", "rded_cluster_centroid", "rded_cluster_lowest_ce", "rded_kcenter_full_images",
         "random_real_epochs_300", "rded_selection_full_images_epochs_300", "rded_kcenter_full_images_epochs_300",
         "rded_facility_location_full_images", "rded_facility_location_full_images_epochs_300", "random_real_draw1",
         "random_real_draw2", "feature_regression", "feature_regression_epochs_300",
         "feature_regression_one_job_epochs_300", "random_real_edc_epochs_300"],
}


# --smoke (module docstring); explicit flags still win
SMOKE = dict(ipc=[1], runs=["gvbsm_authors", "rded_selection"], syn_iterations=[2], epochs=[1], seeds=[0],
             stats_max_samples=64,
             extra=["--dataset_name digits --max_train_samples 200 --max_eval_samples 100 --student convnet32 "
                    "--eval_students convnet32 --accept_unhealthy_synthesis true"])


def smoke_teachers(work: Path, extra: list[str]) -> list[str]:
    """``--smoke``'s teacher set: one ConvNet-32 folder, trained for one epoch by the pipeline's squeeze stage."""
    from gvbsm_hf.pipeline import parse_recipe, run_pipeline

    run_pipeline(parse_recipe(["--config", str(RECIPE), *extra, "--teachers", "convnet32", "--teacher_epochs", "1",
                               "--output_dir", str(work / "teachers"), "--stages", "squeeze"]))
    return [str(work / "teachers" / "teachers" / "convnet32")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", nargs="+", default=None, help="Teacher folders (the fixed teacher set); required.")
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50], choices=sorted(PLAN))
    p.add_argument("--runs", nargs="+", default=None, help="Only these runs (names of RUNS), in this order.")
    p.add_argument("--syn-iterations", type=int, nargs="+", default=[1000],
                   help="Synthesis iterations per --ipc value (in the order of --ipc; one value = all), unless "
                        "the run sets its own.")
    p.add_argument("--epochs", type=int, nargs="+", default=[300],
                   help="Student epochs per --ipc value (in the order of --ipc; one value = all).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--random-with", nargs="*", default=[],
                   help="Runs that also evaluate the random subset (beside those that always do), e.g. when the "
                        "run that usually gives the random subset of a student protocol is skipped at this IPC.")
    p.add_argument("--hard-label-seeds", type=int, nargs="+", default=[0],
                   help="Seeds of the hard-label rows (each row's hard_label_mean).")
    p.add_argument("--stats-max-samples", type=int, default=10000)
    p.add_argument("--work-dir", default="runs/margin_fashion_mnist")
    p.add_argument("--collect", action="store_true", help="Only merge the saved rows into --out.")
    p.add_argument("--resume-from", default=None,
                   help="A results file of this benchmark (e.g. the committed one): its rows are written back to "
                        "--work-dir/rows/ where missing, so a fresh clone extends the table instead of replacing it.")
    p.add_argument("--out", default="benchmarks/results/margin_fashion_mnist.json")
    p.add_argument("--extra", nargs="*", default=[], help="More recipe overrides for every run, quoted.")
    p.add_argument("--smoke", action="store_true", help="seconds-long check of the code path (module docstring; "
                   f"{SMOKE}, unless given); nothing kept")
    args = p.parse_args()
    if not args.smoke:
        if not args.teachers:
            p.error("--teachers is required")
        margin(args)
        return
    with tempfile.TemporaryDirectory(prefix="margin-smoke-") as tmp:
        p.set_defaults(**SMOKE, work_dir=str(Path(tmp) / "runs"), out=str(Path(tmp) / "margin.json"))
        args = p.parse_args()
        args.teachers = args.teachers or smoke_teachers(Path(tmp), _extra(args))
        margin(args)


def _extra(args) -> list[str]:
    return [tok for item in args.extra for tok in shlex.split(item)]


def margin(args: argparse.Namespace) -> None:
    work = Path(args.work_dir)
    if args.resume_from:
        _restore_rows(Path(args.resume_from), work)
    if not args.collect:
        epochs, iterations = (v if len(v) == len(args.ipc) else [v[0]] * len(args.ipc)
                              for v in (args.epochs, args.syn_iterations))
        for ipc, n_epochs, n_iterations in zip(args.ipc, epochs, iterations):
            for name in PLAN[ipc] if args.runs is None else [n for n in args.runs if n in PLAN[ipc]]:
                _run(args, work, ipc, n_epochs, n_iterations, RUNS[name])
    _collect(args, work)


def run_argv(args, work: Path, ipc: int, epochs: int, iterations: int, run: Run) -> tuple[list[str], int, int]:
    """The pipeline's command line of ``run`` at ``ipc``, and its student epochs and synthesis iterations."""
    if "--syn_iterations" in run.overrides:  # a point of the iterations curve
        iterations = int(run.overrides[run.overrides.index("--syn_iterations") + 1])
    if _run_epochs(run) is not None:  # a longer student (the random subset trains as long)
        epochs = _run_epochs(run)
    baselines = ["random_real"] if run.with_random or run.name in args.random_with else [run.method]  # the main method alone = no baseline
    argv = ["--config", str(RECIPE), "--teachers", *args.teachers, "--ipc", str(ipc),
            "--syn_iterations", str(iterations), "--syn_checkpoint_every", str(max(1, iterations // 5)),
            "--num_train_epochs", str(epochs), "--eval_seeds", *map(str, args.seeds),
            "--evaluate_hard_labels", "true", "--hard_label_seeds", *map(str, args.hard_label_seeds),
            "--relabel_export_views", "false",
            "--stats_max_samples", str(args.stats_max_samples), "--stages", "squeeze", "record", "recover", "relabel",
            "evaluate", *AUTHORS, "--syn_method", run.method, *run.overrides, *STUDENT[run.student],
            "--baselines", *baselines, "--output_dir", str(work / f"ipc{ipc}" / run.folder), *_extra(args)]
    return _group_method_options(argv, run.method), epochs, iterations


def _run(args, work: Path, ipc: int, epochs: int, iterations: int, run: Run) -> None:
    from gvbsm_hf.pipeline import parse_recipe, run_pipeline

    saved = work / "rows" / f"ipc{ipc}_{run.name}.json"
    if saved.exists():
        return
    argv, epochs, iterations = run_argv(args, work, ipc, epochs, iterations, run)
    t0 = time.perf_counter()
    summary = run_pipeline(parse_recipe(argv))
    rows = [r for r in summary["results"] if r["method"] in (run.method, "random_real")]
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"run": run.name, "ipc": ipc, "epochs": epochs, "syn_iterations": iterations,
                                 "invocation": _invocation(), "argv": argv,
                                 "wall_time_s": round(time.perf_counter() - t0, 1), "rows": rows}, indent=2) + "\n")
    soft = {r["method"]: r for r in rows if r["labels"] == "soft"}
    print(f"ipc {ipc} {run.name}: " + ", ".join(f"{m} {r['mean']:.2f} ± {r['std']:.2f}" for m, r in soft.items()),
          flush=True)


def _restore_rows(results: Path, work: Path) -> None:
    """Write the rows of a results file back as saved-run files (those not already in ``work/rows``): soft
    per-seed accuracies, the hard-label row as its mean (one value: the file keeps no per-seed hard labels),
    and each student protocol's random subset attached to a run of that protocol."""
    data = json.loads(results.read_text())
    out = work / "rows"
    out.mkdir(parents=True, exist_ok=True)
    first = True
    for ipc, res in data["ipc"].items():
        saved: dict[str, dict] = {}
        for row in res["rows"]:
            run = RUNS[row["recipe"]]
            rows = [{"method": run.method, "labels": "soft", "per_seed": row["per_seed"], "mean": row["mean"],
                     "std": row["std"]}]
            if row.get("hard_label_mean") is not None:
                rows.append({"method": run.method, "labels": "hard", "per_seed": [row["hard_label_mean"]],
                             "mean": row["hard_label_mean"], "std": 0.0})
            saved[run.name] = {"run": run.name, "ipc": int(ipc), "epochs": row["epochs"],
                               "syn_iterations": row.get("syn_iterations"), "student": row["student"],
                               "invocation": data["command"] if first else None, "restored_from": str(results),
                               "wall_time_s": row.get("wall_time_s"), "rows": rows}
            first = False
        for ref in res.get("full_train_set_references", []):
            saved[ref["recipe"]] = {"run": ref["recipe"], "ipc": int(ipc), "epochs": ref["epochs"],
                                    "student": ref["student"], "invocation": None, "restored_from": str(results),
                                    "wall_time_s": ref.get("wall_time_s"),
                                    "rows": [{"method": "random_real", "labels": "soft", "per_seed": ref["per_seed"],
                                              "mean": ref["mean"], "std": ref["std"]}]}
        for student, draws in res.get("random_draws_by_student", {}).items():  # the other random draws
            for d in draws["draws"]:
                name = next((r.name for r in RUNS.values() if d["draw"] and r.draw == d["draw"] and (
                    (student == r.student and _run_epochs(r) in (None, d["epochs"]))
                    or (student == f"{r.student}, {d['epochs']} epochs" and _run_epochs(r) == d["epochs"]))), None)
                if name is not None:
                    saved[name] = {"run": name, "ipc": int(ipc), "epochs": d["epochs"], "student": student,
                                   "invocation": None, "restored_from": str(results), "wall_time_s": None,
                                   "rows": [{"method": "random_real", "labels": "soft", "per_seed": d["per_seed"],
                                             "mean": d["mean"], "std": d["std"]}]}
        for student, rnd in res.get("random_real_by_student", {}).items():
            host = next((s for s in saved.values() if s["student"] == student and not RUNS[s["run"]].reference),
                        None)
            if host is None:  # a protocol only a random-subset run measured
                name = next((r.name for r in RUNS.values() if r.method == "random_real" and not r.draw
                             and not r.reference and f"{r.student}, {rnd['epochs']} epochs" == student), None)
                if name is None:
                    print(f"ipc {ipc}: no run measures the random subset of {student!r}; not restored", flush=True)
                    continue
                host = saved[name] = {"run": name, "ipc": int(ipc), "epochs": rnd["epochs"], "student": student,
                                      "invocation": None, "restored_from": str(results), "wall_time_s": None,
                                      "rows": []}
            host["rows"].append({"method": "random_real", "labels": "soft", "per_seed": rnd["per_seed"],
                                 "mean": rnd["mean"], "std": rnd["std"]})
        for name, s in saved.items():
            path = out / f"ipc{ipc}_{name}.json"
            if not path.exists():
                path.write_text(json.dumps(s, indent=2) + "\n")


def _run_epochs(run: Run) -> int | None:
    """The student epochs a run sets itself (``--num_train_epochs`` in its overrides), else None."""
    o = run.overrides
    return int(o[o.index("--num_train_epochs") + 1]) if "--num_train_epochs" in o else None


def _group_method_options(argv: list[str], method: str) -> list[str]:
    """``argv`` with the options of ``method`` (``--syn_rded_selection kcenter``, ``--syn_init rded``, ...) moved
    into one ``--method_args '{"<method>": {...}}'`` (a recipe holds each method's options under its name; the
    recipe's own groups, e.g. its gvbsm options, stay and are merged per option, the flags winning). Values are
    read as YAML (numbers, booleans, strings); an option given twice keeps its last value, as flags do."""
    import yaml

    from gvbsm_hf.methods import get_method

    own = set(get_method(method).config_class.options())
    rest, options, i = [], {}, 0
    while i < len(argv):
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        name = argv[i][2:] if argv[i].startswith("--") else None
        if name in own:
            values = [yaml.safe_load(v) for v in argv[i + 1:j]]
            options[name] = values[0] if len(values) == 1 else values
        else:
            rest += argv[i:j]
        i = j
    return rest + (["--method_args", json.dumps({method: options})] if options else [])


def _invocation() -> str:
    return "python benchmarks/margin_fashion_mnist.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _stats(values: list[float]) -> dict:
    return {"mean": round(mean(values), 3), "std": round(stdev(values), 3) if len(values) > 1 else 0.0,
            "per_seed": [round(v, 3) for v in values]}


def _collect(args, work: Path) -> None:
    from gvbsm_hf.scores import label_robust_score
    from gvbsm_hf.teacher import load_teacher

    teachers = []
    for folder in args.teachers:
        acc = load_teacher(folder).config.get("accuracy")
        teachers.append({"name": Path(folder).name, "top1": None if acc is None else round(100.0 * float(acc), 2)})
    full_real = max(t["top1"] or 0.0 for t in teachers)  # stand-in for a full-data hard-label student (LRS)
    invocations = []  # the commands that ran the rows (one per process), then this one
    for f in sorted((work / "rows").glob("*.json")):
        inv = json.loads(f.read_text()).get("invocation")
        if inv and inv not in invocations:
            invocations.append(inv)
    result = {
        "command": " && ".join([*invocations, _invocation()]),
        "teachers": teachers,
        "protocol": "ConvNet-128 student, soft labels of the teacher ensemble on every augmented batch (MSE + "
                    "gamma*GT, Eq. 11), top-1 on the 10k test split after the LAST epoch, mean ± sample std over "
                    f"student seeds {args.seeds}; synthesis on the authors' protocol (syn_iterations and student "
                    "epochs of each row in the row); the random subset under the same teachers, student, "
                    "epochs and seeds as the row it is compared with",
        "ipc": {},
    }
    md = ["| IPC | row | components | student | top-1 % | vs random (same student) | hard labels % |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for ipc in sorted(PLAN):
        saved = [json.loads(f.read_text()) for f in sorted((work / "rows").glob(f"ipc{ipc}_*.json"))]
        if not saved:
            continue
        saved.sort(key=lambda s: PLAN[ipc].index(s["run"]) if s["run"] in PLAN[ipc] else 99)
        # the IPC's base student length: that of the runs that do not set their own (--num_train_epochs)
        plain = [s["epochs"] for s in saved if "--num_train_epochs" not in RUNS[s["run"]].overrides] or \
            [s["epochs"] for s in saved]
        base_epochs = max(set(plain), key=plain.count)

        def protocol(s: dict) -> str:  # the student protocol of a saved run: its student, and epochs if unusual
            student = RUNS[s["run"]].student
            return student if s["epochs"] == base_epochs else f"{student}, {s['epochs']} epochs"

        randoms: dict[str, dict] = {}
        for s in saved:  # random subset per student protocol
            if RUNS[s["run"]].draw or RUNS[s["run"]].reference:
                continue
            for r in s["rows"]:
                if r["method"] == "random_real" and r["labels"] == "soft":
                    randoms[protocol(s)] = {**_stats(r["per_seed"]), "epochs": s["epochs"]}
        rows = []
        for s in saved:
            run = RUNS[s["run"]]
            if run.method == "random_real":  # a random subset under another protocol (or draw): not a row
                continue
            by = {(r["method"], r["labels"]): r for r in s["rows"]}
            soft, hard = by.get((run.method, "soft")), by.get((run.method, "hard"))
            if soft is None:
                continue
            rnd = randoms.get(protocol(s))
            row = {"recipe": run.name, "components": run.components, **_stats(soft["per_seed"]),
                   "hard_label_mean": None if hard is None else round(mean(hard["per_seed"]), 3),
                   "student": protocol(s), "epochs": s["epochs"], "syn_iterations": s.get("syn_iterations"), "overrides": run.overrides + STUDENT[run.student],
                   "random_margin": None if rnd is None else round(mean(soft["per_seed"]) - rnd["mean"], 3),
                   "wall_time_s": s["wall_time_s"]}
            if hard is not None and rnd is not None:  # DD-Ranking-style score, docs/results.md
                hlr = (full_real - row["hard_label_mean"]) / 100.0
                ior = row["random_margin"] / 100.0
                row["lrs"] = round(label_robust_score(hlr, ior), 4)
            rows.append(row)
            md.append(f"| {ipc} | {run.name} | {', '.join(run.components) or '—'} | {row['student']} | "
                      f"{row['mean']:.2f} ± {row['std']:.2f} | "
                      f"{'' if row['random_margin'] is None else format(row['random_margin'], '+.2f')} | "
                      f"{'' if row['hard_label_mean'] is None else format(row['hard_label_mean'], '.2f')} |")
        for student, rnd in randoms.items():
            hard_r = [r for s in saved if protocol(s) == student
                      for r in s["rows"] if r["method"] == "random_real" and r["labels"] == "hard"]
            md.append(f"| {ipc} | random_real | random subset | {student} | {rnd['mean']:.2f} ± {rnd['std']:.2f} | "
                      f"0 | {'' if not hard_r else format(mean(hard_r[0]['per_seed']), '.2f')} |")
        draws: dict[str, list] = {}  # the subset's own spread: draw 0 (the baseline) and the other draws
        for s in saved:
            if RUNS[s["run"]].draw and protocol(s) in randoms:
                soft_r = [r for r in s["rows"] if r["method"] == "random_real" and r["labels"] == "soft"][0]
                draws.setdefault(protocol(s), [{"draw": 0, **randoms[protocol(s)]}]).append(
                    {"draw": RUNS[s["run"]].draw, **_stats(soft_r["per_seed"]), "epochs": s["epochs"]})
                md.append(f"| {ipc} | {s['run']} | random subset, syn_seed {RUNS[s['run']].draw} | {protocol(s)} | "
                          f"{_stats(soft_r['per_seed'])['mean']:.2f} ± {_stats(soft_r['per_seed'])['std']:.2f} | "
                          f"{mean(soft_r['per_seed']) - randoms[protocol(s)]['mean']:+.2f} |  |")
        references = []  # the same student on the whole train set, same optimiser steps
        for s in saved:
            if RUNS[s["run"]].reference:
                soft_r = [r for r in s["rows"] if r["labels"] == "soft"][0]
                references.append({"recipe": s["run"], "components": RUNS[s["run"]].components,
                                   "student": protocol(s), "epochs": s["epochs"], **_stats(soft_r["per_seed"]),
                                   "wall_time_s": s["wall_time_s"]})
                md.append(f"| {ipc} | {s['run']} | {', '.join(RUNS[s['run']].components)} | {protocol(s)} | "
                          f"{mean(soft_r['per_seed']):.2f} ± {_stats(soft_r['per_seed'])['std']:.2f} | "
                          f"{'' if protocol(s) not in randoms else format(mean(soft_r['per_seed']) - randoms[protocol(s)]['mean'], '+.2f')} |  |")
        if not rows:
            continue
        best = max(rows, key=lambda r: r["mean"])
        random_real = randoms.get(best["student"])
        result["ipc"][str(ipc)] = {
            "random_real": None if random_real is None else {k: random_real[k] for k in ("mean", "std", "per_seed")},
            "random_real_student": best["student"],
            "random_real_by_student": randoms,
            # per protocol: each random draw's mean over the student seeds, and the spread of those means
            "random_draws_by_student": {k: {"draws": v, "mean_of_draws": round(mean(d["mean"] for d in v), 3),
                                            "std_of_draws": round(stdev([d["mean"] for d in v]), 3)}
                                        for k, v in draws.items()},
            "rows": rows,
            "best": {"recipe": best["recipe"], "mean": best["mean"], "std": best["std"]},
            "margin": None if random_real is None else round(best["mean"] - random_real["mean"], 3),
            # the strictest reading: the best distilled row against the best random subset of any measured
            # student protocol (a user could train the random subset with the better student instead)
            "margin_vs_best_random": None if not randoms else round(
                best["mean"] - max(r["mean"] for r in randoms.values()), 3),
        }
        if references:
            result["ipc"][str(ipc)]["full_train_set_references"] = references
        with_margin = [r for r in rows if r["random_margin"] is not None]
        if with_margin:  # the row furthest above its own random subset (best is the most accurate row)
            top = max(with_margin, key=lambda r: r["random_margin"])
            result["ipc"][str(ipc)]["largest_margin"] = {"recipe": top["recipe"], "student": top["student"],
                                                         "mean": top["mean"], "margin": top["random_margin"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
