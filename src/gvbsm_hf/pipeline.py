"""Stage orchestration for ``recipes/distill.py``: squeeze -> record -> recover -> relabel ->
evaluate -> export (``gvbsm_hf.<stage>.stage``, one module each), every stage cached in
``output_dir`` and skipped when done.

Layout of ``output_dir``::

    recipe.json                         the whole recipe (gvbsm_hf.recipe.recipe_to_dict)
    data_spec.json                      dataset spec (resolution, channels, mean/std, classes)
    teachers/<name>/                    Hub-ready teacher folders (safetensors, config, card)
    statistics/<name>.safetensors       Conv statistics per teacher (docs/method.md Eq. 9) with provenance
    recover/<method>/synthetic.safetensors  synthetic images (+ dataset/, grid.png; jobs/ checkpoints)
    relabel/<method>/                   stored soft labels (parquet), relabel_mode=stored only
    evaluate/results.json               one row per (method, labels, student), last epoch, per seed
    export/<dataset-name>/              Hub-ready dataset folder (parquet + card + grid)
    stages.json                         which stages are done, with the fingerprint of their recipe values
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState
from filelock import FileLock, Timeout

from .data import get_dataset_spec, load_image_dataset
from .errors import GVBSMError
from .pipeline_config import STAGES
from .recipe import Recipe, load_recipe_yaml, parse_recipe, recipe_parser, recipe_to_dict
from .stage import StageContext
from .stage_cache import StageCache
from .stages import STAGE_REGISTRY, stage_configs, stage_fingerprints
from .utils import runtime_provenance, seed_everything, write_json_atomic

__all__ = [
    "STAGES", "Recipe", "StageCache", "format_results_table", "load_recipe_yaml", "parse_recipe", "recipe_parser",
    "recipe_to_dict", "run_pipeline", "stage_configs", "stage_fingerprints",
]


def run_pipeline(recipe: Recipe) -> dict[str, Any]:
    """Run the stages of ``recipe.pipeline.stages`` in order (docs/method.md "Stages"); a stage not
    selected only loads what it has on disk. Returns a summary: results rows, and the paths of the
    dataset folder, card and grid.

    Before any data is loaded: the output folder is checked (a file, read-only, not creatable) and
    locked (a second run on it stops at once, naming the holder's pid), and the launched process
    count is checked against ``num_processes``. A full disk inside a stage stops with a message
    naming the stage; every finished artefact is kept (files are written atomically)."""
    logger = get_logger("gvbsm_hf.pipeline")
    r = recipe
    if r.pipeline.num_threads:
        torch.set_num_threads(int(r.pipeline.num_threads))
    out = Path(r.training.output_dir)
    check_output_dir(out)
    report_to = [t for t in (r.training.report_to or []) if t not in ("none", "all")] if isinstance(r.training.report_to, list) else []

    def make_accelerator() -> Accelerator:
        return Accelerator(cpu=bool(r.training.use_cpu), log_with=report_to or None, project_dir=str(out))

    accelerator = make_accelerator()
    check_process_count(accelerator.num_processes, r.pipeline.num_processes, logger)
    with output_dir_lock(out, accelerator.is_main_process):
        if report_to:
            accelerator.init_trackers("gvbsm", config=recipe_to_dict(r))
        cache = StageCache(out, r.pipeline.redo, recipe)
        if cache.changed:
            logger.warning(cache.describe_changes())
        unused = sorted(set(r.synthesis.method_args) - {r.synthesis.syn_method})
        if unused:
            logger.info(f"method_args of {unused} kept and unused: syn_method is {r.synthesis.syn_method!r} and "
                        "baselines use their own defaults")
        seed_everything(r.training.seed)
        if accelerator.is_main_process:
            write_json_atomic(out / "recipe.json", recipe_to_dict(r) | {"runtime": runtime_provenance(accelerator.num_processes)})

        d = r.data
        dataset = load_image_dataset(
            d.dataset_name, config_name=d.dataset_config_name, image_column=d.image_column, label_column=d.label_column,
            train_split=d.train_split, validation_split=d.validation_split, streaming=d.streaming,
            max_train_samples=d.max_train_samples, max_eval_samples=d.max_eval_samples, seed=r.training.seed,
            image_size=d.image_size, channels=d.channels,
        )
        spec = get_dataset_spec(dataset, d.dataset_name, image_size=d.image_size, channels=d.channels)
        if accelerator.is_main_process:
            write_json_atomic(out / "data_spec.json", spec.to_dict())
        logger.info(f"data: {spec.name}: {spec.num_classes} classes, {spec.channels}x{spec.image_size}px")

        ctx = StageContext(recipe=r, accelerator=accelerator, output_dir=out, cache=cache, dataset=dataset, spec=spec,
                           logger=logger)
        selected = set(r.pipeline.stages)
        for name, stage in STAGE_REGISTRY.items():
            if name not in selected:
                stage.load(ctx)
                continue
            if accelerator.is_main_process:
                cache.start(name)
            try:
                info = stage.run(ctx)
            except Exception as err:
                if is_disk_full(err):
                    raise disk_full_error(name, out, err) from err
                raise
            if not AcceleratorState._shared_state:
                # building a transformers.TrainingArguments resets accelerate's shared state (a Trainer
                # then re-creates it); a stage that built arguments but trained nothing (every seed
                # cached) leaves it empty for the stages after it
                accelerator = ctx.accelerator = make_accelerator()
            cache.mark(name, **info, runtime=runtime_provenance(accelerator.num_processes))
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return {"results": ctx.rows, "output_dir": str(out), **ctx.summary}


LOCK_FILE = ".gvbsm.lock"


def check_output_dir(out: Path) -> None:
    """The output folder must be a creatable, writable folder; say which path and what to do."""
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
        raise GVBSMError(f"{out} is in use by another gvbsm-hf run (pid {holder}): wait for it to finish, stop it, or "
                         "use another `output_dir`. Two runs on one folder would overwrite each other's files.") from None
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


def dataclasses_replace(obj, **changes):
    """``dataclasses.replace`` that also works for ``TrainingArguments`` (re-runs __post_init__)."""
    import dataclasses

    return dataclasses.replace(obj, **changes)


def format_results_table(rows: Sequence[dict[str, Any]], random_method: str = "random_real") -> str:
    """Markdown table of evaluation rows (method, labels, evaluator, IPC, top-1 mean ± std) with the margin over
    the random real subset: the row's mean minus the ``random_method`` row's mean over the seeds both have, same
    evaluator; hard-label rows against the random subset's hard-label row, the others against its soft row
    (docs/method.md "Scores")."""
    randoms = {(r["labels"], r["evaluator"]): r for r in rows if r["method"] == random_method}
    lines = ["| method | labels | evaluator | IPC | top-1 % (last epoch) | vs random subset | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        rnd = randoms.get(("hard" if row["labels"] == "hard" else "soft", row["evaluator"]))
        margin = ""
        if rnd is not None and row["method"] != random_method:
            mine, theirs = dict(zip(row["seeds"], row["per_seed"])), dict(zip(rnd["seeds"], rnd["per_seed"]))
            common = [s for s in mine if s in theirs]
            if common:
                margin = f"{sum(mine[s] - theirs[s] for s in common) / len(common):+.2f}"
        lines.append(f"| {row['method']} | {row['labels']} | {row['evaluator']} | {row['ipc']} | "
                     f"{row['mean']:.2f} ± {row['std']:.2f} | {margin} | {row['n']} |")
    return "\n".join(lines)
