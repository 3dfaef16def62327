"""Registered synthesis methods (``register_method``, ``list_methods``, ``get_method``, ``method_config``)."""

from .registry import SynthesisConfig, SynthesisMethod, SynthesisStep, get_method, list_methods, method_config, register_method, unregister_method
from . import feature_regression, gvbsm, random_real, rded  # noqa: E402,F401  (registers the built-in methods)
from .gvbsm import GVBSMConfig, SRe2LConfig, SRe2LDDConfig, SRe2LGBMConfig  # noqa: E402
from .rded import RDEDConfig  # noqa: E402
from .feature_regression import FeatureRegressionConfig  # noqa: E402

__all__ = [
    "SynthesisConfig", "SynthesisMethod", "SynthesisStep", "GVBSMConfig", "SRe2LConfig", "SRe2LDDConfig",
    "SRe2LGBMConfig", "RDEDConfig", "FeatureRegressionConfig", "get_method", "list_methods", "method_config", "register_method", "unregister_method",
]
