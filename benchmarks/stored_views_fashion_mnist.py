"""Stored-views benchmark (issue 17): does the exported folder alone train as well as the teachers?

On the README's default recipe (``recipes/fashion_mnist/gvbsm_ipc10_cpu.yaml``), one distilled set,
the same student protocol (ConvNet-128, Eq. 11, last epoch, 3 seeds), three label sources:

* ``on_the_fly``: the teacher ensemble labels every augmented batch (needs the teachers);
* ``stored_dense``: the stored views exported in the ``views`` config, one view per student epoch,
  fp16 logits of every class (what ``StoredViews`` replays from the folder alone);
* ``stored_compact``: ``--compact-views`` views per image cycled (view = epoch mod V) with only the
  ``--compact-topk`` largest fp16 logits.

The first two come from the pipeline (rows ``soft`` and ``stored_views`` of evaluate/results.json);
the compact row relabels the same images with ``relabel_stored`` and trains with ``evaluate_students``.
Label and image sizes are the parquet files of an export of each.

    python benchmarks/stored_views_fashion_mnist.py --seeds 0 1 2 --epochs 300
    # the same under CutMix (every paper recipe): views relabelled on the mixed crop
    python benchmarks/stored_views_fashion_mnist.py --seeds 0 1 2 --epochs 300 --extra="--cutmix_prob 1.0" \
        --work-dir runs/stored_views_cutmix --out benchmarks/results/stored_views_fashion_mnist_cutmix.json
    # seconds (tests/test_benchmarks.py): see SMOKE (scikit-learn digits); nothing kept
    python benchmarks/stored_views_fashion_mnist.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
from pathlib import Path

RECIPE = Path(__file__).parents[1] / "recipes" / "fashion_mnist" / "gvbsm_ipc10_cpu.yaml"
# --smoke: the same recipe on 200 scikit-learn digits, one ConvNet-32 teacher trained for one epoch, 2 synthesis
# iterations, one student epoch and seed, 2 compact views; --work-dir and --out in a temporary folder (deleted)
SMOKE = dict(seeds=[0], epochs=1, compact_views=2,
             extra=["--dataset_name digits --teachers convnet32 --teacher_epochs 1 --max_train_samples 200 "
                    "--max_eval_samples 100 --stats_max_samples 64 --syn_iterations 2 --syn_checkpoint_every 1 "
                    "--student convnet32 --accept_unhealthy_synthesis true"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--compact-views", type=int, default=30)
    p.add_argument("--compact-topk", type=int, default=3)
    p.add_argument("--recipe", default=str(RECIPE), help="recipe file (default: the README's default recipe)")
    p.add_argument("--work-dir", default="runs/stored_views_fashion_mnist")
    p.add_argument("--out", default="benchmarks/results/stored_views_fashion_mnist.json")
    p.add_argument("--extra", nargs="*", default=[], help="More recipe overrides, quoted.")
    p.add_argument("--smoke", action="store_true", help=f"seconds-long check of the code path ({SMOKE}, unless "
                   "given; --work-dir and --out in a temporary folder, deleted)")
    args = p.parse_args()
    if not args.smoke:
        stored_views(args)
        return
    with tempfile.TemporaryDirectory(prefix="stored-views-smoke-") as tmp:
        p.set_defaults(**SMOKE, work_dir=str(Path(tmp) / "runs"), out=str(Path(tmp) / "stored_views.json"))
        stored_views(p.parse_args())


def stored_views(args: argparse.Namespace) -> None:
    from gvbsm_hf.export.engine import export_distilled_dataset
    from gvbsm_hf.export.layout import export_sizes
    from gvbsm_hf.pipeline import parse_recipe, run_pipeline
    from gvbsm_hf.relabel.engine import relabel_stored
    from gvbsm_hf.relabel.store import StoredSoftLabels
    from gvbsm_hf.relabel.views import ViewSampling
    from gvbsm_hf.stages import STAGE_REGISTRY
    from gvbsm_hf.stage_cache import StageCache
    from gvbsm_hf.stage import StageContext
    from gvbsm_hf.synthetic_set import SyntheticSet
    from gvbsm_hf.evaluate.runs import evaluate_students

    work = Path(args.work_dir)
    recipe_file = Path(args.recipe).resolve()
    argv = ["--config", str(recipe_file), "--output_dir", str(work / "run"), "--eval_seeds", *map(str, args.seeds),
            "--num_train_epochs", str(args.epochs), "--baselines", "gvbsm",
            # what this benchmark compares: on-the-fly labels against the stored views of the same set, one student
            "--relabel_mode", "on_the_fly", "--relabel_export_views", "true", "--eval_students", "convnet128",
            *[tok for item in args.extra for tok in shlex.split(item)]]
    recipe = parse_recipe(argv)
    summary = run_pipeline(recipe)
    rows = {r["labels"]: r for r in summary["results"] if r["method"] == recipe.synthesis.syn_method}

    out_dir = Path(recipe.training.output_dir)
    from gvbsm_hf.data import DatasetSpec

    spec = DatasetSpec.from_dict(json.loads((out_dir / "data_spec.json").read_text()))
    syn = SyntheticSet.load(out_dir / "recover" / recipe.synthesis.syn_method.replace("+", "_"))
    dense = StoredSoftLabels.load(out_dir / "relabel" / recipe.synthesis.syn_method.replace("+", "_"))
    images = syn.shipped_images(spec)

    # the compact labels: same teachers (the relabel stage's ensemble), fewer views, top-k fp16
    from accelerate import Accelerator

    ctx = StageContext(recipe=recipe, accelerator=Accelerator(cpu=True), output_dir=out_dir,
                       cache=StageCache(out_dir, []), dataset=None, spec=spec, logger=None)
    STAGE_REGISTRY["squeeze"].load(ctx)
    STAGE_REGISTRY["relabel"]._ensemble(ctx)
    compact = relabel_stored(
        images, ctx.ensemble,
        dataclasses.replace(recipe.relabel, relabel_num_views=args.compact_views, relabel_topk=args.compact_topk),
        ViewSampling(spec.image_size, crop_scale=tuple(recipe.training.student_crop_scale),
                     cutmix_prob=float(recipe.training.cutmix_prob)))
    from gvbsm_hf.data import load_image_dataset, to_uint8_tensors

    d = recipe.data
    validation = to_uint8_tensors(load_image_dataset(d.dataset_name, max_eval_samples=d.max_eval_samples,
                                                     seed=recipe.training.seed)["validation"], spec)
    targs = dataclasses.replace(recipe.training, output_dir=str(work / "compact_eval"))
    res = evaluate_students(images, syn.labels, validation, spec, targs, seeds=args.seeds, stored=compact)
    per_seed = [r["top1"] for r in res["per_run"]]

    sizes = {}
    for name, views in (("dense", dense), ("compact", compact)):
        folder = export_distilled_dataset(work / f"export_{name}", images=syn.uint8_images(spec), labels=syn.labels,
                                          spec=spec, stored_views=views.to_dataset(), method={"syn_method": "gvbsm"})
        sizes[name] = export_sizes(folder)
    import numpy as np

    def row(mode, mean, std, seeds_, size):
        return {"mode": mode, "mean": float(mean), "std": float(std), "per_seed": [float(x) for x in seeds_],
                "label_mb": size["label_mb"], "image_mb": size["image_mb"]}

    result = {
        "command": "python benchmarks/stored_views_fashion_mnist.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "ipc": 10,
        "recipe": str(recipe_file.relative_to(Path(__file__).resolve().parents[1])),
        "cutmix_prob": float(recipe.training.cutmix_prob),
        "student_epochs": args.epochs,
        "protocol": "ConvNet-128 student, Eq. 11, top-1 on the 10k test split after the LAST epoch, mean ± sample std "
                    "over seeds; one distilled set; label sizes = parquet of the `views` config",
        "views": {"dense": dense.num_views, "compact": compact.num_views, "compact_topk": args.compact_topk},
        "rows": [
            row("on_the_fly", rows["soft"]["mean"], rows["soft"]["std"], rows["soft"]["per_seed"],
                {"label_mb": 0.0, "image_mb": sizes["dense"]["image_mb"]}),
            row("stored_dense", rows["stored_views"]["mean"], rows["stored_views"]["std"],
                rows["stored_views"]["per_seed"], sizes["dense"]),
            row("stored_compact", np.mean(per_seed), np.std(per_seed, ddof=1) if len(per_seed) > 1 else 0.0,
                per_seed, sizes["compact"]),
        ],
    }
    result["gap_stored_dense_to_on_the_fly"] = round(result["rows"][0]["mean"] - result["rows"][1]["mean"], 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
