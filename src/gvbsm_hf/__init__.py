"""gvbsm-hf: HuggingFace-native dataset distillation with G-VBSM (CVPR 2024).

``from gvbsm_hf import StoredViews`` trains from an exported distilled set alone (:mod:`gvbsm_hf.replay`).
"""

__version__ = "0.1.0"

__all__ = ["StoredViews", "__version__"]


def __getattr__(name: str):  # lazy: `import gvbsm_hf` stays light
    if name == "StoredViews":
        from .replay import StoredViews

        return StoredViews
    raise AttributeError(f"module 'gvbsm_hf' has no attribute {name!r}")
