"""Stage orchestration for ``recipes/distill.py``: squeeze -> record -> recover -> relabel ->
evaluate -> export, every stage cached in ``output_dir`` and skipped when done.

Layout of ``output_dir``::

    data_spec.json                      dataset spec (resolution, channels, mean/std, classes)
    teachers/<name>/                    Hub-ready teacher folders (safetensors, config, card)
    statistics/<name>.safetensors       Conv statistics per teacher (Eq. 9) with provenance
    recover/<method>/synthetic.safetensors  synthetic images (+ dataset/, grid.png; jobs/ checkpoints)
    relabel/<method>/                   stored soft labels (parquet), relabel_mode=stored only
    evaluate/results.json               one row per (method, labels, student, seed), last epoch
    export/<dataset-name>/              Hub-ready dataset folder (parquet + card + grid)
    stages.json                         which stages are done
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import yaml
from transformers import HfArgumentParser

from .configs import (
    DataArguments,
    GVBSMTrainingArguments,
    PipelineArguments,
    PublishArguments,
    RelabelArguments,
    SqueezeArguments,
    StatisticsArguments,
    SynthesisArguments,
)
from .errors import GVBSMError

if TYPE_CHECKING:
    import torch

STAGES = ("squeeze", "record", "recover", "relabel", "evaluate", "export")
RECIPE_CLASSES = (
    DataArguments,
    SqueezeArguments,
    StatisticsArguments,
    SynthesisArguments,
    RelabelArguments,
    GVBSMTrainingArguments,
    PublishArguments,
    PipelineArguments,
)


@dataclass
class Recipe:
    """All the arguments of one run, one dataclass per stage."""

    data: DataArguments
    squeeze: SqueezeArguments
    stats: StatisticsArguments
    synthesis: SynthesisArguments
    relabel: RelabelArguments
    training: GVBSMTrainingArguments
    publish: PublishArguments
    pipeline: PipelineArguments


def recipe_parser() -> HfArgumentParser:
    return HfArgumentParser(RECIPE_CLASSES)  # type: ignore[arg-type]


def _known_fields() -> set[str]:
    return {f.name for cls in RECIPE_CLASSES for f in fields(cls)}


def load_recipe_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML and reject unknown keys (with suggestions)."""
    path = Path(path)
    if not path.exists():
        raise GVBSMError(f"Recipe {path} does not exist; see recipes/ for the shipped recipes.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise GVBSMError(f"Recipe {path} must be a mapping of field: value.")
    known = _known_fields()
    unknown = [k for k in data if k not in known]
    if unknown:
        hints = {k: get_close_matches(k, known, n=1) for k in unknown}
        msg = ", ".join(f"{k!r}" + (f" (did you mean {v[0]!r}?)" if v else "") for k, v in hints.items())
        raise GVBSMError(f"Unknown key(s) in recipe {path}: {msg}. Run `python recipes/distill.py --help` for all fields.")
    return data


def parse_recipe(argv: Sequence[str] | None = None) -> Recipe:
    """``--config recipe.yaml`` plus command-line overrides (flags win over the YAML)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = recipe_parser()
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise GVBSMError("--config needs a path to a recipe YAML.")
        config_path = argv[i + 1]
        del argv[i : i + 2]
    if config_path:
        parser.set_defaults(**load_recipe_yaml(config_path))
    parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    *objs, remaining = parsed
    if remaining:
        raise GVBSMError(f"Unknown command-line argument(s) {remaining}; see `python recipes/distill.py --help`.")
    recipe = Recipe(*objs)  # type: ignore[arg-type]
    bad = [s for s in recipe.pipeline.stages + recipe.pipeline.redo if s not in STAGES]
    if bad:
        raise GVBSMError(f"Unknown stage(s) {bad}; stages are {STAGES}.")
    for option, subset in (("syn_teachers", recipe.synthesis.syn_teachers),
                           ("relabel_teachers", recipe.relabel.relabel_teachers)):
        unknown = [n for n in subset or [] if n not in recipe.squeeze.teachers]
        if unknown:
            raise GVBSMError(f"{option} lists {unknown}, which are not in teachers {recipe.squeeze.teachers}: "
                             "name teachers exactly as in `teachers`.")
    return recipe


def _teacher_subset(names: Sequence[str], subset: Sequence[str] | None) -> list[int]:
    """Indices of the teachers named in ``subset`` (``syn_teachers`` / ``relabel_teachers``); None: all."""
    return [i for i, n in enumerate(names) if not subset or n in set(subset)]


_TRAINING_FIELDS = ("student", "loss_type", "gamma", "kd_temperature", "student_augment", "student_crop_scale",
                   "cutmix_prob", "eval_seeds", "eval_students", "num_train_epochs", "learning_rate",
                   "per_device_train_batch_size", "weight_decay", "lr_scheduler_type", "optim", "warmup_steps",
                   "warmup_ratio", "max_steps", "seed", "bf16", "fp16")


def stage_configs(recipe: "Recipe") -> dict[str, dict[str, Any]]:
    """The recipe fields each stage's output depends on (its own and, through the chain in
    :func:`stage_fingerprints`, those of every earlier stage)."""
    r = recipe
    train = {name: getattr(r.training, name, None) for name in _TRAINING_FIELDS}
    train = {k: (v.value if hasattr(v, "value") else v) for k, v in train.items()}
    data = {k: v for k, v in asdict(r.data).items() if k != "dataloader_workers"}
    configs = {
        "squeeze": data | asdict(r.squeeze),
        "record": asdict(r.stats) | {"syn_crop_scale": r.synthesis.syn_crop_scale, "seed": r.training.seed},
        "recover": asdict(r.synthesis) | {"baselines": r.pipeline.baselines},
        "relabel": asdict(r.relabel) | {"student_crop_scale": r.training.student_crop_scale},
        "evaluate": train | {"evaluate_hard_labels": r.pipeline.evaluate_hard_labels},
        "export": asdict(r.publish),
    }
    return json.loads(json.dumps(configs, default=str))


def stage_fingerprints(recipe: "Recipe") -> dict[str, str]:
    """Chained hashes: a stage's fingerprint changes when its fields or any earlier stage's do."""
    import hashlib

    out, previous = {}, ""
    for stage, cfg in stage_configs(recipe).items():
        previous = hashlib.sha256((previous + json.dumps(cfg, sort_keys=True)).encode()).hexdigest()[:16]
        out[stage] = previous
    return out


class StageCache:
    """``stages.json``: which stages finished, so a rerun skips them (``--redo`` recomputes).

    Each finished stage stores the fingerprint of the recipe fields it depends on; a rerun with a
    changed recipe recomputes the first changed stage and every later one (and logs which fields
    changed), instead of silently reusing results computed with other settings."""

    def __init__(self, output_dir: Path, redo: Sequence[str], recipe: "Recipe | None" = None) -> None:
        self.path = output_dir / "stages.json"
        self.redo = set(redo)
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.fingerprints = stage_fingerprints(recipe) if recipe is not None else {}
        self.configs = stage_configs(recipe) if recipe is not None else {}
        self.changed: dict[str, list[str]] = {}
        for stage in STAGES:
            old = self.state.get(stage, {})
            if "fingerprint" not in old or stage not in self.fingerprints:
                continue
            if old.get("fingerprint") != self.fingerprints[stage]:
                before = old.get("config", {})
                self.changed[stage] = sorted(
                    k for k in set(before) | set(self.configs[stage]) if before.get(k) != self.configs[stage].get(k)
                )
                self.redo.add(stage)
        if self.redo:  # a redone or changed stage invalidates every later one (no stale results)
            first = min(STAGES.index(s) for s in self.redo)
            self.redo.update(STAGES[first:])

    def describe_changes(self) -> str:
        """One line per stage recomputed because the recipe changed (empty when none)."""
        return "\n".join(
            f"recipe changed for stage {stage!r} ({', '.join(keys) or 'an earlier stage'}): recomputing it and later stages"
            for stage, keys in self.changed.items()
            if keys
        )

    def done(self, stage: str) -> bool:
        return stage not in self.redo and self.state.get(stage, {}).get("done", False)

    def mark(self, stage: str, **info: Any) -> None:
        """Record ``stage`` as done. A stage that was already done, not redone, and whose ``info``
        is unchanged keeps its entry (and ``finished`` time): a rerun that skips it leaves it alone."""
        old = self.state.get(stage, {})
        if self.done(stage) and {k: v for k, v in old.items() if k not in ("done", "finished", "fingerprint", "config")} == json.loads(
            json.dumps(info, default=str)
        ):
            return
        self.state[stage] = {"done": True, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **info}
        if stage in self.fingerprints:
            self.state[stage] |= {"fingerprint": self.fingerprints[stage], "config": self.configs[stage]}
        self._write()

    def start(self, stage: str) -> None:
        """Record that ``stage`` is being computed with this recipe, so that a run killed inside it
        and restarted with a changed recipe recomputes it rather than resuming stale checkpoints."""
        if self.done(stage) or stage not in self.fingerprints:
            return
        self.state[stage] = {"done": False, "fingerprint": self.fingerprints[stage], "config": self.configs[stage]}
        self._write()

    def _write(self) -> None:
        # one temporary file per process: every process of a multi-process run marks the stages, and
        # a shared name would let one process move another's half-written file into place
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.replace(self.path)

    def redo_requested(self, stage: str) -> bool:
        return stage in self.redo


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Every field of the recipe as plain JSON-able values (for provenance and cards)."""
    out: dict[str, Any] = {}
    for part in (recipe.data, recipe.squeeze, recipe.stats, recipe.synthesis, recipe.relabel, recipe.publish, recipe.pipeline):
        out.update(asdict(part))
    train = recipe.training
    for name in ("student", "loss_type", "gamma", "kd_temperature", "student_augment", "student_crop_scale",
                 "cutmix_prob", "eval_seeds", "eval_students", "num_train_epochs", "learning_rate",
                 "per_device_train_batch_size", "weight_decay", "lr_scheduler_type", "optim", "warmup_steps"):
        value = getattr(train, name, None)
        out[name] = value.value if hasattr(value, "value") else value
    return json.loads(json.dumps(out, default=str))


