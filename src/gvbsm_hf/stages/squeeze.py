"""Squeeze stage: train each named teacher backbone, or load a given folder / Hub id (docs/method.md "Stages")."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from ..errors import GVBSMError
from .base import Stage, StageContext


def is_teacher_reference(name: str) -> bool:
    """A teacher given as a folder or Hub model id (loaded) rather than a backbone name (trained)."""
    if os.path.isdir(name):
        return True
    if name.startswith(("hf-hub:", "tv:", "timm:")):
        return False
    from ..hub_utils import is_hub_repo_id

    return is_hub_repo_id(name)


def teacher_dir_name(name: str, index: int, names: Sequence[str]) -> str:
    base = name.replace("/", "--").replace(":", "-")
    return f"{base}-{index}" if list(names).count(name) > 1 else base


class SqueezeStage(Stage):
    """Teachers -> ``teachers/<name>/`` (Hub-ready folders: safetensors, config, card)."""

    name = "squeeze"
    depends_on = ("data", "squeeze", "training.seed")

    def folders(self, ctx: StageContext) -> list[Path]:
        names = list(ctx.recipe.squeeze.teachers)
        return [ctx.output_dir / "teachers" / teacher_dir_name(n, i, names) for i, n in enumerate(names)]

    def outputs(self, ctx: StageContext) -> list[Path]:
        return [f / "model.safetensors" for n, f in zip(ctx.recipe.squeeze.teachers, self.folders(ctx))
                if not is_teacher_reference(n)]

    def load(self, ctx: StageContext) -> None:
        self._teachers(ctx, train=False)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        self._teachers(ctx, train=True)
        return {"teachers": [str(p) for p in ctx.teacher_dirs]}

    def _teachers(self, ctx: StageContext, train: bool) -> None:
        """Train (``train``) or load every teacher; the real splits are decoded only when a
        teacher is actually trained."""
        from ..squeeze import train_teacher
        from ..teacher import TeacherModel, load_teacher

        r, acc = ctx.recipe, ctx.accelerator
        names = list(r.squeeze.teachers)
        if not names:
            raise GVBSMError("The recipe lists no teachers: set `teachers: [convnet128, ...]`.")
        teachers, dirs = [], self.folders(ctx)
        redo = ctx.cache.redo_requested(self.name)
        for i, (name, folder) in enumerate(zip(names, dirs)):
            if is_teacher_reference(name):
                ctx.logger.info(f"squeeze: loading teacher {name}")
                teacher = load_teacher(name)
            elif (folder / "model.safetensors").exists() and not (redo and train):
                teacher = load_teacher(folder)
            elif not train:
                raise GVBSMError(f"Teacher {name!r} is not trained yet ({folder} has no model.safetensors): "
                                 "add `squeeze` to `stages`.")
            elif r.squeeze.teacher_epochs == 0:
                if not r.squeeze.teacher_pretrained:
                    raise GVBSMError(
                        f"teacher_epochs: 0 with teacher_pretrained: false would use an untrained {name}; "
                        "set teacher_epochs >= 1 or teacher_pretrained: true."
                    )
                teacher = TeacherModel.from_backbone(name, ctx.spec, pretrained=True)
                if acc.is_main_process:
                    teacher.save_pretrained(folder)
            else:
                ctx.logger.info(f"squeeze: training teacher {i + 1}/{len(names)}: {name}")
                if redo and folder.exists() and acc.is_main_process:
                    shutil.rmtree(folder)
                acc.wait_for_everyone()
                teacher = train_teacher(name, ctx.real("train"), ctx.real("validation"), ctx.spec, r.squeeze,
                                        accelerator=acc, output_dir=folder)
            if hasattr(teacher, "check_spec"):
                teacher.check_spec(ctx.spec)
            teachers.append(teacher.eval())
        acc.wait_for_everyone()
        ctx.teachers, ctx.teacher_dirs = teachers, dirs
