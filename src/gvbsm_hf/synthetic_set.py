"""The synthetic set a recover run produces (or a selection method picks): normalised images,
labels and slot metadata, saved exactly as safetensors and published as a ``datasets.Dataset``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from PIL import Image

from .data import DatasetSpec
from .utils import load_safetensors, save_safetensors


@dataclass
class SyntheticSet:
    """The result of recover: normalised float images plus their labels and slot metadata."""

    images: torch.Tensor
    labels: torch.Tensor
    slots: torch.Tensor
    jobs: torch.Tensor
    method: str
    config: dict = field(default_factory=dict)

    def uint8_images(self, spec: DatasetSpec) -> torch.Tensor:
        """Images quantised to uint8 pixels (what is published as PNG)."""
        return (spec.denormalize(self.images.float()) * 255.0).round().clamp(0, 255).to(torch.uint8)

    def shipped_images(self, spec: DatasetSpec) -> torch.Tensor:
        """The published images, normalised: what relabel, evaluate and the exported soft labels use,
        so that what is evaluated is what is shipped (the authors train on their saved PNGs)."""
        return spec.normalize(self.uint8_images(spec))

    def to_dataset(self, spec: DatasetSpec):
        """``datasets.Dataset`` with ``image`` (Image), ``label`` (ClassLabel), slot and job columns."""
        pixels = self.uint8_images(spec).permute(0, 2, 3, 1).numpy()
        mode = "L" if spec.channels == 1 else "RGB"
        pil = [Image.fromarray(p[..., 0] if spec.channels == 1 else p, mode=mode) for p in pixels]
        features = datasets.Features(
            {
                "image": datasets.Image(),
                "label": datasets.ClassLabel(names=list(spec.class_names) or [str(i) for i in range(spec.num_classes)]),
                "slot": datasets.Value("int32"),
                "job": datasets.Value("int32"),
            }
        )
        return datasets.Dataset.from_dict(
            {
                "image": pil,
                "label": self.labels.tolist(),
                "slot": self.slots.tolist(),
                "job": self.jobs.tolist(),
            },
            features=features,
        )

    def save(self, folder: str | Path) -> Path:
        """Float images and metadata as ``synthetic.safetensors`` (exact, for resuming stages)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors(  # atomic: synthetic.safetensors is the recover stage's "done" marker
            {"images": self.images.contiguous(), "labels": self.labels, "slots": self.slots, "jobs": self.jobs},
            folder / "synthetic.safetensors",
            metadata={"method": self.method, "config": json.dumps(self.config)},
        )
        return folder / "synthetic.safetensors"

    @classmethod
    def load(cls, folder: str | Path) -> "SyntheticSet":
        path = Path(folder) / "synthetic.safetensors"
        t, meta = load_safetensors(path, "recover", with_metadata=True)
        return cls(t["images"], t["labels"], t["slots"], t["jobs"], meta.get("method", ""), json.loads(meta.get("config", "{}")))
