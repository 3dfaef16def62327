"""Record stage: one gradient-free pass of every teacher over real data, storing the global Conv
statistics (docs/method.md Eq. 9) as ``statistics/<teacher>.safetensors`` with provenance."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


from ..data import class_balanced_subset, image_batches
from ..errors import StatisticsMismatchError
from ..fingerprint import config_fingerprint
from ..methods import get_method, method_config
from ..stage import Stage, StageContext
from ..teacher import TeacherModel
from ..utils import runtime_provenance
from .compatibility import stats_augment_kind
from .engine import record_statistics
from .statistics_file import TeacherStatistics, load_statistics, save_statistics


def needs_statistics(ctx: StageContext) -> bool:
    """Whether any method of the run (main or baseline) matches Conv, per-class or per-instance statistics."""
    r = ctx.recipe
    configs = [method_config(m, r.synthesis, baseline=m != ctx.main_method) for m in ctx.methods]
    return any(get_method(c.syn_method).optimised and (c.uses_conv() or c.uses_class_stats() or c.uses_instance_stats())
               for c in configs)


class RecordStage(Stage):
    name = "record"
    depends_on = ("stats", "synthesis.syn_augment", "synthesis.syn_crop_scale", "training.seed")

    def path(self, ctx: StageContext, folder: Path) -> Path:
        return ctx.output_dir / "statistics" / f"{folder.name}.safetensors"

    def outputs(self, ctx: StageContext) -> list[Path]:
        return [self.path(ctx, f) for f in ctx.teacher_dirs] if needs_statistics(ctx) else []

    def load(self, ctx: StageContext) -> None:
        self._statistics(ctx, compute=False)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        self._statistics(ctx, compute=True)
        return {"files": sorted(str(p) for p in self.outputs(ctx))}

    def _cached(self, ctx: StageContext, teacher: TeacherModel, path: Path, augment: str) -> TeacherStatistics:
        """The file at ``path`` if recorded for this very teacher (weights fingerprint) with these
        settings; raises :class:`StatisticsMismatchError` otherwise."""
        s = ctx.recipe.stats
        return load_statistics(
            path, expect_fingerprint=teacher.fingerprint, expect_patch_size=s.stats_patch_size,
            expect_conv_target=s.stats_conv_target, expect_augment=augment,
            expect_patch_mode=s.stats_patch_mode, expect_per_class=s.stats_per_class,
            expect_per_instance=s.stats_instance,
        )

    def _record(self, ctx: StageContext, teacher: TeacherModel, folder: Path, split, augment: str) -> TeacherStatistics:
        """One recording pass of ``teacher`` over ``split`` (this process's shard)."""
        r, acc = ctx.recipe, ctx.accelerator
        # ImageNet scale, authors' train transform: RandomResizedCrop of the ORIGINAL image in the loader
        # workers (docs/differences.md row 2); otherwise the decoded batch is augmented on the device
        loader_view = augment == "authors" and getattr(ctx.spec, "train_view", None) == "random_resized_crop"
        crop_scale = tuple(r.synthesis.syn_crop_scale)
        view = dict(view="train", seed=r.training.seed, crop_scale=crop_scale) if loader_view else {}
        batches = image_batches(split, ctx.spec, r.stats.stats_batch_size, process_index=acc.process_index,
                                num_processes=acc.num_processes, num_workers=r.data.dataloader_workers, **view)
        stats = record_statistics(
            teacher, batches, ctx.spec, dataclasses.replace(r.stats, stats_augment="none" if loader_view else augment),
            accelerator=acc, seed=r.training.seed, crop_scale=crop_scale, teacher_name=folder.name,
            total_batches=None if r.data.streaming else -(-len(split) // r.stats.stats_batch_size),
        )
        if loader_view:  # the family the synthesis checks against (the pixels were cropped in the loader)
            stats.provenance.update(augment=augment, train_view="random_resized_crop",
                                    crop_scale=json.dumps([float(c) for c in crop_scale]))
        return stats

    def _statistics(self, ctx: StageContext, compute: bool) -> None:
        r, acc = ctx.recipe, ctx.accelerator
        ctx.statistics = [None] * len(ctx.teachers)
        if not needs_statistics(ctx):
            return
        split = class_balanced_subset(ctx.dataset["train"], r.stats.stats_max_samples, r.training.seed) if compute else None
        redo = compute and ctx.cache.redo_requested(self.name)
        explicit = compute and self.name in r.pipeline.redo
        augment = stats_augment_kind(r.stats, r.synthesis.syn_augment)
        record_fp = config_fingerprint(self.config(r))
        for i, (teacher, folder) in enumerate(zip(ctx.teachers, ctx.teacher_dirs)):
            path = self.path(ctx, folder)
            if path.exists() and not explicit:
                try:
                    stats = self._cached(ctx, teacher, path, augment)
                    if not redo or stats.provenance.get("record_fingerprint") == record_fp:
                        ctx.statistics[i] = stats
                        continue
                except StatisticsMismatchError:
                    if not compute:
                        raise
            if split is None:  # not selected: recover says what is missing
                continue
            ctx.statistics[i] = self._record(ctx, teacher, folder, split, augment)
            ctx.statistics[i].provenance.update(record_fingerprint=record_fp, **runtime_provenance(acc.num_processes))
            if acc.is_main_process:
                save_statistics(ctx.statistics[i], path)
        acc.wait_for_everyone()
