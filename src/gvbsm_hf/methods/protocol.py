"""The synthesis *protocol*: the recover options shared by the main method and every baseline
(same IPC, iterations, optimiser, augmentation, fidelity options and seed), declared once here.

:class:`~gvbsm_hf.recover.config.SynthesisArguments` (the recipe) and every method's config
(:class:`~gvbsm_hf.methods.registry.SynthesisConfig`) inherit these fields. The fidelity fields
left unset (``None``) take the values of ``syn_protocol`` (:data:`PROTOCOLS`, docs/differences.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from ..augment_families import AugmentKind
from ..validation import RecipeError, ValidatedArguments, check_crop_scale, check_range

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


@dataclass
class SynthesisProtocol(ValidatedArguments):
    """Recover options every method shares (docs/method.md "Recover"); checked when constructed."""

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
    syn_compile: bool = field(
        default=False, metadata={"help": "Compile each teacher's step (forward, statistics, loss) with "
                                 "torch.compile(fullgraph=True): no graph break, no host sync inside (one probe "
                                 "forward without graph gives a teacher's matching layout before its first step). "
                                 "Methods whose loss declares its random draws (gvbsm, sre2l*), syn_class_weight 1."})
    syn_checkpoint_every: int = field(default=100, metadata={"help": "Iterations between checkpoints; the random draws "
                                      "of an interval are made before its first step (docs/method.md 'Recover')."})
    syn_seed: int = field(default=0)

    def validate(self) -> None:
        for name, value in PROTOCOLS[self.syn_protocol].items():
            if name.startswith("syn_") and getattr(self, name) is None:
                setattr(self, name, value)
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


PROTOCOL_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SynthesisProtocol))
"""The protocol's field names, in declaration order."""
