"""ATen ops and time of ONE recover (synthesis) iteration, against a CE-only iteration of the same teacher.

Drives the package's own step (:class:`gvbsm_hf.recover.job_runner.JobRunner` on
:class:`gvbsm_hf.recover.teacher_slot.TeacherSlot`: augmentation, teacher forward with the statistics
hooks, the method's loss, backward, Adam, clipping) on one job of ``--classes-per-job`` classes x
``--slots`` images, and a CE-only iteration on the same images (teacher forward + cross-entropy +
backward + ``torch.optim.Adam`` step, hooks off, nothing else). Per row:

- ``ops_per_iteration``: ATen ops (profiler events named ``aten::*``, nested calls included)
  dispatched in one steady-state iteration (after ``--warmup`` iterations), ``torch.profiler``;
- ``extra_ops_over_ce_only``: that minus the ops of the CE-only iteration (what matching,
  densification, augmentation and the optimiser add);
- ``ms_per_iteration`` (median of ``--repeats`` timed iterations) and ``over_ce_only`` (its ratio to
  the CE-only iteration, measured in the same run).

Rows: convnet128 @ 28 px, resnet18_cifar @ 32 px, and the ImageNet teachers tv:resnet18,
tv:mobilenet_v2, tv:efficientnet_b0, tv:shufflenet_v2_x0_5 @ 224 px (random weights, no download),
methods ``gvbsm`` and ``sre2l``. ``--variant`` labels the rows (``before``: the code as it was
before issue 32; ``after``; ``after_compiled``: ``syn_compile: true``) and replaces only that
variant's rows in the results file, so the variants accumulate.

    python benchmarks/recover_step.py --variant before
    python benchmarks/recover_step.py --variant after
    python benchmarks/recover_step.py --gpu               # CUDA machine: batch 100 @ 224 px, bf16, channels_last
    python benchmarks/recover_step.py --smoke             # seconds: convnet32, batch 2 (also with the --gpu options), writes nothing

``--gpu`` adds the ``gpu`` entry: the four ImageNet teachers at batch 100 (50 classes x 2 slots, the
ImageNet-1k recipe's job) with the options of ``recipes/imagenet1k/gvbsm_ipc10.yaml``; seconds per
ImageNet-1k image of G-VBSM = mean ms per iteration over the four teachers (round robin) x the recipe's
``syn_iterations`` / batch; ``sync_debug_clean``: the steady-state iterations ran under
``torch.cuda.set_sync_debug_mode("error")`` without an error.

Writes ``benchmarks/results/recover_step.json`` (``--smoke``: nothing); ``--breakdown TOP`` also writes
``recover_step_breakdown.json``: per row the TOP ATen ops by self CPU time of one method and one CE-only
iteration (where the time over CE-only goes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics as pystats
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "recover_step.json"
RECIPE = REPO / "recipes" / "imagenet1k" / "gvbsm_ipc10.yaml"
CPU_ROWS = [("convnet128", 28, 1, 10), ("resnet18_cifar", 32, 3, 10), ("tv:resnet18", 224, 3, 1000),
            ("tv:mobilenet_v2", 224, 3, 1000), ("tv:efficientnet_b0", 224, 3, 1000),
            ("tv:shufflenet_v2_x0_5", 224, 3, 1000)]
"""(backbone, image size, channels, classes)."""
IMAGENET = [r for r in CPU_ROWS if r[1] == 224]
METHODS = ("gvbsm", "sre2l")
VARIANTS = ("before", "after", "after_compiled")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_aten_ops(fn) -> int:
    """ATen ops dispatched by ``fn()`` (profiler events ``aten::*``, nested calls included)."""
    from torch.profiler import ProfilerActivity, profile  # the profiler is only needed here

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def op_times(fn, top: int) -> dict[str, Any]:
    """Self CPU milliseconds of ``fn()`` per ATen op (torch.profiler), the ``top`` largest and the total."""
    from torch.profiler import ProfilerActivity, profile  # the profiler is only needed here

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()]
    events.sort(key=lambda e: -e[1])
    return {"total_ms": round(sum(e[1] for e in events), 1),
            "top": [{"op": k, "ms": round(ms, 1), "calls": n} for k, ms, n in events[:top]]}


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls."""
    samples = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        samples.append(1e3 * (time.perf_counter() - t))
    return pystats.median(samples)


