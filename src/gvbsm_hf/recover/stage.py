"""Recover stage: every method of the run (main + baselines, registered in :mod:`gvbsm_hf.methods`)
synthesises or selects its set into ``recover/<method>/`` (docs/method.md "Recover")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


from ..data import class_balanced_indices, to_uint8_tensors
from ..errors import GVBSMError
from ..fingerprint import config_fingerprint
from ..methods import get_method, method_config
from ..stage import Stage, StageContext, method_folder, teacher_subset
from ..synthetic_set import SyntheticSet
from ..utils import write_json_atomic
from ..visualize import save_class_grid
from .engine import recover
from .health import DIAGNOSTIC_SEED, diagnostic_real_per_class, synthesis_diagnostics, synthesis_health


def random_real_rows(split, ipc: int, seed: int, spec):
    """Only the train rows a selection of ``ipc`` per class keeps (``class_balanced_indices(labels,
    n_per_class=ipc, seed)``), decoded in index order: selecting on them returns the same images in
    the same order as on the whole split, without decoding the whole split."""
    return to_uint8_tensors(split.select(class_balanced_indices(split["label"], n_per_class=ipc, seed=seed)), spec)


METHOD_FINGERPRINT_FILE = "gvbsm_recover.json"


class RecoverStage(Stage):
    name = "recover"
    depends_on = ("synthesis", "pipeline.baselines")

    def folder(self, ctx: StageContext, method: str) -> Path:
        return ctx.output_dir / "recover" / method_folder(method)

    def outputs(self, ctx: StageContext) -> list[Path]:
        return [self.folder(ctx, m) / "synthetic.safetensors" for m in ctx.methods]

    def load(self, ctx: StageContext) -> None:
        for method in ctx.methods:
            path = self.folder(ctx, method) / "synthetic.safetensors"
            if path.exists():
                ctx.synthetic[method] = SyntheticSet.load(path.parent)
            if (path.parent / "health.json").exists():
                ctx.health[method] = json.loads((path.parent / "health.json").read_text())

    def run(self, ctx: StageContext) -> dict[str, Any]:
        r, acc, spec = ctx.recipe, ctx.accelerator, ctx.spec
        redo = ctx.cache.redo_requested(self.name)
        explicit = self.name in r.pipeline.redo
        syn_idx = teacher_subset(r.squeeze.teachers, r.synthesis.syn_teachers)
        upstream = ctx.cache.fingerprints.get("record", "")  # data, teachers and statistics settings (chained)
        for method in ctx.methods:
            folder = self.folder(ctx, method)
            config = method_config(method, r.synthesis, baseline=method != ctx.main_method)
            # one method's set depends on its own config and on what came before, not on the other methods:
            # adding a baseline keeps the main method's images
            fingerprint = config_fingerprint(upstream, config.to_dict(), r.synthesis.syn_teachers)
            marker = folder / METHOD_FINGERPRINT_FILE
            unchanged = marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint
            if (folder / "synthetic.safetensors").exists() and not explicit and (not redo or unchanged):
                ctx.synthetic[method] = SyntheticSet.load(folder)
                continue
            if (explicit or (redo and not unchanged)) and folder.exists() and acc.is_main_process:
                shutil.rmtree(folder)
            acc.wait_for_everyone()
            if acc.is_main_process:
                write_json_atomic(marker, {"fingerprint": fingerprint, "config": config.to_dict()})
            entry = get_method(method)
            ctx.logger.info(f"recover: {method}, ipc {config.ipc}")
            real_train = None
            per_class = entry.real_per_class(config) if entry.real_per_class is not None else None
            if not entry.optimised and per_class is not None and not r.data.streaming:
                # only the rows the selection can pick (class_balanced_indices(n_per_class, seed)), in index order
                real_train = random_real_rows(ctx.dataset["train"], per_class, config.syn_seed, spec)
            elif entry.needs_real(config):
                real_train = ctx.real("train")
            result = recover([ctx.teachers[i] for i in syn_idx], [ctx.statistics[i] for i in syn_idx], spec, config,
                             stats_args=r.stats, accelerator=acc, output_dir=folder, real_train=real_train)
            if acc.is_main_process:
                result.save(folder)
                result.to_dataset(spec).save_to_disk(str(folder / "dataset"))  # datasets.load_from_disk
                save_class_grid(result.uint8_images(spec), result.labels,
                                spec.class_names or [str(i) for i in range(spec.num_classes)], folder / "grid.png")
            ctx.synthetic[method] = result
        acc.wait_for_everyone()
        for method in ctx.methods:
            self.check_health(ctx, method, [ctx.teachers[i] for i in syn_idx])
        return {"methods": ctx.methods}

    def check_health(self, ctx: StageContext, method: str, teachers) -> None:
        """Health check (``recover/<method>/health.json``): warn, and stop unless
        ``accept_unhealthy_synthesis``, when the teachers find the set worse than chance. The images are
        kept on disk either way, so accepting it later costs nothing."""
        path = self.folder(ctx, method) / "health.json"
        health = json.loads(path.read_text()) if path.exists() else {}
        fresh = not health
        if fresh:
            health = synthesis_health(ctx.synthetic[method], teachers, ctx.spec, ctx.accelerator.device)
        if "diagnostics" not in health:  # a new set, a health file from before the diagnostics, or a failed try
            health = {k: v for k, v in health.items() if k != "diagnostics_error"}
            health.update(self.diagnose(ctx, method, teachers))
            fresh = True
        if fresh and ctx.accelerator.is_main_process:
            write_json_atomic(path, health)
        ctx.health[method] = health
        if health["healthy"] or not get_method(method).optimised:
            return
        what = (f"The {method!r} synthetic set looks diverged: the teacher ensemble classifies {health['ensemble_top1']} % "
                f"of it correctly, with cross-entropy {health['ensemble_ce']} >= chance {health['chance_ce']} = "
                f"ln {health['num_classes']}.")
        if ctx.recipe.pipeline.accept_unhealthy_synthesis:
            ctx.logger.warning(what + " Kept because accept_unhealthy_synthesis: true; the card says so.")
            return
        raise GVBSMError(what + f" Its images are kept in {path.parent}. Lower syn_lr (now "
                         f"{ctx.recipe.synthesis.syn_lr}) or the loss weights and rerun (recover restarts), or set "
                         "`accept_unhealthy_synthesis: true` (--accept_unhealthy_synthesis true) to go on with it.")

    def diagnose(self, ctx: StageContext, method: str, teachers) -> dict[str, Any]:
        """``{"diagnostics": {...}}`` (:func:`synthesis_diagnostics` against :meth:`diagnostic_reference`), or,
        when they cannot be computed, ``{"diagnostics_error": reason}`` and a warning: a diagnostic never
        costs the synthetic set (it is already saved), and the reason is said, not swallowed."""
        try:
            real = self.diagnostic_reference(ctx)
            return {"diagnostics": synthesis_diagnostics(ctx.synthetic[method], real, teachers, ctx.spec)}
        except Exception as e:  # noqa: BLE001 - any failure is reported (log + health.json), the set is kept
            reason = f"{type(e).__name__}: {e}"
            ctx.logger.warning(f"recover: the image diagnostics of the {method!r} set could not be computed ({reason}); "
                               "the set is kept, the card shows no diagnostics.")
            return {"diagnostics_error": reason}

    def diagnostic_reference(self, ctx: StageContext):
        """The diagnostics' real reference: :func:`diagnostic_real_per_class` seeded train images of each class
        (uint8, labels), decoding only those rows (:func:`random_real_rows`)."""
        if ctx.dataset is None or ctx.recipe.data.streaming:
            raise GVBSMError("no indexable train split at hand (a streamed dataset cannot be sampled per class "
                             "without decoding it whole)")
        return random_real_rows(ctx.dataset["train"], diagnostic_real_per_class(ctx.spec.num_classes),
                                DIAGNOSTIC_SEED, ctx.spec)
