"""Squeeze stage: train each named teacher backbone, or load a given folder / Hub id (docs/method.md "Stages")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from ..errors import GVBSMError
from ..fingerprint import NON_RESULT_FIELDS, config_fingerprint, config_to_dict
from ..teacher import TeacherModel, load_teacher
from ..utils import runtime_provenance, write_json_atomic
from .engine import train_teacher
from .config import is_teacher_reference, teacher_starts_pretrained, untrained_teachers_message
from ..stage import Stage, StageContext


def teacher_dir_name(name: str, index: int, names: Sequence[str]) -> str:
    base = name.replace("/", "--").replace(":", "-")
    return f"{base}-{index}" if list(names).count(name) > 1 else base


TEACHER_FINGERPRINT_FILE = "gvbsm_squeeze.json"


def teacher_fingerprint(ctx: StageContext, name: str) -> str:
    """What one trained teacher depends on: its backbone name, the data, the squeeze settings (not the
    list of the other teachers) and the seed. A teacher whose fingerprint is unchanged is kept when
    the recipe changes elsewhere (e.g. one teacher dropped from ``teachers``)."""
    r = ctx.recipe
    squeeze = {k: v for k, v in config_to_dict(r.squeeze, NON_RESULT_FIELDS).items() if k != "teachers"}
    return config_fingerprint(name, config_to_dict(r.data, NON_RESULT_FIELDS), squeeze, r.training.seed)


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
        r, acc = ctx.recipe, ctx.accelerator
        names = list(r.squeeze.teachers)
        if not names:
            raise GVBSMError("The recipe lists no teachers: set `teachers: [convnet128, ...]`.")
        teachers, dirs = [], self.folders(ctx)
        redo = ctx.cache.redo_requested(self.name)
        explicit = self.name in r.pipeline.redo
        for i, (name, folder) in enumerate(zip(names, dirs)):
            marker = folder / TEACHER_FINGERPRINT_FILE
            unchanged = marker.exists() and json.loads(marker.read_text()).get("fingerprint") == teacher_fingerprint(ctx, name)
            if is_teacher_reference(name):
                ctx.logger.info(f"squeeze: loading teacher {name}")
                teacher = load_teacher(name)
            elif (folder / "model.safetensors").exists() and not (train and (explicit or (redo and not unchanged))):
                teacher = load_teacher(folder)
            elif not train:
                raise GVBSMError(f"Teacher {name!r} is not trained yet ({folder} has no model.safetensors): "
                                 "add `squeeze` to `stages`.")
            elif r.squeeze.teacher_epochs == 0:
                if not teacher_starts_pretrained(name, r.squeeze.teacher_pretrained):
                    raise GVBSMError(untrained_teachers_message([name], r.squeeze.teacher_pretrained))
                ctx.logger.info(f"squeeze: teacher {name}: pretrained weights, no training (teacher_epochs: 0)")
                teacher = TeacherModel.from_backbone(name, ctx.spec, pretrained=True)
                if acc.is_main_process:
                    teacher.save_pretrained(folder)
            else:
                pretrained = teacher_starts_pretrained(name, r.squeeze.teacher_pretrained)
                start = "from pretrained weights" if pretrained else "from scratch"
                ctx.logger.info(f"squeeze: training teacher {i + 1}/{len(names)}: {name} ({start})")
                if redo and folder.exists() and acc.is_main_process:
                    shutil.rmtree(folder)
                acc.wait_for_everyone()
                teacher = train_teacher(name, ctx.real("train"), ctx.real("validation"), ctx.spec, r.squeeze,
                                        accelerator=acc, output_dir=folder, pretrained=pretrained)
            if train and not is_teacher_reference(name) and acc.is_main_process:
                write_json_atomic(marker, {"fingerprint": teacher_fingerprint(ctx, name),
                                           "runtime": runtime_provenance(acc.num_processes)})
            if hasattr(teacher, "check_spec"):
                teacher.check_spec(ctx.spec)
            teachers.append(teacher.eval())
        acc.wait_for_everyone()
        ctx.teachers, ctx.teacher_dirs = teachers, dirs
