"""Time and peak memory of the StoredSoftLabels storage path: ``save``, ``load``, ``read``, ``to_dataset``.

Builds a :class:`gvbsm_hf.relabel.store.StoredSoftLabels` of ``N`` images x ``V`` views x ``K`` classes
(fp16 dense logits by default; ``--topk k`` stores the top-k instead) with random contents, then
runs each phase in a fresh subprocess so that its peak RSS is its own:

* ``save``: ``stored.save(folder)``, the run folder's file (``soft_labels.safetensors`` now; the
  baseline wrote ``soft_labels.parquet`` + ``soft_labels_meta.json``);
* ``load``: ``StoredSoftLabels.load(folder)`` of what ``save`` wrote (checked bit-exact afterwards;
  the safetensors file is mapped, so nothing is read yet);
* ``read``: ``load`` and then every value read once (what a student touches over ``V`` epochs;
  the pages of a mapped file count in RSS as file-backed page cache, which the OS can drop);
* ``to_dataset``: ``stored.to_dataset()``, the ``views`` table of an export (parquet stays the
  export format, so both implementations share this code).

Peak memory is the peak RSS during the phase (``VmHWM``, reset just before it through
``/proc/self/clear_refs``; ``ru_maxrss`` where that is refused) minus the RSS just before it: the
labels are built before, so building them does not count, and a warm-up of every phase on 4 images
first takes the lazy imports out of the measurement. It includes the pages of a mapped file once
read (file-backed page cache, which the OS can drop); ``anon`` is the private memory the loaded
labels hold at the end of ``load`` / ``read`` (a copy of the file in the parquet baseline, nothing
for the mapped safetensors file). Each phase runs ``--repeats`` times (default 2; the CPUs may be
shared) and the minimum of each number is kept.

"before" is the implementation at ``--baseline`` (a git revision of ``src/gvbsm_hf/relabel/engine.py``,
default the last commit whose run folder held parquet, or a path to a copy of the file); "after" is
the ``gvbsm_hf.relabel.store`` installed now.

    python benchmarks/stored_labels_memory.py                     # N=20000 V=4 K=100: 8M logits
    python benchmarks/stored_labels_memory.py --n 2000 --repeats 1 # quick
    python benchmarks/stored_labels_memory.py --skip-before        # only the current code
    python benchmarks/stored_labels_memory.py --smoke              # seconds, current code, no results file

Writes ``benchmarks/results/stored_labels_memory.json`` (not with ``--smoke``).
"""

from __future__ import annotations

import argparse
import importlib.util
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
RELABEL_PATH = "src/gvbsm_hf/relabel/engine.py"
DEFAULT_BASELINE = "a192abd"  # last commit whose run folder held soft_labels.parquet (Arrow plumbing)
PHASES = ("save", "load", "read", "to_dataset")


