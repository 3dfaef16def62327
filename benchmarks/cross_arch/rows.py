"""The rows of ``benchmarks/cross_arch_fashion_mnist.py`` (issue 35): the evaluators, each row's method, recipe
flags and method options, and the rows that synthesise from or relabel with a subset of the teachers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
