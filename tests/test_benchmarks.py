"""Every script in ``benchmarks/`` runs on the current code: ``python benchmarks/<script>.py --smoke``
(each script's smallest configuration of its own code path: tiny data such as scikit-learn digits or
a few generated images, 1-2 iterations / epochs, tiny backbones) exits 0 and writes nothing under
``benchmarks/results/`` (smoke output goes to a temporary folder or nowhere). A new benchmark cannot
skip this: every ``benchmarks/*.py`` must offer ``--smoke`` in its ``--help``.

Select with ``pytest -k benchmarks``. Each script runs in its own process (``sys.executable``, the
repository root as working directory, one thread, the Hub offline), so most of the time is the
imports of each process.
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
NEEDS = {"plot_margin.py": "matplotlib"}  # optional extras (pip install -e ".[plot]"); skipped without them
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


def _results_snapshot() -> dict[str, tuple[int, int]]:
    """Every file under benchmarks/results/: (mtime, size)."""
    return {str(p.relative_to(RESULTS)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in RESULTS.rglob("*") if p.is_file()}


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


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmarks_smoke(script):
    if script in OWN_TEST:
        assert (REPO / OWN_TEST[script]).is_file() and "--smoke" in (REPO / OWN_TEST[script]).read_text()
        pytest.skip(f"{script} --smoke runs in {OWN_TEST[script]}")
    if script in NEEDS and importlib.util.find_spec(NEEDS[script]) is None:
        pytest.skip(f"{script} needs {NEEDS[script]}")
    before = _results_snapshot()
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} --smoke exited with {proc.returncode}:\n" + (
        proc.stdout[-2000:] + "\n" + proc.stderr[-4000:])
    after = _results_snapshot()
    changed = sorted(k for k in after.keys() | before.keys() if after.get(k) != before.get(k))
    assert not changed, f"{script} --smoke wrote into benchmarks/results/: {changed}"
