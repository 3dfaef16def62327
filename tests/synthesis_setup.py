"""Deterministic tiny set-up shared by the synthesis tests and their 2-process script."""

from __future__ import annotations

import numpy as np
import torch

from gvbsm_hf.backbones import create_backbone
from gvbsm_hf.record.config import StatisticsArguments
from gvbsm_hf.methods import PROTOCOL_FIELDS
from gvbsm_hf.recover.config import SynthesisArguments
from gvbsm_hf.data import DatasetSpec
from gvbsm_hf.record.engine import record_statistics

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


def make_teachers(n: int = 2, epochs: int = 3) -> list[torch.nn.Module]:
    """Small ConvNets trained briefly on digits (a second on the CPU), deterministic for a seed,
    so CE and BN matching have meaningful targets."""
    images, labels = digits_uint8()
    x = SPEC.normalize(images)
    teachers = []
    for i in range(n):
        torch.manual_seed(100 + i)
        m = create_backbone("convnet", num_classes=10, in_chans=1, image_size=16, width=8 + 8 * i, depth=2)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        m.train()
        g = torch.Generator().manual_seed(i)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=g).split(64):
                loss = torch.nn.functional.cross_entropy(m(x[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        teachers.append(m.eval())
    return teachers


def make_statistics(teachers, patch_size: int = 4, augment: str = "authors", patch_mode: str = "resize"):
    """Statistics as the default (authors') protocol records them: train-transform augmentation, resized patches."""
    images, labels = digits_uint8()
    batches = list(zip(images[:512].split(128), labels[:512].split(128)))
    return [
        record_statistics(t, batches, SPEC, StatisticsArguments(stats_patch_size=patch_size, stats_conv_target="input",
                                                                stats_augment=augment, stats_patch_mode=patch_mode),
                          teacher_name=f"t{i}")
        for i, t in enumerate(teachers)
    ]


def small_args(**kw) -> SynthesisArguments:
    base = dict(
        ipc=4, syn_iterations=12, syn_lr=0.1, syn_classes_per_batch=5, syn_slots_per_batch=2,
        syn_checkpoint_every=4, syn_crop_scale=[0.5, 1.0], syn_seed=3,
    )
    base.update(kw)
    protocol = {k: v for k, v in base.items() if k in PROTOCOL_FIELDS or k in ("syn_method", "method_args")}
    options = {k: v for k, v in base.items() if k not in protocol}
    if options:  # a method's own options: grouped under the method, as in a recipe
        method = protocol.get("syn_method", "gvbsm")
        protocol["method_args"] = {**protocol.get("method_args", {}), method: options}
    return SynthesisArguments(**protocol)


STATS_ARGS = StatisticsArguments(stats_patch_size=4, stats_conv_target="input")


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
