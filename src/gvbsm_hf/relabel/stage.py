"""Relabel stage: the teacher ensemble (docs/method.md Eq. 8), and in ``relabel_mode: stored`` the
stored views + soft labels of every synthetic set (``relabel/<method>/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..stage import Stage, StageContext, method_folder
from ..recover.stage import teacher_subset


class RelabelStage(Stage):
    name = "relabel"
    depends_on = ("relabel", "training.student_crop_scale", "training.num_train_epochs", "training.cutmix_prob")

    def folder(self, ctx: StageContext, method: str) -> Path:
        return ctx.output_dir / "relabel" / method_folder(method)

    def outputs(self, ctx: StageContext) -> list[Path]:
        from .engine import STORED_META_FILE

        return [self.folder(ctx, m) / STORED_META_FILE for m in self.methods(ctx)]

    def _ensemble(self, ctx: StageContext) -> None:
        from ..ensemble import TeacherEnsemble

        r = ctx.recipe
        teachers = [ctx.teachers[i] for i in teacher_subset(r.squeeze.teachers, r.relabel.relabel_teachers)]
        ctx.ensemble = TeacherEnsemble(teachers, logit_norm=r.relabel.relabel_logit_norm,
                                       mixed_precision=r.synthesis.syn_mixed_precision)

    def load(self, ctx: StageContext) -> None:
        self._labels(ctx, compute=False)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        self._labels(ctx, compute=True)
        return {"mode": ctx.recipe.relabel.relabel_mode}

    def methods(self, ctx: StageContext) -> list[str]:
        """Sets whose views are stored: all in ``stored`` mode; in ``on_the_fly`` mode the main method's
        only (``relabel_export_views``), for the export and the evaluate stage's ``stored_views`` row."""
        r = ctx.recipe
        if r.relabel.relabel_mode == "stored":
            return list(ctx.synthetic)
        return [ctx.main_method] if r.relabel.relabel_export_views and ctx.main_method in ctx.synthetic else []

    def _labels(self, ctx: StageContext, compute: bool) -> None:
        import math

        from .engine import STORED_META_FILE, StoredSoftLabels, relabel_stored

        self._ensemble(ctx)
        r = ctx.recipe
        num_views = r.relabel.relabel_num_views or max(1, math.ceil(float(r.training.num_train_epochs)))
        redo = compute and ctx.cache.redo_requested(self.name)
        for method in self.methods(ctx):
            syn = ctx.synthetic[method]
            folder = self.folder(ctx, method)
            if (folder / STORED_META_FILE).exists() and not redo:  # written last
                ctx.stored[method] = StoredSoftLabels.load(folder)
                continue
            if not compute:
                continue
            ctx.stored[method] = relabel_stored(
                syn.shipped_images(ctx.spec), ctx.ensemble, num_views=num_views, out_size=ctx.spec.image_size,
                crop_scale=tuple(r.training.student_crop_scale), seed=r.relabel.relabel_seed,
                topk=r.relabel.relabel_topk, cutmix_prob=float(r.training.cutmix_prob), accelerator=ctx.accelerator,
            )
            if ctx.accelerator.is_main_process:
                ctx.stored[method].save(folder)
