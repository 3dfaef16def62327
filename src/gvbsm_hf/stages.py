"""The pipeline's stages in order (squeeze -> record -> recover -> relabel -> evaluate -> export),
one package each (``gvbsm_hf.<stage>``: ``config``, ``engine``, ``stage``), and the recipe values
each one depends on (:func:`stage_configs`), chained into :func:`stage_fingerprints`."""

from __future__ import annotations

from typing import Any

from .evaluate.stage import EvaluateStage
from .export.stage import ExportStage
from .pipeline_config import STAGES
from .recipe import Recipe
from .fingerprint import config_fingerprint
from .record.stage import RecordStage
from .recover.stage import RecoverStage
from .relabel.stage import RelabelStage
from .squeeze.stage import SqueezeStage
from .stage import Stage

STAGE_REGISTRY: dict[str, Stage] = {
    s.name: s for s in (SqueezeStage(), RecordStage(), RecoverStage(), RelabelStage(), EvaluateStage(), ExportStage())
}
assert tuple(STAGE_REGISTRY) == STAGES


def stage_configs(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """The recipe values each stage depends on, in stage order."""
    return {name: STAGE_REGISTRY[name].config(recipe) for name in STAGES}


def stage_fingerprints(recipe: Recipe) -> dict[str, str]:
    """Chained hashes: a stage's fingerprint changes when its fields or any earlier stage's do."""
    out, previous = {}, ""
    for stage, cfg in stage_configs(recipe).items():
        previous = config_fingerprint(previous, cfg)
        out[stage] = previous
    return out
