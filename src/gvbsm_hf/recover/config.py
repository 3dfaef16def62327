"""Recover options (docs/method.md Eq. 2, 5, 6, 7, 10): the synthesis protocol every method shares
(:class:`~gvbsm_hf.methods.protocol.SynthesisProtocol`), the main method, and each method's own
options grouped under its name (``method_args``), declared once in the method's config class."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..methods import PROTOCOLS, SynthesisProtocol, list_methods, method_config
from ..validation import RecipeError, check_choice

__all__ = ["PROTOCOLS", "SynthesisArguments", "parse_method_args"]


def parse_method_args(value: Any) -> dict[str, dict[str, Any]]:
    """``method_args`` as ``{method: {option: value}}``; a JSON string (the command line) is decoded."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RecipeError(f"method_args={value!r} is not valid JSON ({err.msg}); write it as "
                              "'{\"gvbsm\": {\"syn_r_bn\": 0.02}}'.") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) or v is None for v in value.values()):
        raise RecipeError(f"method_args={value!r} must map method names to their options, e.g. "
                          "`method_args: {gvbsm: {syn_r_bn: 0.01}}`.")
    return {str(k): dict(v or {}) for k, v in value.items()}


@dataclass
class SynthesisArguments(SynthesisProtocol):
    """Recover: synthesise ``ipc`` images per class with ``syn_method``.

    The protocol fields are shared by the main method and every baseline. ``method_args`` holds
    each method's own options under its name (``{gvbsm: {syn_r_bn: 0.01}, rded: {...}}``): the
    main method takes its group (unset options: the method's defaults); baselines always use their
    own defaults; the other groups are kept, checked and unused, so ``--syn_method X`` works with a
    recipe written for Y."""

    syn_method: str = field(
        default="gvbsm",
        metadata={"help": "Registered synthesis method (gvbsm, sre2l, sre2l+dd, sre2l+gbm, random_real, rded, "
                  "feature_regression, ...; gvbsm_hf.methods.list_methods())."},
    )
    method_args: Optional[Union[dict, str]] = field(
        default_factory=dict,
        metadata={"help": "Each method's own options under its name, e.g. `method_args: {gvbsm: {syn_r_bn: 0.01}}`; "
                  "on the command line a JSON object merged into the recipe's, e.g. "
                  "--method_args '{\"gvbsm\": {\"syn_r_bn\": 0.02}}'. Options: `gvbsm-hf distill --help`."},
    )

    def validate(self) -> None:
        super().validate()
        check_choice("syn_method", self.syn_method, list_methods())
        self.method_args = parse_method_args(self.method_args)
        for name in self.method_args:
            check_choice(f"method_args.{name}", name, list_methods())
            method_config(name, self)  # the options exist and their values are valid
