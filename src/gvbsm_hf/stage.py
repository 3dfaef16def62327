"""The stage seam: :class:`Stage` (one per stage package: ``gvbsm_hf.<stage>.stage``) and the
:class:`StageContext` the stages share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .data import decoded_split
from .fingerprint import NON_RESULT_FIELDS, config_to_dict
from .recipe import Recipe

if TYPE_CHECKING:
    import datasets
    import torch
    from accelerate import Accelerator

    from .data import DatasetSpec


@dataclass
class StageContext:
    """What the stages share: the recipe, the accelerator, the data, and what earlier stages made."""

    recipe: Recipe
    accelerator: "Accelerator"
    output_dir: Path
    cache: Any  # gvbsm_hf.stage_cache.StageCache (which imports the stages, so not imported here)
    dataset: "datasets.DatasetDict"
    spec: "DatasetSpec"
    logger: Any
    teachers: list = field(default_factory=list)
    teacher_dirs: list[Path] = field(default_factory=list)
    statistics: list = field(default_factory=list)
    synthetic: dict = field(default_factory=dict)
    stored: dict = field(default_factory=dict)
    ensemble: Any = None
    rows: list[dict] = field(default_factory=list)
    health: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    _decoded: dict = field(default_factory=dict)

    def real(self, split: str) -> "tuple[torch.Tensor, torch.Tensor]":
        """The uint8 images and labels of ``train`` / ``validation`` (the spec's evaluation view),
        made on first use only. Small sets are decoded whole (a tensor, fastest to index); a spec
        that streams its splits (``spec.stream_splits``: ImageNet scale) gets a
        :class:`~gvbsm_hf.data.DecodedImages` instead, which indexes like the tensor but decodes only
        the rows asked for (in ``dataloader_workers`` worker processes), so no stage ever holds a
        whole large split (ImageNet-1k validation: 7.5 GB decoded, train: 190 GB)."""
        if split not in self._decoded:
            workers = int(getattr(getattr(self.recipe, "data", None), "dataloader_workers", 0) or 0)
            self._decoded[split] = decoded_split(self.dataset[split], self.spec, num_workers=workers)
        return self._decoded[split]

    @property
    def main_method(self) -> str:
        return self.recipe.synthesis.syn_method

    @property
    def methods(self) -> list[str]:
        """The main method first, then the baselines (each once)."""
        main = self.main_method
        return [main] + [b for b in self.recipe.pipeline.baselines if b != main]


def method_folder(name: str) -> str:
    return name.replace("+", "_")


class Stage:
    """One stage of the pipeline.

    ``depends_on`` names the recipe parts (``"synthesis"``) or single fields (``"training.seed"``)
    whose values the stage's output depends on; :class:`StageCache` fingerprints them (with every
    earlier stage's, chained) through :func:`gvbsm_hf.recipe.config_to_dict`, so no field list is
    kept by hand. ``run`` computes what is missing (reusing any finished item, e.g. one teacher);
    ``load`` only loads what exists (the stage was not selected)."""

    name: ClassVar[str]
    depends_on: ClassVar[tuple[str, ...]] = ()

    def outputs(self, ctx: StageContext) -> list[Path]:
        """The files this stage writes (for the docs and ``is_done``)."""
        return []

    def is_done(self, ctx: StageContext) -> bool:
        return ctx.cache.done(self.name) and all(p.exists() for p in self.outputs(ctx))

    def load(self, ctx: StageContext) -> None:
        """Load this stage's outputs into ``ctx`` without computing anything."""

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Compute (or reuse) the outputs into ``ctx``; returns the info stored in ``stages.json``."""
        raise NotImplementedError

    def config(self, recipe: Recipe) -> dict[str, Any]:
        """The recipe values this stage depends on (cache deny-list applied)."""
        out: dict[str, Any] = {}
        parts = recipe.parts()
        for dep in self.depends_on:
            part, _, name = dep.partition(".")
            d = config_to_dict(parts[part], NON_RESULT_FIELDS)
            if name:
                out[name] = d.get(name)
            else:
                out.update(d)
        return out


def teacher_subset(names, subset) -> list[int]:
    """Indices of the teachers named in ``subset`` (``syn_teachers`` / ``relabel_teachers``); None: all."""
    return [i for i, n in enumerate(names) if not subset or n in set(subset)]
