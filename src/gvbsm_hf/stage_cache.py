"""``stages.json``: which stages finished with which recipe values, so a rerun skips them."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import GVBSMError
from .pipeline_config import STAGES
from .recipe import RECIPE_CLASSES, Recipe
from .stages import stage_configs, stage_fingerprints


_MISSING = object()


def _field_defaults() -> dict[str, Any]:
    """Default value of every recipe field, as :func:`config_to_dict` would write it."""
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


def check_stages_file(out: Path, redo: Sequence[str]) -> str | None:
    """A damaged ``stages.json`` is named with its fix (unless ``--redo squeeze``, with which the run
    sets it aside); its problem, or None when it is whole or absent. The run and ``--dry_run`` both call it."""
    path = out / "stages.json"
    if not path.is_file():
        return None
    try:
        problem = None if isinstance(json.loads(path.read_text()), dict) else "not a mapping of stages"
    except (ValueError, UnicodeDecodeError) as err:
        problem = f"{type(err).__name__}: {err}"
    if problem and "squeeze" not in redo:
        raise GVBSMError(f"{path} (the index of finished stages) is damaged or incomplete ({problem}): delete it and "
                         "rerun the same command (every stage is rechecked; teachers, statistics and student runs "
                         "whose settings match are reused), or rerun with `--redo squeeze` to recompute everything.")
    return problem
