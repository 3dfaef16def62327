"""Throughput of the statistics hooks (record stage, Eq. 9) and their cost per synthesis iteration.

1. Record pass: images/s of ``record_statistics`` (normalise + forward + Conv statistics of every
   layer + float64 accumulation) vs plain inference (normalise + forward) of the same teacher on
   the same uint8 batches under ``torch.no_grad``. Goal: ratio >= 0.8.
2. Synthesis iteration: forward + backward of a synthetic batch (default 100) through the teacher
   with no hooks, BN-only hooks (SRe2L) and BN+Conv hooks (G-VBSM), the loss being CE plus an L2
   distance of every statistic to a fixed target (the shape of Eq. 6/10).

Inputs are Fashion-MNIST sized (1x28x28, random pixels: throughput does not depend on content).

    python benchmarks/statistics_throughput.py                       # full run
    python benchmarks/statistics_throughput.py --num-batches 5 --iterations 5 --repeats 2  # quick
    python benchmarks/statistics_throughput.py --smoke   # seconds: convnet32, tiny batches, no file written

Writes ``benchmarks/results/statistics_throughput.json`` (``--smoke``: nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics as pystats
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gvbsm_hf.data import DatasetSpec
from gvbsm_hf.hooks import StatisticsHooks
from gvbsm_hf.record.config import StatisticsArguments
from gvbsm_hf.record.engine import record_statistics


# --smoke: the smallest run of the same code path (tests/test_benchmarks.py); explicit flags still win
SMOKE = dict(teacher="convnet32", batch_size=16, num_batches=2, syn_batch_size=8, iterations=1, repeats=1, warmup=0,
             output=None)


def build_teacher(name: str, num_classes: int, in_chans: int, image_size: int) -> tuple[nn.Module, str]:
    try:
        from gvbsm_hf.backbones import create_backbone

        return create_backbone(name, num_classes, in_chans, image_size), name
    except Exception as err:  # zoo not available: documented fallback
        import timm

        print(f"create_backbone({name!r}) failed ({err!r}); falling back to timm resnet18")
        return timm.create_model("resnet18", pretrained=False, num_classes=num_classes, in_chans=in_chans), "timm:resnet18"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="convnet128")
    p.add_argument("--batch-size", type=int, default=256, help="record-pass batch size")
    p.add_argument("--num-batches", type=int, default=20, help="record-pass batches per measurement")
    p.add_argument("--syn-batch-size", type=int, default=100, help="synthetic batch of the iteration benchmark")
    p.add_argument("--iterations", type=int, default=20, help="synthesis iterations per measurement")
    p.add_argument("--repeats", type=int, default=5, help="measurements per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--conv-target", default="input", choices=["input", "output"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(Path(__file__).parent / "results" / "statistics_throughput.json"))
    p.add_argument("--smoke", action="store_true",
                   help=f"seconds-long check of the code path ({SMOKE}, unless given); writes no file")
    args = p.parse_args()
    if args.smoke:
        p.set_defaults(**SMOKE)
        args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    spec = DatasetSpec(name="fashion_mnist", num_classes=10, image_size=28, channels=1, mean=(0.2860,), std=(0.3530,))
    teacher, teacher_name = build_teacher(args.teacher, spec.num_classes, spec.channels, spec.image_size)
    teacher = teacher.to(device).eval()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    teacher = teacher.to(memory_format=memory_format)
    for prm in teacher.parameters():
        prm.requires_grad_(False)

    g = torch.Generator().manual_seed(args.seed)
    batches = [
        (torch.randint(0, 256, (args.batch_size, 1, 28, 28), generator=g, dtype=torch.uint8).to(device),
         torch.zeros(args.batch_size, dtype=torch.long, device=device))
        for _ in range(args.num_batches)
    ]
    n_images = args.batch_size * args.num_batches

    # ----------------------------------------------------------------- 1. record pass
    def plain() -> None:
        with torch.no_grad():
            for images, _ in batches:
                teacher(spec.normalize(images))

    def record() -> None:
        record_statistics(teacher, batches, spec, StatisticsArguments(stats_patch_size=args.patch_size,
                                                                      stats_conv_target=args.conv_target))

    for _ in range(args.warmup):
        plain()
        record()
    plain_t, record_t = [], []
    for _ in range(args.repeats):  # interleaved so that machine load hits both alike
        plain_t.append(timed(plain, device))
        record_t.append(timed(record, device))
    plain_ips = n_images / pystats.median(plain_t)
    record_ips = n_images / pystats.median(record_t)

    # ----------------------------------------------------------------- 2. synthesis iteration
    x = torch.randn(args.syn_batch_size, 1, 28, 28, device=device).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    y = torch.randint(0, spec.num_classes, (args.syn_batch_size,), generator=g).to(device)

    def make_iteration(hooks: StatisticsHooks | None):
        targets = hooks.bn_targets() if hooks is not None else {}
        targets = {k: (m.to(device), v.to(device)) for k, (m, v) in targets.items()}

        def step() -> None:
            for _ in range(args.iterations):
                loss = F.cross_entropy(teacher(x), y)
                if hooks is not None:
                    for name, (m, v) in hooks.bn_stats.items():
                        tm, tv = targets[name]
                        loss = loss + torch.linalg.vector_norm(m - tm) + torch.linalg.vector_norm(v - tv)
                    for d in hooks.conv_stats.values():
                        for t in d.values():
                            loss = loss + torch.linalg.vector_norm(t - t.detach() * 0.9)
                loss.backward()
                x.grad = None
                if hooks is not None:
                    hooks.clear()

        return step

    iteration_ms: dict[str, float] = {}
    variants = {"no_hooks": None, "bn_only": dict(bn=True, conv=False), "bn_conv": dict(bn=True, conv=True)}
    steps, all_hooks = {}, []
    for label, kw in variants.items():
        hooks = None
        if kw is not None:
            hooks = StatisticsHooks(teacher, conv_target=args.conv_target, patch_size=args.patch_size, enabled=False, **kw)
            all_hooks.append(hooks)
        steps[label] = (hooks, make_iteration(hooks))
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.warmup + args.repeats):
        for label, (hooks, step) in steps.items():
            for h in all_hooks:
                h.enabled = h is hooks
            t = timed(step, device)
            if r >= args.warmup:
                samples[label].append(t)
    for h in all_hooks:
        h.remove()
    for label, ts in samples.items():
        iteration_ms[label] = 1e3 * pystats.median(ts) / args.iterations

    result = {
        "teacher": teacher_name,
        "input_shape": [1, 28, 28],
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "channels_last": args.channels_last,
        "patch_size": args.patch_size,
        "conv_target": args.conv_target,
        "record": {
            "batch_size": args.batch_size,
            "num_batches": args.num_batches,
            "repeats": args.repeats,
            "plain_inference_images_per_s": round(plain_ips, 1),
            "statistics_pass_images_per_s": round(record_ips, 1),
            "ratio": round(record_ips / plain_ips, 3),
            "goal_ratio": 0.8,
            "meets_goal": record_ips / plain_ips >= 0.8,
        },
        "synthesis_iteration": {
            "batch_size": args.syn_batch_size,
            "iterations": args.iterations,
            "ms_per_iteration": {k: round(v, 3) for k, v in iteration_ms.items()},
            "bn_conv_over_bn_only": round(iteration_ms["bn_conv"] / iteration_ms["bn_only"], 3),
            "bn_only_over_no_hooks": round(iteration_ms["bn_only"] / iteration_ms["no_hooks"], 3),
        },
        "command": "python benchmarks/statistics_throughput.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items()
            if k not in ("output", "smoke") and v is not None and v is not False
        ),
    }
    if args.output:  # --smoke: printed only
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
