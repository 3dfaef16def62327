"""What one run of the pipeline does: which stages, baselines, processes and threads."""

from __future__ import annotations

from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Optional, Sequence

from .methods import list_methods
from .validation import RecipeError, ValidatedArguments, check_range

STAGES = ("squeeze", "record", "recover", "relabel", "evaluate", "export")


def check_items(name: str, values: list[str], choices: Sequence[str], example: str) -> None:
    """Every item of the list field ``name`` is one of ``choices``; the message names the field and
    its flag (never ``--name[i]``, which does not exist)."""
    for value in values:
        if value not in choices:
            close = get_close_matches(str(value), list(choices), n=1)
            raise RecipeError(f"{name} lists {value!r}, which is not one of {list(choices)}"
                              f"{f' (did you mean {close[0]!r}?)' if close else ''}. Set `{name}:` in the recipe or "
                              f"--{name}: {example}.")


@dataclass
class PipelineArguments(ValidatedArguments):
    """What ``recipes/distill.py`` runs."""

    stages: list[str] = field(
        default_factory=lambda: list(STAGES), metadata={"help": f"Stages to run, of {list(STAGES)}."}
    )
    redo: list[str] = field(default_factory=list, metadata={"help": "Stages to recompute although cached."})
    baselines: list[str] = field(
        default_factory=lambda: ["random_real"],
        metadata={"help": "Also evaluate these registered methods under the same protocol (built from their own "
                  "defaults). `--baselines none` (`baselines: []`): none."},
    )
    evaluate_hard_labels: bool = field(default=False, metadata={"help": "Also report hard-label training."})
    hard_label_seeds: Optional[list[int]] = field(
        default=None, metadata={"help": "Student seeds of the hard-label rows (fewer than eval_seeds to save time: "
                                "the images' own accuracy varies little over seeds). None: eval_seeds."})
    accept_unhealthy_synthesis: bool = field(
        default=False, metadata={"help": "Go on with a synthetic set the teachers classify worse than chance (the "
                                 "health check at the end of recover stops the run otherwise)."})
    num_threads: Optional[int] = field(
        default=None, metadata={"help": "torch CPU threads per process (torch.set_num_threads). CPU results are "
                                "bit-identical only at a fixed thread count; recorded in stages.json and provenance."})
    num_processes: Optional[int] = field(
        default=None, metadata={"help": "Expected number of processes: the run stops at once if the launcher "
                                "started another number (e.g. `accelerate launch --cpu --num_processes 2` starts one)."})

    def validate(self) -> None:
        check_items("stages", self.stages, STAGES, "e.g. `stages: [recover, evaluate]` (--stages recover evaluate)")
        check_items("redo", self.redo, STAGES, "e.g. `redo: [evaluate]` (--redo evaluate), or --redo none")
        if not self.stages:
            raise RecipeError(f"stages is empty: name at least one of {list(STAGES)} (e.g. `--stages evaluate`), or "
                              "leave it unset to run them all.")
        check_items("baselines", self.baselines, list_methods(),
                    "e.g. `baselines: [random_real]` (--baselines random_real), or `baselines: []` (--baselines none) "
                    "for no baseline")
        if self.hard_label_seeds is not None and not self.hard_label_seeds:
            raise RecipeError("hard_label_seeds is empty: give at least one seed (e.g. `hard_label_seeds: [0]`) or "
                              "leave it unset (null) to use eval_seeds.")
        check_range("num_threads", self.num_threads, 1, allow_none=True)
        check_range("num_processes", self.num_processes, 1, allow_none=True)
