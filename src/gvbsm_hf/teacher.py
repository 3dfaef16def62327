"""Teachers as Hub-ready models: a backbone plus the data spec it was trained on.

``TeacherModel.save_pretrained`` writes ``model.safetensors`` (weights), ``config.json`` (the
constructor arguments, via ``huggingface_hub.PyTorchModelHubMixin``) and a ``README.md`` model card.
Teachers are the backbones ``f`` of docs/method.md "Stages": their BatchNorm running statistics are the
targets of Eq. 1/6, their Conv statistics are recorded for Eq. 9, their logits make Eq. 8.
"""

from __future__ import annotations

import shutil
import contextlib
import io
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData, PyTorchModelHubMixin
from torch import nn

from huggingface_hub.errors import LocalEntryNotFoundError

from . import __version__, hub_utils
from .backbones import create_backbone
from .data import DatasetSpec
from .errors import GVBSMError
from .fingerprint import model_fingerprint
from .utils import damaged_file_error

logger = logging.getLogger(__name__)

CARD_TAGS = ["dataset-distillation", "gvbsm", "image-classification"]
LIBRARY_NAME = "gvbsm-hf"
_TEACHER_OFFLINE_FIX = (
    "list a local teacher folder (e.g. <output_dir>/teachers/<name>/ of an earlier run) in `teachers:` "
    "(--teachers <folder>), list a backbone name there instead so that the squeeze stage trains it, or download "
    "the repo once with network access (huggingface-cli download <id>) so that it is in the local Hub cache."
)
_INIT_KEYS = (
    "backbone", "num_classes", "in_chans", "image_size", "mean", "std",
    "backbone_kwargs", "class_names", "metrics", "dataset", "recipe",
)


class TeacherModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name=LIBRARY_NAME,
    tags=CARD_TAGS,
    pipeline_tag="image-classification",
    paper_url="https://arxiv.org/abs/2311.17950",
):
    """A backbone (``create_backbone(backbone, pretrained=False)``) with its data spec and metrics.

    ``forward`` takes *normalised* images ``(N, in_chans, image_size, image_size)`` and returns
    logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        in_chans: int,
        image_size: int,
        mean: list[float],
        std: list[float],
        backbone_kwargs: dict | None = None,
        class_names: list[str] | None = None,
        metrics: dict | None = None,
        dataset: str | None = None,
        recipe: dict | None = None,
    ) -> None:
        super().__init__()
        if len(mean) != in_chans or len(std) != in_chans:
            raise GVBSMError(
                f"mean/std need one value per channel (in_chans={in_chans}), got {len(mean)} and {len(std)}; "
                "take them from the DatasetSpec (TeacherModel.from_backbone(name, spec))."
            )
        if class_names and len(class_names) != num_classes:
            raise GVBSMError(f"class_names has {len(class_names)} entries but num_classes={num_classes}.")
        self.backbone_name = backbone
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.image_size = int(image_size)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.class_names = list(class_names) if class_names else None
        self.metrics = dict(metrics or {})
        self.dataset = dataset
        self.recipe = dict(recipe or {})  # training recipe (``training`` is nn.Module's flag)
        self.backbone = create_backbone(
            backbone, num_classes=self.num_classes, in_chans=self.in_chans, image_size=self.image_size,
            pretrained=False, **self.backbone_kwargs,
        )

    @classmethod
    def from_backbone(
        cls,
        backbone: str,
        spec: DatasetSpec,
        *,
        backbone_kwargs: dict | None = None,
        pretrained: bool = False,
        **kwargs: Any,
    ) -> "TeacherModel":
        """A fresh teacher for ``spec`` (``pretrained=True`` copies timm/torchvision weights in)."""
        teacher = cls(
            backbone=backbone, num_classes=spec.num_classes, in_chans=spec.channels, image_size=spec.image_size,
            mean=list(spec.mean), std=list(spec.std), backbone_kwargs=backbone_kwargs,
            class_names=list(spec.class_names) or None, dataset=spec.source or spec.name, **kwargs,
        )
        if pretrained:
            weights = create_backbone(
                backbone, num_classes=spec.num_classes, in_chans=spec.channels, image_size=spec.image_size,
                pretrained=True, **(backbone_kwargs or {}),
            )
            teacher.backbone.load_state_dict(weights.state_dict())
        return teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> logits."""
        return self.backbone(x)

    @property
    def spec_dict(self) -> dict[str, Any]:
        """The data-spec part of the config (what a ``DatasetSpec`` must agree with)."""
        return {
            "num_classes": self.num_classes, "image_size": self.image_size, "channels": self.in_chans,
            "mean": list(self.mean), "std": list(self.std),
        }

    def check_spec(self, spec: DatasetSpec) -> None:
        """Raise if ``spec`` (resolution, channels, classes, normalisation) differs from the teacher's."""
        mine = self.spec_dict
        theirs = {
            "num_classes": spec.num_classes, "image_size": spec.image_size, "channels": spec.channels,
            "mean": [float(m) for m in spec.mean], "std": [float(s) for s in spec.std],
        }
        diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
        if diff:
            raise GVBSMError(
                f"Teacher {self.backbone_name!r} does not fit dataset {spec.name!r}: {diff} (teacher, dataset). "
                "Train a teacher on this dataset (squeeze) or use the dataset it was trained on."
            )

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (what ``config.json`` holds) plus ``accuracy`` (validation top-1)."""
        cfg: dict[str, Any] = {
            "backbone": self.backbone_name, "num_classes": self.num_classes, "in_chans": self.in_chans,
            "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
            "backbone_kwargs": dict(self.backbone_kwargs), "class_names": self.class_names,
            "metrics": dict(self.metrics), "dataset": self.dataset, "recipe": dict(self.recipe),
        }
        cfg["accuracy"] = self.metrics.get("val_top1")
        cfg["gvbsm_hf_version"] = __version__
        return cfg

    def init_kwargs(self) -> dict[str, Any]:
        """Arguments that rebuild this teacher (``TeacherModel(**t.init_kwargs())``)."""
        return {k: v for k, v in self.config.items() if k in _INIT_KEYS}

    @property
    def fingerprint(self) -> str:
        """sha256 of the weights (``gvbsm_hf.fingerprint.model_fingerprint``), for statistics provenance."""
        return model_fingerprint(self)

    # ------------------------------------------------------------------------------ Hub mixin

    def save_pretrained(self, save_directory: str | Path, *, config: dict | None = None, **kwargs: Any) -> str | None:
        """Write ``model.safetensors``, ``config.json`` and a fresh ``README.md`` model card."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        # written into a temporary folder, then moved in file by file with model.safetensors LAST: it is
        # the squeeze stage's "done" marker, so a kill at any byte never leaves a torn teacher behind
        tmp = folder / f".tmp-save-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            result = super().save_pretrained(tmp, config=config or self.config, **kwargs)
            names = sorted(p.name for p in tmp.iterdir())
            for name in [n for n in names if n != "model.safetensors"] + [n for n in names if n == "model.safetensors"]:
                os.replace(tmp / name, folder / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return result

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """Model card from ``templates/teacher_card.md`` (metadata via ``ModelCardData``)."""
        repo_id = kwargs.pop("repo_id", None)
        if not (repo_id and hub_utils.is_hub_repo_id(repo_id)):
            repo_id = "path/to/teacher"  # the card never names a folder of this machine
        local_dataset = hub_utils.is_local_path(self.dataset or "")
        dataset = hub_utils.public_name(self.dataset)  # a local dataset folder: its name only
        # the metadata's `datasets` are links on the Hub: a Hub id only, never prose or a local folder
        on_hub = not local_dataset and hub_utils.is_hub_repo_id(self.dataset or "", require_namespace=False)
        dataset_id = self.dataset if on_hub else None
        model_name = f"{self.backbone_name} teacher for {dataset or 'an image dataset'}"
        val_top1 = self.metrics.get("val_top1")
        eval_results = None
        if val_top1 is not None:
            eval_results = [
                EvalResult(
                    task_type="image-classification", dataset_type=dataset_id or "unknown",
                    dataset_name=dataset or "unknown", dataset_split="validation",
                    metric_type="accuracy", metric_name="top-1 accuracy", metric_value=float(val_top1),
                )
            ]
        card_data = ModelCardData(
            library_name=LIBRARY_NAME,
            tags=list(CARD_TAGS),
            pipeline_tag="image-classification",
            datasets=[dataset_id] if dataset_id else None,
            metrics=["accuracy"],
            model_name=model_name,
            eval_results=eval_results,
            backbone=self.backbone_name,
        )
        template = resources.files("gvbsm_hf").joinpath("templates/teacher_card.md").read_text(encoding="utf-8")
        return ModelCard.from_template(
            card_data,
            template_str=template,
            model_name=model_name,
            repo_id=repo_id,
            backbone=self.backbone_name,
            backbone_kwargs=self.backbone_kwargs,
            dataset=dataset or "an unnamed dataset",
            in_chans=self.in_chans,
            image_size=self.image_size,
            mean=[round(m, 4) for m in self.mean],
            std=[round(s, 4) for s in self.std],
            num_classes=self.num_classes,
            class_names=self.class_names,
            num_parameters=sum(p.numel() for p in self.parameters()),
            fingerprint=self.fingerprint,
            val_top1="not measured" if val_top1 is None else f"{100 * float(val_top1):.2f} %",
            extra_metrics={k: v for k, v in self.metrics.items() if k != "val_top1"},
            recipe=self.recipe,
            **kwargs,
        )


def load_teacher(name_or_path: str | Path, *, device: torch.device | str | None = None) -> TeacherModel:
    """Load a teacher from a local folder (``save_pretrained``) or a Hub model id, in eval mode.

    Raises :class:`OfflineError` quickly when a Hub id is not in the local cache and the Hub is
    unreachable (or ``HF_HUB_OFFLINE`` is set).
    """
    target = str(name_or_path)
    if os.path.isdir(target):
        missing = [f for f in ("config.json", "model.safetensors") if not os.path.exists(os.path.join(target, f))]
        if missing:
            raise GVBSMError(
                f"Teacher folder {target!r} lacks {missing}; write it with TeacherModel.save_pretrained "
                "(gvbsm_hf.squeeze.engine.train_teacher does this)."
            )
        local_only = True
    else:
        if not hub_utils.is_hub_repo_id(target):
            raise GVBSMError(
                f"Teacher folder {target!r} does not exist and is not a Hub model id 'org/name': pass an existing "
                "folder written by TeacherModel.save_pretrained or the id of a pushed teacher."
            )
        files = ("config.json", "model.safetensors")
        local_only = all(hub_utils.hub_file_cached(target, (f,)) for f in files)
        if not local_only:
            hub_utils.require_online(f"The files of teacher {target!r} ({', '.join(files)}) are not in the local cache",
                                     _TEACHER_OFFLINE_FIX)
    map_location = str(torch.device(device)) if device is not None else "cpu"
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the mixin prints "Loading weights from local directory"
            teacher = TeacherModel.from_pretrained(
                target, local_files_only=local_only, map_location=map_location, strict=True
            )
    except LocalEntryNotFoundError as e:
        raise hub_utils.offline_error(f"Teacher {target!r} is not in the local cache and cannot be downloaded",
                                      str(e), _TEACHER_OFFLINE_FIX) from e
    except Exception as e:  # noqa: BLE001 - a torn file (safetensors' SafetensorError, a cut config.json)
        if type(e).__name__ == "SafetensorError" or "deserializ" in str(e) or isinstance(e, json.JSONDecodeError):
            raise damaged_file_error(target, "squeeze", f"{type(e).__name__}: {e}") from None
        raise
    return teacher.eval()
