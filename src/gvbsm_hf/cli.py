"""The ``gvbsm-hf`` command, installed with the package (``[project.scripts]``).

    gvbsm-hf distill --config fashion_mnist/gvbsm_ipc10_cpu.yaml           # a shipped recipe, by name
    gvbsm-hf distill --config my_recipe.yaml --ipc 2 --redo recover         # a file; any field overridden
    gvbsm-hf distill --config digits/smoke.yaml --dry_run                   # the plan only: nothing loaded or written
    gvbsm-hf recipes                                                        # the shipped recipes
    accelerate launch -m gvbsm_hf.cli distill --config ...                  # several processes
    python -m gvbsm_hf.cli ...                                              # the same without the script

``recipes/distill.py`` (in a clone) is this ``distill`` command. The shipped recipes are package data
(``gvbsm_hf/recipes``, the repository's ``recipes/`` folder); ``--config`` takes a file path, or the
name of a shipped recipe when no such file exists.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import traceback
from difflib import get_close_matches
from importlib import resources
from pathlib import Path

import yaml

from . import __version__
from .errors import GVBSMError
from .report import explain_margins, format_results_table

EXIT_GVBSM_ERROR = 3
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM
ACCELERATE_CONFIGS = "accelerate_configs"

DISTILL_HELP = """Distill a dataset end to end: squeeze -> record -> recover -> relabel -> evaluate -> export.

    gvbsm-hf distill --config fashion_mnist/gvbsm_ipc10_cpu.yaml
    accelerate launch -m gvbsm_hf.cli distill --config digits/smoke.yaml --ipc 2 --redo recover
    gvbsm-hf distill --config digits/smoke.yaml --dry_run

