"""One recipe = one flat YAML filling the stage configs (``gvbsm_hf.<stage>.config``).

* :func:`parse_recipe`: ``--config recipe.yaml`` plus command-line overrides, through
  ``HfArgumentParser``. Every value is validated here (choices, types, ranges, cross-field checks),
  before any data is loaded or any stage runs.
* :func:`recipe_to_dict`: the recipe as one flat dict (the exported dataset's ``gvbsm_config.json``
  and its card: without :data:`RUN_FIELDS`; ``recipe.json`` keeps them), through
  :func:`gvbsm_hf.fingerprint.config_to_dict`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import itertools
import logging
import sys
import types
import typing
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from accelerate.state import AcceleratorState, PartialState
from transformers import HfArgumentParser

from .backbones import is_backbone_name, unknown_backbone_message
from .data.config import DataArguments
from .errors import GVBSMError, UnknownBackboneError
from .evaluate.config import GVBSMTrainingArguments
from .export.config import PublishArguments
from .fingerprint import SECRET_FIELDS, config_to_dict
from .methods import get_method, list_methods, method_config
from .pipeline_config import PipelineArguments
from .record.config import StatisticsArguments
from .record.compatibility import stats_patch_mode
from .recover.config import SynthesisArguments, parse_method_args
from .relabel.config import RelabelArguments
from .squeeze.config import (
    SqueezeArguments,
    is_teacher_reference,
    teacher_starts_pretrained,
    untrained_teachers_message,
)
from .validation import RecipeError, check_value

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

RUN_FIELDS = frozenset({"output_dir", "logging_dir", "run_name", "redo", "stages", "resume_from_checkpoint",
                        "overwrite_output_dir"})
"""Fields that say where and which part of one run ran, not what it computes: left out of an exported
recipe (its "Reproduce" command runs the whole recipe into a folder of the user's choice)."""
EMPTY_WORDS = ("none", "[]")
"""``--baselines none`` / ``--baselines []`` (or the flag with no value): an empty list (``null`` for an
optional one)."""

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


def recipe_to_dict(recipe: Recipe, deny: Iterable[str] = SECRET_FIELDS | RUN_FIELDS) -> dict[str, Any]:
    """The recipe as one flat dict. Default: what reproduces it (the export's ``gvbsm_config.json``):
    no secrets and no :data:`RUN_FIELDS`; ``deny=SECRET_FIELDS`` keeps those (``recipe.json``)."""
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


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping of the recipe sets one key twice (YAML would keep the last value silently)."""

    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark) -> None:
        super().__init__(None, None, f"duplicate key {key!r}", second)
        self.key, self.lines = key, (first.line + 1, second.line + 1)


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key set twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeConstructor says what is wrong with it
            if key in seen:
                raise DuplicateKeyError(key, seen[key], key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_TRUE_WORDS, _FALSE_WORDS = {"yes", "true", "t", "y", "1"}, {"no", "false", "f", "n", "0"}  # as transformers' string_to_bool


def _non_none(tp: Any) -> list[Any]:
    """The members of a union annotation other than ``None`` (``[tp]`` for a plain one)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return [a for a in args if a is not type(None)]


def _coerce_yaml_value(value: Any, tp: Any) -> Any:
    """``value`` converted as argparse converts it from the command line, for a ``float`` or
    ``bool`` field given a string (YAML 1.1 reads ``1e-3`` as a string); anything else unchanged."""
    base = _non_none(tp)
    if not isinstance(value, str) or len(base) != 1:
        return value
    if base[0] is float:
        try:
            return float(value)
        except ValueError:
            return value
    if base[0] is bool and value.lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.lower() in _TRUE_WORDS
    return value


def _check_yaml_value(path: Path, key: str, value: Any, tp: Any) -> None:
    """Type-check a YAML value before argparse sees it (argparse would re-parse a string default
    and print its whole usage); the message says the value came from the file."""
    try:
        check_value(key, tp, value)
    except RecipeError as err:
        raise RecipeError(f"In recipe {path}: {err}") from None


def _empty_list(tp: Any) -> list | None:
    """What ``none`` means for a list field: ``[]``, or ``None`` for an optional one."""
    return None if type(None) in typing.get_args(tp) else []


def _is_list_type(tp: Any) -> bool:
    """A ``list[...]`` field, optional or not (not one that also takes a string, like ``report_to``)."""
    base = _non_none(tp)
    return len(base) == 1 and typing.get_origin(base[0]) is list


def load_recipe_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML; reject unknown keys (with suggestions) and ill-typed values."""
    path = Path(path)
    if not path.exists():
        raise GVBSMError(f"Recipe {path} does not exist; see recipes/ for the shipped recipes.")
    try:
        data = yaml.load(path.read_text(), Loader=_RecipeLoader) or {}
    except DuplicateKeyError as err:
        raise RecipeError(f"Recipe {path} sets {err.key!r} twice (lines {err.lines[0]} and {err.lines[1]}); YAML "
                          "would keep the last one silently. Keep one of them.") from None
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
        raise GVBSMError(f"Unknown key(s) in recipe {path}: {msg}. Run `gvbsm-hf distill --help` for all fields.")
    for key, value in list(data.items()):
        _, tp = types_[key]
        if isinstance(value, str) and value.strip().lower() in EMPTY_WORDS and _is_list_type(tp):
            value = _empty_list(tp)  # `baselines: none`
        data[key] = value = _coerce_yaml_value(value, tp)
        _check_yaml_value(path, key, value, tp)
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


def _pop_empty_lists(argv: list[str]) -> dict[str, Any]:
    """Remove ``--<list field> none`` / ``[]`` / no value from ``argv`` (argparse cannot empty a list);
    return those fields emptied (``[]``, ``None`` for an optional one). The dataclass then says
    whether empty is allowed (``eval_seeds`` is not)."""
    lists = {name: tp for name, (_, tp) in _field_types().items() if _is_list_type(tp)}
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        flag, eq, inline = argv[i].partition("=")
        name = flag[2:] if flag.startswith("--") else None
        if name in lists:
            values = [inline] if eq else list(itertools.takewhile(lambda a: not a.startswith("--"), argv[i + 1:]))
            if not values or (len(values) == 1 and values[0].strip().lower() in EMPTY_WORDS):
                out[name] = _empty_list(lists[name])
                del argv[i : i + (1 if eq else 1 + len(values))]
                continue
        i += 1
    return out


def _unknown_flags_message(remaining: list[str]) -> str:
    """Unknown command-line arguments, each with "did you mean" (the recipe's field names) or the
    method that owns it."""
    owners = method_options()
    fields = list(_field_types())
    hints = []
    for flag in (a.lstrip("-").split("=")[0] for a in remaining if a.startswith("--")):
        if flag in owners:
            hints.append(f" {flag} is an option of {owners[flag]}: pass it as --method_args '{{\"{owners[flag][0]}\": "
                         f"{{\"{flag}\": VALUE}}}}'.")
        elif close := get_close_matches(flag, fields, n=1):
            hints.append(f" --{flag}: did you mean --{close[0]}?")
    return f"Unknown command-line argument(s) {remaining}.{''.join(hints)} See `gvbsm-hf distill --help`."


def parse_recipe(argv: Sequence[str] | None = None) -> Recipe:
    """``--config recipe.yaml`` plus command-line overrides (flags win over the YAML), validated."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = recipe_parser()
    config_path = _pop_flag(argv, "--config")
    cli_method_args = _pop_flag(argv, "--method_args")
    data = load_recipe_yaml(config_path) if config_path else {}
    if cli_method_args is not None:
        data["method_args"] = merge_method_args(data.get("method_args"), cli_method_args)
    data.update(_pop_empty_lists(argv))
    parser.set_defaults(**data)
    parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    *objs, remaining = parsed
    if remaining:
        raise GVBSMError(_unknown_flags_message(remaining))
    recipe = Recipe(*objs)  # type: ignore[arg-type]
    validate_recipe(recipe)
    return recipe


def recipe_defaults() -> dict[str, Any]:
    """The flat values (:func:`recipe_to_dict`) of the recipe that sets nothing (``parse_recipe([])``):
    the export's card lists only the values of its recipe that differ from these."""
    return copy.deepcopy(_recipe_defaults())


@functools.cache
def _recipe_defaults() -> dict[str, Any]:
    # building the default TrainingArguments resets accelerate's shared state: a running Accelerator's is put back
    saved = [(shared, dict(shared)) for shared in (PartialState._shared_state, AcceleratorState._shared_state)]
    try:
        return recipe_to_dict(parse_recipe([]))
    finally:
        for shared, before in saved:
            if before:
                shared.clear()
                shared.update(before)


def validate_recipe(recipe: Recipe) -> None:
    """Cross-field checks of a whole recipe, before any stage runs (each field was checked by its
    dataclass): teacher subsets, backbone names, the main method's options and sizes."""
    r = recipe
    if not str(r.training.output_dir or "").strip():
        raise RecipeError(f"output_dir is empty ({r.training.output_dir!r}; an unset shell variable?): nothing would "
                          "say where the run writes. Set `output_dir: <folder>` in the recipe or --output_dir <folder>.")
    r.stats.stats_patch_mode = stats_patch_mode(r.stats, r.synthesis)  # record and recover share it
    for option, subset in (("syn_teachers", r.synthesis.syn_teachers), ("relabel_teachers", r.relabel.relabel_teachers)):
        unknown = [n for n in subset or [] if n not in r.squeeze.teachers]
        if unknown:
            raise RecipeError(f"{option} lists {unknown}, which are not in teachers {r.squeeze.teachers}: "
                              "name teachers exactly as in `teachers`.")
    main = method_config(r.synthesis.syn_method, r.synthesis)  # the main method accepts every method field set
    if main.uses_instance_stats() and not r.stats.stats_instance:
        raise RecipeError(f"syn_r_instance={getattr(main, 'syn_r_instance', None)} matches per-instance BN statistics "
                          "(docs/method.md Eq. 19), which the record stage stores only with `stats_instance: true`: "
                          "set `stats_instance: true` (the record stage then records them), or syn_r_instance: 0.")
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
    "RECIPE_CLASSES", "RUN_FIELDS", "Recipe", "recipe_to_dict", "recipe_parser", "load_recipe_yaml", "parse_recipe", "validate_recipe",
]
