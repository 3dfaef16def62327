"""Time and peak memory of the StoredSoftLabels storage path: ``to_dataset``, ``save``, ``load``.

Builds a :class:`gvbsm_hf.relabel.engine.StoredSoftLabels` of ``N`` images x ``V`` views x ``K`` classes
(fp16 dense logits by default; ``--topk k`` stores the top-k instead) with random contents, then
runs each phase in a fresh subprocess so that its peak RSS is its own:

* ``to_dataset``: ``stored.to_dataset()`` (the ``views`` table of an export);
* ``save``: ``stored.save(folder)`` (``soft_labels.parquet`` + ``soft_labels_meta.json``);
* ``load``: ``StoredSoftLabels.load(folder)`` of what ``save`` wrote (checked bit-exact afterwards).

Peak memory is ``ru_maxrss`` at the end of the phase minus the RSS just before it (the labels
themselves are built before, in fp16, chunk by chunk, so building them does not set the peak; a
warm-up of every phase on 4 images first takes the lazy imports out of the measurement).
Each phase runs ``--repeats`` times (default 2; the CPUs may be shared) and the minimum of the
times and of the peaks is kept.

"before" is the implementation at ``--baseline`` (a git revision of ``src/gvbsm_hf/relabel.py``,
default the last commit with the list-based storage, or a path to a copy of the file); "after" is
the ``gvbsm_hf.relabel.engine`` installed now.

    python benchmarks/stored_labels_memory.py                     # N=20000 V=4 K=100: 8M logits
    python benchmarks/stored_labels_memory.py --n 2000 --repeats 1 # quick
    python benchmarks/stored_labels_memory.py --skip-before        # only the current code

Writes ``benchmarks/results/stored_labels_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELABEL_PATH = "src/gvbsm_hf/relabel.py"
DEFAULT_BASELINE = "cfa4050"  # last commit whose StoredSoftLabels went through Python lists
PHASES = ("to_dataset", "save", "load")


# ---- worker (one phase, one process) ---------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _import_impl(impl: str):
    """The StoredSoftLabels class of ``impl``: 'current' or a path to a copy of relabel.py."""
    if impl == "current":
        from gvbsm_hf.relabel.engine import StoredSoftLabels

        return StoredSoftLabels
    import importlib.util

    import gvbsm_hf  # noqa: F401  (parent package, for the copy's relative imports)

    spec = importlib.util.spec_from_file_location("gvbsm_hf._bench_relabel", impl)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.StoredSoftLabels


def _build(cls, n: int, v: int, k: int, topk: int | None, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, v, 2, generator=g) * 16
    boxes = torch.cat([xy, xy + 8 + torch.rand(n, v, 2, generator=g) * 8], dim=-1)
    flip = torch.rand(n, v, generator=g) > 0.5
    kwargs = {}
    if topk is None:
        logits = torch.empty(n, v, k, dtype=torch.float16)
        for lo in range(0, n, 1000):  # chunks: no full-size float32 transient
            hi = min(n, lo + 1000)
            logits[lo:hi] = (torch.randn(hi - lo, v, k, generator=g) * 4).half()
        kwargs["logits"] = logits
    else:
        values = torch.empty(n, v, topk, dtype=torch.float16)
        indices = torch.empty(n, v, topk, dtype=torch.int16 if k <= 32767 else torch.int32)
        for lo in range(0, n, 1000):
            hi = min(n, lo + 1000)
            z = torch.randn(hi - lo, v, k, generator=g) * 4
            vals, inds = z.topk(topk, dim=-1)
            values[lo:hi], indices[lo:hi] = vals.half(), inds.to(indices.dtype)
        kwargs.update(topk_values=values, topk_indices=indices)
    return cls(boxes=boxes, flip=flip, num_classes=k, image_size=(32, 32), out_size=32, seed=seed,
               extra={"benchmark": "stored_labels_memory"}, **kwargs)


def _same(a, b) -> bool:
    import torch

    ok = torch.equal(a.boxes, b.boxes) and torch.equal(a.flip, b.flip) and a.metadata() == b.metadata()
    for name in ("logits", "topk_values", "topk_indices"):
        ta, tb = getattr(a, name), getattr(b, name)
        ok = ok and (ta is None) == (tb is None)
        if ta is not None:
            ok = ok and ta.dtype == tb.dtype and torch.equal(ta, tb)
    return bool(ok)


def worker(args: argparse.Namespace) -> None:
    import gc

    cls = _import_impl(args.impl)
    # warm-up on 4 images: lazy imports (datasets, pyarrow.parquet, builders) are not the phase's cost
    tiny = _build(cls, 4, args.v, args.k, args.topk)
    warm = Path(args.folder + "_warmup")
    tiny.save(warm)
    tiny.to_dataset()
    cls.load(warm)
    del tiny
    stored = None if args.phase == "load" else _build(cls, args.n, args.v, args.k, args.topk)
    gc.collect()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    if args.phase == "to_dataset":
        out = stored.to_dataset()
        assert len(out) == args.n
    elif args.phase == "save":
        stored.save(args.folder)
    else:
        out = cls.load(args.folder)
    seconds = time.perf_counter() - t0
    peak = _peak_mb() - rss0
    result = {"phase": args.phase, "seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": rss0}
    if args.phase == "load":
        del out  # measured; now check the round trip against freshly built labels
        gc.collect()
        result["round_trip_exact"] = _same(_build(cls, args.n, args.v, args.k, args.topk), cls.load(args.folder))
    print("RESULT " + json.dumps(result), flush=True)


# ---- driver ----------------------------------------------------------------------------------


def _baseline_file(baseline: str, tmp: Path) -> str:
    if Path(baseline).is_file():
        return str(Path(baseline).resolve())
    text = subprocess.run(["git", "show", f"{baseline}:{RELABEL_PATH}"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout
    path = tmp / "relabel_baseline.py"
    path.write_text(text)
    return str(path)


def _run_phase(impl: str, phase: str, folder: Path, args: argparse.Namespace, cache: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", phase, "--impl", impl, "--folder", str(folder),
           "--n", str(args.n), "--v", str(args.v), "--k", str(args.k)]
    if args.topk is not None:
        cmd += ["--topk", str(args.topk)]
    # a fresh datasets cache per run: no cache hit from an earlier run, nothing left in ~/.cache
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(cache), TQDM_DISABLE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{phase} ({impl}) failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def measure(impl: str, args: argparse.Namespace, tmp: Path) -> dict:
    best: dict[str, dict] = {}
    exact = True
    for rep in range(args.repeats):
        folder = tmp / f"stored_{Path(impl).stem}_{rep}"
        for phase in PHASES:  # save writes the folder that load reads
            cache = tmp / f"cache_{Path(impl).stem}_{rep}_{phase}"
            r = _run_phase(impl, phase, folder, args, cache)
            print(f"  {Path(impl).name:24s} {phase:10s} {r['seconds']:8.3f} s  +{r['peak_rss_mb']:8.1f} MB", flush=True)
            b = best.setdefault(phase, {"seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"]})
            b["seconds"] = min(b["seconds"], r["seconds"])
            b["peak_rss_mb"] = min(b["peak_rss_mb"], r["peak_rss_mb"])
            exact = exact and r.get("round_trip_exact", True)
    parquet = tmp / f"stored_{Path(impl).stem}_0" / "soft_labels.parquet"
    out = {f"{p}_s": round(best[p]["seconds"], 4) for p in PHASES}
    out["peak_rss_mb"] = round(max(best[p]["peak_rss_mb"] for p in PHASES), 1)
    out.update({f"{p}_peak_rss_mb": round(best[p]["peak_rss_mb"], 1) for p in PHASES})
    out["parquet_mb"] = round(parquet.stat().st_size / 2**20, 2)
    out["round_trip_exact"] = bool(exact)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20000, help="images")
    p.add_argument("--v", type=int, default=4, help="views per image")
    p.add_argument("--k", type=int, default=100, help="classes")
    p.add_argument("--topk", type=int, default=None, help="store the top-k logits instead of dense ones")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--baseline", default=DEFAULT_BASELINE,
                   help=f"git revision of {RELABEL_PATH}, or a path to a copy of it ('before')")
    p.add_argument("--skip-before", action="store_true", help="measure only the current code")
    p.add_argument("--output", default=str(ROOT / "benchmarks/results/stored_labels_memory.json"))
    p.add_argument("--worker", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--impl", default="current", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.phase = args.worker
        worker(args)
        return

    width = args.topk if args.topk is not None else args.k
    result: dict = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "n_logits": args.n * args.v * width,
        # in-memory size of the labels (fp16 logits / top-k values + indices, float32 boxes, bool flips)
        "labels_mb": round(args.n * args.v * (width * (2 if args.topk is None else 2 + (2 if args.k <= 32767 else 4))
                                              + 16 + 1) / 2**20, 1),
        "shape": {"n": args.n, "v": args.v, "k": args.k, "topk": args.topk},
        "repeats": args.repeats,
        "notes": "min over repeats; peak_rss_mb = max over phases of (ru_maxrss after phase - RSS before), "
                 "each phase in its own process after a 4-image warm-up; includes some tens of MB of allocator / "
                 "thread-pool start-up that does not grow with the labels; 2 shared CPU cores, timings approximate",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    with tempfile.TemporaryDirectory(prefix="stored_labels_bench_") as tmp_s:
        tmp = Path(tmp_s)
        if not args.skip_before:
            base = _baseline_file(args.baseline, tmp)
            result["baseline"] = args.baseline
            print(f"before ({args.baseline})")
            result["before"] = measure(base, args, tmp)
        print("after (current gvbsm_hf.relabel.engine)")
        result["after"] = measure("current", args, tmp)
    if "before" in result:
        b, a = result["before"], result["after"]
        result["speedup"] = {f"{ph}": round(b[f"{ph}_s"] / max(a[f"{ph}_s"], 1e-9), 1) for ph in PHASES}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
