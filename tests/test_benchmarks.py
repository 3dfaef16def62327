"""Every script in ``benchmarks/`` runs on the current code: ``python benchmarks/<script>.py --smoke``
(each script's smallest configuration of its own code path: tiny data such as scikit-learn digits or
a few generated images, 1-2 iterations / epochs, tiny backbones) exits 0 and writes nothing under
``benchmarks/results/`` (smoke output goes to a temporary folder or nowhere). A new benchmark cannot
skip this: every ``benchmarks/*.py`` must offer ``--smoke`` in its ``--help``.

Select with ``pytest -k benchmarks``. The smokes run one after the other in ONE process
(``sys.executable``, the repository root as working directory, one thread, the Hub offline; each
script through ``runpy`` as ``__main__``, its environment and working directory restored after it),
so the package's imports are paid once, not once per script; each script is still its own test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py"))
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
NEEDS = {"plot_margin.py": "matplotlib", "plot_cross_arch.py": "matplotlib"}  # optional extras (pip install -e ".[plot]"); skipped without them
OWN_TEST = {"cross_arch_fashion_mnist.py": "tests/test_cross_arch.py"}
"""Scripts whose --smoke a test of their own runs (with more checks: the results schema): not run twice."""

# every script's --help in ONE process (runpy), so that the imports are paid once
_HELP_ALL = r"""
import contextlib, io, json, runpy, sys, traceback
paths, out = sys.argv[1:], {}
sys.path.insert(0, sys.argv[1].rsplit("/", 1)[0])  # benchmarks/ (scripts import their siblings)
for path in paths:
    sys.argv = [path, "--help"]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(path, run_name="__main__")
    except SystemExit:
        pass
    except Exception:
        buf.write("ERROR " + traceback.format_exc())
    out[path.rsplit("/", 1)[1]] = buf.getvalue()
print("\n" + json.dumps(out))
"""


# every script's --smoke in ONE process (runpy), each with its exit code, output tail and what it changed
_SMOKE_ALL = r"""
import contextlib, io, json, os, runpy, sys, time, traceback
from pathlib import Path
results, report, paths = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
sys.path.insert(0, paths[0].rsplit("/", 1)[0])  # benchmarks/ (scripts import their siblings)
snap = lambda: {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in results.rglob("*") if p.is_file()}
out, cwd, env = {}, os.getcwd(), dict(os.environ)
for path in paths:
    before, buf, code, t0 = snap(), io.StringIO(), 0, time.perf_counter()
    sys.argv = [path, "--smoke"]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        code, _ = 1, buf.write(traceback.format_exc())
    os.chdir(cwd)
    os.environ.clear(); os.environ.update(env)
    after = snap()
    out[path.rsplit("/", 1)[1]] = {"code": code, "tail": buf.getvalue()[-5000:], "seconds": time.perf_counter() - t0,
                                   "changed": sorted(k for k in after.keys() | before.keys() if after.get(k) != before.get(k))}
    Path(report).write_text(json.dumps(out))
"""


def test_benchmarks_are_found():
    assert len(SCRIPTS) >= 10, SCRIPTS


def test_benchmarks_every_script_offers_smoke():
    proc = subprocess.run([sys.executable, "-c", _HELP_ALL, *(str(BENCHMARKS / s) for s in SCRIPTS)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    helps = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(helps) == SCRIPTS
    errors = {s: h[-1500:] for s, h in helps.items() if h.startswith("ERROR") or "usage:" not in h}
    assert not errors, errors
    missing = [s for s, h in helps.items() if "[--smoke]" not in h]
    assert not missing, f"benchmarks without a --smoke option (see tests/test_benchmarks.py): {missing}"


def _runs_here(script: str) -> bool:
    return script not in OWN_TEST and not (script in NEEDS and importlib.util.find_spec(NEEDS[script]) is None)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> dict[str, dict]:
    """``{script: {"code", "tail", "seconds", "changed"}}`` for every script this module runs."""
    report = tmp_path_factory.mktemp("smokes") / "report.json"
    scripts = [str(BENCHMARKS / s) for s in SCRIPTS if _runs_here(s)]
    proc = subprocess.run([sys.executable, "-c", _SMOKE_ALL, str(RESULTS), str(report), *scripts], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=1200)
    runs = json.loads(report.read_text()) if report.exists() else {}
    if proc.returncode != 0:  # the process itself died (a crash): the scripts after the last report fail below
        for s in scripts:
            runs.setdefault(s.rsplit("/", 1)[1], {"code": proc.returncode, "changed": [], "seconds": 0.0,
                                                  "tail": proc.stdout[-2000:] + proc.stderr[-3000:]})
    return runs


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmarks_smoke(script, smoke_runs):
    if script in OWN_TEST:
        assert (REPO / OWN_TEST[script]).is_file() and "--smoke" in (REPO / OWN_TEST[script]).read_text()
        pytest.skip(f"{script} --smoke runs in {OWN_TEST[script]}")
    if not _runs_here(script):
        pytest.skip(f"{script} needs {NEEDS[script]}")
    run = smoke_runs[script]
    assert run["code"] == 0, f"{script} --smoke exited with {run['code']}:\n" + run["tail"]
    assert not run["changed"], f"{script} --smoke wrote into benchmarks/results/: {run['changed']}"
