"""Recover options: the synthesis protocol and the method (docs/method.md Eq. 2, 5, 6, 7, 10)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..augment import AugmentKind
from ..backbones import is_backbone_name
from ..methods import list_methods
from ..validation import RecipeError, ValidatedArguments, check_choice, check_crop_scale, check_range

BackboneChoice = Literal["uniform", "round_robin"]
SynInit = Literal["noise", "real", "rded"]
FRTargets = Literal["teacher", "ensemble"]
RDEDSelection = Literal["lowest_ce", "cluster_lowest_ce", "cluster_centroid", "boundary", "kcenter", "facility_location"]
MixedPrecision = Literal["no", "bf16", "fp16"]
SynProtocol = Literal["authors", "gvbsm_hf_v0"]
FirstLayer = Literal["first_conv", "first_bn_and_conv"]
DropUnit = Literal["layer", "statistic"]
EmaInit = Literal["zero", "first"]
DDPool = Literal["always", "downsample_only"]
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
            if not is_backbone_name(self.syn_fr_backbone):
                raise RecipeError(f"syn_fr_backbone={self.syn_fr_backbone!r} is not a known backbone: use a zoo name "
                                  "(gvbsm_hf.backbones.list_backbones()), 'tv:<name>', 'timm:<name>' or 'hf-hub:<repo>'.")
