"""Evaluate stage: fresh students on every synthetic set under one protocol (docs/method.md Eq. 11),
LAST-epoch top-1 on the real validation split, one row per (method, labels, student) in
``evaluate/results.json``, rewritten after every seed (a killed run keeps its finished seeds and
resumes the unfinished one from its Trainer checkpoint when ``save_strategy`` is set)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..stage import Stage, StageContext, method_folder
from ..utils import write_json_atomic
from . import runs

PROTOCOL = "last epoch, mean ± std over seeds"


def summarise(method: str, label_mode: str, student: str, ipc: int, per_seed: list[dict]) -> dict[str, Any]:
    """One results row from the per-seed runs of (method, labels, student)."""
    top1 = [float(run["top1"]) for run in per_seed]
    stats = runs.summarise_top1(top1)
    return {"method": method, "labels": label_mode, "evaluator": student, "ipc": ipc, **stats,
            "protocol": PROTOCOL, "seeds": [int(run["seed"]) for run in per_seed], "per_seed": top1}


class EvaluateStage(Stage):
    name = "evaluate"
    depends_on = ("training", "pipeline.evaluate_hard_labels", "pipeline.hard_label_seeds")

    def path(self, ctx: StageContext) -> Path:
        return ctx.output_dir / "evaluate" / "results.json"

    def outputs(self, ctx: StageContext) -> list[Path]:
        return [self.path(ctx)]

    def load(self, ctx: StageContext) -> None:
        path = self.path(ctx)
        ctx.rows = json.loads(path.read_text()) if path.exists() and not ctx.cache.redo_requested(self.name) else []

    def run(self, ctx: StageContext) -> dict[str, Any]:
        self.load(ctx)
        r = ctx.recipe
        seeds = [int(s) for s in r.training.eval_seeds]
        students = list(r.training.eval_students or [r.training.student])
        label_modes = ["soft"] + (["hard"] if r.pipeline.evaluate_hard_labels else [])
        if r.relabel.relabel_mode == "on_the_fly" and ctx.main_method in ctx.stored:
            label_modes.append("stored_views")  # what the exported folder alone trains (bitwise, tested)
        for method, syn in ctx.synthetic.items():
            for label_mode in label_modes:
                if label_mode in ("hard", "stored_views") and method != ctx.main_method:
                    continue
                mode_seeds = [int(s) for s in r.pipeline.hard_label_seeds] if (
                    label_mode == "hard" and r.pipeline.hard_label_seeds) else seeds
                for student in students:
                    self._evaluate(ctx, method, syn, label_mode, student, mode_seeds)
        return {"rows": len(ctx.rows)}

    def _evaluate(self, ctx: StageContext, method: str, syn: Any, label_mode: str, student: str,
                  seeds: list[int]) -> None:
        r = ctx.recipe
        key = (method, label_mode, student)
        existing = next((row for row in ctx.rows if (row["method"], row["labels"], row["evaluator"]) == key), None)
        done = [] if existing is None else [{"student": student, "seed": s, "top1": t}
                                             for s, t in zip(existing["seeds"], existing["per_seed"]) if s in seeds]
        if {run["seed"] for run in done} >= set(seeds):
            return

        def on_run_done(run: dict) -> None:
            if run["student"] != student or any(x["seed"] == run["seed"] for x in done):
                return
            done.append({"student": student, "seed": int(run["seed"]), "top1": float(run["top1"])})
            row = summarise(method, label_mode, student, r.synthesis.ipc, sorted(done, key=lambda x: seeds.index(x["seed"])))
            ctx.rows[:] = [x for x in ctx.rows if (x["method"], x["labels"], x["evaluator"]) != key] + [row]
            if ctx.accelerator.is_main_process:
                write_json_atomic(self.path(ctx), ctx.rows)

        targs = dataclasses.replace(
            r.training, output_dir=str(ctx.output_dir / "evaluate" / method_folder(method) / label_mode),
            loss_type="ce" if label_mode == "hard" else r.training.loss_type,
        )
        on_the_fly = label_mode == "soft" and r.relabel.relabel_mode == "on_the_fly"
        use_stored = label_mode == "stored_views" or (label_mode == "soft" and r.relabel.relabel_mode == "stored")
        runs.evaluate_students(
            syn.shipped_images(ctx.spec), syn.labels, ctx.real("validation"), ctx.spec, targs, students=[student],
            seeds=seeds, soft_labeler=ctx.ensemble if on_the_fly else None,
            stored=ctx.stored.get(method) if use_stored else None,
            completed=list(done), on_run_done=on_run_done,
            reuse_saved_runs=self.name not in r.pipeline.redo,  # a run is reused only if its settings and data match
        )
