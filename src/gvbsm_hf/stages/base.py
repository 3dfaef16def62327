"""The stage seam: :class:`Stage` (one per module of :mod:`gvbsm_hf.stages`), the shared
:class:`StageContext` and the per-stage cache (``stages.json``)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from ..configs import STAGES
from ..recipe import NON_RESULT_FIELDS, Recipe, config_fingerprint, config_to_dict

if TYPE_CHECKING:
    import datasets
    import torch
    from accelerate import Accelerator

    from ..data import DatasetSpec


@dataclass
class StageContext:
    """What the stages share: the recipe, the accelerator, the data, and what earlier stages made."""

    recipe: Recipe
    accelerator: "Accelerator"
    output_dir: Path
    cache: "StageCache"
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
        from ..data import decoded_split

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


def stage_configs(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """The recipe values each stage depends on, in stage order."""
    from . import STAGE_REGISTRY

    return {name: STAGE_REGISTRY[name].config(recipe) for name in STAGES}


def stage_fingerprints(recipe: Recipe) -> dict[str, str]:
    """Chained hashes: a stage's fingerprint changes when its fields or any earlier stage's do."""
    out, previous = {}, ""
    for stage, cfg in stage_configs(recipe).items():
        previous = config_fingerprint(previous, cfg)
        out[stage] = previous
    return out


_MISSING = object()


def _field_defaults() -> dict[str, Any]:
    """Default value of every recipe field, as :func:`config_to_dict` would write it."""
    import dataclasses

    from ..configs import RECIPE_CLASSES

    out: dict[str, Any] = {}
    for cls in RECIPE_CLASSES:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
    return json.loads(json.dumps(out, default=lambda v: getattr(v, "value", str(v))))


def _same(key: str, before: dict, now: dict) -> bool:
    """Whether ``key`` is unchanged; a key absent before (a field added since) counts as unchanged
    while it holds its default, so upgrading gvbsm-hf does not recompute finished stages."""
    old, new = before.get(key, _MISSING), now.get(key, _MISSING)
    if old is _MISSING:
        return new == _field_defaults().get(key, _MISSING)
    return old == new


class StageCache:
    """``stages.json``: which stages finished, so a rerun skips them (``--redo`` recomputes).

    Each finished stage stores the fingerprint of the recipe values it depends on; a rerun with a
    changed recipe recomputes the first changed stage and every later one (and logs which fields
    changed), instead of silently reusing results computed with other settings."""

    def __init__(self, output_dir: Path, redo: Sequence[str], recipe: Recipe | None = None) -> None:
        self.path = output_dir / "stages.json"
        self.redo = set(redo)
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.fingerprints = stage_fingerprints(recipe) if recipe is not None else {}
        self.configs = stage_configs(recipe) if recipe is not None else {}
        self.changed: dict[str, list[str]] = {}
        for stage in STAGES:
            old = self.state.get(stage, {})
            if "fingerprint" not in old or stage not in self.fingerprints:
                continue
            if old.get("fingerprint") != self.fingerprints[stage]:
                before, now = old.get("config", {}), self.configs[stage]
                keys = sorted(k for k in set(before) | set(now) if not _same(k, before, now))
                if keys:  # an option added by a newer gvbsm-hf, left at its default, changes nothing
                    self.changed[stage] = keys
                    self.redo.add(stage)
        if self.redo:  # a redone or changed stage invalidates every later one (no stale results)
            first = min(STAGES.index(s) for s in self.redo)
            self.redo.update(STAGES[first:])

    def describe_changes(self) -> str:
        """One line per stage recomputed because the recipe changed (empty when none)."""
        return "\n".join(
            f"recipe changed for stage {stage!r} ({', '.join(keys) or 'an earlier stage'}): recomputing it and later stages"
            for stage, keys in self.changed.items()
            if keys
        )

    def done(self, stage: str) -> bool:
        return stage not in self.redo and self.state.get(stage, {}).get("done", False)

    def mark(self, stage: str, **info: Any) -> None:
        """Record ``stage`` as done. A stage that was already done, not redone, and whose ``info``
        is unchanged keeps its entry (and ``finished`` time): a rerun that skips it leaves it alone."""
        old = self.state.get(stage, {})
        if self.done(stage) and {k: v for k, v in old.items() if k not in ("done", "finished", "fingerprint", "config")} == json.loads(
            json.dumps(info, default=str)
        ):
            return
        self.state[stage] = {"done": True, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **json.loads(json.dumps(info, default=str))}
        if stage in self.fingerprints:
            self.state[stage] |= {"fingerprint": self.fingerprints[stage], "config": self.configs[stage]}
        self._write()

    def start(self, stage: str) -> None:
        """Record that ``stage`` is being computed with this recipe, so that a run killed inside it
        and restarted with a changed recipe recomputes it rather than resuming stale checkpoints."""
        if self.done(stage) or stage not in self.fingerprints:
            return
        self.state[stage] = {"done": False, "fingerprint": self.fingerprints[stage], "config": self.configs[stage]}
        self._write()

    def _write(self) -> None:
        # one temporary file per process: every process of a multi-process run marks the stages, and
        # a shared name would let one process move another's half-written file into place
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.replace(self.path)

    def redo_requested(self, stage: str) -> bool:
        return stage in self.redo
