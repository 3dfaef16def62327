"""Relabel stage: the teacher ensemble (docs/method.md Eq. 8), and in ``relabel_mode: stored`` the
stored views + soft labels of every synthetic set (``relabel/<method>/soft_labels.safetensors``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..stage import Stage, StageContext, method_folder
from .engine import build_ensemble, relabel_stored, stored_view_count
from .store import LEGACY_FILES, STORED_LABELS_FILE, StoredSoftLabels
from .views import ViewSampling


class RelabelStage(Stage):
    name = "relabel"
    depends_on = ("relabel", "training.student_crop_scale", "training.num_train_epochs", "training.cutmix_prob")

    def folder(self, ctx: StageContext, method: str) -> Path:
        return ctx.output_dir / "relabel" / method_folder(method)

    def outputs(self, ctx: StageContext) -> list[Path]:
        return [self.folder(ctx, m) / STORED_LABELS_FILE for m in self.methods(ctx)]

    def _ensemble(self, ctx: StageContext) -> None:
        r = ctx.recipe
        ctx.ensemble = build_ensemble(ctx.teachers, r.squeeze.teachers, r.relabel,
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
        self._ensemble(ctx)
        r = ctx.recipe
        num_views = stored_view_count(r.relabel, r.training.num_train_epochs)
        args = dataclasses.replace(r.relabel, relabel_num_views=num_views)
        sampling = ViewSampling(out_size=ctx.spec.image_size, crop_scale=tuple(r.training.student_crop_scale),
                                cutmix_prob=float(r.training.cutmix_prob))
        redo = compute and ctx.cache.redo_requested(self.name)
        for method in self.methods(ctx):
            folder = self.folder(ctx, method)
            # the file is written atomically: present means complete; an earlier version's parquet
            # files are recomputed when the stage runs and named with `--redo relabel` when it is only loaded
            legacy = not compute and (folder / LEGACY_FILES[0]).exists()
            if not redo and ((folder / STORED_LABELS_FILE).exists() or legacy):
                ctx.stored[method] = StoredSoftLabels.load(folder)
                continue
            if not compute:
                continue
            images = ctx.synthetic[method].shipped_images(ctx.spec)
            ctx.stored[method] = relabel_stored(images, ctx.ensemble, args, sampling, accelerator=ctx.accelerator)
            if ctx.accelerator.is_main_process:
                ctx.stored[method].save(folder)
