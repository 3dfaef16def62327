"""Export options: the Hub-ready dataset folder and what is pushed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..validation import RecipeError, ValidatedArguments

@dataclass
class PublishArguments(ValidatedArguments):
    """Export to a Hub-ready dataset folder and optionally push."""

    dataset_repo_id: Optional[str] = field(
        default=None, metadata={"help": "e.g. org/fashion-mnist-gvbsm-ipc10 (default: derived name)."}
    )
    push_dataset: bool = field(default=False)
    teacher_repo_prefix: Optional[str] = field(
        default=None, metadata={"help": "Push teachers as <prefix>-<backbone> model repos."}
    )
    dataset_license: Optional[str] = field(default=None, metadata={"help": "Overrides the source license."})

    def validate(self) -> None:
        if self.push_dataset and not self.dataset_repo_id:
            raise RecipeError("push_dataset: true needs `dataset_repo_id: <org>/<name>` (or --dataset_repo_id).")
        for name in ("dataset_repo_id", "teacher_repo_prefix"):
            value = getattr(self, name)
            if value is not None and (value.count("/") != 1 or not all(value.split("/"))):
                raise RecipeError(f"{name}={value!r} must look like <org>/<name>.")
