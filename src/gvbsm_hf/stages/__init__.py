"""The pipeline's stages, one module each: squeeze -> record -> recover -> relabel -> evaluate -> export.

Each module exposes one :class:`~gvbsm_hf.stages.base.Stage` (its recipe dependencies, its output
files, ``is_done`` / ``load`` / ``run(context)``); :func:`gvbsm_hf.pipeline.run_pipeline` loops over
:data:`STAGE_REGISTRY` in order with one :class:`~gvbsm_hf.stages.base.StageContext`.
"""

from .base import Stage, StageCache, StageContext, stage_configs, stage_fingerprints
from .evaluate import EvaluateStage
from .export import ExportStage
from .record import RecordStage
from .recover import RecoverStage
from .relabel import RelabelStage
from .squeeze import SqueezeStage

STAGE_REGISTRY: dict[str, Stage] = {
    s.name: s for s in (SqueezeStage(), RecordStage(), RecoverStage(), RelabelStage(), EvaluateStage(), ExportStage())
}

__all__ = ["STAGE_REGISTRY", "Stage", "StageCache", "StageContext", "stage_configs", "stage_fingerprints"]
