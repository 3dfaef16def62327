"""Distill a dataset with G-VBSM end to end.

    accelerate launch recipes/distill.py --config recipes/fashion_mnist/gvbsm_ipc10_cpu.yaml
    accelerate launch recipes/distill.py --config recipes/digits/smoke.yaml --ipc 2 --redo recover

Every field of the recipe (see ``--help``) can be overridden on the command line. Stages are
cached in ``output_dir``; rerunning the same command resumes where it stopped.

An error of the package (a bad recipe value, a missing file, a full disk, ...) is printed as one
block saying what went wrong and what to do, and the process exits with code 3 (2: the
command-line parser's own usage errors); the traceback goes to ``<output_dir>/error.log``, or to
the terminal with ``--traceback`` (``--debug`` is ``TrainingArguments``' own option).
"""

from __future__ import annotations

import os
import sys
import textwrap
import traceback

from gvbsm_hf.errors import GVBSMError
from gvbsm_hf.pipeline import format_results_table, parse_recipe, run_pipeline

EXIT_GVBSM_ERROR = 3


def _output_dir(argv: list[str]) -> str | None:
    if "--output_dir" in argv and argv.index("--output_dir") + 1 < len(argv):
        return argv[argv.index("--output_dir") + 1]
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        try:
            return (yaml.safe_load(open(argv[argv.index("--config") + 1])) or {}).get("output_dir")
        except Exception:  # noqa: BLE001 - the recipe itself is what failed
            return None
    return None


def report_error(err: BaseException, argv: list[str], debug: bool) -> int:
    """Print ``err`` as one readable block; keep the traceback in a log file (or print it with --traceback)."""
    trace = "".join(traceback.format_exception(err))
    where = None
    if debug:
        print(trace, file=sys.stderr)
    else:
        out = _output_dir(argv)
        if out and os.path.isdir(out):
            try:
                where = os.path.join(out, "error.log")
                with open(where, "w") as f:
                    f.write(trace)
            except OSError:
                where = None
    rank = os.environ.get("RANK", "0")
    body = "\n".join(textwrap.fill(part, width=100, subsequent_indent="  ") for part in str(err).split("\n"))
    lines = ["", "=" * 100, f"gvbsm-hf stopped ({type(err).__name__}{', process ' + rank if rank != '0' else ''}):", body,
             f"(traceback: {where}; add --traceback to print it)" if where else "(add --traceback to print it)",
             "=" * 100]
    print("\n".join(lines), file=sys.stderr)
    return EXIT_GVBSM_ERROR


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        from gvbsm_hf.pipeline import recipe_parser

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
    from accelerate import PartialState

    if PartialState().is_main_process:
        print("\n" + format_results_table(summary["results"]))
        for key in ("dataset_folder", "card", "grid", "dataset_url"):
            if key in summary:
                print(f"{key:>15}: {summary[key]}")
    return summary


if __name__ == "__main__":
    args = sys.argv[1:]
    try:
        main(args)
    except GVBSMError as error:
        sys.exit(report_error(error, args, "--traceback" in args))
