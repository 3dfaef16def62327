"""Export stage: the main method's set as a Hub-ready ``datasets`` folder (parquet configs +
dataset card + grid) in ``export/<name>/``, optionally pushed with the teachers (model repos)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import GVBSMError
from ..recipe import recipe_defaults, recipe_to_dict
from ..stage import Stage, StageContext, method_folder
from .engine import export_distilled_dataset
from .layout import CARD_FILE
from .push import push_distilled_dataset, push_teacher


def dataset_name(ctx: StageContext) -> str:
    r = ctx.recipe
    return r.publish.dataset_repo_id or (
        f"{ctx.spec.name.replace('_', '-')}-{method_folder(r.synthesis.syn_method).replace('_', '-')}-ipc{r.synthesis.ipc}")


def teacher_repo_ids(ctx: StageContext) -> list[str]:
    """Hub ids of the teachers as pushed with ``teacher_repo_prefix`` (empty when not pushed)."""
    prefix = ctx.recipe.publish.teacher_repo_prefix
    return [f"{prefix}-{p.name}" for p in ctx.teacher_dirs] if prefix else []


class ExportStage(Stage):
    name = "export"
    depends_on = ("publish",)

    def folder(self, ctx: StageContext) -> Path:
        return ctx.output_dir / "export" / dataset_name(ctx).split("/")[-1]

    def outputs(self, ctx: StageContext) -> list[Path]:
        return [self.folder(ctx) / CARD_FILE]

    def load(self, ctx: StageContext) -> None:
        folder = self.folder(ctx)
        if (folder / CARD_FILE).exists():
            ctx.summary.update(dataset_folder=str(folder), card=str(folder / CARD_FILE))

    def run(self, ctx: StageContext) -> dict[str, Any]:
        r, acc = ctx.recipe, ctx.accelerator
        main = ctx.synthetic.get(ctx.main_method)
        if main is None:
            raise GVBSMError(f"export needs the {ctx.main_method!r} synthetic set: add `recover` to `stages`.")
        folder = self.folder(ctx)
        defaults = recipe_defaults()  # on every process: building them touches accelerate's shared state
        if acc.is_main_process:  # temporary folders of an export that was killed half-way
            for stale in folder.parent.glob(f".{folder.name}.tmp-*") if folder.parent.exists() else []:
                shutil.rmtree(stale, ignore_errors=True)
        grid = ctx.output_dir / "recover" / method_folder(ctx.main_method) / "grid.png"
        if acc.is_main_process:
            with torch.no_grad():
                ctx.ensemble.to(acc.device)
                soft = torch.cat([ctx.ensemble(b.to(acc.device)).float().cpu() for b in main.shipped_images(ctx.spec).split(256)])
            present = [s for s in ctx.statistics if s is not None]
            views = ctx.stored[ctx.main_method].to_dataset() if ctx.main_method in ctx.stored else None
            repos = teacher_repo_ids(ctx)
            export_distilled_dataset(
                folder, images=main.uint8_images(ctx.spec), labels=main.labels, spec=ctx.spec, soft_logits=soft,
                slot_metadata={"slot": main.slots.tolist(), "job": main.jobs.tolist()}, stored_views=views,
                statistics=present or None, method=recipe_to_dict(r),
                results=list(ctx.rows), teacher_repos=repos or None,
                teacher_names=[p.name for p in ctx.teacher_dirs],
                grid_path=grid if grid.exists() else None, repo_id=r.publish.dataset_repo_id,
                source_dataset=ctx.spec.source or ctx.spec.name, license=r.publish.dataset_license or ctx.spec.license,
                health=ctx.health.get(ctx.main_method), defaults=defaults,
            )
            ctx.summary.update(dataset_folder=str(folder), card=str(folder / CARD_FILE), grid=str(grid))
            if r.publish.push_dataset:
                ctx.summary["dataset_url"] = push_distilled_dataset(folder, r.publish.dataset_repo_id)
            if r.publish.teacher_repo_prefix:
                ctx.summary["teacher_urls"] = [push_teacher(p, repo) for p, repo in zip(ctx.teacher_dirs, repos)]
        acc.wait_for_everyone()
        return {"folder": str(folder)}
