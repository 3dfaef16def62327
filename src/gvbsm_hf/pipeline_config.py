"""What one run of the pipeline does: which stages, baselines, processes and threads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .methods import list_methods
from .validation import RecipeError, ValidatedArguments, check_choice, check_range

STAGES = ("squeeze", "record", "recover", "relabel", "evaluate", "export")

@dataclass
class PipelineArguments(ValidatedArguments):
    """What ``recipes/distill.py`` runs."""

    stages: list[str] = field(
        default_factory=lambda: list(STAGES), metadata={"help": f"Stages to run, of {list(STAGES)}."}
    )
    redo: list[str] = field(default_factory=list, metadata={"help": "Stages to recompute although cached."})
    baselines: list[str] = field(
        default_factory=lambda: ["random_real"],
        metadata={"help": "Also evaluate these registered methods under the same protocol (built from their own defaults)."},
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
        for name in ("stages", "redo"):
            for i, s in enumerate(getattr(self, name)):
                check_choice(f"{name}[{i}]", s, STAGES)
        for i, b in enumerate(self.baselines):
            check_choice(f"baselines[{i}]", b, list_methods())
        if self.hard_label_seeds is not None and not self.hard_label_seeds:
            raise RecipeError("hard_label_seeds is empty: give at least one seed (e.g. `hard_label_seeds: [0]`) or "
                              "leave it unset (null) to use eval_seeds.")
        check_range("num_threads", self.num_threads, 1, allow_none=True)
        check_range("num_processes", self.num_processes, 1, allow_none=True)
