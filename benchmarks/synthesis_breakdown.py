"""Cost of one synthesis (recover) iteration, SRe2L mode vs full G-VBSM, on the same backbone.

Runs the real synthesis step (``gvbsm_hf.recover.engine``: augmentation, teacher forward/backward,
hooks, losses, Adam, clipping) on one batch of ``--ipc`` x ``--classes`` images, for four settings
that add one component at a time:

    ce_only        CE only, no hooks                        -> forward/backward (+ crop, Adam)
    sre2l          + BN matching (Eq. 1, alpha 0)           -> BN cost
    sre2l+conv     + Conv matching of every layer (Eq. 10)  -> Conv (GSM) cost
    gvbsm          + DD (Eq. 5) + SDS EMA (alpha 0.8)       -> DD cost; the full method

Each is timed over ``--iterations`` steps, ``--repeats`` times interleaved (median). The FLOPs of
one teacher forward+backward are counted with ``torch.utils.flop_counter`` and divided by the
``ce_only`` time to give the achieved rate, compared with a float32 matmul measured here.
Statistics targets come from a record pass over random pixels (cost does not depend on content),
recorded as the synthesis expects them (``check_statistics_fit``): with the recording augmentation
family and patch mode of the synthesis protocol (``--syn-protocol``, default: the package's,
``SynthesisArguments.syn_protocol``), once per distinct (augmentation, crop scale, patch mode) of the
four settings.

    python benchmarks/synthesis_breakdown.py                    # convnet128, Fashion-MNIST shape
    python benchmarks/synthesis_breakdown.py --backbone resnet18_cifar --iterations 5
    python benchmarks/synthesis_breakdown.py --syn-protocol gvbsm_hf_v0   # gvbsm-hf 0.1's protocol
    python benchmarks/synthesis_breakdown.py --smoke            # seconds: convnet32, 1 step, no file written

Writes ``benchmarks/results/synthesis_breakdown.json`` (``--smoke``: nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics as pystats
import time
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F

VARIANTS = {  # name: (method, its options; unset: the method's defaults)
    "ce_only": ("gvbsm", dict(syn_r_bn=0.0, syn_r_conv=0.0, syn_dd=False, syn_alpha=0.0)),
    "sre2l": ("sre2l", {}),
    "sre2l+conv": ("gvbsm", dict(syn_dd=False, syn_alpha=0.0)),
    "gvbsm": ("gvbsm", {}),
}
# --smoke: the smallest run of the same code path (tests/test_benchmarks.py); explicit flags still win
SMOKE = dict(backbone="convnet32", classes=4, ipc=2, iterations=1, repeats=1, warmup=0, matmul_size=256, output=None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def teacher_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return int(counter.get_total_flops())


def main() -> None:
    # the package is imported here, not at the top: synthesis_imagenet_scale.py imports this module's helpers
    from gvbsm_hf.backbones import create_backbone
    from gvbsm_hf.record.config import StatisticsArguments
    from gvbsm_hf.recover.config import PROTOCOLS, SynthesisArguments
    from gvbsm_hf.data import DatasetSpec
    from gvbsm_hf.record.engine import record_statistics
    from gvbsm_hf.methods import method_config
    from gvbsm_hf.recover.job_runner import JobRunner
    from gvbsm_hf.recover.teacher_slot import TeacherSlot
    from gvbsm_hf.recover.jobs import plan_jobs
    from gvbsm_hf.record.compatibility import stats_augment_kind, stats_patch_mode

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="convnet128")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ipc", type=int, default=10, help="batch = ipc x classes (one reorder-loop job)")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--syn-protocol", default=None, choices=sorted(PROTOCOLS),
                   help="synthesis protocol of every setting (default: the package's default)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n float32 matmul peak measurement")
    p.add_argument("--output", default=str(Path(__file__).parent / "results" / "synthesis_breakdown.json"))
    p.add_argument("--smoke", action="store_true",
                   help=f"seconds-long check of the code path ({SMOKE}, unless given); writes no file")
    args = p.parse_args()
    if args.smoke:
        p.set_defaults(**SMOKE)
        args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    spec = DatasetSpec(name="bench", num_classes=args.classes, image_size=args.image_size, channels=args.channels,
                       mean=(0.5,) * args.channels, std=(0.25,) * args.channels)
    teacher = create_backbone(args.backbone, args.classes, args.channels, args.image_size).to(device).eval()
    stats_args = StatisticsArguments(stats_patch_size=args.patch_size, stats_conv_target="input")
    g = torch.Generator().manual_seed(0)
    n_stats = 16 if args.smoke else 128
    batches = [(torch.randint(0, 256, (n_stats, args.channels, args.image_size, args.image_size), generator=g,
                              dtype=torch.uint8), torch.zeros(n_stats, dtype=torch.long)) for _ in range(4)]
    protocol = {} if args.syn_protocol is None else {"syn_protocol": args.syn_protocol}
    recorded: dict[tuple, object] = {}  # (augmentation family, crop scale, patch mode) -> statistics

    runners: dict[str, JobRunner] = {}
    stack = ExitStack()
    for name, (method, options) in VARIANTS.items():
        syn = method_config(method, SynthesisArguments(
            syn_method=method, ipc=args.ipc, syn_iterations=10**6, syn_mixed_precision=args.mixed_precision,
            syn_channels_last=args.channels_last, **protocol), **options)
        # the statistics this synthesis accepts (record.compatibility.check_statistics_fit): recorded with its
        # protocol's augmentation family (random crops of `syn_crop_scale`) and patch mode
        key = (stats_augment_kind(stats_args, syn.syn_augment), tuple(syn.syn_crop_scale),
               stats_patch_mode(stats_args, syn))
        if key not in recorded:
            recorded[key] = record_statistics(teacher, batches, spec, StatisticsArguments(
                stats_patch_size=args.patch_size, stats_conv_target="input", stats_augment=key[0],
                stats_patch_mode=key[2]), crop_scale=key[1])
        stats = recorded[key]
        slot = TeacherSlot(teacher, stats, syn, stats_args, device, stack)
        slot.hooks.enabled = False
        job = plan_jobs(args.classes, args.ipc, None, None)[0]
        runners[name] = JobRunner(job, [slot], spec, syn, device, Path("/nonexistent"), None)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(args.warmup + args.repeats):
        for name, runner in runners.items():
            for other in runners.values():
                other.slots[0].hooks.enabled = False
            sync(device)
            t = time.perf_counter()
            for _ in range(args.iterations):
                runner.step()
            runner.sums = {}
            sync(device)
            if r >= args.warmup:
                samples[name].append((time.perf_counter() - t) / args.iterations)
    stack.close()
    ms = {k: 1e3 * pystats.median(v) for k, v in samples.items()}
    batch = args.ipc * args.classes
    x = torch.randn(batch, args.channels, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.classes, (batch,), device=device)
    flops = teacher_flops(teacher, x, y)
    peak = matmul_gflops(device, n=args.matmul_size)
    achieved = flops / (ms["ce_only"] / 1e3) / 1e9
    result = {
        "backbone": args.backbone,
        "input_shape": [args.channels, args.image_size, args.image_size],
        "batch_size": batch,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mixed_precision": args.mixed_precision,
        "channels_last": args.channels_last,
        "syn_protocol": syn.syn_protocol,
        "statistics_recorded_with": [{"augment": a, "crop_scale": list(c), "patch_mode": m} for a, c, m in recorded],
        "ms_per_iteration": {k: round(v, 2) for k, v in ms.items()},
        "breakdown_ms": {
            "forward_backward_adam": round(ms["ce_only"], 2),
            "bn_matching": round(ms["sre2l"] - ms["ce_only"], 2),
            "conv_matching": round(ms["sre2l+conv"] - ms["sre2l"], 2),
            "dd_and_sds": round(ms["gvbsm"] - ms["sre2l+conv"], 2),
        },
        "gvbsm_over_sre2l": round(ms["gvbsm"] / ms["sre2l"], 3),
        "goal_gvbsm_over_sre2l": 1.5,
        "meets_goal": ms["gvbsm"] / ms["sre2l"] <= 1.5,
        "teacher_forward_backward_gflop": round(flops / 1e9, 3),
        "achieved_gflops_forward_backward": round(achieved, 1),
        "matmul_peak_gflops_measured": round(peak, 1),
        "fraction_of_matmul_peak": round(achieved / peak, 3),
        "command": "python benchmarks/synthesis_breakdown.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items()
            if k not in ("output", "smoke") and v is not None and v is not False),
    }
    if args.output:  # --smoke: printed only
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
