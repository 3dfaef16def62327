"""The random real subset baseline (docs/method.md "Baselines and ablations"): ``ipc`` real images
per class, class-balanced and seeded, chosen rather than optimised."""

from __future__ import annotations

import torch

from ..data import DatasetSpec, class_balanced_indices
from ..synthetic_set import SyntheticSet
from .registry import SynthesisConfig, register_method


@register_method("random_real", config=SynthesisConfig, select=True, real_per_class=lambda config: config.ipc,
                 description="A class-balanced random subset of the real train split")
def random_real_subset(real: tuple[torch.Tensor, torch.Tensor], spec: DatasetSpec, config: SynthesisConfig):
    """``config.ipc`` real images per class (``class_balanced_indices(labels, n_per_class=ipc, seed=syn_seed)``),
    class-major, as a :class:`~gvbsm_hf.synthetic_set.SyntheticSet`."""
    images, labels = real
    idx = torch.tensor(class_balanced_indices(labels.tolist(), n_per_class=config.ipc, seed=config.syn_seed),
                       dtype=torch.long)
    order = torch.argsort(labels[idx] * (len(idx) + 1) + torch.arange(len(idx)))
    idx = idx[order]
    lab = labels[idx]
    slots = torch.zeros_like(lab)
    for c in lab.unique():
        m = lab == c
        slots[m] = torch.arange(int(m.sum()))
    return SyntheticSet(spec.normalize(images[idx]), lab, slots, torch.zeros_like(lab), "random_real",
                        {"ipc": config.ipc, "seed": config.syn_seed})
