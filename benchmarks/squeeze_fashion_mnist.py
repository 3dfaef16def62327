"""Squeeze benchmark: train the small-dataset teachers on Fashion-MNIST, report test top-1 and wall time.

Goal: convnet128 >= 91 % top-1 on the Fashion-MNIST test split (used as validation).

    python benchmarks/squeeze_fashion_mnist.py                          # all five teachers, 10 epochs
    accelerate launch --num_processes 2 benchmarks/squeeze_fashion_mnist.py --teachers convnet128
    python benchmarks/squeeze_fashion_mnist.py --epochs 1 --teachers convnet128 --max-train-samples 2000
    python benchmarks/squeeze_fashion_mnist.py --smoke   # seconds: see SMOKE (digits); nothing kept

Writes ``--out`` (JSON) and the same path with ``.md`` (a markdown table). Teachers are saved under
``--teacher-dir/<name>`` (``load_teacher`` reads them); an interrupted run resumes from their checkpoints.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from gvbsm_hf.squeeze.config import SqueezeArguments
from gvbsm_hf.squeeze.engine import train_teacher

DEFAULT_TEACHERS = ["convnet128", "resnet18_cifar", "wrn_16_2", "mobilenetv2_050", "shufflenetv2_050"]
GOAL = {"convnet128": 0.91}
# --smoke (tests/test_benchmarks.py): one cheap teacher, one epoch on 200 scikit-learn digits, teacher and results
# in a temporary folder (deleted); explicit flags still win
SMOKE = dict(dataset="digits", teachers=["convnet32"], epochs=1, max_train_samples=200, batch_size=64, cpu=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", nargs="+", default=DEFAULT_TEACHERS, help="Backbone names to train.")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05, help="Peak SGD learning rate (cosine, warm-up).")
    p.add_argument("--batch-size", type=int, default=128, help="Global batch size.")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--no-augment", action="store_true", help="Disable pad-4 crop + flip.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train-samples", type=int, default=None, help="Class-balanced subset (smoke runs).")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--cpu", action="store_true", help="Force CPU even if a GPU is present.")
    p.add_argument("--teacher-dir", default="runs/squeeze_fashion_mnist", help="Teacher folders (+ checkpoints).")
    p.add_argument("--out", default="benchmarks/results/squeeze_fashion_mnist.json")
    p.add_argument("--dataset", default="fashion_mnist", help="built-in dataset (--smoke: digits)")
    p.add_argument("--smoke", action="store_true",
                   help=f"seconds-long check of the code path ({SMOKE}, unless given; --teacher-dir and --out in a "
                        "temporary folder, deleted)")
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    if not args.smoke:
        squeeze(args)
        return
    with tempfile.TemporaryDirectory(prefix="squeeze-smoke-") as tmp:
        p.set_defaults(**SMOKE, teacher_dir=str(Path(tmp) / "teachers"), out=str(Path(tmp) / "squeeze.json"))
        squeeze(p.parse_args())


def squeeze(args: argparse.Namespace) -> None:
    from gvbsm_hf.data import get_dataset_spec, load_image_dataset, to_uint8_tensors

    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    t0 = time.perf_counter()
    dsd = load_image_dataset(args.dataset, max_train_samples=args.max_train_samples, seed=args.seed)
    spec = get_dataset_spec(dsd, args.dataset)
    train = to_uint8_tensors(dsd["train"], spec)
    validation = to_uint8_tensors(dsd["validation"], spec)
    data_time = time.perf_counter() - t0
    accelerator.print(f"{args.dataset}: {len(train[0])} train / {len(validation[0])} test images ({data_time:.1f} s)")

    squeeze = SqueezeArguments(
        teachers=list(args.teachers), teacher_epochs=args.epochs, teacher_lr=args.lr,
        teacher_batch_size=args.batch_size, teacher_weight_decay=args.weight_decay,
        teacher_label_smoothing=args.label_smoothing, teacher_augment=not args.no_augment, teacher_seed=args.seed,
    )
    rows = []
    for name in args.teachers:
        start = time.perf_counter()
        teacher = train_teacher(
            name, train, validation, spec, squeeze, accelerator=accelerator,
            output_dir=Path(args.teacher_dir) / name,
        )
        wall = time.perf_counter() - start
        row = {
            "teacher": name,
            "val_top1": teacher.metrics["val_top1"],
            "wall_time_s": round(wall, 1),
            "train_time_s": teacher.metrics["train_time_s"],
            "epochs": args.epochs,
            "parameters": sum(p.numel() for p in teacher.parameters()),
            "goal_top1": GOAL.get(name),
        }
        rows.append(row)
        accelerator.print(f"{name}: test top-1 {100 * row['val_top1']:.2f} %, {wall:.0f} s")

    if accelerator.is_main_process:
        result = {
            "benchmark": "squeeze_fashion_mnist",
            "settings": {k: v for k, v in vars(args).items()},
            "train_images": len(train[0]),
            "validation_images": len(validation[0]),
            "validation_split": "test",
            "processes": accelerator.num_processes,
            "device": torch.cuda.get_device_name() if accelerator.device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "rows": rows,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        lines = [
            "# Squeeze on Fashion-MNIST",
            "",
            f"{result['train_images']} train images, top-1 on the {result['validation_images']} test images after the "
            f"last epoch; {args.epochs} epochs, global batch {args.batch_size}, peak lr {args.lr}, "
            f"{result['processes']} process(es) on {result['device']}.",
            "",
            "| teacher | test top-1 | goal | wall time (s) | parameters |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            goal = "" if r["goal_top1"] is None else (
                f">= {100 * r['goal_top1']:.0f} % ({'met' if r['val_top1'] >= r['goal_top1'] else 'NOT met'})"
            )
            lines.append(f"| {r['teacher']} | {100 * r['val_top1']:.2f} % | {goal} | {r['wall_time_s']} | {r['parameters']:,} |")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        accelerator.print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