--config is a YAML file, or the name of a shipped recipe (`gvbsm-hf recipes` lists them). Every field
of the recipe (below) can be overridden on the command line. Stages are cached in ``output_dir``;
rerunning the same command resumes where it stopped. --dry_run validates the recipe and prints the
plan (each stage cached / will run and why, the method's options, the files) without loading data or
writing anything.

An error of the package (a bad recipe value, a missing file, a full disk, ...) is printed as one
block saying what went wrong and what to do, and the process exits with code 3 (2: the
command-line parser's own usage errors); the traceback goes to ``<output_dir>/error.log``, or to
the terminal with ``--traceback`` (``--debug`` is ``TrainingArguments``' own option). Ctrl-C
(SIGINT) and SIGTERM print one line naming the stage and saying that the same command resumes,
and exit with 130 / 143 (the traceback, if wanted, in ``error.log`` too)."""


# ------------------------------------------------------------------------------ shipped recipes


def recipes_folder() -> Path:
    """The shipped recipes' folder (package data ``gvbsm_hf/recipes``: the repository's ``recipes/``)."""
    root = resources.files("gvbsm_hf") / "recipes"
    if not isinstance(root, Path):  # a zipped install: the recipes are not files on disk
        raise GVBSMError(f"The shipped recipes are not files on disk ({root}): install gvbsm-hf as a folder "
                         "(pip install), or give --config a path.")
    return root


def shipped_recipes(accelerate: bool = False) -> list[str]:
    """Names of the shipped recipes (``<dataset>/<recipe>.yaml``), or of the accelerate configs."""
    root = recipes_folder()
    paths = sorted(root.glob("*/*.yaml"))
    return [p.relative_to(root).as_posix() for p in paths if (p.parent.name == ACCELERATE_CONFIGS) == accelerate]


def description(path: Path) -> str:
    """A recipe's one-line description: its first comment line, up to the end of its first sentence."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            return text[: text.index(". ") + 1] if ". " in text else text
    return ""


def resolve_config(name: str) -> str:
    """``--config``'s value: a file that exists, else the path of the shipped recipe of that name
    (``fashion_mnist/gvbsm_ipc10_cpu.yaml``, also with a leading ``recipes/``)."""
    if Path(name).exists():
        return name
    root = recipes_folder()
    short = name[len("recipes/"):] if name.startswith("recipes/") else name
    if short and (root / short).is_file():
        return str(root / short)
    known = shipped_recipes() + shipped_recipes(accelerate=True)
    close = get_close_matches(short, known, n=1)
    raise GVBSMError(f"Recipe {name} does not exist: it is neither a file nor a shipped recipe"
                     f"{f' (did you mean {close[0]!r}?)' if close else ''}. `gvbsm-hf recipes` lists the shipped "
                     "recipes.")


def _resolve_config_arg(argv: list[str]) -> list[str]:
    """``argv`` with the value of ``--config`` (``--config X`` or ``--config=X``) resolved."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out


def list_recipes(argv: list[str]) -> int:
    """``gvbsm-hf recipes``: the shipped recipes with their descriptions; ``--path NAME``: one's path."""
    parser = argparse.ArgumentParser(prog="gvbsm-hf recipes", description="List the shipped recipes.")
    parser.add_argument("--path", metavar="NAME", help="Print the path of one shipped file (e.g. "
                        "accelerate_configs/cpu.yaml, for `accelerate launch --config_file`).")
    args = parser.parse_args(argv)
    if args.path:
        path = recipes_folder() / args.path
        if not path.is_file():
            close = get_close_matches(args.path, shipped_recipes() + shipped_recipes(accelerate=True), n=1)
            raise GVBSMError(f"{args.path} is not a shipped file{f' (did you mean {close[0]!r}?)' if close else ''}: "
                             "`gvbsm-hf recipes` lists them.")
        print(path)
        return 0
    root = recipes_folder()
    for title, names in (("Recipes (gvbsm-hf distill --config NAME):", shipped_recipes()),
                         ("Accelerate configs (accelerate launch --config_file \"$(gvbsm-hf recipes --path NAME)\" ...):",
                          shipped_recipes(accelerate=True))):
        print(title)
        width = max(len(n) for n in names) + 2
        for name in names:
            print(f"  {name:<{width}}{description(root / name)}")
        print()
    print(f"They are in {root}; copy one to change it.")
    return 0


# ------------------------------------------------------------------------------ distill: errors and signals


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
        config = resolve_config(flags["--config"]) if flags.get("--config") else None
        return (yaml.safe_load(open(config)) or {}).get("output_dir") if config else None
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
    """Print ``err`` as one readable block; keep the traceback in ``<out>/error.log`` (or print it with
    --traceback; ``out=None``: no log, e.g. when another run holds the folder)."""
    trace = "".join(traceback.format_exception(err))
    where = None
    if debug:
        print(trace, file=sys.stderr)
    else:
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


# ------------------------------------------------------------------------------ distill


def distill_parser() -> argparse.ArgumentParser:
    """The recipe's fields (``recipe_parser``) plus the command's own flags, for ``--help``."""
    from .recipe import recipe_parser  # torch, transformers: only for distill (gvbsm-hf --help stays fast)

    parser = recipe_parser()
    parser.prog, parser.description = "gvbsm-hf distill", DISTILL_HELP
    parser.add_argument("--config", help="YAML recipe (a path, or a shipped recipe's name); command-line flags "
                        "override its values.")
    parser.add_argument("--dry_run", action="store_true", help="Validate the recipe and print the plan (stages "
                        "cached / to run, method options, files); load no data, write nothing. Not a recipe field.")
    parser.add_argument("--traceback", action="store_true", help="Print tracebacks instead of writing error.log.")
    return parser


def distill_main(argv: list[str] | None = None) -> dict:
    """``gvbsm-hf distill`` without the error handling: run the recipe (or print its plan with
    ``--dry_run``); the pipeline's summary (empty for ``--help`` and ``--dry_run``)."""
    # torch, transformers, datasets are imported for distill only: gvbsm-hf --help and recipes stay fast
    from accelerate import PartialState  # (see above)
    from .pipeline import parse_recipe, run_pipeline  # (see above)
    from .plan import format_plan  # (see above)

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        distill_parser().print_help()
        return {}
    argv = [a for a in argv if a != "--traceback"]
    dry_run = "--dry_run" in argv
    argv = _resolve_config_arg([a for a in argv if a != "--dry_run"])
    recipe = parse_recipe(argv)
    if dry_run:
        if os.environ.get("RANK", "0") == "0":  # one plan for a multi-process launch
            print(format_plan(recipe))
        return {}
    summary = run_pipeline(recipe)
    if PartialState().is_main_process:
        print("\n" + format_results_table(summary["results"]))
        explanation = explain_margins(summary["results"], method=recipe.synthesis.syn_method)
        if explanation:
            print("\n" + textwrap.fill(explanation, width=100) + "\n")
        for key in ("dataset_folder", "card", "grid", "dataset_url"):
            if key in summary:
                print(f"{key:>15}: {summary[key]}")
    return summary


def distill(argv: list[str]) -> int:
    """``distill_main`` with the package's errors and interruptions reported as above; the exit code.
    A dry run writes no ``error.log``, nor does a run refused because another run holds the folder."""
    from .pipeline import OutputDirLockedError  # torch, transformers: only for distill (see the module's doc)

    signal.signal(signal.SIGTERM, _raise_terminated)
    debug = "--traceback" in argv
    out = None if "--dry_run" in argv else _output_dir(argv)
    try:
        distill_main(argv)
    except GVBSMError as error:
        return report_error(error, None if isinstance(error, OutputDirLockedError) else out, debug)
    except KeyboardInterrupt as stop:
        return report_interrupt(stop, out, debug)
    return 0


# ------------------------------------------------------------------------------ the command


def command_parser() -> argparse.ArgumentParser:
    """``gvbsm-hf``'s top level: the subcommands and what they do."""
    parser = argparse.ArgumentParser(prog="gvbsm-hf", description=__doc__.split("\n\n")[0] + "\n\n" + textwrap.dedent(
        __doc__.split("\n\n")[1]), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gvbsm-hf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("distill", add_help=False, help="Run a recipe (or print its plan with --dry_run); "
                   "`gvbsm-hf distill --help` lists every option.")
    sub.add_parser("recipes", add_help=False, help="List the shipped recipes and accelerate configs.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``gvbsm-hf`` console command; its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "distill":
        return distill(argv[1:])
    if argv and argv[0] == "recipes":
        try:
            return list_recipes(argv[1:])
        except GVBSMError as error:
            return report_error(error, None, debug=False)
    command_parser().parse_args(argv)  # --help (exit 0), or a usage error (exit 2)
    return 2


if __name__ == "__main__":
    sys.exit(main())
