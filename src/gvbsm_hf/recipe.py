"""One recipe = one flat YAML filling the stage configs (``gvbsm_hf.<stage>.config``).

* :func:`parse_recipe`: ``--config recipe.yaml`` plus command-line overrides, through
  ``HfArgumentParser``. Every value is validated here (choices, types, ranges, cross-field checks),
  before any data is loaded or any stage runs.
* :func:`recipe_to_dict`: the whole recipe as one flat dict (``recipe.json``, the exported
  dataset's ``gvbsm_config.json``), through :func:`gvbsm_hf.fingerprint.config_to_dict`.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .data.config import DataArguments
from .evaluate.config import GVBSMTrainingArguments
from .export.config import PublishArguments
from .fingerprint import SECRET_FIELDS, config_to_dict
from .methods import method_config
from .backbones import is_backbone_name, unknown_backbone_message
from .pipeline_config import PipelineArguments
from .record.config import StatisticsArguments
from .recover.config import PROTOCOLS, SynthesisArguments
from .relabel.config import RelabelArguments
from .squeeze.config import SqueezeArguments, is_teacher_reference, teacher_starts_pretrained, untrained_teachers_message
from .validation import RecipeError, ValidatedArguments, check_value
from .errors import GVBSMError, UnknownBackboneError

RECIPE_CLASSES = (
    DataArguments,
    SqueezeArguments,
    StatisticsArguments,
    SynthesisArguments,
    RelabelArguments,
    GVBSMTrainingArguments,
    PublishArguments,
    PipelineArguments,
)
"""The recipe's dataclasses, in stage order (one ``HfArgumentParser`` fills them all)."""

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


def recipe_to_dict(recipe: Recipe, deny: Iterable[str] = SECRET_FIELDS) -> dict[str, Any]:
    """The whole recipe as one flat dict (``recipe.json``, the export's ``gvbsm_config.json``)."""
    out: dict[str, Any] = {}
    for part in recipe.parts().values():
        out.update(config_to_dict(part, deny))
    return out


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
    trained = [n for n in r.squeeze.teachers if not is_teacher_reference(n)]
    untrained = [n for n in trained if not teacher_starts_pretrained(n, r.squeeze.teacher_pretrained)]
    if untrained and r.squeeze.teacher_epochs == 0:
        raise RecipeError(untrained_teachers_message(untrained, r.squeeze.teacher_pretrained))


def check_backbone_names(recipe: Recipe) -> None:
    """Every teacher to train and every student must be a known backbone name (before squeeze)."""
    named = [("teachers", n) for n in recipe.squeeze.teachers if not is_teacher_reference(n)]
    named += [("student", n) for n in [recipe.training.student, *(recipe.training.eval_students or [])]]
    for option, name in named:
        if not is_backbone_name(name):
            raise UnknownBackboneError(f"{option}: {unknown_backbone_message(name)}")


__all__ = [
    "RECIPE_CLASSES", "Recipe", "recipe_to_dict", "recipe_parser", "load_recipe_yaml", "parse_recipe", "validate_recipe",
]
