"""Registered synthesis methods and initialisations (``register_method`` / ``register_init``,
``list_methods``, ``get_method``, ``method_config``). Importing the package registers the built-in ones."""

from . import feature_regression, gvbsm, init, random_real, rded  # noqa: F401  (registers the built-in methods)
from .feature_regression import FeatureRegressionConfig
from .gvbsm import GVBSMConfig, SRe2LConfig, SRe2LDDConfig, SRe2LGBMConfig
from .protocol import PROTOCOL_FIELDS, PROTOCOLS, SynthesisProtocol
from .rded import RDEDConfig
from .registry import (
    InitStrategy,
    SynthesisConfig,
    SynthesisMethod,
    SynthesisStep,
    check_method_options,
    get_init,
    get_method,
    list_inits,
    list_methods,
    method_config,
    register_init,
    register_method,
    unregister_method,
)

__all__ = [
    "PROTOCOLS", "PROTOCOL_FIELDS", "SynthesisProtocol", "SynthesisConfig", "SynthesisMethod", "SynthesisStep",
    "InitStrategy", "GVBSMConfig", "SRe2LConfig", "SRe2LDDConfig", "SRe2LGBMConfig", "RDEDConfig",
    "FeatureRegressionConfig", "check_method_options", "get_init", "get_method", "list_inits", "list_methods",
    "method_config", "register_init", "register_method", "unregister_method",
]
