"""One recipe = one flat YAML filling the stage dataclasses (:mod:`gvbsm_hf.configs`).

* :func:`parse_recipe`: ``--config recipe.yaml`` plus command-line overrides, through
  ``HfArgumentParser``. Every value is validated here (choices, types, ranges, cross-field checks),
  before any data is loaded or any stage runs.
* :func:`config_to_dict`: THE serializer of configs (dataclass -> dict minus an explicit deny-list),
  used for the stage cache fingerprints, ``recipe.json`` and the exported dataset's
  ``gvbsm_config.json`` / card. :func:`config_fingerprint` hashes it with ``datasets``' Hasher.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .configs import (
    RECIPE_CLASSES,
    STAGES,
    DataArguments,
    GVBSMTrainingArguments,
    PipelineArguments,
    PublishArguments,
    RecipeError,
    RelabelArguments,
    SqueezeArguments,
    StatisticsArguments,
    SynthesisArguments,
    ValidatedArguments,
    check_value,
)
from .errors import GVBSMError

SECRET_FIELDS = frozenset({"hub_token", "push_to_hub_token"})
"""Never written anywhere (recipe.json, cards)."""

NON_RESULT_FIELDS = SECRET_FIELDS | frozenset({
    # where and how a run reports and saves, not what it computes
    "output_dir", "logging_dir", "run_name", "report_to", "logging_steps", "logging_strategy", "logging_first_step",
    "logging_nan_inf_filter", "disable_tqdm", "log_level", "log_level_replica", "log_on_each_node",
    "save_strategy", "save_steps", "save_total_limit", "save_safetensors", "save_on_each_node", "save_only_model",
    "overwrite_output_dir", "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_strategy",
    "hub_private_repo", "hub_always_push", "hub_revision", "push_to_hub_model_id", "push_to_hub_organization",
    "local_rank", "skip_memory_metrics", "dataloader_workers", "stages", "redo",
})
"""Deny-list of the stage cache: fields that never change a stage's output."""


@dataclass
class Recipe:
    """All the arguments of one run, one dataclass per stage."""

    data: DataArguments
    squeeze: SqueezeArguments
    stats: StatisticsArguments
    synthesis: SynthesisArguments
    relabel: RelabelArguments
    training: GVBSMTrainingArguments
    publish: PublishArguments
    pipeline: PipelineArguments

    def parts(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ------------------------------------------------------------------------------ serializer


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "value", str(v))))


def config_to_dict(obj: Any, deny: Iterable[str] = SECRET_FIELDS) -> dict[str, Any]:
    """Every field of a config dataclass as plain JSON values, minus the ``deny`` names.

    ``TrainingArguments`` go through their own ``to_dict`` (enums as values, tokens masked)."""
    deny = set(deny)
    if isinstance(obj, TrainingArguments):
        d = obj.to_dict()
    elif dataclasses.is_dataclass(obj):
        d = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    else:
        raise TypeError(f"config_to_dict needs a dataclass, got {type(obj).__name__}")
    return _plain({k: v for k, v in d.items() if k not in deny})


def recipe_to_dict(recipe: Recipe, deny: Iterable[str] = SECRET_FIELDS) -> dict[str, Any]:
    """The whole recipe as one flat dict (``recipe.json``, the export's ``gvbsm_config.json``)."""
    out: dict[str, Any] = {}
    for part in recipe.parts().values():
        out.update(config_to_dict(part, deny))
    return out


def config_fingerprint(*values: Any) -> str:
    """``datasets.fingerprint.Hasher`` of JSON-able values."""
    from datasets.fingerprint import Hasher

    return Hasher.hash(_plain(list(values)))


# ------------------------------------------------------------------------------ parsing


def recipe_parser() -> HfArgumentParser:
    return HfArgumentParser(RECIPE_CLASSES)  # type: ignore[arg-type]


def _field_types() -> dict[str, tuple[type, Any]]:
    out = {}
    for cls in RECIPE_CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f.name] = (cls, hints.get(f.name, Any))
    return out


def _check_yaml_value(path: Path, key: str, value: Any, cls: type, tp: Any) -> None:
    """Type-check a YAML value before argparse sees it (argparse would re-parse a string default
    and print its whole usage); the message says the value came from the file."""
    if issubclass(cls, ValidatedArguments) or cls is GVBSMTrainingArguments:
        try:
            check_value(key, tp, value)
        except RecipeError as err:
            raise RecipeError(f"In recipe {path}: {err}") from None