# ---- worker (one phase, one process) ---------------------------------------------------------


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _reset_peak() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS, so that building the labels does not set it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb(reset: bool) -> float:
    return _status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _import_impl(impl: str):
    """The StoredSoftLabels class of ``impl``: 'current' or a path to a copy of an older module."""
    if impl == "current":
        from gvbsm_hf.relabel.store import StoredSoftLabels

        return StoredSoftLabels
    import gvbsm_hf.relabel  # noqa: F401  (parent packages, for the copy's relative imports)

    text = Path(impl).read_text()
    package = "gvbsm_hf.relabel" if "from .." in text else "gvbsm_hf"  # relabel/engine.py or the older relabel.py
    spec = importlib.util.spec_from_file_location(f"{package}._bench_baseline", impl)
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
    rows = max(1, 2**20 // (v * k))  # images per chunk of random logits
    if topk is None:
        logits = torch.empty(n, v, k, dtype=torch.float16)
        for lo in range(0, n, rows):  # chunks: no full-size float32 transient
            hi = min(n, lo + rows)
            logits[lo:hi] = (torch.randn(hi - lo, v, k, generator=g) * 4).half()
        kwargs["logits"] = logits
    else:
        values = torch.empty(n, v, topk, dtype=torch.float16)
        indices = torch.empty(n, v, topk, dtype=torch.int16 if k <= 32767 else torch.int32)
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            z = torch.randn(hi - lo, v, k, generator=g) * 4
            vals, inds = z.topk(topk, dim=-1)
            values[lo:hi], indices[lo:hi] = vals.half(), inds.to(indices.dtype)
        kwargs.update(topk_values=values, topk_indices=indices)
    return cls(boxes=boxes, flip=flip, num_classes=k, image_size=(32, 32), out_size=32, seed=seed,
               extra={"benchmark": "stored_labels_memory"}, **kwargs)


_TENSORS = ("boxes", "flip", "logits", "topk_values", "topk_indices")


def _read_all(stored) -> float:
    """Read every value once, about 2**16 values at a time (no large transient)."""
    total = 0.0
    for name in _TENSORS:
        t = getattr(stored, name)
        if t is not None:
            for chunk in t.split(max(1, 2**16 // max(1, t[0].numel()))):
                total += float(chunk.double().sum())
    return total


def _same(a, b) -> bool:
    import torch

    ok = a.metadata() == b.metadata()
    for name in _TENSORS:
        ta, tb = getattr(a, name), getattr(b, name)
        ok = ok and (ta is None) == (tb is None)
        if ta is not None:
            ok = ok and ta.dtype == tb.dtype and torch.equal(ta, tb)
    return bool(ok)


def _phase(cls, phase: str, args: argparse.Namespace) -> dict:
    import gc

    stored = _build(cls, args.n, args.v, args.k, args.topk) if phase in ("save", "to_dataset") else None
    out = None
    gc.collect()
    reset = _reset_peak()
    rss0, anon0 = _rss_mb(), _status_mb("RssAnon")
    t0 = time.perf_counter()
    if phase == "to_dataset":
        out = stored.to_dataset()
        assert len(out) == args.n
    elif phase == "save":
        stored.save(args.folder)
    elif phase == "load":
        out = cls.load(args.folder)
    else:
        out = cls.load(args.folder)
        _read_all(out)
    seconds = time.perf_counter() - t0
    result = {"phase": phase, "seconds": seconds, "peak_rss_mb": _peak_mb(reset) - rss0, "rss_before_mb": rss0,
              # private (anonymous) memory the phase's result holds: a mapped file's pages are not in it
              "anon_mb": _status_mb("RssAnon") - anon0}
    if phase == "load":
        del out  # measured; now check the round trip against freshly built labels
        gc.collect()
        result["round_trip_exact"] = _same(_build(cls, args.n, args.v, args.k, args.topk), cls.load(args.folder))
    return result


def worker(args: argparse.Namespace) -> None:
    cls = _import_impl(args.impl)
    # warm-up on 4 images: lazy imports (datasets, pyarrow.parquet, safetensors) are not the phase's cost
    tiny = _build(cls, 4, args.v, args.k, args.topk)
    warm = Path(args.folder + "_warmup")
    tiny.save(warm)
    tiny.to_dataset()
    _read_all(cls.load(warm))
    del tiny
    for phase in args.worker.split(","):  # one phase, except with --smoke
        print("RESULT " + json.dumps(_phase(cls, phase, args)), flush=True)


# ---- driver ----------------------------------------------------------------------------------


def _baseline_file(baseline: str, tmp: Path) -> str:
    if Path(baseline).is_file():
        return str(Path(baseline).resolve())
    text = subprocess.run(["git", "show", f"{baseline}:{RELABEL_PATH}"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout
    path = tmp / "relabel_baseline.py"
    path.write_text(text)
    return str(path)


def _run_phases(impl: str, phases: str, folder: Path, args: argparse.Namespace, cache: Path) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", phases, "--impl", impl, "--folder", str(folder),
           "--n", str(args.n), "--v", str(args.v), "--k", str(args.k)]
    if args.topk is not None:
        cmd += ["--topk", str(args.topk)]
    # a fresh datasets cache per run: no cache hit from an earlier run, nothing left in ~/.cache
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(cache), TQDM_DISABLE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{phases} ({impl}) failed:\n{proc.stderr[-4000:]}")
    return [json.loads(ln[len("RESULT "):]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]


def measure(impl: str, args: argparse.Namespace, tmp: Path) -> dict:
    best: dict[str, dict] = {}
    exact = True
    name = "baseline" if impl != "current" else "current"
    for rep in range(args.repeats):
        folder = tmp / f"stored_{name}_{rep}"
        # save writes the folder that load / read use; one process per phase, all in one with --smoke
        groups = [",".join(PHASES)] if args.smoke else list(PHASES)
        for group in groups:
            for r in _run_phases(impl, group, folder, args, tmp / f"cache_{name}_{rep}_{group}"):
                phase = r["phase"]
                print(f"  {name:10s} {phase:10s} {r['seconds']:8.3f} s  peak +{r['peak_rss_mb']:8.1f} MB  "
                      f"anonymous +{r['anon_mb']:8.1f} MB", flush=True)
                b = best.setdefault(phase, dict(r))
                for key in ("seconds", "peak_rss_mb", "anon_mb"):
                    b[key] = min(b[key], r[key])
                exact = exact and r.get("round_trip_exact", True)
    folder = tmp / f"stored_{name}_0"
    out = {f"{p}_s": round(best[p]["seconds"], 4) for p in PHASES}
    out.update({f"{p}_peak_rss_mb": round(best[p]["peak_rss_mb"], 1) for p in PHASES})
    out.update({f"{p}_anon_mb": round(best[p]["anon_mb"], 1) for p in ("load", "read")})
    out["files"] = sorted(p.name for p in folder.iterdir())
    out["file_mb"] = round(sum(p.stat().st_size for p in folder.iterdir()) / 2**20, 2)
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
    p.add_argument("--smoke", action="store_true",
                   help="seconds: 256 images, current code only, every phase in one process, no results file")
    p.add_argument("--output", default=str(ROOT / "benchmarks/results/stored_labels_memory.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="current", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.smoke:
        args.n, args.repeats, args.skip_before = min(args.n, 256), 1, True

    width = args.topk if args.topk is not None else args.k
    result: dict = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "n_logits": args.n * args.v * width,
        # in-memory size of the labels (fp16 logits / top-k values + indices, float32 boxes, bool flips)
        "labels_mb": round(args.n * args.v * (width * (2 if args.topk is None else 2 + (2 if args.k <= 32767 else 4))
                                              + 16 + 1) / 2**20, 1),
        "shape": {"n": args.n, "v": args.v, "k": args.k, "topk": args.topk},
        "repeats": args.repeats,
        "notes": "min over repeats; *_peak_rss_mb = peak RSS during the phase (VmHWM, reset just before it) - RSS "
                 "before it, each phase in its own process after a 4-image warm-up; it counts the file-backed pages "
                 "of a mapped file once read (page cache the OS can drop); *_anon_mb = private (anonymous) memory "
                 "the loaded labels hold at the end of the phase; 2 shared CPU cores, timings approximate",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    with tempfile.TemporaryDirectory(prefix="stored_labels_bench_") as tmp_s:
        tmp = Path(tmp_s)
        if not args.skip_before:
            base = _baseline_file(args.baseline, tmp)
            result["baseline"] = args.baseline
            print(f"before ({args.baseline}: {RELABEL_PATH})")
            result["before"] = measure(base, args, tmp)
        print("after (current gvbsm_hf.relabel.store)")
        result["after"] = measure("current", args, tmp)
    if "before" in result:
        b, a = result["before"], result["after"]
        result["after_over_before"] = {
            **{f"{ph}_time": round(a[f"{ph}_s"] / max(b[f"{ph}_s"], 1e-9), 2) for ph in PHASES},
            **{f"{ph}_peak": round(a[f"{ph}_peak_rss_mb"] / max(b[f"{ph}_peak_rss_mb"], 1e-9), 2) for ph in PHASES},
        }
    if not result["after"]["round_trip_exact"] or not result.get("before", {}).get("round_trip_exact", True):
        raise SystemExit("round trip not bit-exact")
    if args.smoke:
        print(json.dumps(result["after"], indent=2))
        return
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
