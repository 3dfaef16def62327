"""Typed configuration for every stage (parsed from YAML recipes with ``HfArgumentParser``).

Field names are unique across the dataclasses so that one flat YAML recipe (trl /
alignment-handbook style) can fill all of them and any field can be overridden on the command
line. Stage prefixes (``teacher_``, ``stats_``, ``syn_``, ``relabel_``) keep them apart.
Defaults follow ``SPEC.md`` (small-dataset settings of the authors' code unless noted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

SYNTHESIS_METHODS = ("gvbsm", "sre2l", "sre2l+dd", "sre2l+gbm", "random_real")
"""Presets for :class:`SynthesisArguments.syn_method` (baselines and ablations, issue 4)."""


@dataclass
class DataArguments:
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


@dataclass
class SqueezeArguments:
    """Teacher backbones: train them (squeeze) or load them by folder / Hub id."""

    teachers: list[str] = field(
        default_factory=lambda: ["convnet128", "resnet18_cifar", "wrn_16_2", "mobilenetv2_050", "shufflenetv2_050"],
        metadata={"help": "Backbone names to train (zoo, 'tv:' torchvision, 'timm:' timm, 'hf-hub:'), "
                  "or teacher folders / Hub ids (loaded, not trained)."},
    )
    teacher_epochs: int = field(default=5, metadata={"help": "Epochs per teacher (SPEC: few epochs)."})
    teacher_lr: float = field(default=0.05, metadata={"help": "Peak learning rate (SGD, cosine)."})
    teacher_batch_size: int = field(default=128, metadata={"help": "Global batch size (split across processes, so 1 and N processes train the same teacher)."})
    teacher_weight_decay: float = field(default=5e-4)
    teacher_momentum: float = field(default=0.9)
    teacher_label_smoothing: float = field(default=0.0)
    teacher_augment: bool = field(default=True, metadata={"help": "Random crop (pad 4) + flip."})
    teacher_pretrained: bool = field(
        default=False, metadata={"help": "Start from pretrained timm/torchvision weights (needs the Hub)."}
    )
    teacher_seed: int = field(default=0)


@dataclass
class StatisticsArguments:
    """Global Conv statistics (GSM, Eq. 9)."""

    stats_patch_size: int = field(default=4, metadata={"help": "Patch side Np: 4 small datasets, 16 ImageNet."})
    stats_conv_target: str = field(
        default="input",
        metadata={"help": "Match the Conv2d 'input' (authors' code, default) or 'output' (paper text)."},
    )
    stats_batch_size: int = field(default=256)
    stats_augment: bool = field(default=True, metadata={"help": "Apply the synthesis augmentation to real data."})
    stats_max_samples: Optional[int] = field(default=None, metadata={"help": "Cap on images in the pass."})


@dataclass
class SynthesisArguments:
    """Recover: synthesise ``ipc`` images per class (Eq. 2, 5, 6, 7, 10)."""

    syn_method: str = field(
        default="gvbsm",
        metadata={"help": f"Preset, one of {SYNTHESIS_METHODS}. Presets set the flags below; explicit "
                  "flags in the recipe win."},
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
        metadata={"help": "IPC slots of each class per batch ('reorder loop', SPEC). None: all ipc."},
    )
    syn_backbone_choice: str = field(
        default="uniform", metadata={"help": "'uniform' sampling (paper, Eq. 7) or 'round_robin' (authors' code)."}
    )
    syn_teachers: Optional[list[str]] = field(
        default=None, metadata={"help": "Subset of teachers used in synthesis (None: all)."}
    )
    syn_ce_weight: float = field(default=1.0)
    syn_r_bn: float = field(default=0.01, metadata={"help": "BN matching weight."})
    syn_r_conv: float = field(default=0.01, metadata={"help": "Conv matching weight (0 disables GSM)."})
    syn_first_layer_multiplier: float = field(default=10.0)
    syn_alpha: float = field(default=0.8, metadata={"help": "SDS EMA factor (0 = plain Eq. 1)."})
    syn_beta_dr: float = field(default=0.4, metadata={"help": "Drop probability of each Conv statistic."})
    syn_dd: bool = field(default=True, metadata={"help": "Data densification (Eq. 5)."})
    syn_dd_weight: float = field(default=1.0)
    syn_dd_tau: float = field(default=4.0)
    syn_dd_pool_size: int = field(default=32)
    syn_augment: bool = field(default=True, metadata={"help": "Random resized crop + flip each iteration."})
    syn_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    syn_init: str = field(default="noise", metadata={"help": "'noise' or 'real' (RDED/EDC-style) init."})
    syn_mixed_precision: str = field(default="no", metadata={"help": "'no', 'bf16' or 'fp16' autocast."})
    syn_channels_last: bool = field(default=False)
    syn_checkpoint_every: int = field(default=100, metadata={"help": "Iterations between checkpoints."})
    syn_seed: int = field(default=0)


@dataclass
class RelabelArguments:
    """Relabel: ensemble soft labels (Eq. 8)."""

    relabel_mode: str = field(
        default="on_the_fly", metadata={"help": "'on_the_fly' (teachers per student batch) or 'stored'."}
    )
    relabel_teachers: Optional[list[str]] = field(default=None, metadata={"help": "Subset (None: all)."})
    relabel_logit_norm: bool = field(default=False, metadata={"help": "Logit normalisation (ImageNet-1k)."})
    relabel_num_views: int = field(default=4, metadata={"help": "Stored augmented views per image."})
    relabel_topk: Optional[int] = field(default=None, metadata={"help": "Keep only top-k logits (stored)."})
    relabel_seed: int = field(default=0)


@dataclass
class GVBSMTrainingArguments(TrainingArguments):
    """Student training on a distilled set (Eq. 11), extends ``transformers.TrainingArguments``."""

    student: str = field(default="convnet128", metadata={"help": "Evaluator backbone name."})
    loss_type: str = field(default="mse_gt", metadata={"help": "'mse_gt' (Eq. 11), 'kl' (SRe2L) or 'ce'."})
    gamma: float = field(default=0.1, metadata={"help": "GT cross-entropy weight (0.15 CIFAR in code)."})
    kd_temperature: float = field(
        default=4.0, metadata={"help": "tau of Eq. 8's softmax(z/tau) for loss_type='kl' (teacher and student); mse_gt uses raw logits."}
    )
    student_augment: bool = field(default=True)
    student_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    cutmix_prob: float = field(default=0.0, metadata={"help": "Probability of CutMix on a batch."})
    student_channels_last: bool = field(
        default=False, metadata={"help": "channels_last memory format for the student and its batches (faster convs)."}
    )
    eval_seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds, mean +- std."})
    eval_students: Optional[list[str]] = field(
        default=None, metadata={"help": "Several evaluators (cross-architecture table); None: [student]."}
    )


@dataclass
class PublishArguments:
    """Export to a Hub-ready dataset folder and optionally push."""

    dataset_repo_id: Optional[str] = field(
        default=None, metadata={"help": "e.g. org/fashion-mnist-gvbsm-ipc10 (default: derived name)."}
    )
    push_dataset: bool = field(default=False)
    teacher_repo_prefix: Optional[str] = field(
        default=None, metadata={"help": "Push teachers as <prefix>-<backbone> model repos."}
    )
    dataset_license: Optional[str] = field(default=None, metadata={"help": "Overrides the source license."})


@dataclass
class PipelineArguments:
    """What ``recipes/distill.py`` runs."""

    stages: list[str] = field(
        default_factory=lambda: ["squeeze", "record", "recover", "relabel", "evaluate", "export"],
    )
    redo: list[str] = field(default_factory=list, metadata={"help": "Stages to recompute although cached."})
    baselines: list[str] = field(
        default_factory=lambda: ["random_real"],
        metadata={"help": "Also evaluate these syn_method presets under the same protocol."},
    )
    evaluate_hard_labels: bool = field(default=False, metadata={"help": "Also report hard-label training."})
