"""One synthesis (recover) batch at ImageNet scale: seconds per synthetic image and peak memory.

The batch of `recipes/imagenet1k/gvbsm_ipc10.yaml`: 100 images (50 classes x 2 slots) at 224 px,
its four torchvision teachers (random weights: the cost does not depend on them), 1000 classes,
round robin, the full G-VBSM loss of the recipe (CE + BN + Conv matching with patch 16, DD, SDS
EMA; its syn_* values), through the package's recover engine (``gvbsm_hf.recover.engine.JobRunner``:
augmentation, teacher forward/backward, hooks, losses, Adam, clipping). Conv statistics come from
a record pass over random pixels (the cost does not depend on them either).

Variants: ``fp32``; ``bf16`` (``syn_mixed_precision: bf16``, autocast); ``channels_last``
(``syn_channels_last: true``); ``bf16+channels_last`` (what the recipe sets); ``compile``
(``torch.compile`` of every teacher, fp32; recorded as skipped, with the reason, if it fails).
Each variant runs in its own process (a clean peak memory, and a failing compile cannot take the
others down): one warm-up step per teacher (two with compile: the first call compiles, and the
statistics hooks' state makes the second compile once more), then ``--steps`` timed steps per
teacher (their median); a round-robin
step costs the mean over the teachers, and

    s_per_image = seconds per step * syn_iterations (4000) / batch

(every image of an IPC-10 run is in one batch that runs all 4000 iterations). ``peak_mem_mb``: the
process's peak RSS on the CPU; ``torch.cuda.max_memory_allocated`` on a GPU. The CPU's measured
float32 matmul rate is written alongside (``cpu_matmul_peak_gflops``); the printed table adds the
rate achieved on the FLOPs of a step (teacher forward + backward to the pixels,
``torch.utils.flop_counter``; hooks and losses not counted) and its fraction of that peak.

    python benchmarks/synthesis_imagenet_scale.py                       # CPU (--steps 2), + CUDA if present
    python benchmarks/synthesis_imagenet_scale.py --batch 4 --image-size 64 --steps 1   # quick check
    python benchmarks/synthesis_imagenet_scale.py --smoke   # seconds: fp32, ShuffleNet-V2 only, 128 px, no file

Writes ``benchmarks/results/synthesis_imagenet_scale.json``: ``{"command", "batch", "image_size",
"teachers", "cpu": {"<variant>": {"s_per_image", "peak_mem_mb"}}, "cpu_matmul_peak_gflops",
"gpu": null or {"device", "<variant>": {...}}}`` (``--smoke``: nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "imagenet1k" / "gvbsm_ipc10.yaml"
VARIANTS = {
    "fp32": dict(syn_mixed_precision="no", syn_channels_last=False, compile=False),
    "bf16": dict(syn_mixed_precision="bf16", syn_channels_last=False, compile=False),
    "channels_last": dict(syn_mixed_precision="no", syn_channels_last=True, compile=False),
    "bf16+channels_last": dict(syn_mixed_precision="bf16", syn_channels_last=True, compile=False),
    "compile": dict(syn_mixed_precision="no", syn_channels_last=False, compile=True),
}
NUM_CLASSES = 1000
# --smoke: the smallest run of the same code path (tests/test_benchmarks.py), on the CPU, one variant process with
# the recipe's cheapest teacher at the ImageNet-scale threshold (128 px); explicit flags still win
SMOKE = dict(batch=2, image_size=128, steps=1, gpu_steps=1, variants=["fp32"], teachers=["tv:shufflenet_v2_x0_5"],
             devices=["cpu"], warmup=1, variant_timeout=300, matmul_size=256, output=None)


from synthesis_breakdown import matmul_gflops, sync  # noqa: E402  (the same helpers as the breakdown benchmark)


def _recipe():
    """The ImageNet recipe (``--bf16 false`` where TrainingArguments refuses bf16: it is the
    student's setting, not synthesis')."""
    import torch

    from gvbsm_hf.recipe import parse_recipe

    extra = [] if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else ["--bf16", "false"]
    return parse_recipe(["--config", str(RECIPE), *extra])


def worker(device_name: str, variant: str, batch: int, image_size: int, steps: int, threads: int | None,
           teacher_names: list[str] | None = None, warmup_steps: int | None = None) -> dict:
    """One variant on one device, in this process: the timing row (printed as the last line)."""
    import dataclasses
    import resource

    import torch
    import torch.nn.functional as F

    from gvbsm_hf.backbones import create_backbone
    from gvbsm_hf.data import IMAGENET_MEAN, IMAGENET_STD, DatasetSpec
    from gvbsm_hf.methods import method_config
    from gvbsm_hf.record.engine import record_statistics
    from gvbsm_hf.recover.job_runner import JobRunner
    from gvbsm_hf.recover.teacher_slot import TeacherSlot
    from gvbsm_hf.recover.jobs import plan_jobs
    from gvbsm_hf.record.compatibility import stats_augment_kind, stats_patch_mode

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    opts = VARIANTS[variant]
    r = _recipe()
    syn_args = dataclasses.replace(r.synthesis, syn_mixed_precision=opts["syn_mixed_precision"],
                                   syn_channels_last=opts["syn_channels_last"])
    config = method_config(syn_args.syn_method, syn_args)
    stats_args = r.stats
    spec = DatasetSpec(name="imagenet-scale", num_classes=NUM_CLASSES, image_size=image_size, channels=3,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD)
    slots_per_batch = 2 if batch % 2 == 0 else 1
    job = plan_jobs(NUM_CLASSES, slots_per_batch, batch // slots_per_batch, slots_per_batch)[0]
    assert len(job) == batch, (len(job), batch)

    g = torch.Generator().manual_seed(0)
    stats_batches = [(torch.randint(0, 256, (8, 3, image_size, image_size), generator=g, dtype=torch.uint8),
                      torch.zeros(8, dtype=torch.long))]
    names = list(teacher_names or r.squeeze.teachers)
    teachers, flops = [], []
    for name in names:
        model = create_backbone(name, NUM_CLASSES, 3, image_size, pretrained=False).to(device).eval()
        teachers.append(model)
        from torch.utils.flop_counter import FlopCounterMode

        for p in model.parameters():  # as in synthesis: gradients w.r.t. the pixels only
            p.requires_grad_(False)
        x = torch.randn(2, 3, image_size, image_size, device=device, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x), torch.zeros(2, dtype=torch.long, device=device)).backward()
        flops.append(counter.get_total_flops() / 2 * batch)
    recording = dataclasses.replace(stats_args, stats_augment=stats_augment_kind(stats_args, config.syn_augment),
                                    stats_patch_mode=stats_patch_mode(stats_args, config))
    stats = [record_statistics(t, stats_batches, spec, recording, crop_scale=tuple(config.syn_crop_scale))
             for t in teachers]
    stack = ExitStack()
    slots = [TeacherSlot(t, s, config, stats_args, device, stack) for t, s in zip(teachers, stats)]
    if opts["compile"]:
        for slot in slots:
            slot.model = torch.compile(slot.model)
    runner = JobRunner(job, slots, spec, config, device, Path("/nonexistent"), None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one_step(k: int) -> float:
        runner.iteration = k  # round robin picks teacher `iteration % 4`
        sync(device)
        t = time.perf_counter()
        runner.step()
        sync(device)
        runner.sums = {}
        return time.perf_counter() - t

    # warm-up: oneDNN / cuDNN primitives, and torch.compile's graphs: the statistics hooks fill their
    # dicts on the first call, so a compiled teacher is compiled again on its second call, then stable
    rounds = warmup_steps if warmup_steps is not None else (2 if opts["compile"] else 1)
    warmup = [sum(one_step(k) for _ in range(rounds)) for k in range(len(slots))]
    per_teacher = [sorted(one_step(k) for _ in range(steps))[(steps - 1) // 2] for k in range(len(slots))]
    stack.close()
    s_per_step = sum(per_teacher) / len(per_teacher)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gflop_step = sum(flops) / len(flops) / 1e9
    return {
        "s_per_image": s_per_step * config.syn_iterations / batch,
        "peak_mem_mb": round(peak, 1),
        "s_per_step": s_per_step,
        "per_teacher_s": dict(zip(names, per_teacher)),
        "warmup_s": dict(zip(names, warmup)),
        "teacher_fwd_bwd_gflop_per_step": gflop_step,
        "syn_iterations": config.syn_iterations,
        "threads": torch.get_num_threads(),
    }


def run_variant(device: str, variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--device", device, "--variant", variant, "--batch", str(args.batch),
           "--image-size", str(args.image_size), "--steps", str(args.steps if device == "cpu" else args.gpu_steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.teachers:
        cmd += ["--teachers", *args.teachers]
    if args.warmup is not None:
        cmd += ["--warmup", str(args.warmup)]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), timeout=args.variant_timeout)
    except subprocess.TimeoutExpired:
        return {"s_per_image": None, "peak_mem_mb": None, "skipped": f"did not finish in {args.variant_timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:  # failed before its result: the exception line of the traceback, else the exit status
        tail = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        errors = [line for line in tail if not line.startswith((" ", "W", "I", "[")) and (
            "Error" in line or "Exception" in line)]
        status = f"exit code {proc.returncode}" + (" (killed by a signal)" if proc.returncode < 0 else "")
        reason = f"{errors[-1].strip()[:400]} ({status})" if errors else status
        return {"s_per_image": None, "peak_mem_mb": None, "skipped": reason}
    row = json.loads(lines[-1])
    if proc.returncode != 0:  # measured, then failed while exiting (e.g. compile workers at shutdown)
        print(f"note: {device} {variant} exited with {proc.returncode} after writing its result", flush=True)
    row["process_s"] = time.perf_counter() - t
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=2, help="timed steps per teacher on the CPU")
    p.add_argument("--gpu-steps", type=int, default=20, help="timed steps per teacher on a GPU")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--teachers", nargs="+", default=None, help="default: the recipe's four (a subset for quick checks)")
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up steps per teacher (default 1; 2 for compile, which compiles twice)")
    p.add_argument("--variant-timeout", type=int, default=3600, help="seconds per variant process (then: skipped)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n float32 matmul peak measurement")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "synthesis_imagenet_scale.json"))
    p.add_argument("--smoke", action="store_true",
                   help=f"seconds-long check of the code path ({SMOKE}, unless given); writes no file")
    p.add_argument("--keep", action="store_true",
                   help="keep the variants already in --output (same batch, size, teachers) that this run does not redo")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        p.set_defaults(**SMOKE)
        args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.device, args.variant, args.batch, args.image_size, args.steps, args.threads,
                                args.teachers, args.warmup)))
        return

    import torch

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    if args.threads:
        torch.set_num_threads(args.threads)
    teachers = list(args.teachers or _recipe().squeeze.teachers)
    result = {
        "command": "python benchmarks/synthesis_imagenet_scale.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k in ("batch", "image_size", "steps", "gpu_steps", "variants", "devices", "threads", "teachers")
            and v is not None),
        "batch": args.batch,
        "image_size": args.image_size,
        "teachers": teachers,
        "cpu": None,
        "cpu_matmul_peak_gflops": round(matmul_gflops(torch.device("cpu"), n=args.matmul_size), 1),
        "gpu": None,
    }
    out = Path(args.output) if args.output else None  # --smoke: printed only
    if args.keep and out is not None and out.exists():  # a run completed piecewise (e.g. the slow compile variant later)
        old = json.loads(out.read_text())
        if (old["batch"], old["image_size"], old["teachers"]) != (args.batch, args.image_size, teachers):
            raise SystemExit(f"--keep: {out} was measured with another batch, image size or teacher set")
        result["command"] = old["command"] + " && " + result["command"] + " --keep"
        result["cpu"], result["gpu"] = old.get("cpu"), old.get("gpu")
    peak_cpu = result["cpu_matmul_peak_gflops"]
    print(f"{'device':>6} {'variant':>19} {'s/image':>9} {'s/step':>8} {'peak MB':>9} {'GFLOP/s':>8} {'of peak':>7}  per teacher (s)")
    for device in devices:
        section: dict = dict(result["cpu" if device == "cpu" else "gpu"] or {})
        if device == "cuda":
            section["device"] = torch.cuda.get_device_name(0)
        for variant in args.variants:
            row = run_variant(device, variant, args)
            section[variant] = {"s_per_image": row["s_per_image"], "peak_mem_mb": row["peak_mem_mb"]}
            if row.get("skipped"):
                section[variant]["skipped"] = row["skipped"]
                print(f"{device:>6} {variant:>19} skipped: {row['skipped']}", flush=True)
                if args.smoke:  # a smoke run checks the code path: a failed variant is a failure
                    raise SystemExit(f"--smoke: {device} {variant} failed: {row['skipped']}")
                continue
            rate = row["teacher_fwd_bwd_gflop_per_step"] / row["s_per_step"]
            frac = f"{rate / peak_cpu:7.2f}" if device == "cpu" else "      -"
            teachers_s = ", ".join(f"{k.split(':')[-1]} {v:.3f}" for k, v in row["per_teacher_s"].items())
            print(f"{device:>6} {variant:>19} {row['s_per_image']:9.3f} {row['s_per_step']:8.3f} {row['peak_mem_mb']:9.1f} "
                  f"{rate:8.1f} {frac}  {teachers_s} ({row['threads']} threads; warm-up "
                  f"{sum(row['warmup_s'].values()):.1f} s)", flush=True)
        result["cpu" if device == "cpu" else "gpu"] = section
    result["cpu"] = result["cpu"] or {}
    print(f"cpu float32 matmul: {peak_cpu} GFLOP/s; {platform.processor() or platform.machine()}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
