"""Registered initialisations of optimised methods (``syn_init``): where a job's pixels start.

``noise`` (Gaussian, the default) and ``real`` (seeded real images of each class) live here;
``rded`` (the crops the ``rded`` method selects) is registered in :mod:`gvbsm_hf.methods.rded`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..data import DatasetSpec
from ..errors import GVBSMError
from ..utils import seeded_generator
from .registry import SynthesisConfig, register_init


@register_init("noise", needs_real=False)
def noise_init(job: Any, real: Any, spec: DatasetSpec, config: SynthesisConfig, teachers: Sequence[nn.Module] = (),
               device: Any = None, cache: Optional[dict] = None) -> None:
    """Gaussian noise: the engine draws it from the job's generator."""
    return None


@register_init("real", needs_real=True)
def real_init(job: Any, real: tuple[torch.Tensor, torch.Tensor], spec: DatasetSpec, config: SynthesisConfig,
              teachers: Sequence[nn.Module] = (), device: Any = None, cache: Optional[dict] = None) -> torch.Tensor:
    """Seeded real images of each class (:func:`init_from_real`)."""
    return init_from_real(job, real, spec, config.syn_seed)


def init_from_real(
    job: Any, real: tuple[torch.Tensor, torch.Tensor], spec: DatasetSpec, seed: int
) -> torch.Tensor:
    """The job's initial images: for each (class, slot) a seeded real image of that class, normalised.

    Only those ``len(job)`` rows are read, in one indexing request, so ``real`` may be a split
    decoded on access (:class:`gvbsm_hf.data.DecodedImages`, ImageNet scale): real initialisation
    never decodes the train split, only the job's images."""
    images, labels = real
    labels = torch.as_tensor(labels)
    picks = []
    for c in job.classes:
        idx = (labels == c).nonzero().flatten()
        if len(idx) == 0:
            raise GVBSMError(f"syn_init='real' needs real images of class {c}, found none.")
        g = seeded_generator(seed, "init", c)
        perm = idx[torch.randperm(len(idx), generator=g)]
        picks.extend(perm[s % len(perm)] for s in job.slots)
    return spec.normalize(images[torch.stack(picks)])
