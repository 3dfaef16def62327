"""Distill a dataset with G-VBSM end to end.

    accelerate launch recipes/distill.py --config recipes/fashion_mnist/gvbsm_ipc10_cpu.yaml
    accelerate launch recipes/distill.py --config recipes/digits/smoke.yaml --ipc 2 --redo recover

Every field of the recipe (see ``--help``) can be overridden on the command line. Stages are
cached in ``output_dir``; rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import sys

from gvbsm_hf.pipeline import format_results_table, parse_recipe, run_pipeline


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        from gvbsm_hf.pipeline import recipe_parser

        parser = recipe_parser()
        parser.description = __doc__
        parser.add_argument("--config", help="YAML recipe; command-line flags override its values.")
        parser.print_help()
        return {}
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
    main()