def is_teacher_reference(name: str) -> bool:
    """A teacher given as a folder or Hub model id (loaded) rather than a backbone name (trained)."""
    if os.path.isdir(name):
        return True
    return "/" in name and not name.startswith(("hf-hub:", "tv:", "timm:"))


def teacher_dir_name(name: str, index: int, names: Sequence[str]) -> str:
    base = name.replace("/", "--").replace(":", "-")
    return f"{base}-{index}" if list(names).count(name) > 1 else base


def _subset(split, max_samples: int | None, seed: int):
    """A seeded class-balanced subset of a ``datasets`` split (``None``: the whole split); for a
    streaming split, the first ``max_samples`` rows after a seeded shuffle."""
    import datasets

    from .data import class_balanced_indices

    if max_samples is None:
        return split
    if isinstance(split, datasets.IterableDataset):
        return split.shuffle(seed=seed, buffer_size=10_000).take(max_samples)
    if max_samples >= len(split):
        return split
    return split.select(class_balanced_indices(split["label"], total=max_samples, seed=seed))


RealTensors = Callable[[str], "tuple[torch.Tensor, torch.Tensor]"]
"""``real(split)``: the uint8 images and labels of ``train`` or ``validation``, decoded on first use."""


def _random_real_rows(split, ipc: int, seed: int, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the train rows the ``random_real`` baseline keeps (``class_balanced_indices(labels,
    n_per_class=ipc, seed)``), decoded in index order: ``random_real_subset`` on them returns the
    same images in the same order as on the whole split, without decoding the whole split."""
    from .data import class_balanced_indices, to_uint8_tensors

    return to_uint8_tensors(split.select(class_balanced_indices(split["label"], n_per_class=ipc, seed=seed)), spec)


def _load_teachers(recipe: Recipe, spec, real: RealTensors, accelerator, out: Path, cache: StageCache, logger):
    """Squeeze stage: train each named backbone (or load a given folder / Hub id). The real splits
    are decoded (``real``) only when a teacher is actually trained."""
    from .squeeze import train_teacher
    from .teacher import TeacherModel, load_teacher

    names = list(recipe.squeeze.teachers)
    if not names:
        raise GVBSMError("The recipe lists no teachers: set `teachers: [convnet128, ...]`.")
    teachers, dirs = [], []
    for i, name in enumerate(names):
        folder = out / "teachers" / teacher_dir_name(name, i, names)
        dirs.append(folder)
        if is_teacher_reference(name):
            logger.info(f"squeeze: loading teacher {name}")
            teacher = load_teacher(name)
        elif (folder / "model.safetensors").exists() and not cache.redo_requested("squeeze"):
            teacher = load_teacher(folder)
        elif recipe.squeeze.teacher_epochs == 0:
            if not recipe.squeeze.teacher_pretrained:
                raise GVBSMError(
                    f"teacher_epochs: 0 with teacher_pretrained: false would use an untrained {name}; "
                    "set teacher_epochs >= 1 or teacher_pretrained: true."
                )
            teacher = TeacherModel.from_backbone(name, spec, pretrained=True)
            if accelerator.is_main_process:
                teacher.save_pretrained(folder)
        else:
            logger.info(f"squeeze: training teacher {i + 1}/{len(names)}: {name}")
            if cache.redo_requested("squeeze") and folder.exists() and accelerator.is_main_process:
                import shutil

                shutil.rmtree(folder)
            accelerator.wait_for_everyone()
            teacher = train_teacher(name, real("train"), real("validation"), spec, recipe.squeeze,
                                    accelerator=accelerator, output_dir=folder)
        teacher.check_spec(spec) if hasattr(teacher, "check_spec") else None
        teachers.append(teacher.eval())
    accelerator.wait_for_everyone()
    return teachers, dirs


def run_pipeline(recipe: Recipe) -> dict[str, Any]:
    """Run the stages of ``recipe.pipeline.stages`` (SPEC "Stages"), each cached in output_dir.

    Returns a summary: results rows, and the paths of the dataset folder, card and grid.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.logging import get_logger

    from .data import get_dataset_spec, image_batches, load_image_dataset, to_uint8_tensors
    from .relabel import STORED_META_FILE, StoredSoftLabels, TeacherEnsemble, relabel_stored
    from .statistics import load_statistics, record_statistics, save_statistics, statistics_to_dataset
    from .synthesis import SyntheticSet, recover
    from .trainer import evaluate_students
    from .utils import seed_everything
    from .visualize import save_class_grid

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
    stages = set(r.pipeline.stages)
    seed_everything(r.training.seed)
    if accelerator.is_main_process:
        (out / "recipe.json").write_text(json.dumps(recipe_to_dict(r), indent=2))

    # ---- data (validated before any compute) ----------------------------------------------
    d = r.data
    dsd = load_image_dataset(
        d.dataset_name, config_name=d.dataset_config_name, image_column=d.image_column, label_column=d.label_column,
        train_split=d.train_split, validation_split=d.validation_split, streaming=d.streaming,
        max_train_samples=d.max_train_samples, max_eval_samples=d.max_eval_samples, seed=r.training.seed,
    )
    spec = get_dataset_spec(dsd, d.dataset_name)
    if accelerator.is_main_process:
        (out / "data_spec.json").write_text(json.dumps(spec.to_dict(), indent=2))
    logger.info(f"data: {spec.name}: {spec.num_classes} classes, {spec.channels}x{spec.image_size}px")
    # Real splits as uint8 tensors, decoded only by the stages that need them (ImageNet-1k's train
    # split would be ~190 GB: it is never decoded whole unless teachers are trained or syn_init=real).
    decoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def real(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in decoded:
            decoded[split] = to_uint8_tensors(dsd[split], spec)
        return decoded[split]

    # ---- squeeze ---------------------------------------------------------------------------
    if accelerator.is_main_process:
        cache.start("squeeze")
    teachers, teacher_dirs = _load_teachers(r, spec, real, accelerator, out, cache, logger)
    cache.mark("squeeze", teachers=[str(p) for p in teacher_dirs])

    # ---- record ----------------------------------------------------------------------------
    methods = [r.synthesis.syn_method] + [b for b in r.pipeline.baselines if b != r.synthesis.syn_method]
    statistics: list = [None] * len(teachers)
    stats_dir = out / "statistics"
    if r.synthesis.syn_r_conv > 0:  # recorded statistics are loaded for recover/export even without the stage
        stats_split = _subset(dsd["train"], r.stats.stats_max_samples, r.training.seed) if "record" in stages else None
        if "record" in stages and accelerator.is_main_process:
            cache.start("record")
        for i, (teacher, folder) in enumerate(zip(teachers, teacher_dirs)):
            path = stats_dir / f"{folder.name}.safetensors"
            if path.exists() and not cache.redo_requested("record"):
                statistics[i] = load_statistics(
                    path, expect_fingerprint=teacher.fingerprint, expect_patch_size=r.stats.stats_patch_size,
                    expect_conv_target=r.stats.stats_conv_target,
                )
                continue
            if stats_split is None:  # "record" not in stages: recover says what is missing
                continue
            batches = image_batches(stats_split, spec, r.stats.stats_batch_size, process_index=accelerator.process_index,
                                    num_processes=accelerator.num_processes, num_workers=d.dataloader_workers)
            statistics[i] = record_statistics(
                teacher, batches, spec, accelerator=accelerator, patch_size=r.stats.stats_patch_size,
                conv_target=r.stats.stats_conv_target, augment=r.stats.stats_augment,
                crop_scale=tuple(r.synthesis.syn_crop_scale), seed=r.training.seed, teacher_name=folder.name,
                dataset_name=spec.name,
                total_batches=None if d.streaming else -(-len(stats_split) // r.stats.stats_batch_size),
            )
            if accelerator.is_main_process:
                save_statistics(statistics[i], path)
        accelerator.wait_for_everyone()
        if "record" in stages:
            cache.mark("record", files=sorted(str(p) for p in stats_dir.glob("*.safetensors")))

    # ---- recover ---------------------------------------------------------------------------
    synthetic: dict[str, SyntheticSet] = {}
    if "recover" in stages and accelerator.is_main_process:
        cache.start("recover")
    for method in methods:
        folder = out / "recover" / method.replace("+", "_")
        if (folder / "synthetic.safetensors").exists() and not cache.redo_requested("recover"):
            synthetic[method] = SyntheticSet.load(folder)
            continue
        if "recover" not in stages:
            continue
        if cache.redo_requested("recover") and folder.exists() and accelerator.is_main_process:
            import shutil

            shutil.rmtree(folder)
        accelerator.wait_for_everyone()
        args = dataclasses_replace(r.synthesis, syn_method=method)
        logger.info(f"recover: {method}, ipc {args.ipc}")
        if method == "random_real" and not d.streaming:
            real_train = _random_real_rows(dsd["train"], args.ipc, args.syn_seed, spec)
        elif method == "random_real" or args.syn_init == "real":
            real_train = real("train")
        else:
            real_train = None
        syn_idx = _teacher_subset(r.squeeze.teachers, r.synthesis.syn_teachers)
        result = recover([teachers[i] for i in syn_idx], [statistics[i] for i in syn_idx], spec, args,
                         stats_args=r.stats, accelerator=accelerator, output_dir=folder, real_train=real_train)
        if accelerator.is_main_process:
            result.save(folder)
            result.to_dataset(spec).save_to_disk(str(folder / "dataset"))  # datasets.load_from_disk
            save_class_grid(result.uint8_images(spec), result.labels, spec.class_names or
                            [str(i) for i in range(spec.num_classes)], folder / "grid.png")
        synthetic[method] = result
    accelerator.wait_for_everyone()
    if "recover" in stages:
        cache.mark("recover", methods=methods)

    # ---- relabel ---------------------------------------------------------------------------
    relabel_teachers = [teachers[i] for i in _teacher_subset(r.squeeze.teachers, r.relabel.relabel_teachers)]
    ensemble = TeacherEnsemble(relabel_teachers, logit_norm=r.relabel.relabel_logit_norm,
                               mixed_precision=r.synthesis.syn_mixed_precision)
    stored: dict[str, StoredSoftLabels] = {}
    if r.relabel.relabel_mode == "stored":  # stored labels are loaded for evaluate/export even without the stage
        for method, syn in synthetic.items():
            folder = out / "relabel" / method.replace("+", "_")
            if (folder / STORED_META_FILE).exists() and not cache.redo_requested("relabel"):  # written last
                stored[method] = StoredSoftLabels.load(folder)
                continue
            if "relabel" not in stages:
                continue
            stored[method] = relabel_stored(
                syn.images, ensemble, num_views=r.relabel.relabel_num_views, out_size=spec.image_size,
                crop_scale=tuple(r.training.student_crop_scale), seed=r.relabel.relabel_seed,
                topk=r.relabel.relabel_topk, accelerator=accelerator,
            )
            if accelerator.is_main_process:
                stored[method].save(folder)
        if "relabel" in stages:
            cache.mark("relabel", mode="stored")
    elif r.relabel.relabel_mode not in ("on_the_fly", "stored"):
        raise GVBSMError(f"relabel_mode must be 'on_the_fly' or 'stored', got {r.relabel.relabel_mode!r}.")
    elif "relabel" in stages:  # on the fly: the ensemble labels every student batch in evaluate
        cache.mark("relabel", mode="on_the_fly")

    # ---- evaluate --------------------------------------------------------------------------
    results_path = out / "evaluate" / "results.json"
    rows: list[dict[str, Any]] = json.loads(results_path.read_text()) if results_path.exists() else []
    if cache.redo_requested("evaluate"):
        rows = []
    if "evaluate" in stages:
        label_modes = ["soft"] + (["hard"] if r.pipeline.evaluate_hard_labels else [])
        for method, syn in synthetic.items():
            for label_mode in label_modes:
                if label_mode == "hard" and method != r.synthesis.syn_method:
                    continue
                done = any(row["method"] == method and row["labels"] == label_mode for row in rows)
                if done:
                    continue
                targs = dataclasses_replace(
                    r.training, output_dir=str(out / "evaluate" / method.replace("+", "_") / label_mode),
                    loss_type=r.training.loss_type if label_mode == "soft" else "ce",
                )
                res = evaluate_students(
                    syn.images, syn.labels, real("validation"), spec, targs,
                    soft_labeler=ensemble if label_mode == "soft" and r.relabel.relabel_mode == "on_the_fly" else None,
                    stored=stored.get(method) if label_mode == "soft" else None,
                )
                for student, s in res["summary"].items():
                    rows.append({"method": method, "labels": label_mode, "evaluator": student, "ipc": r.synthesis.ipc,
                                 "mean": s["mean"], "std": s["std"], "n": s["n"],
                                 "protocol": "last epoch, mean ± std over seeds",
                                 "seeds": [run["seed"] for run in res["per_run"] if run["student"] == student],
                                 "per_seed": [run["top1"] for run in res["per_run"] if run["student"] == student]})
                if accelerator.is_main_process:
                    results_path.parent.mkdir(parents=True, exist_ok=True)
                    results_path.write_text(json.dumps(rows, indent=2))
        cache.mark("evaluate", rows=len(rows))

    # ---- export ----------------------------------------------------------------------------
    summary: dict[str, Any] = {"results": rows, "output_dir": str(out)}
    main = synthetic.get(r.synthesis.syn_method)
    if "export" in stages and main is not None and accelerator.is_main_process:
        from .hub import export_distilled_dataset, push_distilled_dataset, push_teacher

        name = r.publish.dataset_repo_id or f"{spec.name.replace('_', '-')}-{r.synthesis.syn_method.replace('+', '-')}-ipc{r.synthesis.ipc}"
        folder = out / "export" / name.split("/")[-1]
        with torch.no_grad():
            ensemble.to(accelerator.device)
            soft = torch.cat([ensemble(b.to(accelerator.device)).float().cpu() for b in main.images.split(256)])
        stats_table = statistics_to_dataset([s for s in statistics if s is not None]) if any(
            s is not None for s in statistics) else None
        views = stored[r.synthesis.syn_method].to_dataset() if r.synthesis.syn_method in stored else None
        grid = out / "recover" / r.synthesis.syn_method.replace("+", "_") / "grid.png"
        teacher_repos = ([f"{r.publish.teacher_repo_prefix}-{p.name}" for p in teacher_dirs]
                         if r.publish.teacher_repo_prefix else [str(p) for p in teacher_dirs])
        export_distilled_dataset(
            folder, images=main.uint8_images(spec), labels=main.labels, spec=spec, soft_logits=soft,
            slot_metadata={"slot": main.slots.tolist(), "job": main.jobs.tolist()}, stored_views=views,
            statistics=stats_table, method=recipe_to_dict(r),
            results=[row for row in rows], teacher_repos=teacher_repos,
            grid_path=grid if grid.exists() else None, repo_id=r.publish.dataset_repo_id,
            source_dataset=spec.source or spec.name, license=r.publish.dataset_license or spec.license,
        )
        summary.update(dataset_folder=str(folder), card=str(folder / "README.md"), grid=str(grid))
        cache.mark("export", folder=str(folder))
        if r.publish.push_dataset:
            if not r.publish.dataset_repo_id:
                raise GVBSMError("push_dataset: true needs dataset_repo_id: <org>/<name>.")
            summary["dataset_url"] = push_distilled_dataset(folder, r.publish.dataset_repo_id)
        if r.publish.teacher_repo_prefix:
            summary["teacher_urls"] = [push_teacher(p, f"{r.publish.teacher_repo_prefix}-{p.name}") for p in teacher_dirs]
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


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