@contextmanager
def sync_debug(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def recipe_options() -> dict[str, Any]:
    """The ImageNet-1k G-VBSM recipe's synthesis options (``syn_iterations``, its ``gvbsm`` group, patch size)."""
    import yaml  # read only by --gpu

    recipe = yaml.safe_load(RECIPE.read_text())
    return {"syn_iterations": int(recipe["syn_iterations"]), "method_args": recipe["method_args"]["gvbsm"],
            "patch_size": int(recipe["stats_patch_size"]), "syn_lr": float(recipe["syn_lr"])}


def measure(backbone: str, size: int, channels: int, classes: int, method: str, *, variant: str, classes_per_job: int,
            slots: int, device: torch.device, warmup: int, repeats: int, gpu: dict | None = None,
            breakdown: int = 0, patch_mode: str | None = None) -> dict[str, Any]:
    """One row: the method's iteration and the CE-only iteration of the same teacher on one job."""
    # the package is imported here, after main() put src/ on the path (the script runs without installing it)
    from gvbsm_hf.backbones import create_backbone
    from gvbsm_hf.data import DatasetSpec
    from gvbsm_hf.methods import method_config
    from gvbsm_hf.record.compatibility import stats_augment_kind, stats_patch_mode
    from gvbsm_hf.record.config import StatisticsArguments
    from gvbsm_hf.record.engine import record_statistics
    from gvbsm_hf.recover.config import SynthesisArguments
    from gvbsm_hf.recover.job_runner import JobRunner
    from gvbsm_hf.recover.jobs import plan_jobs
    from gvbsm_hf.recover.teacher_slot import TeacherSlot

    torch.manual_seed(0)
    spec = DatasetSpec(name="bench", num_classes=classes, image_size=size, channels=channels,
                       mean=(0.5,) * channels, std=(0.25,) * channels)
    teacher = create_backbone(backbone, classes, channels, size).to(device).eval()
    patch = 16 if size >= 128 else 4
    protocol: dict[str, Any] = {"syn_iterations": 10**6}
    options: dict[str, Any] = {}
    if gpu is not None:
        patch = gpu["patch_size"]
        protocol |= {"syn_mixed_precision": "bf16", "syn_channels_last": True, "syn_lr": gpu["syn_lr"]}
        if method == "gvbsm":
            options = {k: v for k, v in gpu["method_args"].items() if k not in ("syn_init",)}
    syn = method_config(method, SynthesisArguments(syn_method=method, ipc=slots, **protocol), **options)
    if variant == "after_compiled":
        if "syn_compile" not in {f.name for f in dataclasses.fields(syn)}:
            raise SystemExit("--variant after_compiled needs the syn_compile option (issue 32, step 5).")
        syn = dataclasses.replace(syn, syn_compile=True)
    stats_args = StatisticsArguments(stats_patch_size=patch, stats_conv_target="input", stats_patch_mode=patch_mode)
    stats = None
    if syn.uses_conv():
        g = torch.Generator().manual_seed(0)
        batch = [(torch.randint(0, 256, (8, channels, size, size), generator=g, dtype=torch.uint8),
                  torch.zeros(8, dtype=torch.long))]
        kind, mode = stats_augment_kind(stats_args, syn.syn_augment), stats_patch_mode(stats_args, syn)
        stats = record_statistics(teacher, batch, spec, StatisticsArguments(
            stats_patch_size=patch, stats_conv_target="input", stats_augment=kind, stats_patch_mode=mode),
            crop_scale=tuple(syn.syn_crop_scale))
    with ExitStack() as stack:
        slot = TeacherSlot(teacher, stats, syn, stats_args, device, stack)
        job = plan_jobs(classes_per_job, slots, None, None)[0]
        runner = JobRunner(job, [slot], spec, syn, device, Path("/nonexistent"), None)

        def method_step() -> None:
            runner.step()
            runner.sums = {}  # the flush every checkpoint interval is not part of an iteration

        # CE-only: forward + cross-entropy + backward + Adam on the same images, no hooks, nothing else
        x_ce = runner.x.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([x_ce], lr=syn.syn_lr, betas=tuple(syn.syn_adam_betas))
        labels = runner.labels

        def ce_step() -> None:
            slot.hooks.enabled = False
            x_in = x_ce.contiguous(memory_format=torch.channels_last) if syn.syn_channels_last else x_ce
            with runner.autocast():  # the same precision and layout as the method's step (--gpu: bf16, channels_last)
                logits = slot.model(x_in)
            loss = F.cross_entropy(logits.float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(warmup):
            method_step()
            ce_step()
        sync(device)
        ops = count_aten_ops(method_step)
        ops_ce = count_aten_ops(ce_step)
        where = {"method_step": op_times(method_step, breakdown), "ce_only_step": op_times(ce_step, breakdown)} if breakdown else None
        clean = True
        with sync_debug(gpu is not None and device.type == "cuda"):
            try:
                ms = timed(method_step, device, repeats)
            except RuntimeError as err:  # a host sync inside the step under set_sync_debug_mode("error")
                if "synchroniz" not in str(err):
                    raise
                clean = False
                ms = timed(method_step, device, repeats)
        ms_ce = timed(ce_step, device, repeats)
    row = {"backbone": backbone, "image_size": size, "batch": len(job), "method": method, "variant": variant,
           "ops_per_iteration": ops, "extra_ops_over_ce_only": ops - ops_ce, "ms_per_iteration": round(ms, 3),
           "over_ce_only": round(ms / ms_ce, 3)}
    print(json.dumps(row), flush=True)
    return row | ({"_sync_clean": clean} if gpu is not None else {}) | ({"_breakdown": where} if where else {})


def main() -> None:
    sys.path.insert(0, str(REPO / "src"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="after", choices=VARIANTS, help="label of the rows (and syn_compile for "
                   "after_compiled); only this variant's rows are replaced in the results file. 'before' was run on "
                   "the code before issue 32 (commit fc25f61) and is kept in the file")
    p.add_argument("--backbones", nargs="*", default=None, help="subset of the row backbones (default: all)")
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--classes-per-job", type=int, default=2)
    p.add_argument("--slots", type=int, default=2, help="images per class; batch = classes-per-job x slots")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gpu", action="store_true", help="CUDA: the four ImageNet teachers at batch 100 (50 x 2), "
                   "the ImageNet-1k recipe's options, bf16 + channels_last, sync debug mode 'error'")
    p.add_argument("--note", default="", help="appended to the command (e.g. 'timings under load')")
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument("--stats-patch-mode", default=None, choices=["resize", "partial"],
                   help="CPU rows: the Conv patch statistics' mode (default: the protocol's, 'resize' for the authors'); "
                   "with 'partial' write to another --output (the rows' keys do not name the mode)")
    p.add_argument("--breakdown", type=int, default=0, metavar="TOP",
                   help="CPU: also profile one method and one CE-only iteration per row and write the TOP ops by self "
                   "CPU time to recover_step_breakdown.json beside --output (where the time over CE-only goes)")
    p.add_argument("--smoke", action="store_true", help="seconds: convnet32 @ 28 px, batch 2, 2 warm-ups, 1 repeat, "
                   "writes nothing")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(variant=args.variant, warmup=args.warmup, repeats=args.repeats)
    if args.smoke:
        rows = [measure("convnet32", 28, 1, 4, m, classes_per_job=1, slots=2, device=torch.device("cpu"),
                        variant=args.variant if args.variant != "after_compiled" else "after", warmup=2, repeats=1,
                        breakdown=3)
                for m in METHODS]
        # the --gpu options (the ImageNet recipe's gvbsm group, bf16 autocast, channels_last) on the CPU
        rows.append(measure("convnet32", 28, 1, 4, "gvbsm", classes_per_job=1, slots=2, device=torch.device("cpu"),
                            variant="after", warmup=2, repeats=1, gpu=recipe_options() | {"patch_size": 4}))
        assert all(r["ops_per_iteration"] > 0 for r in rows) and rows[-1].pop("_sync_clean")
        assert all(r["_breakdown"]["method_step"]["top"] for r in rows[:-1])
        return
    out = Path(args.output)
    if args.stats_patch_mode == "partial" and out.resolve() == RESULTS.resolve():
        raise SystemExit("--stats-patch-mode partial: pass another --output (the rows' keys do not name the mode), "
                         "e.g. benchmarks/results/recover_step_partial.json")
    result = json.loads(out.read_text()) if out.exists() else {"rows": [], "gpu": None}
    shown, skip = [], False
    for a in sys.argv[1:]:  # the command without --output / --note (the note follows it as a comment)
        if skip or a in ("--output", "--note"):
            skip = not skip and a in ("--output", "--note")
            continue
        shown.append(a)
    command = " ".join(["python benchmarks/recover_step.py", *shown])
    if args.gpu:
        device = torch.device("cuda")
        opts = recipe_options()
        rows = [measure(b, s, c, k, m, classes_per_job=50, slots=2, device=device, gpu=opts, **common)
                for b, s, c, k in IMAGENET for m in args.methods]
        clean = all(r.pop("_sync_clean") for r in rows)
        gv = [r["ms_per_iteration"] for r in rows if r["method"] == "gvbsm"]
        old = (result.get("gpu") or {}).get("rows", [])
        result["gpu"] = {
            "device": torch.cuda.get_device_name(device), "command": command,
            "rows": [r for r in old if r["variant"] != args.variant] + rows,
            "s_per_image_imagenet_gvbsm": round(pystats.mean(gv) / 1e3 * opts["syn_iterations"] / rows[0]["batch"], 4)
            if gv else None,
            "sync_debug_clean": clean,
        }
    else:
        device = torch.device("cpu")
        chosen = [r for r in CPU_ROWS if args.backbones is None or r[0] in args.backbones]
        rows = [measure(b, s, c, k, m, classes_per_job=args.classes_per_job, slots=args.slots, device=device,
                        breakdown=args.breakdown, patch_mode=args.stats_patch_mode, **common)
                for b, s, c, k in chosen for m in args.methods]
        if args.breakdown:
            detail = [{k: r[k] for k in ("backbone", "image_size", "batch", "method", "variant")} | r.pop("_breakdown")
                      for r in rows]
            where = out.with_name(out.stem + "_breakdown.json")
            where.write_text(json.dumps({"command": command, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "rows": detail}, indent=2) + "\n")
            print(f"wrote {where}")
        keys = {(r["backbone"], r["method"], r["variant"]) for r in rows}
        result["rows"] = [r for r in result.get("rows", []) if (r["backbone"], r["method"], r["variant"]) not in keys]
        result["rows"] += rows
        result["rows"].sort(key=lambda r: ([b for b, *_ in CPU_ROWS].index(r["backbone"]) if r["backbone"] in
                                           [b for b, *_ in CPU_ROWS] else 99, r["method"], VARIANTS.index(r["variant"])))
        result["command"] = command + (f"  # {args.note}" if args.note else "")
        result["device"] = "cpu"
        result["threads"] = torch.get_num_threads()
    result = {"command": result.get("command", ""), "torch": torch.__version__, "device": result.get("device", "cpu"),
              "threads": result.get("threads", torch.get_num_threads()), "rows": result["rows"],
              "gpu": result.get("gpu")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
