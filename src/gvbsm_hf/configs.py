"""Typed configuration for every stage (parsed from YAML recipes with ``HfArgumentParser``).

Field names are unique across the dataclasses so that one flat YAML recipe (trl /
alignment-handbook style) can fill all of them and any field can be overridden on the command
line. Stage prefixes (``teacher_``, ``stats_``, ``syn_``, ``relabel_``) keep them apart.

Every choice is a ``Literal`` (``HfArgumentParser`` turns it into argparse ``choices``) and every
value is checked in ``__post_init__`` (:class:`ValidatedArguments`), i.e. when the recipe is
parsed, before any data is loaded: a YAML default is not seen by argparse's ``choices``, so the
check is repeated there. Method-specific synthesis fields default to ``None``, meaning "the
registered method's own default" (:mod:`gvbsm_hf.methods`); baselines are always built from
their own defaults. Equations: docs/method.md.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any, Literal, Optional

from transformers import TrainingArguments

from .errors import GVBSMError

STAGES = ("squeeze", "record", "recover", "relabel", "evaluate", "export")

BackboneChoice = Literal["uniform", "round_robin"]
SynInit = Literal["noise", "real", "rded"]
FRTargets = Literal["teacher", "ensemble"]
RDEDSelection = Literal["lowest_ce", "cluster_lowest_ce", "cluster_centroid", "boundary", "kcenter", "facility_location"]
MixedPrecision = Literal["no", "bf16", "fp16"]
ConvTarget = Literal["input", "output"]
RelabelMode = Literal["on_the_fly", "stored"]
LossType = Literal["mse_gt", "kl", "ce"]
AugmentKind = Literal["authors", "per_image_rrc", "none"]
SynProtocol = Literal["authors", "gvbsm_hf_v0"]
FirstLayer = Literal["first_conv", "first_bn_and_conv"]
DropUnit = Literal["layer", "statistic"]
EmaInit = Literal["zero", "first"]
DDPool = Literal["always", "downsample_only"]
PatchMode = Literal["resize", "partial"]
CutMixLabel = Literal["original", "mixed"]

PROTOCOLS: dict[str, dict[str, str]] = {
    # the authors' public G-VBSM code (docs/differences.md, one row per field)
    "authors": {"syn_augment": "authors", "syn_first_layer": "first_conv", "syn_beta_dr_unit": "layer",
                "syn_ema_init": "zero", "syn_dd_pool": "always", "stats_patch_mode": "resize"},
    # what gvbsm-hf 0.1 did
    "gvbsm_hf_v0": {"syn_augment": "per_image_rrc", "syn_first_layer": "first_bn_and_conv",
                    "syn_beta_dr_unit": "statistic", "syn_ema_init": "first", "syn_dd_pool": "downsample_only",
                    "stats_patch_mode": "partial"},
}
"""``syn_protocol``: the values of the implementation-fidelity fields left unset (``None``) in a
recipe. An explicit value always wins. ``stats_augment`` left unset follows ``syn_augment``."""


class RecipeError(GVBSMError):
    """A recipe value is invalid; the message names the field and the fix."""


def _suggest(value: Any, choices: typing.Sequence[Any]) -> str:
    close = get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in typing.get_args(tp)
    return tp, False


def check_choice(name: str, value: Any, choices: typing.Sequence[Any]) -> None:
    """Raise :class:`RecipeError` naming ``name`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise RecipeError(f"{name}={value!r} is not one of {list(choices)}{_suggest(value, choices)}. "
                          f"Set `{name}:` in the recipe or `--{name}` to one of them.")


def check_range(name: str, value: float | int | None, low: float | None = None, high: float | None = None,
                *, low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> None:
    """Raise :class:`RecipeError` unless ``low <= value <= high`` (open ends as flagged) and finite."""
    if value is None:
        if allow_none:
            return
        raise RecipeError(f"{name} must be set.")
    v = float(value)
    bad = not math.isfinite(v)
    if low is not None:
        bad |= v <= low if low_open else v < low
    if high is not None:
        bad |= v >= high if high_open else v > high
    if bad:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise RecipeError(f"{name}={value!r} is out of range: it must be a finite number in {interval}. "
                          f"Fix `{name}:` in the recipe or `--{name}`.")


class ValidatedArguments:
    """Mixin: type-check every field and enforce ``Literal`` choices in ``__post_init__``.

    Subclasses add range checks in ``validate()``."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name not in hints:
                continue
            check_value(f.name, hints[f.name], getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """Range checks of the subclass (raise :class:`RecipeError`)."""


def check_value(name: str, tp: Any, value: Any) -> None:
    """Raise :class:`RecipeError` unless ``value`` fits the annotation ``tp`` (Literal choices included)."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return
        raise RecipeError(f"{name} must not be null; remove it from the recipe to use the default.")
    origin = typing.get_origin(tp)
    if origin is Literal:
        check_choice(name, value, typing.get_args(tp))
    elif tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{name}={value!r} must be true or false.")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{name}={value!r} must be an integer (got {type(value).__name__}).")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{name}={value!r} must be a number (got {type(value).__name__}).")
    elif tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{name}={value!r} must be a string (got {type(value).__name__}).")
    elif origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{name}={value!r} must be a list, e.g. `{name}: [a, b]` or `--{name} a b`.")
        (item,) = typing.get_args(tp) or (Any,)
        for i, v in enumerate(value):
            check_value(f"{name}[{i}]", item, v)


@dataclass
class DataArguments(ValidatedArguments):
    """Which dataset to distill and how to read it (``gvbsm_hf.data``)."""

    dataset_name: str = field(
        default="fashion_mnist",
        metadata={"help": "Built-in name (digits, fashion_mnist, cifar10, cifar100, tiny-imagenet, "
                  "imagenet-1k), a Hub dataset id or a local folder that `datasets` can load."},
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset config."})
    image_column: Optional[str] = field(default=None, metadata={"help": "Image column (auto if None)."})
    label_column: Optional[str] = field(default=None, metadata={"help": "Label column (auto if None)."})
    train_split: Optional[str] = field(default=None, metadata={"help": "Train split name (auto if None)."})
    validation_split: Optional[str] = field(
        default=None, metadata={"help": "Validation split name (auto: validation, valid, val or test)."}
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (large datasets)."})
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Use only this many training images (class-balanced, seeded)."}
    )
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Cap on validation images."})
    dataloader_workers: int = field(
        default=0, metadata={"help": "DataLoader worker processes decoding images in the record stage (0: in-process)."}
    )
    image_size: Optional[int] = field(
        default=None, metadata={"help": "Resize every image to image_size x image_size (bilinear); None: the "
                                "built-in size, else the first training image's height (images must then agree)."}
    )
    channels: Optional[Literal[1, 3]] = field(
        default=None, metadata={"help": "Convert every image to 1 (grey, 'L') or 3 (RGB) channels; None: the "
                                "built-in value, else the first training image's mode (images must then agree)."}
    )

    def validate(self) -> None:
        check_range("image_size", self.image_size, 1, allow_none=True)
        check_range("max_train_samples", self.max_train_samples, 1, allow_none=True)
        check_range("max_eval_samples", self.max_eval_samples, 1, allow_none=True)
        check_range("dataloader_workers", self.dataloader_workers, 0)


@dataclass
class SqueezeArguments(ValidatedArguments):
    """Teacher backbones: train them (squeeze) or load them by folder / Hub id."""

    teachers: list[str] = field(
        default_factory=lambda: ["convnet128", "resnet18_cifar", "wrn_16_2", "mobilenetv2_050", "shufflenetv2_050"],
        metadata={"help": "Backbone names to train (zoo, 'tv:' torchvision, 'timm:' timm, 'hf-hub:'), "
                  "or teacher folders / Hub ids (loaded, not trained)."},
    )
    teacher_epochs: int = field(default=5, metadata={"help": "Epochs per teacher (few epochs, docs/method.md)."})
    teacher_lr: float = field(default=0.05, metadata={"help": "Peak learning rate (SGD, cosine)."})
    teacher_batch_size: int = field(default=128, metadata={"help": "Global batch size (split across processes, so 1 and N processes train the same teacher)."})
    teacher_weight_decay: float = field(default=5e-4)
    teacher_momentum: float = field(default=0.9)
    teacher_label_smoothing: float = field(default=0.0)
    teacher_augment: bool = field(default=True, metadata={"help": "Random crop (pad 4) + flip."})
    teacher_pretrained: bool = field(
        default=False, metadata={"help": "Teachers that have pretrained weights ('timm:', 'tv:', 'hf-hub:' and bare "
                                 "timm names) start from them (downloaded once, then cached); zoo teachers have none "
                                 "and are trained from scratch."}
    )
    teacher_seed: int = field(default=0)

    def validate(self) -> None:
        if not self.teachers:
            raise RecipeError("teachers is empty: list at least one backbone, e.g. `teachers: [convnet128]`.")
        check_range("teacher_epochs", self.teacher_epochs, 0)
        check_range("teacher_lr", self.teacher_lr, 0, low_open=True)
        check_range("teacher_batch_size", self.teacher_batch_size, 1)
        check_range("teacher_weight_decay", self.teacher_weight_decay, 0)
        check_range("teacher_momentum", self.teacher_momentum, 0, 1, high_open=True)
        check_range("teacher_label_smoothing", self.teacher_label_smoothing, 0, 1, high_open=True)


@dataclass
class StatisticsArguments(ValidatedArguments):
    """Global Conv statistics (GSM, docs/method.md Eq. 9)."""

    stats_patch_size: int = field(default=4, metadata={"help": "Patch side Np: 4 small datasets, 16 ImageNet."})
    stats_conv_target: ConvTarget = field(
        default="input",
        metadata={"help": "Match the Conv2d 'input' (authors' code, default) or 'output' (paper text)."},
    )
    stats_batch_size: int = field(default=256)
    stats_augment: Optional[AugmentKind] = field(
        default=None, metadata={"help": "Augmentation of the real data while recording: 'authors' (each dataset's "
                                "train transform), 'per_image_rrc' or 'none'. Unset: the family of syn_augment. "
                                "Recorded in the statistics; synthesis refuses statistics of another family unless "
                                "this is set explicitly."})
    stats_patch_mode: Optional[PatchMode] = field(
        default=None, metadata={"help": "Patch statistics on maps whose side is not a multiple of stats_patch_size: "
                                "'resize' the map bilinearly (authors) or average 'partial' edge patches. Unset: "
                                "syn_protocol's."})
    stats_max_samples: Optional[int] = field(default=None, metadata={"help": "Cap on images in the pass."})
    stats_per_class: bool = field(
        default=False, metadata={"help": "Also record per-class BN-input and Conv statistics in the same pass (soft "
                                 "category-aware matching, syn_class_weight < 1; docs/method.md \"Beyond G-VBSM\"). "
                                 "Memory grows with classes x channels, not images."})

    def validate(self) -> None:
        check_range("stats_patch_size", self.stats_patch_size, 1)
        check_range("stats_batch_size", self.stats_batch_size, 1)
        check_range("stats_max_samples", self.stats_max_samples, 1, allow_none=True)


METHOD_FIELD_HELP = " Default (null): the method's own default (docs/method.md \"Baselines and ablations\")."


@dataclass
class SynthesisArguments(ValidatedArguments):
    """Recover: synthesise ``ipc`` images per class (docs/method.md Eq. 2, 5, 6, 7, 10).

    The fields up to ``syn_seed`` are the *protocol*, shared by the main method and every
    baseline. The fields after it belong to the method (``syn_method``): left unset (``None``),
    the registered method's config class supplies its own default; baselines never see them."""

    syn_method: str = field(
        default="gvbsm",
        metadata={"help": "Registered synthesis method (gvbsm, sre2l, sre2l+dd, sre2l+gbm, random_real, ...; "
                  "see gvbsm_hf.methods.list_methods())."},
    )
    ipc: int = field(default=10, metadata={"help": "Images per class."})
    syn_iterations: int = field(default=1000, metadata={"help": "Optimisation steps per batch (code: 4000)."})
    syn_lr: float = field(default=0.05, metadata={"help": "Adam lr, cosine-decayed (0.1 ImageNet)."})
    syn_adam_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    syn_classes_per_batch: Optional[int] = field(
        default=None, metadata={"help": "Classes per synthesis batch (None: all)."}
    )
    syn_slots_per_batch: Optional[int] = field(
        default=None,
        metadata={"help": "IPC slots of each class per batch (the 'reorder loop'). None: all ipc."},
    )
    syn_teachers: Optional[list[str]] = field(
        default=None, metadata={"help": "Subset of teachers used in synthesis (None: all)."}
    )
    syn_protocol: SynProtocol = field(
        default="authors", metadata={"help": "Fills the fidelity fields left unset: 'authors' (the authors' code, "
                                     "default) or 'gvbsm_hf_v0' (gvbsm-hf 0.1). See docs/differences.md."})
    syn_augment: Optional[AugmentKind] = field(
        default=None, metadata={"help": "'authors' (one pad-crop/RRC + flip + roll per batch), 'per_image_rrc' "
                                "(independent random-resized crop + flip per image) or 'none'. Unset: syn_protocol's."})
    syn_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    syn_first_layer: Optional[FirstLayer] = field(
        default=None, metadata={"help": "Layers that get syn_first_layer_multiplier: 'first_conv' (authors) or "
                                "'first_bn_and_conv' (gvbsm-hf 0.1). Unset: syn_protocol's."})
    syn_beta_dr_unit: Optional[DropUnit] = field(
        default=None, metadata={"help": "beta_dr drops a whole 'layer' (authors) or each 'statistic'. Unset: syn_protocol's."})
    syn_ema_init: Optional[EmaInit] = field(
        default=None, metadata={"help": "SDS EMA starts at 'zero' (authors) or at the 'first' statistic. Unset: syn_protocol's."})
    syn_dd_pool: Optional[DDPool] = field(
        default=None, metadata={"help": "DD pools to syn_dd_pool_size 'always' (authors; upsamples 28 px) or "
                                "'downsample_only'. Unset: syn_protocol's."})
    syn_mixed_precision: MixedPrecision = field(default="no", metadata={"help": "'no', 'bf16' or 'fp16' autocast."})
    syn_channels_last: bool = field(default=False)
    syn_checkpoint_every: int = field(default=100, metadata={"help": "Iterations between checkpoints."})
    syn_seed: int = field(default=0)
    # ---- method fields (None: the method's default) ----------------------------------------
    syn_init: Optional[SynInit] = field(default=None, metadata={"help": "'noise', 'real' (random real images) or 'rded' "
                                        "(the crops the rded method selects, RDED/EDC-style) init." + METHOD_FIELD_HELP})
    syn_backbone_choice: Optional[BackboneChoice] = field(
        default=None, metadata={"help": "'uniform' sampling (paper, Eq. 7) or 'round_robin' (authors' code)." + METHOD_FIELD_HELP}
    )
    syn_single_teacher: Optional[bool] = field(default=None, metadata={"help": "Use only the first teacher (SRe2L)." + METHOD_FIELD_HELP})
    syn_ce_weight: Optional[float] = field(default=None, metadata={"help": "CE weight." + METHOD_FIELD_HELP})
    syn_r_bn: Optional[float] = field(default=None, metadata={"help": "BN matching weight." + METHOD_FIELD_HELP})
    syn_r_conv: Optional[float] = field(default=None, metadata={"help": "Conv matching weight (0 disables GSM)." + METHOD_FIELD_HELP})
    syn_first_layer_multiplier: Optional[float] = field(default=None, metadata={"help": "Weight of the first layer's terms." + METHOD_FIELD_HELP})
    syn_alpha: Optional[float] = field(default=None, metadata={"help": "SDS EMA factor (0 = plain Eq. 1)." + METHOD_FIELD_HELP})
    syn_beta_dr: Optional[float] = field(default=None, metadata={"help": "Drop probability of each Conv statistic." + METHOD_FIELD_HELP})
    syn_dd: Optional[bool] = field(default=None, metadata={"help": "Data densification (Eq. 5)." + METHOD_FIELD_HELP})
    syn_dd_weight: Optional[float] = field(default=None, metadata={"help": "DD weight." + METHOD_FIELD_HELP})
    syn_dd_tau: Optional[float] = field(default=None, metadata={"help": "DD temperature tau." + METHOD_FIELD_HELP})
    syn_dd_pool_size: Optional[int] = field(default=None, metadata={"help": "DD pooling side." + METHOD_FIELD_HELP})
    syn_class_weight: Optional[float] = field(
        default=None, metadata={"help": "w of soft category-aware matching (EDC): w * global + (1 - w) * per-class "
                                "BN/Conv matching; 1 = global only (needs stats_per_class: true when < 1)." + METHOD_FIELD_HELP})
    syn_rded_candidates: Optional[int] = field(
        default=None, metadata={"help": "rded / syn_init rded: random crops scored per class (lowest ensemble CE "
                                "wins); unset: 5 x ipc x syn_rded_factor^2." + METHOD_FIELD_HELP})
    syn_rded_crop_scale: Optional[list[float]] = field(
        default=None, metadata={"help": "rded: area fraction [min, max] of the square candidate crops." + METHOD_FIELD_HELP})
    syn_rded_factor: Optional[int] = field(
        default=None, metadata={"help": "rded: stitch factor x factor selected crops into one image (1: no "
                                "stitching)." + METHOD_FIELD_HELP})
    syn_rded_selection: Optional[RDEDSelection] = field(
        default=None, metadata={"help": "rded: which candidates are kept: 'lowest_ce' (RDED), or k-means of the "
                                "candidates' teacher logits into k clusters and per cluster the lowest-CE member "
                                "('cluster_lowest_ce') or the member nearest its centre ('cluster_centroid'), or 'boundary': the "
                                "highest-CE candidates the ensemble still classifies correctly, or 'kcenter': greedy "
                                "farthest-point coverage of the teachers' penultimate features, or 'facility_location': greedy "
                                "k-medoids-style average coverage of the same features."
                                + METHOD_FIELD_HELP})
    syn_fr_backbone: Optional[str] = field(
        default=None, metadata={"help": "feature_regression: backbone of the pool of student networks whose features "
                                "the ridge regression uses (Eq. 12); the evaluation student's architecture." + METHOD_FIELD_HELP})
    syn_fr_pool_size: Optional[int] = field(
        default=None, metadata={"help": "feature_regression: networks in the pool, used in turn." + METHOD_FIELD_HELP})
    syn_fr_online_steps: Optional[int] = field(
        default=None, metadata={"help": "feature_regression: training steps of a pool network on the synthetic views "
                                "before it is re-initialised." + METHOD_FIELD_HELP})
    syn_fr_model_lr: Optional[float] = field(
        default=None, metadata={"help": "feature_regression: Adam lr of the pool networks." + METHOD_FIELD_HELP})
    syn_fr_real_batch: Optional[int] = field(
        default=None, metadata={"help": "feature_regression: real train images per iteration (class-balanced over the "
                                "job's classes) on which the regression is scored." + METHOD_FIELD_HELP})
    syn_fr_ridge: Optional[float] = field(
        default=None, metadata={"help": "feature_regression: ridge rho, lambda = rho * tr(K_SS) / N (Eq. 12)." + METHOD_FIELD_HELP})
    syn_fr_label_grad: Optional[bool] = field(
        default=None, metadata={"help": "feature_regression: differentiate through the teacher's logits of the synthetic "
                                "views (the labels move with the images)." + METHOD_FIELD_HELP})
    syn_fr_targets: Optional[FRTargets] = field(
        default=None, metadata={"help": "feature_regression: the regression targets T_S, T_R are the iteration's teacher "
                                "('teacher', GBM) or the mean logits of all synthesis teachers ('ensemble', the relabel "
                                "stage's Eq. 8 without LN)." + METHOD_FIELD_HELP})
    syn_fr_stagger: Optional[bool] = field(
        default=None, metadata={"help": "feature_regression: stagger the pool's first lifetimes (network m is first "
                                "re-drawn after (m+1)/P * syn_fr_online_steps steps) so the pool always holds networks of "
                                "several ages instead of resetting all of them together." + METHOD_FIELD_HELP})

    def validate(self) -> None:
        from .methods import list_methods

        for name, value in PROTOCOLS[self.syn_protocol].items():
            if name.startswith("syn_") and getattr(self, name) is None:
                setattr(self, name, value)
        check_choice("syn_method", self.syn_method, list_methods())
        check_range("ipc", self.ipc, 1)
        check_range("syn_iterations", self.syn_iterations, 0)
        check_range("syn_lr", self.syn_lr, 0, low_open=True)
        if len(self.syn_adam_betas) != 2:
            raise RecipeError(f"syn_adam_betas={self.syn_adam_betas} must be two numbers, e.g. [0.5, 0.9].")
        for i, b in enumerate(self.syn_adam_betas):
            check_range(f"syn_adam_betas[{i}]", b, 0, 1, high_open=True)
        check_range("syn_classes_per_batch", self.syn_classes_per_batch, 1, allow_none=True)
        check_range("syn_slots_per_batch", self.syn_slots_per_batch, 1, allow_none=True)
        check_crop_scale("syn_crop_scale", self.syn_crop_scale)
        check_range("syn_checkpoint_every", self.syn_checkpoint_every, 1)
        for name in ("syn_ce_weight", "syn_r_bn", "syn_r_conv", "syn_first_layer_multiplier", "syn_dd_weight"):
            check_range(name, getattr(self, name), 0, allow_none=True)
        check_range("syn_alpha", self.syn_alpha, 0, 1, high_open=True, allow_none=True)
        check_range("syn_beta_dr", self.syn_beta_dr, 0, 1, allow_none=True)
        check_range("syn_dd_tau", self.syn_dd_tau, 0, low_open=True, allow_none=True)
        check_range("syn_dd_pool_size", self.syn_dd_pool_size, 1, allow_none=True)
        check_range("syn_class_weight", self.syn_class_weight, 0, 1, allow_none=True)
        check_range("syn_rded_candidates", self.syn_rded_candidates, 1, allow_none=True)
        if self.syn_rded_crop_scale is not None:
            check_crop_scale("syn_rded_crop_scale", self.syn_rded_crop_scale)
        check_range("syn_rded_factor", self.syn_rded_factor, 1, allow_none=True)
        for name in ("syn_fr_pool_size", "syn_fr_online_steps", "syn_fr_real_batch"):
            check_range(name, getattr(self, name), 1, allow_none=True)
        check_range("syn_fr_model_lr", self.syn_fr_model_lr, 0, low_open=True, allow_none=True)
        check_range("syn_fr_ridge", self.syn_fr_ridge, 0, low_open=True, allow_none=True)
        if self.syn_fr_backbone is not None:
            from .backbones import is_backbone_name

            if not is_backbone_name(self.syn_fr_backbone):
                raise RecipeError(f"syn_fr_backbone={self.syn_fr_backbone!r} is not a known backbone: use a zoo name "
                                  "(gvbsm_hf.backbones.list_backbones()), 'tv:<name>', 'timm:<name>' or 'hf-hub:<repo>'.")


def check_crop_scale(name: str, scale: list[float]) -> None:
    if len(scale) != 2 or not (0 < float(scale[0]) <= float(scale[1]) <= 1):
        raise RecipeError(f"{name}={scale} must be [min, max] with 0 < min <= max <= 1, e.g. [0.08, 1.0].")


@dataclass
class RelabelArguments(ValidatedArguments):
    """Relabel: ensemble soft labels (docs/method.md Eq. 8)."""

    relabel_mode: RelabelMode = field(
        default="on_the_fly", metadata={"help": "'on_the_fly' (teachers per student batch) or 'stored'."}
    )
    relabel_teachers: Optional[list[str]] = field(default=None, metadata={"help": "Subset (None: all)."})
    relabel_logit_norm: bool = field(default=False, metadata={"help": "Logit normalisation (ImageNet-1k)."})
    relabel_num_views: Optional[int] = field(
        default=None, metadata={"help": "Stored augmented views per image, replayed as view (epoch mod V). None: one per "
                                "student epoch (num_train_epochs), the authors' FKD-style dense labels."})
    relabel_export_views: bool = field(
        default=True, metadata={"help": "Also store the views of the main method in relabel_mode on_the_fly, so the "
                                "export carries replayable soft labels (the `views` config) and evaluate reports "
                                "the 'stored_views' row (trained from the exported files alone)."})
    relabel_topk: Optional[int] = field(default=None, metadata={"help": "Keep only top-k logits (stored)."})
    relabel_seed: int = field(default=0)

    def validate(self) -> None:
        check_range("relabel_num_views", self.relabel_num_views, 1, allow_none=True)
        check_range("relabel_topk", self.relabel_topk, 1, allow_none=True)


@dataclass
class GVBSMTrainingArguments(TrainingArguments):
    """Student training on a distilled set (docs/method.md Eq. 11), extends ``transformers.TrainingArguments``."""

    student: str = field(default="convnet128", metadata={"help": "Evaluator backbone name."})
    loss_type: LossType = field(default="mse_gt", metadata={"help": "'mse_gt' (Eq. 11), 'kl' (SRe2L) or 'ce'."})
    gamma: float = field(default=0.1, metadata={"help": "GT cross-entropy weight (0.15 CIFAR in code)."})
    kd_temperature: float = field(
        default=4.0, metadata={"help": "tau of Eq. 8's softmax(z/tau) for loss_type='kl' (teacher and student); mse_gt uses raw logits."}
    )
    student_augment: bool = field(default=True)
    student_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    cutmix_prob: float = field(default=0.0, metadata={"help": "Probability of CutMix on a batch (authors: 1.0)."})
    cutmix_ce_label: CutMixLabel = field(
        default="original", metadata={"help": "Under CutMix, the GT cross-entropy of Eq. 11 uses the 'original' label "
                                      "(authors) or the lambda-'mixed' one."})
    student_channels_last: bool = field(
        default=False, metadata={"help": "channels_last memory format for the student and its batches (faster convs)."}
    )
    eval_seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds, mean +- std."})
    eval_students: Optional[list[str]] = field(
        default=None, metadata={"help": "Several evaluators (cross-architecture table); None: [student]."}
    )
    student_ema_decay: Optional[float] = field(
        default=None, metadata={"help": "Keep an EMA of the student (ema = d * ema + (1 - d) * w after every optimizer "
                                "step, parameters and float buffers) and evaluate with it (EDC). None: off."})
    student_lr_smoothing: Optional[float] = field(
        default=None, metadata={"help": "EDC's smoothing schedule: a cosine whose period is this factor zeta >= 1 "
                                "times the run, lr = 0.5 (1 + cos(pi t / (zeta T))) after warmup; replaces "
                                "lr_scheduler_type. None: off (zeta = 1 is the plain cosine)."})

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, typing.get_args(LossType))
        check_range("gamma", self.gamma, 0)
        check_range("kd_temperature", self.kd_temperature, 0, low_open=True)
        check_range("cutmix_prob", self.cutmix_prob, 0, 1)
        check_choice("cutmix_ce_label", self.cutmix_ce_label, typing.get_args(CutMixLabel))
        check_crop_scale("student_crop_scale", self.student_crop_scale)
        check_range("student_ema_decay", self.student_ema_decay, 0, 1, high_open=True, allow_none=True)
        check_range("student_lr_smoothing", self.student_lr_smoothing, 1, allow_none=True)
        if not self.eval_seeds:
            raise RecipeError("eval_seeds is empty: give at least one seed, e.g. `eval_seeds: [0, 1, 2]`.")
        if self.push_to_hub:
            raise RecipeError(
                "push_to_hub is the Trainer's upload of student checkpoints and is not used here: to publish, set "
                "`push_dataset: true` with `dataset_repo_id: <org>/<name>` (and `teacher_repo_prefix: <org>/<name>` "
                "for the teachers)."
            )
        super().__post_init__()


@dataclass
class PublishArguments(ValidatedArguments):
    """Export to a Hub-ready dataset folder and optionally push."""

    dataset_repo_id: Optional[str] = field(
        default=None, metadata={"help": "e.g. org/fashion-mnist-gvbsm-ipc10 (default: derived name)."}
    )
    push_dataset: bool = field(default=False)
    teacher_repo_prefix: Optional[str] = field(
        default=None, metadata={"help": "Push teachers as <prefix>-<backbone> model repos."}
    )
    dataset_license: Optional[str] = field(default=None, metadata={"help": "Overrides the source license."})

    def validate(self) -> None:
        if self.push_dataset and not self.dataset_repo_id:
            raise RecipeError("push_dataset: true needs `dataset_repo_id: <org>/<name>` (or --dataset_repo_id).")
        for name in ("dataset_repo_id", "teacher_repo_prefix"):
            value = getattr(self, name)
            if value is not None and (value.count("/") != 1 or not all(value.split("/"))):
                raise RecipeError(f"{name}={value!r} must look like <org>/<name>.")


@dataclass
class PipelineArguments(ValidatedArguments):
    """What ``recipes/distill.py`` runs."""

    stages: list[str] = field(
        default_factory=lambda: list(STAGES), metadata={"help": f"Stages to run, of {list(STAGES)}."}
    )
    redo: list[str] = field(default_factory=list, metadata={"help": "Stages to recompute although cached."})
    baselines: list[str] = field(
        default_factory=lambda: ["random_real"],
        metadata={"help": "Also evaluate these registered methods under the same protocol (built from their own defaults)."},
    )
    evaluate_hard_labels: bool = field(default=False, metadata={"help": "Also report hard-label training."})
    hard_label_seeds: Optional[list[int]] = field(
        default=None, metadata={"help": "Student seeds of the hard-label rows (fewer than eval_seeds to save time: "
                                "the images' own accuracy varies little over seeds). None: eval_seeds."})
    accept_unhealthy_synthesis: bool = field(
        default=False, metadata={"help": "Go on with a synthetic set the teachers classify worse than chance (the "
                                 "health check at the end of recover stops the run otherwise)."})
    num_threads: Optional[int] = field(
        default=None, metadata={"help": "torch CPU threads per process (torch.set_num_threads). CPU results are "
                                "bit-identical only at a fixed thread count; recorded in stages.json and provenance."})
    num_processes: Optional[int] = field(
        default=None, metadata={"help": "Expected number of processes: the run stops at once if the launcher "
                                "started another number (e.g. `accelerate launch --cpu --num_processes 2` starts one)."})

    def validate(self) -> None:
        from .methods import list_methods

        for name in ("stages", "redo"):
            for i, s in enumerate(getattr(self, name)):
                check_choice(f"{name}[{i}]", s, STAGES)
        for i, b in enumerate(self.baselines):
            check_choice(f"baselines[{i}]", b, list_methods())
        if self.hard_label_seeds is not None and not self.hard_label_seeds:
            raise RecipeError("hard_label_seeds is empty: give at least one seed (e.g. `hard_label_seeds: [0]`) or "
                              "leave it unset (null) to use eval_seeds.")
        check_range("num_threads", self.num_threads, 1, allow_none=True)
        check_range("num_processes", self.num_processes, 1, allow_none=True)


RECIPE_CLASSES = (
    DataArguments,
    SqueezeArguments,
    StatisticsArguments,
    SynthesisArguments,
    RelabelArguments,
    GVBSMTrainingArguments,
    PublishArguments,
    PipelineArguments,
)
