"""Distill a dataset with G-VBSM end to end.

    accelerate launch recipes/distill.py --config recipes/fashion_mnist/gvbsm_ipc10_cpu.yaml
    accelerate launch recipes/distill.py --config recipes/digits/smoke.yaml --ipc 2 --redo recover

Every field of the recipe (see ``--help``) can be overridden on the command line. Stages are
cached in ``output_dir``; rerunning the same command resumes where it stopped.

An error of the package (a bad recipe value, a missing file, a full disk, ...) is printed as one
block saying what went wrong and what to do, and the process exits with code 3 (2: the
command-line parser's own usage errors); the traceback goes to ``<output_dir>/error.log``, or to
the terminal with ``--traceback`` (``--debug`` is ``TrainingArguments``' own option). Ctrl-C
(SIGINT) and SIGTERM print one line naming the stage and saying that the same command resumes,
and exit with 130 / 143 (the traceback, if wanted, in ``error.log`` too).
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import traceback

import yaml
from accelerate import PartialState

from gvbsm_hf.errors import GVBSMError
from gvbsm_hf.pipeline import (
    OutputDirLockedError,
    format_results_table,
    parse_recipe,
    recipe_parser,
    run_pipeline,
)

EXIT_GVBSM_ERROR = 3
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the run unwinds
    (the output folder's lock released, temporary files removed) and says where it stopped."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _output_dir(argv: list[str]) -> str | None:
    """The run's folder as the command line gives it (``--output_dir`` wins over the recipe's), for
    an error raised before the recipe is parsed."""
    flags = {a.split("=", 1)[0]: (a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else None))
             for i, a in enumerate(argv) if a.startswith("--")}
    if flags.get("--output_dir") is not None:
        return flags["--output_dir"]
    try:
        return (yaml.safe_load(open(flags["--config"])) or {}).get("output_dir") if flags.get("--config") else None
    except Exception:  # noqa: BLE001 - the recipe itself is what failed
        return None


def _write_log(trace: str, out: str | None) -> str | None:
    """Write ``trace`` to ``<out>/error.log`` when ``out`` is an existing folder; its path, or None."""
    if not out or not os.path.isdir(out):
        return None
    try:
        where = os.path.join(out, "error.log")
        with open(where, "w") as f:
            f.write(trace)
        return where
    except OSError:
        return None


def report_error(err: BaseException, out: str | None, debug: bool) -> int:
    """Print ``err`` as one readable block; keep the traceback in a log file (or print it with --traceback).
    A run refused because another run holds ``out`` writes nothing there (the folder is the other run's)."""
    trace = "".join(traceback.format_exception(err))
    where = None
    if debug:
        print(trace, file=sys.stderr)
    elif not isinstance(err, OutputDirLockedError):
        where = _write_log(trace, out)
    rank = os.environ.get("RANK", "0")
    body = "\n".join(textwrap.fill(part, width=100, subsequent_indent="  ", break_on_hyphens=False,
                                   break_long_words=False) for part in str(err).split("\n"))
    lines = ["", "=" * 100, f"gvbsm-hf stopped ({type(err).__name__}{', process ' + rank if rank != '0' else ''}):", body,
             f"(traceback: {where}; add --traceback to print it)" if where else "(add --traceback to print it)",
             "=" * 100]
    print("\n".join(lines), file=sys.stderr)
    return EXIT_GVBSM_ERROR


def report_interrupt(stop: KeyboardInterrupt, out: str | None, debug: bool) -> int:
    """One line for Ctrl-C / SIGTERM: where the run stopped and that the same command resumes it."""
    trace = "".join(traceback.format_exception(stop))
    if debug:
        print(trace, file=sys.stderr)
    else:
        _write_log(trace, out)
    what = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
    stage = getattr(stop, "stage", None)
    where = f"in the {stage} stage" if stage else "before the first stage"
    if os.environ.get("RANK", "0") == "0":
        print(f"\ngvbsm-hf interrupted ({what}) {where}; finished work is kept: run the same command to resume.",
              file=sys.stderr)
    return EXIT_SIGTERM if isinstance(stop, Terminated) else EXIT_SIGINT


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        parser = recipe_parser()
        parser.description = __doc__
        parser.add_argument("--config", help="YAML recipe; command-line flags override its values.")
        parser.add_argument("--traceback", action="store_true", help="Print tracebacks instead of writing error.log.")
        parser.print_help()
        return {}
    if "--traceback" in argv:
        argv.remove("--traceback")
    recipe = parse_recipe(argv)
    summary = run_pipeline(recipe)
    if PartialState().is_main_process:
        print("\n" + format_results_table(summary["results"]))
        for key in ("dataset_folder", "card", "grid", "dataset_url"):
            if key in summary:
                print(f"{key:>15}: {summary[key]}")
    return summary


def cli(argv: list[str]) -> int:
    """``main`` with the package's errors and interruptions reported as above; the exit code."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    debug = "--traceback" in argv
    try:
        main(argv)
    except GVBSMError as error:
        return report_error(error, _output_dir(argv), debug)
    except KeyboardInterrupt as stop:
        return report_interrupt(stop, _output_dir(argv), debug)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
