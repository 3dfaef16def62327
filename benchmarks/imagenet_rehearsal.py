"""Dress rehearsal of the ImageNet-1k path on the CPU: `recipes/imagenet1k/gvbsm_ipc10.yaml` ITSELF,
shrunk by command-line overrides only, on a generated ImageNet-shaped image folder.

The folder (``make_imagenet_folder``): ``<root>/{train,validation}/n0xxxxxxx/*.JPEG``, JPEGs of
mixed sizes and aspect ratios (about 0.5 to 2), one grayscale ('L') and one CMYK file, at least 20
classes, a few images per class. The recipe runs end to end to the exported dataset folder at
224 px with its four torchvision teachers (trained 1 epoch from scratch: no pretrained weights
offline), patch 16, logit normalisation and the tv:resnet18 student; what is shrunk is listed in
``SHRINK`` (iterations, epochs, IPC, sample caps, workers). ``tests/test_imagenet_path.py`` runs
the same rehearsal in-process.

This script runs every stage in its own process (``recipes/distill.py ... --stages <stage>`` on
one output folder, each stage loading what the earlier ones wrote), and measures per stage the
wall time and the peak resident memory of that process tree (the RSS of the stage process plus
the memory only its DataLoader workers hold, their USS, sampled every 50 ms; or the process's own
``ru_maxrss`` if larger). Each stage's time includes the process start (imports, loading the folder, the data
spec), ``startup_s`` of the printed table (not in the JSON) is that cost measured alone.

    python benchmarks/imagenet_rehearsal.py                           # 20 classes, 4 train (3 used) + 3 val each
    python benchmarks/imagenet_rehearsal.py --classes 20 --train-per-class 2 --val-per-class 1  # smallest (IPC 2)
    python benchmarks/imagenet_rehearsal.py --smoke   # seconds: see SMOKE; no file written

Writes ``benchmarks/results/imagenet_rehearsal.json``:
``{"command", "images", "classes", "processes", "stages": {"<stage>": {"wall_s", "peak_rss_mb"}}}``.

``--smoke`` (``tests/test_benchmarks.py``) runs the same code path at its smallest: 2 classes, one
teacher and student (ShuffleNet-V2 0.5x, the recipe's smallest) at 128 px (still the ImageNet
preprocessing: ``gvbsm_hf.augment_families.IMAGENET_SCALE``), every stage in ONE process (``--one-process``:
each stage process would repeat the imports), in a temporary folder that is deleted; no results file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "imagenet1k" / "gvbsm_ipc10.yaml"
DISTILL = REPO / "recipes" / "distill.py"
STAGES = ["squeeze", "record", "recover", "relabel", "evaluate", "export"]

# What the rehearsal changes in the recipe, all of it size: no pretrained weights (offline), so the
# four teachers train one epoch from scratch; 4 recover iterations (each of the four teachers once,
# round robin); IPC 2 (the smallest with the DD term of Eq. 5); one student epoch and seed; sample caps; 2 workers on 2 cores; 4 iterations
# on one-epoch teachers do not make a set the teachers recognise, so the health check is told to
# accept it (accept_unhealthy_synthesis; the card says so). bf16 stays
# for synthesis (syn_mixed_precision); the Trainer's `bf16: true` is refused without a bf16 GPU.
SHRINK = [
    "--teacher_pretrained", "false", "--teacher_epochs", "1",
    "--max_train_samples", "60", "--stats_max_samples", "20",
    "--ipc", "2", "--syn_iterations", "4", "--syn_checkpoint_every", "2", "--syn_classes_per_batch", "10",
    "--num_train_epochs", "1", "--eval_seeds", "0", "--eval_students", "tv:resnet18",
    "--dataloader_workers", "2", "--accept_unhealthy_synthesis", "true",
]


# --smoke: the rehearsal at its smallest (module docstring); explicit flags still win
SMOKE = dict(classes=2, train_per_class=2, val_per_class=1, one_process=True, output=None,
             extra="--teachers tv:shufflenet_v2_x0_5 --student tv:shufflenet_v2_x0_5 "
                   "--eval_students tv:shufflenet_v2_x0_5 --image_size 128 --max_train_samples 4 "
                   "--stats_max_samples 4 --syn_iterations 2 --syn_checkpoint_every 1 --dataloader_workers 0")


def cpu_overrides() -> list[str]:
    """``--bf16 false`` where TrainingArguments refuses bf16 (no bf16 GPU)."""
    import torch

    return [] if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else ["--bf16", "false"]


def rehearsal_argv(dataset: str | Path, output_dir: str | Path, *extra: str) -> list[str]:
    """The command-line arguments of the rehearsal (after ``recipes/distill.py``)."""
    return ["--config", str(RECIPE), "--dataset_name", str(dataset), "--output_dir", str(output_dir),
            *SHRINK, *cpu_overrides(), *extra]


def make_imagenet_folder(root: str | Path, classes: int = 20, train_per_class: int = 4, val_per_class: int = 3,
                         seed: int = 0) -> dict:
    """An ImageNet-shaped image folder: ``root/{train,validation}/<wnid>/<wnid>_<i>.JPEG``.

    Every image is a JPEG of its own size (shorter side 120..400 px, aspect ratio 0.5..2, so both
    landscape and portrait), drawn as a class colour, a class-dependent stripe pattern and noise
    (something a teacher can learn); the first training image of class 0 is grayscale ('L') and
    the first of class 1 CMYK. Returns ``{"root", "images", "classes", "sizes", "modes"}``."""
    import numpy as np
    from PIL import Image

    if classes < 2 or train_per_class < 1 or val_per_class < 1:
        raise ValueError("need >= 2 classes and >= 1 train / validation image per class")
    root = Path(root)
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 226, size=(classes, 3))
    sizes, modes, n = set(), {}, 0
    for split, per_class in (("train", train_per_class), ("validation", val_per_class)):
        for c in range(classes):
            wnid = f"n{1440764 + 1000 * c:08d}"
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                short = int(rng.integers(120, 401))
                aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
                w, h = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
                yy, xx = np.mgrid[0:h, 0:w]
                stripes = np.sin((xx * np.cos(c) + yy * np.sin(c)) * (0.02 + 0.01 * (c % 5)))[..., None]
                img = palette[c][None, None, :] * (0.75 + 0.25 * stripes) + rng.normal(0, 20, (h, w, 3))
                im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
                if split == "train" and i == 0 and c == 0:
                    im = im.convert("L")
                elif split == "train" and i == 0 and c == 1:
                    im = im.convert("CMYK")
                path = folder / f"{wnid}_{i}.JPEG"
                im.save(path, format="JPEG", quality=90)
                sizes.add(im.size)
                modes[im.mode] = modes.get(im.mode, 0) + 1
                n += 1
    return {"root": str(root), "images": n, "classes": classes, "sizes": sorted(sizes), "modes": modes}


def _tree_rss(proc) -> int:
    """Resident memory (bytes) of a psutil process and its children, 0 once it is gone: the process's
    RSS plus each child's USS (the memory only that child holds), so that DataLoader workers, forked
    from the stage process, do not count the pages they share with it a second time."""
    import psutil

    try:
        total = proc.memory_info().rss
        children = proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in children:
        try:
            total += p.memory_full_info().uss
        except psutil.AccessDenied:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], env: dict, log) -> dict:
    """Run ``cmd``; wall time and peak RSS (MB) of its process tree. Raises on a non-zero exit."""
    try:
        import psutil
    except ImportError:  # only the process's own ru_maxrss then
        psutil = None
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
    peak = 0
    handle = psutil.Process(child.pid) if psutil is not None else None
    while True:
        if handle is not None:
            peak = max(peak, _tree_rss(handle))
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        log.flush()
        tail = Path(log.name).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {child.returncode} (log: {log.name}); its end:\n{tail}")
    peak = max(peak, usage.ru_maxrss * 1024)  # ru_maxrss is in KiB on Linux
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(peak / 2**20, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--train-per-class", type=int, default=4)
    p.add_argument("--val-per-class", type=int, default=3)
    p.add_argument("--workdir", default=None, help="folder for the images and the run (default: a temporary one)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the stage processes")
    p.add_argument("--extra", default="", help="more recipe overrides after SHRINK, one quoted string, e.g. "
                   "--extra='--ipc 4'")
    p.add_argument("--one-process", action="store_true",
                   help="every stage in one process (measured together as 'all'), no separate start-up probe")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "imagenet_rehearsal.json"))
    p.add_argument("--smoke", action="store_true",
                   help=f"seconds-long check of the code path ({SMOKE}, unless given; a temporary --workdir, "
                        "deleted); writes no results file")
    args = p.parse_args()
    if not args.smoke:
        rehearse(args)
        return
    p.set_defaults(**SMOKE)
    args = p.parse_args()
    if args.workdir:
        rehearse(args)
    else:
        with tempfile.TemporaryDirectory(prefix="imagenet-rehearsal-smoke-") as tmp:
            args.workdir = tmp
            rehearse(args)


def rehearse(args: argparse.Namespace) -> None:
    """The rehearsal of ``main``'s arguments."""
    import shlex

    extra = shlex.split(args.extra)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="imagenet-rehearsal-"))
    folder = make_imagenet_folder(work / "imagenet", args.classes, args.train_per_class, args.val_per_class)
    out = work / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(work / "hf_datasets_cache"))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    base = [sys.executable, str(DISTILL), *rehearsal_argv(folder["root"], out, *extra)]
    stages = {}
    with open(work / "rehearsal.log", "w") as log:
        # the process start alone, which every stage process repeats: imports, recipe, the folder, the data spec
        probe = [sys.executable, "-c", "import sys; from gvbsm_hf.pipeline import parse_recipe; from gvbsm_hf.data import load_image_dataset, "
                 "get_dataset_spec; r = parse_recipe(sys.argv[1:]); d = r.data; "
                 "ds = load_image_dataset(d.dataset_name, max_train_samples=d.max_train_samples, "
                 "image_size=d.image_size, channels=d.channels, seed=r.training.seed); "
                 "get_dataset_spec(ds, d.dataset_name, image_size=d.image_size, channels=d.channels)",
                 *rehearsal_argv(folder["root"], work / "probe")]
        startup = None if args.one_process else run_measured(probe, env, log)
        for stage, selected in ([("all", STAGES)] if args.one_process else [(s, [s]) for s in STAGES]):
            stages[stage] = run_measured(base + ["--stages", *selected], env, log)
            print(f"{stage:>9}: {stages[stage]['wall_s']:8.2f} s  {stages[stage]['peak_rss_mb']:9.1f} MB", flush=True)
    if startup is not None:
        print(f"{'startup':>9}: {startup['wall_s']:8.2f} s  {startup['peak_rss_mb']:9.1f} MB  (in every stage's figures)")
    exported = sorted((out / "export").glob("*/README.md"))
    if not exported:
        raise RuntimeError(f"no exported dataset folder in {out / 'export'}")
    shown = [str(Path(a).relative_to(REPO)) if a == str(RECIPE) else a
             for a in rehearsal_argv("<generated_folder>", "<output_dir>", *extra)]
    result = {
        "command": (f"python benchmarks/imagenet_rehearsal.py --classes {args.classes} --train-per-class "
                    f"{args.train_per_class} --val-per-class {args.val_per_class}"
                    + (f" --threads {args.threads}" if args.threads else "")
                    + (f" --extra={shlex.quote(args.extra)}" if args.extra else "")
                    + (" --one-process" if args.one_process else "")
                    + ("  # all stages: python recipes/distill.py " + " ".join(shown) if args.one_process else
                       "  # each stage: python recipes/distill.py " + " ".join(shown) + " --stages <stage>")),
        "images": int(folder["images"]),
        "classes": int(folder["classes"]),
        "processes": 1,
        "stages": stages,
    }
    if args.output:  # --smoke: printed only
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
