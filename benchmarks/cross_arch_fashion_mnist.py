"""Cross-architecture benchmark (issue 35 "Distilled sets that transfer"): does a distilled set beat a random
real subset of the same size on EVERY evaluator, not only on the network it was distilled with? Fashion-MNIST
IPC 10, one fixed teacher set, 3 student seeds, last epoch.

Columns: the evaluators (``EVALUATORS``, zoo backbones of ``gvbsm_hf.backbones``): ``convnet128_in``
(the dataset-distillation literature's ConvNet-128 with instance norm), ``convnet128_nn`` (no
normalisation), ``resnet18_cifar``, ``mobilenetv2_100``, ``shufflenetv2_100`` (full width, CIFAR stems) and
``vit_tiny_p4`` (timm ViT, patch 4). Every evaluator trains under the same student protocol (the recipe's:
soft labels of the teacher ensemble on every augmented batch, ``eval_students`` in one pipeline run per
row, so the views and labels of a seed are the same for every evaluator; with ``relabel_mode: stored``
the same stored views and labels).

Rows (``RECIPES``; every one through the library's pipeline, ``recipes/fashion_mnist/gvbsm_ipc10.yaml`` with
the overrides below, one output folder per row under ``--work-dir``; a method's own options go to the
pipeline as ``--method_args '{"<method>": {...}}'``):

* ``sre2l``: SRe2L (cross-entropy + BN matching, one teacher);
* ``gvbsm_authors``: G-VBSM, the authors' synthesis protocol (``syn_protocol: authors``, round robin);
* ``gvbsm_hf_v0``: G-VBSM, gvbsm-hf 0.1's synthesis protocol (``syn_protocol: gvbsm_hf_v0``, uniform);
* ``rded``: RDED selection (the ensemble's most typical real crops, 0.5-1 of the image, one per image);
* ``edc_style``: G-VBSM from RDED crops (``syn_init: rded``) with soft category-aware matching
  (``stats_per_class: true``, ``syn_class_weight: 0.5``);
* ``feature_regression``: feature regression from random real images (the margin benchmark's row);
* ``rded_kcenter``: selection without optimisation, whole real images covering the teachers' penultimate
  feature space (``syn_rded_selection: kcenter`` over 1000 candidates per class, docs/method.md);
* ``feature_regression_kcenter_init``: feature regression started from those k-center picks;
* ``gvbsm_real_init``: G-VBSM (authors' protocol) started from random real images (``syn_init: real``);
* ``gvbsm_real_init_tv``: the same with the total-variation prior (``syn_tv_weight``, docs/method.md Eq. 18);
* ``gvbsm_real_init_instance``: the same with per-instance BN statistic matching (``syn_r_instance``,
  ``stats_instance: true``, docs/method.md Eq. 19);
* ``gvbsm_real_init_tv_instance``: both remedies at once; ``gvbsm_real_init_tv_instance_strong``: both at
  weights that move their terms (``TV_WEIGHT_STRONG``, ``INSTANCE_WEIGHT_STRONG`` in ``cross_arch/rows.py``);
* ``random_real_draw1``: another random real subset (``syn_seed: 1``): how far two random draws lie apart
  under this protocol, the scale against which every other row's margin is read;
* each component's share in ``gvbsm_authors`` (issue 35 item 3), one change each: ``gvbsm_authors_no_bn``
  (``syn_r_bn: 0``, no BN statistic matching), ``gvbsm_authors_no_conv`` (``syn_r_conv: 0``, no Conv
  statistic matching), ``gvbsm_authors_no_dd`` (``syn_dd: false``, no data densification),
  ``gvbsm_authors_first_layer_1`` (``syn_first_layer_multiplier: 1``, the first layer weighted like the
  others) and ``gvbsm_authors_convnet_teachers`` (synthesis from the ConvNet teachers only,
  ``syn_teachers``: the teacher family; relabelling keeps every teacher); the initialisation's share is
  ``gvbsm_real_init``;
* the relabel ensemble (the paper's Table 3 and Table 6, on the random subset's images, whose synthesis costs
  nothing): ``random_real_relabel_1`` / ``_2`` / ``_3`` (soft labels of the first 1, 2, 3 teachers as given,
  ``relabel_teachers``; ``random_real`` itself is all four) and ``random_real_logit_norm``
  (``relabel_logit_norm: true``, docs/method.md Eq. 13);

and the baseline ``random_real`` (a random real subset, same teachers, labels, students and seeds).
Each row reports its ``mean_over_evaluators``, ``min_margin_vs_random`` (its worst evaluator against the
random subset on that evaluator), ``hard_label_in`` (the set with its hard labels on ``convnet128_in``,
``--hard-label-seeds``: how much of the result is the images and how much the soft labels) and
``within_class_diversity`` (:func:`within_class_diversity` in the teachers' penultimate feature space:
1 is as spread as real images of the class, 0 is one image repeated), and, beside the issue's schema, the
extra key ``diagnostics``: :func:`gvbsm_hf.image_diagnostics.diagnose` of its images against the same real
images (docs/method.md "Image diagnostics": pixel mean and contrast, saturated pixels, high-frequency power,
per-instance activation statistics in the teachers, within-class distances). ``best``: the distilled row (not a
variant of the random subset: another draw, other labels) with the highest ``mean_over_evaluators``.

Teachers: the four-teacher set of ``benchmarks/margin_fashion_mnist.py`` (trained by
``benchmarks/squeeze_fashion_mnist.py``, see ``benchmarks/fidelity_fashion_mnist.py``)::

    python benchmarks/cross_arch_fashion_mnist.py --teachers runs/fm_teachers/convnet128 runs/fm_teachers/convnet32 \\
        runs/fm_teachers/convnet32_d2 runs/fm_teachers/shufflenetv2_050
    python benchmarks/cross_arch_fashion_mnist.py --teachers ... --recipes rded edc_style   # another process
    python benchmarks/cross_arch_fashion_mnist.py --teachers ... --collect
    python benchmarks/cross_arch_fashion_mnist.py --teachers ... --recipes <new row> \\
        --resume-from benchmarks/results/cross_arch_fashion_mnist.json   # a fresh clone: keep the committed rows

Each finished row is saved to ``--work-dir/rows/`` at once (a killed benchmark resumes where it stopped;
``--collect`` merges whatever has run). Writes ``--output``
(``benchmarks/results/cross_arch_fashion_mnist.json``, schema: :func:`validate_result`) and a markdown table
beside it. The full table is many CPU hours (6 rows + the random subset, 6 evaluators x 3 seeds x 300
epochs each): run it on a GPU.

    python benchmarks/cross_arch_fashion_mnist.py --smoke   # well under a minute (tests/test_cross_arch.py)

``--smoke``: one teacher folder (ConvNet-32, one epoch on 200 scikit-learn digits, 16 px, trained by the
pipeline's squeeze stage), IPC 2, the rows ``gvbsm_authors`` and ``rded`` and the random subset at 2
synthesis iterations, the evaluators ``convnet128_in`` and ``vit_tiny_p4``, one student epoch and seed
(``SMOKE``); everything in a temporary folder that is deleted, the JSON validated in memory and written
only to ``--output`` when given (never under ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from torch import nn

# the measures live in the library (docs/method.md "Image diagnostics"); the rest of gvbsm_hf is imported inside
# the functions that need it (as in the other benchmarks): --help and the unit tests of the diversity measure
# (tests/test_cross_arch.py) load this file without the pipeline
from gvbsm_hf.image_diagnostics import (diagnose, mean_pairwise_distance, teacher_feature_space,  # noqa: F401
                                        within_class_diversity)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "fashion_mnist" / "gvbsm_ipc10.yaml"
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_OUTPUT = RESULTS / "cross_arch_fashion_mnist.json"

# the rows (what each one runs) and the results document (its schema, tables) are modules of their own
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, also when loaded by path (tests)
from cross_arch.results import (DIAGNOSTIC_COLUMNS, build_result, diagnostics_markdown, diagnostics_of,  # noqa: E402,F401
                                markdown, validate_result)
from cross_arch.rows import (EVALUATORS, HARD_EVALUATOR, RANDOM, RECIPES, RELABEL_ENSEMBLE, STUDENT,  # noqa: E402,F401
                             SYN_TEACHER_FILTER, relabel_teachers, syn_teachers)

# --smoke (module docstring); explicit flags still win
SMOKE = {"ipc": 2, "recipes": ["gvbsm_authors", "rded"], "evaluators": ["convnet128_in", "vit_tiny_p4"],
         "syn_iterations": 2, "epochs": 1, "seeds": [0], "hard_label_seeds": [0], "stats_max_samples": 64,
         "real_per_class": 20,
         "extra": [("--dataset_name digits --max_train_samples 200 --max_eval_samples 100 --student convnet32 "
                    "--per_device_train_batch_size 20 --accept_unhealthy_synthesis true")]}

# ------------------------------------------------------------------------------------- diversity


def set_diversity(folder: Path, method: str, teachers: Sequence[nn.Module], real: tuple[torch.Tensor, torch.Tensor]) -> float:
    """:func:`within_class_diversity` of the shipped images of ``method`` in the pipeline folder ``folder``."""
    from gvbsm_hf.data import DatasetSpec
    from gvbsm_hf.stage import method_folder
    from gvbsm_hf.synthetic_set import SyntheticSet

    spec = DatasetSpec.from_dict(json.loads((folder / "data_spec.json").read_text()))
    syn = SyntheticSet.load(folder / "recover" / method_folder(method))
    syn_f, real_f = teacher_feature_space(teachers, syn.shipped_images(spec), spec.normalize(real[0]))
    return within_class_diversity(syn_f, syn.labels, real_f, real[1])


def set_diagnostics(folder: Path, method: str, teachers: Sequence[nn.Module],
                    real: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """:func:`gvbsm_hf.image_diagnostics.diagnose` of the shipped images of ``method`` in the pipeline folder
    ``folder`` against the real reference ``real`` (the row's extra key ``diagnostics``)."""
    from gvbsm_hf.data import DatasetSpec
    from gvbsm_hf.stage import method_folder
    from gvbsm_hf.synthetic_set import SyntheticSet

    spec = DatasetSpec.from_dict(json.loads((folder / "data_spec.json").read_text()))
    syn = SyntheticSet.load(folder / "recover" / method_folder(method))
    return diagnose(syn.uint8_images(spec), syn.labels, real[0], real[1], teachers, spec)


def real_reference(argv: list[str], per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` seeded real train images per class (uint8) and labels: the diversity reference, loaded
    as the pipeline loads the recipe ``argv``'s data."""
    from gvbsm_hf.data import class_balanced_indices, get_dataset_spec, load_image_dataset, to_uint8_tensors
    from gvbsm_hf.recipe import parse_recipe

    r = parse_recipe(argv)
    d = r.data
    dataset = load_image_dataset(
        d.dataset_name, config_name=d.dataset_config_name, image_column=d.image_column, label_column=d.label_column,
        train_split=d.train_split, validation_split=d.validation_split, max_train_samples=d.max_train_samples,
        max_eval_samples=d.max_eval_samples, seed=r.training.seed, image_size=d.image_size, channels=d.channels)
    spec = get_dataset_spec(dataset, d.dataset_name, image_size=d.image_size, channels=d.channels)
    train = dataset["train"]
    return to_uint8_tensors(train.select(class_balanced_indices(train["label"], n_per_class=per_class, seed=0)), spec)


# ------------------------------------------------------------------------------------------ runs


def run_argv(args: argparse.Namespace, name: str, work: Path) -> list[str]:
    """The pipeline's command line of row ``name`` (all evaluators, soft labels)."""
    method, flags, options = RECIPES[name]
    argv = ["--config", str(RECIPE), "--teachers", *args.teachers, "--ipc", str(args.ipc),
            "--syn_iterations", str(args.syn_iterations), "--syn_checkpoint_every", str(max(1, args.syn_iterations // 5)),
            "--num_train_epochs", str(args.epochs), "--eval_seeds", *map(str, args.seeds),
            "--eval_students", *args.evaluators, "--evaluate_hard_labels", "false", "--relabel_export_views", "false",
            "--stats_max_samples", str(args.stats_max_samples),
            "--stages", "squeeze", "record", "recover", "relabel", "evaluate", *STUDENT,
            "--syn_method", method, *flags, "--baselines", method, "--output_dir", str(work / name), *_extra(args)]
    subset, ensemble = syn_teachers(name, args.teachers), relabel_teachers(name, args.teachers)
    argv += ["--syn_teachers", *subset] if subset else []
    argv += ["--relabel_teachers", *ensemble] if ensemble else []
    return argv + (["--method_args", json.dumps({method: options})] if options else [])


def hard_argv(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """``argv`` re-run for the hard-label row on :data:`HARD_EVALUATOR` only: the evaluate stage alone, on
    the images the first run made (its finished soft runs are reused)."""
    stages = argv.index("--stages")
    argv = argv[:stages] + ["--stages", "evaluate"] + argv[stages + 6:]
    return argv + ["--eval_students", HARD_EVALUATOR, "--evaluate_hard_labels", "true",
                   "--hard_label_seeds", *map(str, args.hard_label_seeds)]


def _run(args: argparse.Namespace, work: Path, name: str, teachers: list, real,
         teacher_info: list[dict[str, Any]]) -> None:
    from gvbsm_hf.pipeline import parse_recipe, run_pipeline

    saved = work / "rows" / f"{name}.json"
    if saved.exists():
        row = json.loads(saved.read_text())
        if set(args.evaluators) <= set(row["per_evaluator"]) and (name == RANDOM or row.get("hard_label_in") is not None):
            return
    method = RECIPES[name][0]
    argv = run_argv(args, name, work)
    t0 = time.perf_counter()
    summary = run_pipeline(parse_recipe(argv))
    soft = {r["evaluator"]: r["per_seed"] for r in summary["results"] if r["method"] == method and r["labels"] == "soft"}
    missing = sorted(set(args.evaluators) - set(soft))
    if missing:
        raise RuntimeError(f"{name}: the pipeline returned no soft-label row for {missing}")
    row: dict[str, Any] = {"recipe": name, "method": method, "per_evaluator": {e: soft[e] for e in args.evaluators},
                           "hard_label_in": None, "within_class_diversity": None}
    row["within_class_diversity"] = set_diversity(work / name, method, teachers, real)
    row["diagnostics"] = set_diagnostics(work / name, method, teachers, real)
    if name != RANDOM:
        hard_summary = run_pipeline(parse_recipe(hard_argv(args, argv)))
        hard = [r for r in hard_summary["results"]
                if r["method"] == method and r["labels"] == "hard" and r["evaluator"] == HARD_EVALUATOR]
        if not hard:
            raise RuntimeError(f"{name}: the pipeline returned no hard-label row for {HARD_EVALUATOR}")
        row["hard_label_in"] = mean(hard[0]["per_seed"])
    row.update(invocation=_invocation(), argv=argv, wall_time_s=round(time.perf_counter() - t0, 1),
               teachers=teacher_info)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(row, indent=2) + "\n")
    print(f"{name}: " + ", ".join(f"{e} {mean(v):.2f}" for e, v in row["per_evaluator"].items())
          + f"; diversity {row['within_class_diversity']:.3f}"
          + ("" if row["hard_label_in"] is None else f"; hard labels ({HARD_EVALUATOR}) {row['hard_label_in']:.2f}"),
          flush=True)


def _restore_rows(results: Path, work: Path) -> None:
    """Write the rows (and the random subset) of a results file of this benchmark back as saved-row files,
    where missing: a fresh clone then extends the committed table instead of replacing it."""
    data = json.loads(results.read_text())
    out = work / "rows"
    out.mkdir(parents=True, exist_ok=True)
    restored = [{"recipe": RANDOM, "method": RANDOM, "hard_label_in": None, "within_class_diversity": None,
                 "per_evaluator": {e: s["per_seed"] for e, s in data["random_real"].items()}}]
    restored += [{"recipe": r["recipe"], "method": RECIPES[r["recipe"]][0], "hard_label_in": r["hard_label_in"],
                  "within_class_diversity": r["within_class_diversity"], **diagnostics_of(r),
                  "per_evaluator": {e: s["per_seed"] for e, s in r["per_evaluator"].items()}} for r in data["rows"]]
    for row in restored:
        path = out / f"{row['recipe']}.json"
        if not path.exists():
            path.write_text(json.dumps({**row, "invocation": data["command"], "restored_from": str(results),
                                        "teachers": data["teachers"]}, indent=2)
                            + "\n")


# ---------------------------------------------------------------------------------------- collect


def teacher_set(folders: Sequence[str]) -> list[dict[str, Any]]:
    """``[{"name", "top1"}]`` of the teacher folders (their squeeze-stage accuracy, in %)."""
    from gvbsm_hf.teacher import load_teacher

    teachers = []
    for folder in folders:
        acc = load_teacher(folder).config.get("accuracy")
        if acc is None:
            raise RuntimeError(f"teacher folder {folder} records no accuracy (config.json 'accuracy'): train it with "
                               "the squeeze stage (teacher_epochs >= 1) so that its top-1 can be reported")
        teachers.append({"name": Path(folder).name, "top1": round(100.0 * float(acc), 2)})
    return teachers


def saved_rows(work: Path) -> dict[str, dict]:
    """``{recipe: row}`` of the rows saved under ``work/rows/``."""
    rows = [json.loads(f.read_text()) for f in sorted((work / "rows").glob("*.json"))]
    return {row["recipe"]: row for row in rows}


def check_same_teachers(saved: dict[str, dict], teachers: list[dict[str, Any]], work: Path) -> None:
    """Every saved row was made with ``teachers`` (rows record their teacher set; a re-made set differs across
    CPUs, docs/results.md): a table compares its rows with ONE random subset under the same teachers."""
    other = sorted(name for name, row in saved.items() if row.get("teachers") not in (None, teachers))
    if other:
        raise RuntimeError(f"rows {other} in {work / 'rows'} were made with another teacher set "
                           f"({saved[other[0]]['teachers']}) than --teachers ({teachers}): give this teacher set its own "
                           "--work-dir and --output, so that every row is compared with a random subset under the same "
                           "teachers.")


def collect(args: argparse.Namespace, work: Path) -> dict:
    from gvbsm_hf.recipe import parse_recipe

    teachers = teacher_set(args.teachers)
    saved = saved_rows(work)
    check_same_teachers(saved, teachers, work)
    invocations = []  # the commands that ran the rows (one per process), then this one
    for s in saved.values():
        if s.get("invocation") and s["invocation"] not in invocations:
            invocations.append(s["invocation"])
    r = parse_recipe(run_argv(args, RANDOM, work))
    labels = f"soft ({r.relabel.relabel_mode}, {r.training.loss_type})"
    if _invocation() not in invocations:
        invocations.append(_invocation())
    result = build_result(" && ".join(invocations), teachers, args.ipc, labels, args.evaluators, saved)
    validate_result(result)
    return result


# ------------------------------------------------------------------------------------------- main


def _invocation() -> str:
    return "python benchmarks/cross_arch_fashion_mnist.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _extra(args: argparse.Namespace) -> list[str]:
    return [tok for item in args.extra for tok in shlex.split(item)]


def benchmark(args: argparse.Namespace) -> dict:
    from gvbsm_hf.teacher import load_teacher

    work = Path(args.work_dir)
    if args.resume_from:
        _restore_rows(Path(args.resume_from), work)
    if not args.collect:
        teacher_info = teacher_set(args.teachers)
        check_same_teachers(saved_rows(work), teacher_info, work)  # before any compute
        for name in args.recipes:  # every row's command line, so a row the teachers cannot make stops here
            run_argv(args, name, work)
        teachers = [load_teacher(f).eval() for f in args.teachers]
        real = real_reference(run_argv(args, RANDOM, work), args.real_per_class)
        for name in [RANDOM, *args.recipes]:
            _run(args, work, name, teachers, real, teacher_info)
    return collect(args, work)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", nargs="+", default=None, help="Teacher folders (the fixed teacher set); required.")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--recipes", nargs="+", default=[n for n in RECIPES if n != RANDOM],
                   choices=[n for n in RECIPES if n != RANDOM], help="Rows to run (the random subset always runs).")
    p.add_argument("--evaluators", nargs="+", default=EVALUATORS, help="Evaluator backbones (the columns).")
    p.add_argument("--syn-iterations", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=300, help="Student epochs (last epoch reported).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--hard-label-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help=f"Seeds of each row's hard-label run on {HARD_EVALUATOR} (hard_label_in).")
    p.add_argument("--stats-max-samples", type=int, default=10000)
    p.add_argument("--real-per-class", type=int, default=500,
                   help="Real train images per class of the diversity reference.")
    p.add_argument("--work-dir", default="runs/cross_arch_fashion_mnist")
    p.add_argument("--collect", action="store_true", help="Only merge the saved rows into --output.")
    p.add_argument("--resume-from", default=None,
                   help="A results file of this benchmark (e.g. the committed one): its rows are written back to "
                        "--work-dir/rows/ where missing, so a fresh clone extends the table instead of replacing it.")
    p.add_argument("--output", "--out", dest="output", default=None,
                   help=f"Results JSON (default {DEFAULT_OUTPUT.relative_to(REPO)}; --smoke: none unless given).")
    p.add_argument("--extra", nargs="*", default=[], help="More recipe overrides for every run, quoted.")
    p.add_argument("--smoke", action="store_true", help="seconds-long check of the code path (module docstring; "
                   f"{SMOKE}, unless given); nothing kept under benchmarks/results/")
    args = p.parse_args()
    if not args.smoke:
        if not args.teachers:
            p.error("--teachers is required")
        result = benchmark(args)
        out = Path(args.output or DEFAULT_OUTPUT)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return
    if args.output and Path(args.output).resolve().is_relative_to(RESULTS.resolve()):
        p.error(f"--smoke writes nothing under {RESULTS}: give another --output")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cross-arch-smoke-") as tmp:
        p.set_defaults(**SMOKE, work_dir=str(Path(tmp) / "runs"))
        args = p.parse_args()
        from margin_fashion_mnist import smoke_teachers  # the sibling script's teacher set (one for all smokes)

        args.teachers = args.teachers or smoke_teachers(Path(tmp), _extra(args))
        result = benchmark(args)  # validated (validate_result) before it is returned
    print(markdown(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"smoke OK in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
