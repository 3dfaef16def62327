"""gvbsm-hf: HuggingFace-native dataset distillation with G-VBSM (CVPR 2024).

The public API is importable from the top level and loaded on first use, so ``import gvbsm_hf``
stays light: ``from gvbsm_hf import StoredViews`` trains from an exported distilled set alone
(:mod:`gvbsm_hf.replay`); ``GVBSMTrainer`` / ``GVBSMTrainingArguments`` train a student
(:mod:`gvbsm_hf.evaluate`); ``load_distilled_spec`` / ``to_tensors`` read an export
(:mod:`gvbsm_hf.export`); ``TeacherEnsemble`` and ``load_teacher`` give the soft labels of Eq. 8.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "StoredViews": "replay",
    "GVBSMTrainer": "evaluate.trainer",
    "SyntheticImageDataset": "evaluate.datasets",
    "GVBSMTrainingArguments": "evaluate.config",
    "load_distilled_dataset": "export.loading",
    "load_distilled_spec": "export.loading",
    "to_tensors": "export.loading",
    "TeacherEnsemble": "ensemble",
    "load_teacher": "teacher",
    "create_backbone": "backbones",
}
"""Public name -> the module (under ``gvbsm_hf``) that defines it."""

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'gvbsm_hf' has no attribute {name!r}")
