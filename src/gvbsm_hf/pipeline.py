"""Stage orchestration for ``recipes/distill.py``: squeeze -> record -> recover -> relabel ->
evaluate -> export (``gvbsm_hf.<stage>.stage``, one module each), every stage cached in
``output_dir`` and skipped when done.

Layout of ``output_dir``::

    recipe.json                         the whole recipe (gvbsm_hf.recipe.recipe_to_dict, run fields kept)
    data_spec.json                      dataset spec (resolution, channels, mean/std, classes)
    teachers/<name>/                    Hub-ready teacher folders (safetensors, config, card)
    statistics/<name>.safetensors       Conv statistics per teacher (docs/method.md Eq. 9) with provenance
    recover/<method>/synthetic.safetensors  synthetic images (+ dataset/, grid.png; jobs/ checkpoints)
    relabel/<method>/                   stored soft labels (soft_labels.safetensors), relabel_mode=stored only
    evaluate/results.json               one row per (method, labels, student), last epoch, per seed
    export/<dataset-name>/              Hub-ready dataset folder (parquet + card + grid)
    stages.json                         which stages are done, with the fingerprint of their recipe values
    error.log                           the traceback of the last error or interruption (recipes/distill.py)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState
from filelock import FileLock, Timeout
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

from . import hub_utils
from .data import get_dataset_spec, load_image_dataset
from .errors import DataValidationError, GVBSMError
from .export.config import PublishArguments
from .fingerprint import SECRET_FIELDS
from .methods import get_init, get_method, method_config
from .pipeline_config import STAGES
from .progress import library_bars, log_stage_done
from .recipe import (
    Recipe,
    load_recipe_yaml,
    parse_recipe,
    recipe_parser,
    recipe_to_dict,
)
from .report import format_results_table
from .stage import StageContext
from .stage_cache import StageCache, check_stages_file
from .stages import STAGE_REGISTRY, stage_configs, stage_fingerprints
from .utils import runtime_provenance, seed_everything, write_json_atomic

__all__ = [
    "STAGES", "OutputDirLockedError", "Recipe", "StageCache", "format_results_table", "load_recipe_yaml", "parse_recipe", "recipe_parser",
    "recipe_to_dict", "run_pipeline", "stage_configs", "stage_fingerprints",
]


class OutputDirLockedError(GVBSMError):
    """Another run holds the output folder (``recipes/distill.py`` writes no ``error.log`` into it)."""


def run_pipeline(recipe: Recipe) -> dict[str, Any]:
    """Run the stages of ``recipe.pipeline.stages`` in order (docs/method.md "Stages"); a stage not
    selected only loads what it has on disk. Returns a summary: results rows, and the paths of the
    dataset folder, card and grid.

    Before anything is written: a requested push checks the Hub and the token
    (:func:`check_push_access`), the output folder is checked (empty name, a file, read-only, not
    creatable) and locked (a second run on it stops at once, naming the holder's pid), and the
    launched process count is checked against ``num_processes``. Before any stage: a damaged
    ``stages.json`` / ``results.json`` is named with its fix, and ``ipc`` is checked against the
    class sizes (:func:`check_ipc`). A full disk inside a stage stops with a message naming the
    stage; every finished artefact is kept (files are written atomically). A KeyboardInterrupt
    (Ctrl-C, or SIGTERM in ``recipes/distill.py``) carries the stage it stopped in as ``.stage``."""
    logger = get_logger("gvbsm_hf.pipeline")
    r = recipe
    check_push_access(r.publish)
    if r.pipeline.num_threads:
        torch.set_num_threads(int(r.pipeline.num_threads))
    check_output_dir(r.training.output_dir)
    out = Path(r.training.output_dir)
    report_to = [t for t in (r.training.report_to or []) if t not in ("none", "all")] if isinstance(r.training.report_to, list) else []

    def make_accelerator() -> Accelerator:
        return Accelerator(cpu=bool(r.training.use_cpu), log_with=report_to or None, project_dir=str(out))

    accelerator = make_accelerator()
    check_process_count(accelerator.num_processes, r.pipeline.num_processes, logger)
    stage_name: str | None = None
    try:
        with output_dir_lock(out, accelerator.is_main_process), library_bars():
            if report_to:
                accelerator.init_trackers("gvbsm", config=recipe_to_dict(r, deny=SECRET_FIELDS))
            cache = open_stage_cache(out, r.pipeline.redo, r, accelerator)
            if cache.changed:
                logger.warning(cache.describe_changes())
            check_results_file(out, cache)
            unused = sorted(set(r.synthesis.method_args) - {r.synthesis.syn_method})
            if unused:
                logger.warning(f"method_args of {unused} kept and unused: syn_method is {r.synthesis.syn_method!r} and "
                            "baselines use their own defaults")
            seed_everything(r.training.seed)
            if accelerator.is_main_process:
                write_json_atomic(out / "recipe.json", recipe_to_dict(r, deny=SECRET_FIELDS)
                                  | {"runtime": runtime_provenance(accelerator.num_processes)})

            d = r.data
            dataset = load_image_dataset(
                d.dataset_name, config_name=d.dataset_config_name, image_column=d.image_column,
                label_column=d.label_column, train_split=d.train_split, validation_split=d.validation_split,
                streaming=d.streaming, max_train_samples=d.max_train_samples, max_eval_samples=d.max_eval_samples,
                seed=r.training.seed, image_size=d.image_size, channels=d.channels,
            )
            spec = get_dataset_spec(dataset, d.dataset_name, image_size=d.image_size, channels=d.channels)
            check_ipc(r, dataset["train"], spec.class_names, logger)
            if accelerator.is_main_process:
                write_json_atomic(out / "data_spec.json", spec.to_dict())
            logger.info(f"data: {spec.name}: {spec.num_classes} classes, {spec.channels}x{spec.image_size}px")

            ctx = StageContext(recipe=r, accelerator=accelerator, output_dir=out, cache=cache, dataset=dataset,
                               spec=spec, logger=logger)
            selected = set(r.pipeline.stages)
            for stage_name, stage in STAGE_REGISTRY.items():
                if stage_name not in selected:
                    stage.load(ctx)
                    continue
                if accelerator.is_main_process:
                    cache.start(stage_name)
                    if stage_name == "evaluate":
                        repair_damaged_run_files(out / "evaluate", logger)
                accelerator.wait_for_everyone()
                started = time.monotonic()
                try:
                    info = stage.run(ctx)
                except Exception as err:
                    if is_disk_full(err):
                        raise disk_full_error(stage_name, out, err) from err
                    raise
                if not AcceleratorState._shared_state:
                    # building a transformers.TrainingArguments resets accelerate's shared state (a Trainer
                    # then re-creates it); a stage that built arguments but trained nothing (every seed
                    # cached) leaves it empty for the stages after it
                    accelerator = ctx.accelerator = make_accelerator()
                cache.mark(stage_name, **info, runtime=runtime_provenance(accelerator.num_processes))
                log_stage_done(stage_name, time.monotonic() - started, info)
            accelerator.wait_for_everyone()
            accelerator.end_training()
    except KeyboardInterrupt as stop:  # Ctrl-C (SIGTERM too, in recipes/distill.py): say where it stopped
        stop.stage = stage_name  # type: ignore[attr-defined]
        raise
    return {"results": ctx.rows, "output_dir": str(out), **ctx.summary}


LOCK_FILE = ".gvbsm.lock"


def check_output_dir(out: str | Path) -> None:
    """The output folder must be named (an empty name, e.g. an unset shell variable, would write into
    the current folder) and be a creatable, writable folder; say which path and what to do."""
    if not str(out).strip():
        raise GVBSMError(f"output_dir is empty ({str(out)!r}; an unset shell variable?): set `output_dir: <folder>` "
                         "in the recipe or --output_dir <folder>.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GVBSMError(f"output_dir {out} is a file, not a folder: set `output_dir:` (or --output_dir) to a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise GVBSMError(f"output_dir {out} cannot be written ({err.strerror or err}): choose a folder you can write "
                         "to with `output_dir:` (or --output_dir), or fix its permissions.") from None


@contextlib.contextmanager
def output_dir_lock(out: Path, is_main_process: bool):
    """One run per output folder: the main process holds ``<output_dir>/.gvbsm.lock`` (``filelock``)
    for the whole run; a second run fails at once, naming the holder's pid."""
    if not is_main_process:
        yield
        return
    lock = FileLock(str(out / LOCK_FILE))
    pid_file = out / (LOCK_FILE + ".pid")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = pid_file.read_text().strip() if pid_file.exists() else "unknown"
        raise OutputDirLockedError(f"{out} is in use by another gvbsm-hf run (pid {holder}): wait for it to finish, "
                                   "stop it, or use another `output_dir`. Two runs on one folder would overwrite each "
                                   "other's files.") from None
    try:
        pid_file.write_text(str(os.getpid()))
        yield
    finally:
        pid_file.unlink(missing_ok=True)
        lock.release()


def check_process_count(launched: int, expected: int | None, logger) -> None:
    """``num_processes`` set and different from what was launched: stop. ``accelerate launch --cpu
    --num_processes N`` starts ONE process (it sets MASTER_ADDR but no WORLD_SIZE): say how to get N."""
    hint = ("On CPU, `accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml ...` (or "
            "`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ...`, or `torchrun "
            "--nproc_per_node 2 ...`) starts two.")
    if expected is not None and launched != expected:
        raise GVBSMError(f"num_processes: {expected} but the launcher started {launched} process(es). {hint}")
    if launched == 1 and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        logger.warning(f"A multi-process launch was requested but ONE process runs (accelerate's simple launcher). {hint}")


def is_disk_full(err: BaseException) -> bool:
    text = str(err)
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in text or "unexpected pos" in text


def disk_full_error(stage: str, out: Path, err: BaseException):
    return GVBSMError(f"The disk filled up during the {stage} stage ({err}). Nothing computed so far is lost: finished "
                      f"stages and checkpoints are in {out} (stages.json lists them; files are written atomically). "
                      "Free some space and rerun the same command: it resumes where it stopped.")


# ------------------------------------------------------------------------------ checks before compute


def check_push_access(publish: PublishArguments) -> None:
    """When the recipe pushes (``push_dataset``, ``teacher_repo_prefix``), check before any compute
    that the Hub can be reached and the token can write; offline (``HF_HUB_OFFLINE``) this fails at
    once instead of after the whole run."""
    asked = [f for f, on in (("push_dataset: true", publish.push_dataset),
                             (f"teacher_repo_prefix: {publish.teacher_repo_prefix}", publish.teacher_repo_prefix)) if on]
    if not asked:
        return
    what = f"The recipe pushes to the Hugging Face Hub ({', '.join(asked)})"
    fix = ("run where the Hub is reachable, or drop `push_dataset` / `teacher_repo_prefix` from the recipe: the export "
           "folder can be pushed later with `hf upload`.")
    hub_utils.require_online(f"{what} but the Hub cannot be used", fix)
    try:
        info = HfApi().whoami()
    except hub_utils.network_errors() as err:
        raise hub_utils.offline_error(f"{what} but the Hub cannot be used", f"{type(err).__name__}: {err}", fix) from None
    except (LocalTokenNotFoundError, HfHubHTTPError) as err:
        raise GVBSMError(f"{what} but no valid Hugging Face token was found ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}): log in with `hf auth login` (or set HF_TOKEN) "
                         "with a token that can write, or drop the push from the recipe.") from None
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise GVBSMError(f"{what} but the Hugging Face token of {info.get('name', 'this user')!r} is read-only: log in "
                         "with a token that can write (`hf auth login`, or HF_TOKEN), or drop the push from the recipe.")


def needs_real_images(name: str, recipe: Recipe) -> bool:
    """Whether method ``name`` of the run takes ``ipc`` real train images per class: a selection
    method (random_real, rded) or a real-image initialisation (``syn_init: real`` / ``rded``)."""
    config = method_config(name, recipe.synthesis, baseline=name != recipe.synthesis.syn_method)
    return not get_method(name).optimised or get_init(config.syn_init).needs_real


def check_ipc(recipe: Recipe, train: Any, class_names: Sequence[str], logger) -> None:
    """``ipc`` against the train split's class sizes (known once the data is loaded, before squeeze):
    a method that takes ``ipc`` real images per class is refused, naming the classes and their
    counts; a method that synthesises from noise is only warned. A streamed split is not counted."""
    if isinstance(train, datasets.IterableDataset):
        return
    ipc = int(recipe.synthesis.ipc)
    labels = np.asarray(train.with_format("arrow")["label"].to_numpy(), dtype=np.int64)
    counts = np.bincount(labels, minlength=len(class_names))
    short = [(c, int(n)) for c, n in enumerate(counts) if n < ipc]
    if not short:
        return
    shown = ", ".join(f"class {class_names[c]!r} has {n}" for c, n in short[:5]) + (
        f" (and {len(short) - 5} more classes)" if len(short) > 5 else "")
    methods = [recipe.synthesis.syn_method] + [b for b in recipe.pipeline.baselines if b != recipe.synthesis.syn_method]
    real = [m for m in methods if needs_real_images(m, recipe)]
    fewest = min(n for _, n in short)
    if real:
        raise DataValidationError(
            f"ipc={ipc} but the train split has fewer images in {len(short)} class(es): {shown}. {' and '.join(real)} "
            f"need{'s' if len(real) == 1 else ''} {ipc} real images of every class (a selection, or real-image "
            f"initialisation). Lower `ipc:` (--ipc) to at most "
            f"{fewest}, use more training images (`max_train_samples:`), or drop them (`baselines:` / --baselines "
            "none, `syn_init: noise`).")
    logger.warning(f"ipc={ipc} is more than the train split holds in {len(short)} class(es) ({shown}): the synthetic "
                   f"set will have more images of those classes than the real data.")


def read_json_file(path: Path, what: str, fix: str) -> Any:
    """The JSON in ``path``; a file that does not parse (cut short, emptied by a full disk) is named with ``fix``."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise GVBSMError(f"{path} ({what}) is damaged or incomplete ({type(err).__name__}: {err}): {fix}") from None


def open_stage_cache(out: Path, redo: Sequence[str], recipe: Recipe, accelerator: Accelerator) -> StageCache:
    """The run's :class:`StageCache`; a damaged ``stages.json`` is named with its fix, and set aside
    (``stages.json.damaged``) when ``--redo squeeze`` recomputes every stage anyway."""
    path = out / "stages.json"
    problem = check_stages_file(out, redo)
    accelerator.wait_for_everyone()  # every process has looked at it before the main one moves it
    if problem and accelerator.is_main_process:
        path.replace(path.with_name(path.name + ".damaged"))
    accelerator.wait_for_everyone()
    return StageCache(out, redo, recipe)


def check_results_file(out: Path, cache: StageCache) -> None:
    """``evaluate/results.json`` is read unless evaluate is recomputed: a damaged one is named with its fix."""
    path = out / "evaluate" / "results.json"
    if path.exists() and not cache.redo_requested("evaluate"):
        read_json_file(path, "the evaluation results", "rerun with `--redo evaluate` (finished student runs are "
                       "reused from their run_result.json).")


def repair_damaged_run_files(folder: Path, logger) -> list[Path]:
    """JSON files of the student runs (``<method>/<labels>/<student>/seed<N>/*.json``) that do not
    parse, e.g. the empty ``all_results.json`` a full disk leaves in ``Trainer.save_metrics``: each
    is named in a warning and deleted, so the rerun recomputes what it held (a run without a valid
    ``run_result.json`` is retrained) instead of failing to read it."""
    damaged = []
    for path in sorted(folder.glob("**/seed*/*.json")) if folder.is_dir() else []:
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            damaged.append(path)
    for path in damaged:
        logger.warning(f"{path} is damaged or incomplete (a full disk or a kill while it was written): deleting it; "
                       f"the run in {path.parent} is recomputed unless its run_result.json is whole.")
        path.unlink()
    return damaged
