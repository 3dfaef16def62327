"""Fidelity benchmark (issue 14): what each difference between the authors' G-VBSM code and
gvbsm-hf 0.1 is worth, on Fashion-MNIST IPC 10, one fixed teacher set, 3 student seeds, last epoch.

Rows (every one through the library's pipeline, ``recipes/fashion_mnist/gvbsm_ipc10.yaml`` with the
overrides below, one cached output folder per row under ``--work-dir``, so a killed run resumes):

* ``authors``: the shipped paper recipe (``syn_protocol: authors``, round-robin backbones,
  CutMix on every student batch with the CE term on the original label);
* ``previous_default``: what gvbsm-hf 0.1 did (``syn_protocol: gvbsm_hf_v0``, uniform backbones,
  no CutMix, CE on the mixed label);
* one row per difference switched alone from ``authors``: synthesis augmentation (per-image RRC),
  recording augmentation (per-image RRC), first-layer multiplier (first BN and first Conv),
  evaluation CutMix (off);
* ``random_real``: a random real subset of the same size under the ``authors`` student protocol.

    python benchmarks/squeeze_fashion_mnist.py --teachers convnet128 --epochs 6 --cpu --teacher-dir runs/fm_teachers
    python benchmarks/squeeze_fashion_mnist.py --teachers convnet32 convnet32_d2 shufflenetv2_050 --epochs 2 \\
        --cpu --teacher-dir runs/fm_teachers
    python benchmarks/fidelity_fashion_mnist.py --teachers runs/fm_teachers/convnet128 runs/fm_teachers/convnet32 \\
        runs/fm_teachers/convnet32_d2 runs/fm_teachers/shufflenetv2_050 --syn-iterations 1000 --epochs 300

Writes ``--out`` (``benchmarks/results/fidelity_fashion_mnist.json``) and a markdown table beside it.

    python benchmarks/fidelity_fashion_mnist.py --smoke   # seconds (tests/test_benchmarks.py); nothing kept

``--smoke``: one teacher folder (ConvNet-32, one epoch on 200 scikit-learn digits, trained by the
pipeline's squeeze stage), the rows ``authors``, ``previous_default`` and ``random_real`` at 2
synthesis iterations and one student epoch and seed (``SMOKE``), everything in a temporary folder
that is deleted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

RECIPE = Path(__file__).parents[1] / "recipes" / "fashion_mnist" / "gvbsm_ipc10.yaml"

AUTHORS = ["--syn_protocol", "authors", "--cutmix_prob", "1.0", "--cutmix_ce_label", "original"]
AUTHORS_OPTIONS = {"syn_backbone_choice": "round_robin"}  # gvbsm's own options (`method_args: {gvbsm: ...}`)
VARIANTS: dict[str, tuple[list[str], dict, list[str]]] = {
    # name: (overrides on top of AUTHORS, gvbsm options on top of AUTHORS_OPTIONS, what changed)
    "authors": ([], {}, []),
    "previous_default": (["--syn_protocol", "gvbsm_hf_v0", "--cutmix_prob", "0.0", "--cutmix_ce_label", "mixed"],
                         {"syn_backbone_choice": "uniform"},
                         ["syn_augment", "stats_augment", "syn_first_layer", "syn_beta_dr_unit", "syn_ema_init",
                          "stats_patch_mode", "syn_dd_pool", "syn_backbone_choice", "cutmix_prob", "cutmix_ce_label"]),
    "augmentation": (["--syn_augment", "per_image_rrc", "--stats_augment", "authors"], {}, ["syn_augment"]),
    "recording_augmentation": (["--stats_augment", "per_image_rrc"], {}, ["stats_augment"]),
    "first_layer_multiplier": (["--syn_first_layer", "first_bn_and_conv"], {}, ["syn_first_layer"]),
    "evaluation_cutmix": (["--cutmix_prob", "0.0"], {}, ["cutmix_prob"]),
}
# --smoke (module docstring); explicit flags still win
SMOKE = dict(syn_iterations=2, epochs=1, seeds=[0], variants=["authors", "previous_default", "random_real"],
             stats_max_samples=64,
             extra=["--dataset_name digits --max_train_samples 200 --max_eval_samples 100 --student convnet32 "
                    "--eval_students convnet32 --accept_unhealthy_synthesis true"])


def method_args(options: dict) -> list[str]:
    """The command-line flag of gvbsm's own options (one ``--method_args``: the last one given wins)."""
    return ["--method_args", json.dumps({"gvbsm": options})]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", nargs="+", default=None, help="Teacher folders (the fixed teacher set); required.")
    p.add_argument("--syn-iterations", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=300, help="Student epochs.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=[*VARIANTS, "random_real"])
    p.add_argument("--stats-max-samples", type=int, default=10000)
    p.add_argument("--work-dir", default="runs/fidelity_fashion_mnist")
    p.add_argument("--out", default="benchmarks/results/fidelity_fashion_mnist.json")
    p.add_argument("--extra", nargs="*", default=[], help="More recipe overrides for every row, quoted.")
    p.add_argument("--smoke", action="store_true", help="seconds-long check of the code path (module docstring; "
                   f"{SMOKE}, unless given); nothing kept")
    args = p.parse_args()
    if not args.smoke:
        if not args.teachers:
            p.error("--teachers is required")
        fidelity(args)
        return
    with tempfile.TemporaryDirectory(prefix="fidelity-smoke-") as tmp:
        p.set_defaults(**SMOKE, work_dir=str(Path(tmp) / "runs"), out=str(Path(tmp) / "fidelity.json"))
        args = p.parse_args()
        extra = [tok for item in args.extra for tok in shlex.split(item)]
        from margin_fashion_mnist import smoke_teachers  # the sibling script's teacher set (one for all smokes)

        args.teachers = args.teachers or smoke_teachers(Path(tmp), extra)
        fidelity(args)


def fidelity(args: argparse.Namespace) -> None:
    from gvbsm_hf.pipeline import parse_recipe, run_pipeline
    from gvbsm_hf.teacher import load_teacher

    common = ["--config", str(RECIPE), "--teachers", *args.teachers, "--syn_iterations", str(args.syn_iterations),
              "--syn_checkpoint_every", str(max(1, args.syn_iterations // 5)), "--num_train_epochs", str(args.epochs),
              "--eval_seeds", *map(str, args.seeds), "--evaluate_hard_labels", "false",
              "--relabel_export_views", "false",  # the on-the-fly row only (stored views: benchmarks/stored_views_*)
              "--stats_max_samples", str(args.stats_max_samples),
              "--stages", "squeeze", "record", "recover", "relabel", "evaluate",
              *[tok for item in args.extra for tok in shlex.split(item)]]
    rows, runs = [], []
    for name in args.variants:
        if name == "random_real":  # the baseline of the `authors` run: same folder, same teachers, same protocol
            argv = common + AUTHORS + method_args(AUTHORS_OPTIONS) + [
                "--baselines", "random_real", "--output_dir", f"{args.work_dir}/authors"]
            method, changed = "random_real", ["syn_method"]
        else:
            extra, options, changed = VARIANTS[name]
            # `--baselines gvbsm` = no baseline beside the main method
            argv = common + AUTHORS + extra + method_args({**AUTHORS_OPTIONS, **options}) + [
                "--baselines", "gvbsm", "--output_dir", f"{args.work_dir}/{name}"]
            method = "gvbsm"
        t0 = time.perf_counter()
        summary = run_pipeline(parse_recipe(argv))
        (row,) = [r for r in summary["results"] if r["labels"] == "soft" and r["method"] == method]
        rows.append({"variant": name, "changed": changed, "mean": row["mean"], "std": row["std"],
                     "per_seed": row["per_seed"], "seeds": row["seeds"], "method": row["method"]})
        runs.append({"variant": name, "argv": argv, "wall_time_s": round(time.perf_counter() - t0, 1)})
        print(f"{name}: {row['mean']:.2f} ± {row['std']:.2f} {row['per_seed']}", flush=True)
        _write(args, rows, runs, load_teacher)


def _write(args, rows, runs, load_teacher) -> None:
    teachers = []
    for folder in args.teachers:
        t = load_teacher(folder)
        acc = t.config.get("accuracy")
        teachers.append({"name": Path(folder).name, "top1": None if acc is None else round(100.0 * float(acc), 2)})
    result = {
        "command": "python benchmarks/fidelity_fashion_mnist.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "teachers": teachers,
        "ipc": 10,
        "syn_iterations": args.syn_iterations,
        "student_epochs": args.epochs,
        "protocol": "ConvNet-128 student, soft labels of the teacher ensemble on every augmented batch (MSE + "
                    "gamma*GT, Eq. 11), top-1 on the 10k test split after the LAST epoch, mean ± sample std over "
                    "student seeds (one synthetic set per row, syn_seed 0)",
        "rows": rows,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    base = next((r["mean"] for r in rows if r["variant"] == "authors"), None)
    lines = ["| variant | changed from `authors` | top-1 % (last epoch) | Δ vs authors | per seed |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        delta = "" if base is None or r["variant"] == "authors" else f"{r['mean'] - base:+.2f}"
        lines.append(f"| {r['variant']} | {', '.join(r['changed']) or '—'} | {r['mean']:.2f} ± {r['std']:.2f} | "
                     f"{delta} | {', '.join(f'{v:.2f}' for v in r['per_seed'])} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
