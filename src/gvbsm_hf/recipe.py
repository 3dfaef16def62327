"""One recipe = one flat YAML filling the stage configs (``gvbsm_hf.<stage>.config``).

* :func:`parse_recipe`: ``--config recipe.yaml`` plus command-line overrides, through
  ``HfArgumentParser``. Every value is validated here (choices, types, ranges, cross-field checks),
  before any data is loaded or any stage runs.
* :func:`recipe_to_dict`: the whole recipe as one flat dict (``recipe.json``, the exported
  dataset's ``gvbsm_config.json``), through :func:`gvbsm_hf.fingerprint.config_to_dict`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
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
from .methods import get_method, list_methods, method_config
from .backbones import is_backbone_name, unknown_backbone_message
from .pipeline_config import PipelineArguments
from .record.config import StatisticsArguments
from .recover.config import PROTOCOLS, SynthesisArguments, parse_method_args
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

logger = logging.getLogger(__name__)  # recipes are parsed before accelerate's state exists

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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the epilog (each method's options) kept as written."""


def method_options_help() -> str:
    """Each registered method's options with their defaults and help (the ``--help`` epilog)."""
    lines = ["Method options (`method_args: {METHOD: {OPTION: VALUE}}`; --method_args '{\"METHOD\": {...}}'):"]
    for name in list_methods():
        entry = get_method(name)
        lines.append(f"  {name}: {entry.description}")
        for f in dataclasses.fields(entry.config_class):
            if f.name in entry.config_class.options():
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                help_ = next((g.metadata["help"] for c in entry.config_class.__mro__ if dataclasses.is_dataclass(c)
                              for g in dataclasses.fields(c) if g.name == f.name and "help" in g.metadata), "")
                lines.append(f"    {f.name} = {default!r}  {help_}".rstrip())
    return "\n".join(lines)


def recipe_parser() -> HfArgumentParser:
    return HfArgumentParser(RECIPE_CLASSES, epilog=method_options_help(), formatter_class=_HelpFormatter)  # type: ignore[arg-type]


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
    data = group_method_options(data, path)
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


def method_options() -> dict[str, list[str]]:
    """Option name -> the registered methods that declare it."""
    owners: dict[str, list[str]] = {}
    for name in list_methods():
        for option in get_method(name).config_class.options():
            owners.setdefault(option, []).append(name)
    return owners


def group_method_options(data: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """A recipe written before methods owned their options (flat ``syn_r_bn: 0.01``) still works: its
    method options move under ``method_args[<its syn_method>]``, with a warning saying how to convert it."""
    owners = method_options()
    flat = [k for k in data if k in owners]
    if not flat:
        return data
    method = data.get("syn_method", SynthesisArguments.syn_method)
    options = get_method(method).config_class.options() if method in list_methods() else []
    foreign = [k for k in flat if k not in options]
    if foreign:
        raise RecipeError(f"In recipe {path}: {foreign} are not options of syn_method {method!r} (they belong to "
                          f"{ {k: owners[k] for k in foreign} }). Group each method's options under its name, e.g. "
                          f"`method_args: {{{owners[foreign[0]][0]}: {{{foreign[0]}: ...}}}}`.")
    data = dict(data)
    group = {k: data.pop(k) for k in flat}
    method_args = parse_method_args(data.get("method_args"))
    method_args[method] = {**group, **method_args.get(method, {})}
    data["method_args"] = method_args
    logger.warning(f"Recipe {path} sets method options at the top level ({', '.join(flat)}); they are read as "
                   f"`method_args: {{{method}: {{...}}}}`. Write them that way to silence this warning.")
    return data


def merge_method_args(base: Any, override: Any) -> dict[str, dict[str, Any]]:
    """``method_args`` of the recipe updated per method by ``override`` (the command line's)."""
    merged = parse_method_args(base)
    for name, options in parse_method_args(override).items():
        merged[name] = {**merged.get(name, {}), **options}
    return merged


def _pop_flag(argv: list[str], flag: str) -> str | None:
    """Remove ``flag VALUE`` or ``flag=VALUE`` from ``argv``; return VALUE (the last one given)."""
    value = None
    i = 0
    while i < len(argv):
        if argv[i] == flag:
            if i + 1 >= len(argv):
                raise GVBSMError(f"{flag} needs a value.")
            value = argv[i + 1]
            del argv[i : i + 2]
        elif argv[i].startswith(flag + "="):
            value = argv[i].split("=", 1)[1]
            del argv[i]
        else:
            i += 1
    return value


def parse_recipe(argv: Sequence[str] | None = None) -> Recipe:
    """``--config recipe.yaml`` plus command-line overrides (flags win over the YAML), validated."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = recipe_parser()
    config_path = _pop_flag(argv, "--config")
    cli_method_args = _pop_flag(argv, "--method_args")
    data = load_recipe_yaml(config_path) if config_path else {}
    if cli_method_args is not None:
        data["method_args"] = merge_method_args(data.get("method_args"), cli_method_args)
    parser.set_defaults(**data)
    parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    *objs, remaining = parsed
    if remaining:
        owners = method_options()
        flags = [a.lstrip("-").split("=")[0] for a in remaining if a.startswith("--")]
        hint = "".join(f" {f} is an option of {owners[f]}: pass it as --method_args '{{\"{owners[f][0]}\": "
                       f"{{\"{f}\": VALUE}}}}'." for f in flags if f in owners)
        raise GVBSMError(f"Unknown command-line argument(s) {remaining}; see `python recipes/distill.py --help`.{hint}")
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
