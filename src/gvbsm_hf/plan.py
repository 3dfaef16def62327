"""``gvbsm-hf distill --dry_run``: what a run of a recipe would do, read from the recipe and from
``output_dir`` alone. No data is loaded and nothing is written (a missing ``output_dir`` is not
created).

Each stage is ``cached``, ``will run`` or ``not run`` (not in ``stages``), by the rule
:func:`gvbsm_hf.pipeline.run_pipeline` applies: :class:`~gvbsm_hf.stage_cache.StageCache` over
``stages.json`` (``--redo``, the recipe values each stage depends on, chained through
:func:`~gvbsm_hf.stages.stage_fingerprints`), plus the stage's output files on disk.
"""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import DatasetSpec
from .errors import GVBSMError
from .methods import get_method, method_config
from .pipeline_config import STAGES
from .recipe import Recipe
from .relabel.store import STORED_LABELS_FILE
from .squeeze.config import is_teacher_reference
from .stage import StageContext, method_folder
from .stage_cache import StageCache, check_stages_file
from .stages import STAGE_REGISTRY

SPEC_NEEDED = "<dataset>"
"""Stands for the dataset's name in a path that needs the data spec (known once the data is loaded)."""


@dataclass
class StagePlan:
    """One stage of the plan: ``action`` (cached / will run / not run), why, and what it writes."""

    name: str
    action: str
    why: str
    outputs: list[str] = field(default_factory=list)


def check_output_dir_readonly(out: Path) -> str:
    """:func:`gvbsm_hf.pipeline.check_output_dir` without creating or writing anything: raise what
    the run would raise; otherwise a line saying what the run finds there."""
    if not str(out).strip():
        raise GVBSMError(f"output_dir is empty ({str(out)!r}; an unset shell variable?): set `output_dir: <folder>` "
                         "in the recipe or --output_dir <folder>.")
    if out.exists() and not out.is_dir():
        raise GVBSMError(f"output_dir {out} is a file, not a folder: set `output_dir:` (or --output_dir) to a folder.")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GVBSMError(f"output_dir {out} cannot be written ({existing} is not writable): choose a folder you can "
                         "write to with `output_dir:` (or --output_dir), or fix its permissions.")
    if not out.exists():
        return f"{out} (does not exist yet: the run creates it)"
    pid = out / ".gvbsm.lock.pid"
    held = f"; a run (pid {pid.read_text().strip()}) may be using it now" if pid.exists() else ""
    return f"{out} (exists{held})"


def known_spec(out: Path) -> DatasetSpec | None:
    """The data spec of the run's last start (``data_spec.json``), or None (no data is loaded here)."""
    path = out / "data_spec.json"
    try:
        return DatasetSpec.from_dict(json.loads(path.read_text())) if path.is_file() else None
    except (ValueError, TypeError):
        return None


def stage_outputs(name: str, ctx: StageContext) -> tuple[list[Path], list[str]]:
    """(files whose presence the cache checks, lines describing what the stage writes) of one stage,
    relative to ``output_dir``; a path that needs the data spec holds :data:`SPEC_NEEDED`."""
    r, stage, out = ctx.recipe, STAGE_REGISTRY[name], ctx.output_dir
    files: list[Path] = []
    lines: list[str] = []
    if name == "squeeze":
        for teacher, folder in zip(r.squeeze.teachers, stage.folders(ctx)):  # type: ignore[attr-defined]
            if is_teacher_reference(teacher):
                lines.append(f"teacher {teacher}: loaded as given, nothing written")
            else:
                files.append(folder / "model.safetensors")
                lines.append(f"{folder.relative_to(out)}/  (teacher {teacher}: safetensors, config, card)")
    elif name == "record":
        files = stage.outputs(ctx)
        lines = [str(p.relative_to(out)) for p in files] or ["nothing: no method of the run matches statistics"]
    elif name == "recover":
        files = stage.outputs(ctx)
        lines = [f"{p.parent.relative_to(out)}/  (synthetic.safetensors, grid.png, dataset/, jobs/)" for p in files]
    elif name == "relabel":
        stored = r.relabel.relabel_mode == "stored"
        methods = ctx.methods if stored else ([ctx.main_method] if r.relabel.relabel_export_views else [])
        files = [stage.folder(ctx, m) / STORED_LABELS_FILE for m in methods]  # type: ignore[attr-defined]
        lines = [str(p.relative_to(out)) for p in files] or ["nothing: soft labels are computed on the fly"]
    elif name == "evaluate":
        files = stage.outputs(ctx)
        students = list(r.training.eval_students or [r.training.student])
        lines = [str(files[0].relative_to(out)),
                 f"evaluate/<method>/<labels>/<student>/seed<N>/  (students {students}, seeds {list(r.training.eval_seeds)})"]
    elif name == "export":
        if ctx.spec is not None or r.publish.dataset_repo_id:
            files = stage.outputs(ctx)
            lines = [f"{files[0].parent.relative_to(out)}/  (parquet configs, README.md card, grid)"]
        else:
            folder = f"{SPEC_NEEDED}-{method_folder(r.synthesis.syn_method).replace('_', '-')}-ipc{r.synthesis.ipc}"
            lines = [f"export/{folder}/  (parquet configs, README.md card, grid; {SPEC_NEEDED}: the data spec's name, "
                     "known once the data is loaded)"]
        if r.publish.push_dataset:
            lines.append(f"pushed to the Hub: {r.publish.dataset_repo_id} (Hub access and token checked at the start)")
        if r.publish.teacher_repo_prefix:
            lines.append(f"teachers pushed as {r.publish.teacher_repo_prefix}-<teacher>")
    return files, lines