def load_recipe_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML; reject unknown keys (with suggestions) and ill-typed values."""
    path = Path(path)
    if not path.exists():
        raise GVBSMError(f"Recipe {path} does not exist; see recipes/ for the shipped recipes.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"Recipe {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise GVBSMError(f"Recipe {path} must be a mapping of field: value.")
    types_ = _field_types()
    unknown = [k for k in data if k not in types_]
    if unknown:
        hints = {k: get_close_matches(k, list(types_), n=1) for k in unknown}
        msg = ", ".join(f"{k!r}" + (f" (did you mean {v[0]!r}?)" if v else "") for k, v in hints.items())
        raise GVBSMError(f"Unknown key(s) in recipe {path}: {msg}. Run `python recipes/distill.py --help` for all fields.")
    for key, value in data.items():
        cls, tp = types_[key]
        if cls is GVBSMTrainingArguments and key not in {f.name for f in dataclasses.fields(GVBSMTrainingArguments)
                                                           if f.name not in {g.name for g in dataclasses.fields(TrainingArguments)}}:
            continue  # TrainingArguments' own fields: checked by its __post_init__
        _check_yaml_value(path, key, value, cls, tp)
    return data


def parse_recipe(argv: Sequence[str] | None = None) -> Recipe:
    """``--config recipe.yaml`` plus command-line overrides (flags win over the YAML), validated."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = recipe_parser()
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise GVBSMError("--config needs a path to a recipe YAML.")
        config_path = argv[i + 1]
        del argv[i : i + 2]
    if config_path:
        parser.set_defaults(**load_recipe_yaml(config_path))
    parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    *objs, remaining = parsed
    if remaining:
        raise GVBSMError(f"Unknown command-line argument(s) {remaining}; see `python recipes/distill.py --help`.")
    recipe = Recipe(*objs)  # type: ignore[arg-type]
    validate_recipe(recipe)
    return recipe


def validate_recipe(recipe: Recipe) -> None:
    """Cross-field checks of a whole recipe, before any stage runs (each field was checked by its
    dataclass): teacher subsets, backbone names, the main method's options and sizes."""
    from .methods import method_config

    from .configs import PROTOCOLS

    r = recipe
    if r.stats.stats_patch_mode is None:  # a recipe-level protocol field (record and recover use it)
        r.stats.stats_patch_mode = PROTOCOLS[r.synthesis.syn_protocol]["stats_patch_mode"]
    for option, subset in (("syn_teachers", r.synthesis.syn_teachers), ("relabel_teachers", r.relabel.relabel_teachers)):
        unknown = [n for n in subset or [] if n not in r.squeeze.teachers]
        if unknown:
            raise RecipeError(f"{option} lists {unknown}, which are not in teachers {r.squeeze.teachers}: "
                              "name teachers exactly as in `teachers`.")
    method_config(r.synthesis.syn_method, r.synthesis)  # the main method accepts every method field set
    check_backbone_names(r)
    from .stages.squeeze import is_teacher_reference, teacher_starts_pretrained, untrained_teachers_message

    trained = [n for n in r.squeeze.teachers if not is_teacher_reference(n)]
    untrained = [n for n in trained if not teacher_starts_pretrained(n, r.squeeze.teacher_pretrained)]
    if untrained and r.squeeze.teacher_epochs == 0:
        raise RecipeError(untrained_teachers_message(untrained, r.squeeze.teacher_pretrained))


def check_backbone_names(recipe: Recipe) -> None:
    """Every teacher to train and every student must be a known backbone name (before squeeze)."""
    from .backbones.registry import _unknown_message, is_backbone_name
    from .errors import UnknownBackboneError
    from .stages.squeeze import is_teacher_reference

    named = [("teachers", n) for n in recipe.squeeze.teachers if not is_teacher_reference(n)]
    named += [("student", n) for n in [recipe.training.student, *(recipe.training.eval_students or [])]]
    for option, name in named:
        if not is_backbone_name(name):
            raise UnknownBackboneError(f"{option}: {_unknown_message(name)}")


__all__ = [
    "STAGES", "Recipe", "RecipeError", "NON_RESULT_FIELDS", "SECRET_FIELDS", "config_to_dict", "recipe_to_dict",
    "config_fingerprint", "recipe_parser", "load_recipe_yaml", "parse_recipe", "validate_recipe",
]
