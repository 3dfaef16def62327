"""Stage orchestration for ``recipes/distill.py``: squeeze -> record -> recover -> relabel ->
evaluate -> export (:mod:`gvbsm_hf.stages`, one module each), every stage cached in
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

import json
from pathlib import Path
from typing import Any, Sequence

from .configs import STAGES
from .recipe import Recipe, load_recipe_yaml, parse_recipe, recipe_parser, recipe_to_dict
from .stages import STAGE_REGISTRY, StageCache, StageContext, stage_configs, stage_fingerprints

__all__ = [
    "STAGES", "Recipe", "StageCache", "format_results_table", "load_recipe_yaml", "parse_recipe", "recipe_parser",
    "recipe_to_dict", "run_pipeline", "stage_configs", "stage_fingerprints",
]


def run_pipeline(recipe: Recipe) -> dict[str, Any]:
    """Run the stages of ``recipe.pipeline.stages`` in order (docs/method.md "Stages"); a stage not
    selected only loads what it has on disk. Returns a summary: results rows, and the paths of the
    dataset folder, card and grid."""
    from accelerate import Accelerator
    from accelerate.logging import get_logger

    from .data import get_dataset_spec, load_image_dataset
    from .utils import seed_everything

    logger = get_logger("gvbsm_hf.pipeline")
    r = recipe
    out = Path(r.training.output_dir)
    report_to = [t for t in (r.training.report_to or []) if t not in ("none", "all")] if isinstance(r.training.report_to, list) else []
    accelerator = Accelerator(cpu=bool(r.training.use_cpu), log_with=report_to or None, project_dir=str(out))
    if report_to:
        accelerator.init_trackers("gvbsm", config=recipe_to_dict(r))
    out.mkdir(parents=True, exist_ok=True)
    cache = StageCache(out, r.pipeline.redo, recipe)
    if cache.changed:
        logger.warning(cache.describe_changes())
    seed_everything(r.training.seed)
    if accelerator.is_main_process:
        (out / "recipe.json").write_text(json.dumps(recipe_to_dict(r), indent=2))

    d = r.data
    dataset = load_image_dataset(
        d.dataset_name, config_name=d.dataset_config_name, image_column=d.image_column, label_column=d.label_column,
        train_split=d.train_split, validation_split=d.validation_split, streaming=d.streaming,
        max_train_samples=d.max_train_samples, max_eval_samples=d.max_eval_samples, seed=r.training.seed,
    )
    spec = get_dataset_spec(dataset, d.dataset_name)
    if accelerator.is_main_process:
        (out / "data_spec.json").write_text(json.dumps(spec.to_dict(), indent=2))
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
        info = stage.run(ctx)
        cache.mark(name, **info)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"results": ctx.rows, "output_dir": str(out), **ctx.summary}


def dataclasses_replace(obj, **changes):
    """``dataclasses.replace`` that also works for ``TrainingArguments`` (re-runs __post_init__)."""
    import dataclasses

    return dataclasses.replace(obj, **changes)


def format_results_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of evaluation rows (method, labels, evaluator, IPC, top-1 mean ± std)."""
    lines = ["| method | labels | evaluator | IPC | top-1 % (last epoch) | seeds |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['labels']} | {row['evaluator']} | {row['ipc']} | "
                     f"{row['mean']:.2f} ± {row['std']:.2f} | {row['n']} |")
    return "\n".join(lines)
