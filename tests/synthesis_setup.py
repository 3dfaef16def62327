"""Deterministic tiny set-up shared by the synthesis tests and their 2-process script."""

from __future__ import annotations

import numpy as np
import torch

from gvbsm_hf.backbones import create_backbone
from gvbsm_hf.configs import StatisticsArguments, SynthesisArguments
from gvbsm_hf.data import DatasetSpec
from gvbsm_hf.statistics import record_statistics

SPEC = DatasetSpec(
    name="digits-test", num_classes=10, image_size=16, channels=1, mean=(0.3,), std=(0.4,),
    class_names=tuple(str(i) for i in range(10)),
)


def digits_uint8() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits as uint8 (N, 1, 16, 16) built without the project's data layer."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), torch.tensor(d.target, dtype=torch.long)


def make_teachers(n: int = 2) -> list[torch.nn.Module]:
    """Random-weight small ConvNets whose BatchNorm running statistics are set from real data
    (cumulative average), so BN matching has meaningful targets without training."""
    images, _ = digits_uint8()
    x = SPEC.normalize(images[:512])
    teachers = []
    for i in range(n):
        torch.manual_seed(100 + i)
        m = create_backbone("convnet", num_classes=10, in_chans=1, image_size=16, width=8 + 8 * i, depth=2)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.reset_running_stats()
                mod.momentum = None
        m.train()
        with torch.no_grad():
            for chunk in x.split(128):
                m(chunk)
        teachers.append(m.eval())
    return teachers


def make_statistics(teachers, patch_size: int = 4):
    images, labels = digits_uint8()
    batches = list(zip(images[:512].split(128), labels[:512].split(128)))
    return [
        record_statistics(t, batches, SPEC, patch_size=patch_size, conv_target="input", teacher_name=f"t{i}")
        for i, t in enumerate(teachers)
    ]


def small_args(**kw) -> SynthesisArguments:
    base = dict(
        ipc=4, syn_iterations=12, syn_lr=0.1, syn_classes_per_batch=5, syn_slots_per_batch=2,
        syn_checkpoint_every=4, syn_crop_scale=[0.5, 1.0], syn_seed=3,
    )
    base.update(kw)
    return SynthesisArguments(**base)


STATS_ARGS = StatisticsArguments(stats_patch_size=4, stats_conv_target="input")


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