def _why_run(name: str, cache: StageCache | None, state: dict[str, Any], explicit: list[str], first: str | None) -> str:
    """Why a selected stage that is not cached runs."""
    if name in explicit:
        return f"--redo {name}"
    if cache is not None and cache.changed.get(name):
        return f"recipe changed: {', '.join(cache.changed[name])}"
    entry = state.get(name)
    if first is not None and STAGES.index(first) < STAGES.index(name) and (entry or {}).get("done"):
        cause = f"--redo {first}" if first in explicit else f"the recipe change in {first}"
        return f"{cause} recomputes every later stage"
    if entry is not None and not entry.get("done"):
        return "started, not finished (resumes from what it saved)"
    return "not done"


def plan_stages(recipe: Recipe) -> list[StagePlan]:
    """Each stage of ``recipe``: cached / will run / not run, why, and what it writes."""
    out = Path(recipe.training.output_dir)
    redo = list(recipe.pipeline.redo)
    damaged = check_stages_file(out, redo)
    cache = None if damaged else StageCache(out, redo, recipe)
    state = cache.state if cache is not None else {}
    marked = [s for s in STAGES if s in redo or (cache is not None and cache.changed.get(s))]
    first = marked[0] if marked else None
    ctx = StageContext(recipe=recipe, accelerator=None, output_dir=out, cache=cache, dataset=None,  # type: ignore[arg-type]
                       spec=known_spec(out), logger=None)  # type: ignore[arg-type]
    ctx.teacher_dirs = STAGE_REGISTRY["squeeze"].folders(ctx)  # type: ignore[attr-defined]
    plans = []
    for name in STAGES:
        files, lines = stage_outputs(name, ctx)
        done = cache is not None and cache.done(name)
        if name not in recipe.pipeline.stages:
            loaded = "its finished outputs are loaded" if (state.get(name) or {}).get("done") else (
                "not done either: a later stage that needs its outputs stops")
            plans.append(StagePlan(name, "not run", f"not in `stages`; {loaded}", lines))
            continue
        missing = [p for p in files if not p.exists()]
        if done and not missing:
            finished = state[name].get("finished")
            plans.append(StagePlan(name, "cached", f"done{f' {finished}' if finished else ''}, recipe unchanged", lines))
        elif done:
            plans.append(StagePlan(name, "will run", f"stages.json says done but {missing[0].relative_to(out)} is "
                                   "missing: what is missing is recomputed", lines))
        elif damaged:
            plans.append(StagePlan(name, "will run", f"--redo squeeze (stages.json is damaged, {damaged}: set aside "
                                   "as stages.json.damaged)", lines))
        else:
            plans.append(StagePlan(name, "will run", _why_run(name, cache, state, redo, first), lines))
    return plans


def _options(values: dict[str, Any], given: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" + (" (recipe)" if k in given else "") for k, v in values.items()) or "none"


def method_lines(recipe: Recipe) -> list[str]:
    """The main method with its effective options (and which the recipe set), the protocol every
    method shares, and each baseline with its own defaults."""
    s = recipe.synthesis
    main = method_config(s.syn_method, s)
    given = dict((s.method_args or {}).get(s.syn_method) or {})
    lines = [f"method: {s.syn_method}: {get_method(s.syn_method).description}",
             f"  options: {_options({k: getattr(main, k) for k in main.options()}, given)}",
             f"  protocol (every method): {_options({k: getattr(main, k) for k in main.PROTOCOL_FIELDS}, {})}"]
    for name in [b for b in recipe.pipeline.baselines if b != s.syn_method]:
        config = method_config(name, s, baseline=True)
        lines.append(f"baseline: {name} (its own defaults): {_options({k: getattr(config, k) for k in config.options()}, {})}")
    unused = sorted(set(s.method_args or {}) - {s.syn_method})
    if unused:
        lines.append(f"method_args of {unused}: kept and unused")
    return lines


def format_plan(recipe: Recipe) -> str:
    """The dry run's printout: output folder, data, method, then one block per stage."""
    r = recipe
    out = Path(r.training.output_dir)
    where = check_output_dir_readonly(out)
    plans = plan_stages(r)
    d = r.data
    data = f"{d.dataset_name}" + (f" ({d.dataset_config_name})" if d.dataset_config_name else "")
    wrap = lambda text, indent: textwrap.fill(text, width=110, subsequent_indent=indent,  # noqa: E731
                                              break_long_words=False, break_on_hyphens=False)
    lines = ["gvbsm-hf distill --dry_run: the recipe is valid; nothing was loaded or written.", "",
             f"output_dir: {where}",
             wrap(f"data: {data}" + (f", max_train_samples {d.max_train_samples}" if d.max_train_samples else "")
                  + f": not loaded (its class sizes are checked against ipc={r.synthesis.ipc} once it is)", "  "),
             f"teachers: {list(r.squeeze.teachers)}; student: {r.training.student}",
             f"processes: {r.pipeline.num_processes or 'as launched'}, device: "
             f"{'cpu' if r.training.use_cpu else 'as accelerate finds it'}, torch threads: "
             f"{r.pipeline.num_threads or 'torch default'}"]
    lines += [wrap(line, "    ") for line in method_lines(r)]
    lines += ["", "stages (in order):"]
    for p in plans:
        lines.append(wrap(f"  {p.name:<9} {p.action:<9} {p.why}", " " * 22))
        lines += [wrap(f"{'':<22}{o}", " " * 24) for o in p.outputs]
    lines += ["", "every run also writes recipe.json, data_spec.json and stages.json in output_dir."]
    return "\n".join(lines)


__all__ = ["StagePlan", "format_plan", "method_lines", "plan_stages"]
