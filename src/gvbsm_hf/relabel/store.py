"""Stored soft labels: the views and ensemble logits of every synthetic image, and their file.

:class:`StoredSoftLabels` holds, per image, ``V`` augmented views (crop box, flip, CutMix partner
and box) and the ensemble logits of each view (Eq. 8, FKD-style; fp16, or only the top-k with
the missing classes filled with ``min(kept) - fill_margin`` when densified, finite so that both
the MSE of Eq. 11 and a softmax work).

A run folder keeps them in ONE safetensors file, ``soft_labels.safetensors`` (one tensor per
column of :mod:`gvbsm_hf.relabel.tables`, the metadata as JSON in the header), written
atomically and read lazily: :meth:`StoredSoftLabels.load` maps the file, whose pages are read on
demand as views are replayed and stay file-backed page cache the OS can drop (an ImageNet-scale
file is never copied into the process). The export writes the same columns as the parquet
``views`` config of a HF dataset (:meth:`to_dataset`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch

from ..augment import CropFlipParams
from ..errors import DataValidationError, GVBSMError
from ..utils import damaged_file_error, load_safetensors, save_safetensors
from . import tables
from .views import replay_views

__all__ = ["STORED_LABELS_FILE", "StoredSoftLabels"]

STORED_LABELS_FILE = "soft_labels.safetensors"
"""The file of a run folder's stored soft labels (tensors + metadata; its presence means complete)."""

LEGACY_FILES = ("soft_labels.parquet", "soft_labels_meta.json")
"""What earlier versions wrote instead: no longer read (``--redo relabel`` recomputes), removed by :meth:`save`."""


@dataclass
class StoredSoftLabels:
    """Precomputed ensemble logits of ``V`` augmented views of ``N`` images (Eq. 8, FKD-style).

    Attributes:
        boxes: ``(N, V, 4)`` float32 crop boxes in source-pixel coordinates (augment's format).
        flip: ``(N, V)`` bool horizontal flips (applied after the crop).
        logits: ``(N, V, K)`` dense ensemble logits (fp16 by default), or ``None`` with top-k.
        topk_values / topk_indices: ``(N, V, k)`` kept logits (descending) and their classes
            (int16 when K <= 32767, else int32) when stored with ``topk``.
        num_classes: K.
        image_size: ``(H, W)`` of the source images the boxes refer to.
        out_size: side of the crops fed to the teachers (the student must use the same).
        mix_partner / mix_boxes: ``(N, V)`` int32 partner image (``-1``: none) and ``(N, V, 4)``
            int16 box ``(y1, y2, x1, x2)`` in crop pixels of each view's CutMix
            (:func:`~gvbsm_hf.relabel.views.sample_view_cutmix`), or ``None`` (no view mixed); the
            logits are those of the mixed view. ``cutmix_prob`` / ``cutmix_alpha`` say how they were drawn.
        seed, crop_scale, clean_view, logit_norm: how the views / logits were made (provenance).
        fill_margin: top-k reconstruction fills missing classes with
            ``min(kept values) - fill_margin`` (finite, so MSE and softmax both work; the top-k
            values stay exact and strictly on top when ``fill_margin > 0``).
    """

    boxes: torch.Tensor
    flip: torch.Tensor
    num_classes: int
    image_size: tuple[int, int]
    out_size: int
    logits: torch.Tensor | None = None
    topk_values: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    seed: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    clean_view: bool = False
    logit_norm: bool = False
    fill_margin: float = 1.0
    mix_partner: torch.Tensor | None = None
    mix_boxes: torch.Tensor | None = None
    cutmix_prob: float = 0.0
    cutmix_alpha: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        self.crop_scale = (float(self.crop_scale[0]), float(self.crop_scale[1]))
        if (self.logits is None) == (self.topk_values is None):
            raise GVBSMError("StoredSoftLabels needs exactly one of `logits` (dense) or `topk_values`/`topk_indices`.")
        if self.topk_values is not None and self.topk_indices is None:
            raise GVBSMError("StoredSoftLabels: `topk_values` given without `topk_indices`.")
        if self.boxes.ndim != 3 or self.boxes.shape[-1] != 4:
            raise GVBSMError(f"boxes must be (N, V, 4), got {tuple(self.boxes.shape)}.")
        n, v = self.boxes.shape[:2]
        if tuple(self.flip.shape) != (n, v):
            raise GVBSMError(f"flip must be (N, V) = {(n, v)}, got {tuple(self.flip.shape)}.")
        values = self.logits if self.logits is not None else self.topk_values
        if tuple(values.shape[:2]) != (n, v):
            raise GVBSMError(f"logits must start with (N, V) = {(n, v)}, got {tuple(values.shape)}.")
        if (self.mix_partner is None) != (self.mix_boxes is None):
            raise GVBSMError("StoredSoftLabels needs both `mix_partner` and `mix_boxes` (CutMix), or neither.")
        if self.mix_partner is not None:
            if tuple(self.mix_partner.shape) != (n, v) or tuple(self.mix_boxes.shape) != (n, v, 4):
                raise GVBSMError(f"mix_partner must be (N, V) = {(n, v)} and mix_boxes (N, V, 4), got "
                                 f"{tuple(self.mix_partner.shape)} and {tuple(self.mix_boxes.shape)}.")
            if self.mix_partner.numel() and (self.mix_partner.min() < -1 or self.mix_partner.max() >= n):
                raise DataValidationError(f"mix_partner holds image numbers outside [-1, {n}): the CutMix "
                                          "partners belong to another image set.")
        self.cutmix_prob = float(self.cutmix_prob)
        self.cutmix_alpha = float(self.cutmix_alpha)

    # ---- shape ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def num_views(self) -> int:
        return int(self.boxes.shape[1])

    @property
    def topk(self) -> int | None:
        return None if self.topk_values is None else int(self.topk_values.shape[-1])

    @property
    def has_mix(self) -> bool:
        """Whether views carry CutMix (``mix_partner`` / ``mix_boxes``)."""
        return self.mix_partner is not None

    # ---- access --------------------------------------------------------------------------
    def _select(self, view_index: torch.Tensor | int, image_index: torch.Tensor | None):
        if image_index is None:
            image_index = torch.arange(len(self))
        image_index = torch.as_tensor(image_index, dtype=torch.long).reshape(-1).cpu()
        view_index = torch.as_tensor(view_index, dtype=torch.long).reshape(-1).cpu()
        if view_index.numel() == 1:
            view_index = view_index.expand(image_index.numel())
        if view_index.numel() != image_index.numel():
            raise GVBSMError(
                f"view_index has {view_index.numel()} entries for {image_index.numel()} images: "
                "pass one view per image (or a single int)."
            )
        if image_index.numel() and (image_index.min() < 0 or image_index.max() >= len(self)):
            raise GVBSMError(
                f"image index out of range [0, {len(self)}): the stored labels do not cover these images; "
                "re-run relabel_stored on the same image set."
            )
        if view_index.numel() and (view_index.min() < 0 or view_index.max() >= self.num_views):
            raise GVBSMError(f"view index out of range [0, {self.num_views}).")
        return image_index, view_index

    def view_params(self, view_index: torch.Tensor | int, image_index: torch.Tensor | None = None) -> CropFlipParams:
        """Crop/flip parameters of view ``view_index[j]`` of image ``image_index[j]`` (CPU)."""
        i, v = self._select(view_index, image_index)
        return CropFlipParams(boxes=self.boxes[i, v].float(), flip=self.flip[i, v].bool())

    def mix_params(self, view_index: torch.Tensor | int, image_index: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CutMix of the selected views: partner image ``(B,)`` long (``-1``: none), box ``(B, 4)``
        long ``(y1, y2, x1, x2)`` and ``lam`` ``(B,)`` float32, the fraction of the view's own pixels."""
        i, v = self._select(view_index, image_index)
        if self.mix_partner is None:
            return torch.full((len(i),), -1, dtype=torch.long), torch.zeros(len(i), 4, dtype=torch.long), torch.ones(len(i))
        partner, box = self.mix_partner[i, v].long(), self.mix_boxes[i, v].long()
        area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
        lam = 1.0 - area.double() / float(self.out_size * self.out_size)
        return partner, box, lam.float()

    def replay(
        self,
        images: torch.Tensor,
        view_index: torch.Tensor | int,
        image_index: torch.Tensor | None = None,
        partner_images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The selected views of ``images`` (the source images of ``image_index``, any device):
        crop + flip, and under CutMix the partner's view pasted in (docs/method.md "Stored views").

        ``partner_images``: the source images of ``mix_params(...)[0].clamp(min=0)`` (row ``j`` is
        the partner of row ``j``; rows of unmixed views are ignored), needed when any view is mixed.
        """
        i, v = self._select(view_index, image_index)
        if not self.has_mix:
            return replay_views(images, self.view_params(v, i), self.out_size)
        partner, box, _ = self.mix_params(v, i)
        if partner_images is None:
            if bool((partner >= 0).any()):
                raise GVBSMError("These stored views are CutMix-ed: pass partner_images= the source images of "
                                 "stored.mix_params(view, index)[0].clamp(min=0).")
            return replay_views(images, self.view_params(v, i), self.out_size)
        p = partner.clamp(min=0)
        return replay_views(images, self.view_params(v, i), self.out_size, partner_images=partner_images,
                            partner_params=self.view_params(v, p), mix_boxes=box)

    def dense_logits(self, view_index: torch.Tensor | int, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits ``(B, K)`` of the selected views (top-k: missing classes filled, see class doc)."""
        i, v = self._select(view_index, image_index)
        if self.logits is not None:
            return self.logits[i, v].float()
        vals = self.topk_values[i, v].float()
        idx = self.topk_indices[i, v].long()
        fill = vals.min(dim=-1, keepdim=True).values - float(self.fill_margin)
        out = fill.expand(vals.shape[0], self.num_classes).clone()
        return out.scatter_(-1, idx, vals)

    # ---- columns -------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """JSON-able description needed by :meth:`from_rows` (everything but the per-image rows)."""
        values = self.logits if self.logits is not None else self.topk_values
        return {
            "num_classes": int(self.num_classes),
            "image_size": list(self.image_size),
            "out_size": int(self.out_size),
            "num_views": self.num_views,
            "topk": self.topk,
            "logits_dtype": str(values.dtype).replace("torch.", ""),
            "index_dtype": None if self.topk_indices is None else str(self.topk_indices.dtype).replace("torch.", ""),
            "seed": int(self.seed),
            "crop_scale": list(self.crop_scale),
            "clean_view": bool(self.clean_view),
            "logit_norm": bool(self.logit_norm),
            "fill_margin": float(self.fill_margin),
            "cutmix_prob": float(self.cutmix_prob),
            "cutmix_alpha": float(self.cutmix_alpha),
            "has_mix": self.has_mix,
            "box_format": "xyxy_pixels",
            "mix_box_format": "y1y2x1x2_crop_pixels",
            "extra": dict(self.extra),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The per-image columns (:data:`gvbsm_hf.relabel.tables.COLUMNS` names) as the stored tensors."""
        named = {"views_boxes": self.boxes, "views_flip": self.flip, "soft_logits": self.logits,
                 "topk_values": self.topk_values, "topk_indices": self.topk_indices,
                 "views_mix_partner": self.mix_partner, "views_mix_boxes": self.mix_boxes}
        return {name: t for name, t in named.items() if t is not None}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The table's columns as numpy arrays, one row per image (views of the tensors, no copy
        for contiguous CPU tensors).

        ``views_boxes`` float32 ``(N, V, 4)``, ``views_flip`` bool ``(N, V)`` and either
        ``soft_logits`` ``(N, V, K)`` or ``topk_values`` / ``topk_indices`` ``(N, V, k)`` in
        their stored dtypes (and the CutMix columns). :meth:`from_rows` accepts this dict back.
        """
        meta = self.metadata()
        return {name: tables.as_numpy(t, tables.column_dtype(name, meta), name) for name, t in self.tensors().items()}

    def to_rows(self) -> dict[str, list]:
        """Columns of a ``datasets`` table as Python lists (exact, JSON-able, but slow and large for
        big sets: :meth:`to_arrays`, :meth:`to_dataset` and :meth:`save` do not go through them).
        Use :meth:`features` for the matching ``datasets.Features``."""
        return {name: col.tolist() for name, col in self.to_arrays().items()}

    def features(self) -> datasets.Features:
        """``datasets.Features`` of the table (fixed-shape arrays, original dtypes)."""
        return tables.features(self.to_arrays())

    def to_arrow(self) -> pa.Table:
        """The table as a ``pyarrow.Table`` with the schema of :meth:`features` (built from the
        tensors' buffers: no per-element conversion; zero-copy for contiguous CPU tensors)."""
        return tables.to_arrow(self.to_arrays())

    def to_dataset(self) -> datasets.Dataset:
        """A ``datasets.Dataset`` of the per-image rows (metadata in ``info.description`` as JSON):
        the export's ``views`` config. Built from the tensors' buffers: for contiguous CPU tensors
        it shares their memory, so do not modify the tensors in place while the dataset is in use."""
        return tables.to_dataset(self.to_arrays(), self.metadata())

    @classmethod
    def from_rows(cls, rows: Any, metadata: Mapping[str, Any] | None = None, **overrides: Any) -> StoredSoftLabels:
        """Inverse of :meth:`to_rows` / :meth:`to_arrays` / :meth:`to_dataset`.

        ``rows``: a ``datasets.Dataset`` (or ``pyarrow.Table``), a dict of columns (numpy arrays,
        tensors or lists) or a list of row dicts. ``metadata``: :meth:`metadata` (read from a
        dataset's ``info.description`` when omitted); keyword ``overrides`` replace single entries
        (e.g. ``out_size=32``). Arrow tables are copied buffer by buffer into new tensors (no
        Python objects per element); the result does not share memory with ``rows``.
        """
        meta = dict(metadata) if metadata is not None else tables.table_metadata(rows)
        meta.update(overrides)
        return cls._from_columns(tables.read_columns(rows, meta), meta)

    @classmethod
    def _from_columns(cls, cols: Mapping[str, Any], meta: Mapping[str, Any]) -> StoredSoftLabels:
        """From columns (numpy arrays or tensors, :data:`~gvbsm_hf.relabel.tables.COLUMNS` names)."""
        if cols.get("views_boxes") is None or cols.get("views_flip") is None:
            raise DataValidationError(
                "Stored soft-label rows need 'views_boxes' and 'views_flip' columns: build them with "
                "StoredSoftLabels.to_dataset() / to_rows() / relabel_stored()."
            )
        t = {name: _as_tensor(col, tables.column_dtype(name, meta)) for name, col in cols.items() if col is not None}
        kwargs: dict[str, Any] = {}
        if "soft_logits" in t:
            kwargs["logits"] = t["soft_logits"]
            num_classes = int(meta.get("num_classes", t["soft_logits"].shape[-1]))
        else:
            if "topk_values" not in t or "topk_indices" not in t:
                raise DataValidationError(
                    "Stored soft-label rows need 'soft_logits' or 'topk_values' + 'topk_indices' columns."
                )
            kwargs.update(topk_values=t["topk_values"], topk_indices=t["topk_indices"])
            if "num_classes" not in meta:
                raise DataValidationError("Top-k stored soft labels need metadata['num_classes'] (see .metadata()).")
            num_classes = int(meta["num_classes"])
        has_partner, has_boxes = "views_mix_partner" in t, "views_mix_boxes" in t
        if has_partner != has_boxes or (not has_partner and meta.get("has_mix")):
            raise DataValidationError(
                "CutMix-ed stored views need both 'views_mix_partner' and 'views_mix_boxes' columns: the table "
                "lost one; export the views again (StoredSoftLabels.to_dataset())."
            )
        if "image_size" not in meta or "out_size" not in meta:
            raise DataValidationError(
                "Stored soft labels need metadata with 'image_size' and 'out_size': pass "
                "metadata=stored.metadata() (the export keeps it in gvbsm_export.json)."
            )
        return cls(
            boxes=t["views_boxes"],
            flip=t["views_flip"],
            num_classes=num_classes,
            image_size=tuple(meta["image_size"]),
            out_size=int(meta["out_size"]),
            seed=int(meta.get("seed", 0)),
            crop_scale=tuple(meta.get("crop_scale", (0.08, 1.0))),
            clean_view=bool(meta.get("clean_view", False)),
            logit_norm=bool(meta.get("logit_norm", False)),
            fill_margin=float(meta.get("fill_margin", 1.0)),
            mix_partner=t.get("views_mix_partner"),
            mix_boxes=t.get("views_mix_boxes"),
            cutmix_prob=float(meta.get("cutmix_prob", 0.0)),
            cutmix_alpha=float(meta.get("cutmix_alpha", 1.0)),
            extra=dict(meta.get("extra", {})),
            **kwargs,
        )

    # ---- file ----------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``soft_labels.safetensors`` into ``folder`` (atomically: the file is complete or
        absent) and remove the files of the earlier parquet format; returns ``folder``."""
        folder = Path(folder)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors().items()}
        save_safetensors(tensors, folder / STORED_LABELS_FILE,
                         metadata={tables.METADATA_KEY: json.dumps(self.metadata())})
        for name in LEGACY_FILES:
            (folder / name).unlink(missing_ok=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> StoredSoftLabels:
        """Read what :meth:`save` wrote, lazily: the tensors map the file (copy-on-write), so
        memory holds only the pages that are read; the values are bit for bit those saved.

        A torn or foreign file raises an error naming it and ``--redo relabel``; a folder of the
        earlier parquet format raises one naming ``--redo relabel`` too.
        """
        folder = Path(folder)
        path = folder / STORED_LABELS_FILE
        if not path.exists():
            if (folder / LEGACY_FILES[0]).exists():
                raise GVBSMError(
                    f"{folder} holds stored soft labels in the parquet format of an earlier gvbsm-hf "
                    f"({LEGACY_FILES[0]}), which is no longer read: recompute them with `--redo relabel` and "
                    f"`relabel` among the stages (it writes {STORED_LABELS_FILE}; the synthetic images are kept)."
                )
            raise GVBSMError(
                f"No stored soft labels in {folder} (need {STORED_LABELS_FILE}): run the relabel stage with "
                "relabel_mode='stored' first."
            )
        tensors, header = load_safetensors(path, "relabel", with_metadata=True)
        try:
            meta = json.loads(header[tables.METADATA_KEY])
            unknown = set(tensors) - set(tables.COLUMNS)
            if unknown:
                raise GVBSMError(f"unknown tensors {sorted(unknown)}")
            for name, t in tensors.items():
                if t.dtype != tables.column_dtype(name, meta):
                    raise GVBSMError(f"{name} is {t.dtype}, the metadata says {tables.column_dtype(name, meta)}")
            return cls._from_columns(tensors, meta)
        except (KeyError, ValueError, TypeError, AttributeError) as err:  # GVBSMError is a ValueError
            raise damaged_file_error(path, "relabel", f"{type(err).__name__}: {err}") from None


def _as_tensor(col: Any, dtype: torch.dtype) -> torch.Tensor:
    """Tensor of ``col`` (a tensor: kept, or cast; a numpy array: no copy when it is writable,
    contiguous and of that dtype)."""
    if isinstance(col, torch.Tensor):
        return col if col.dtype == dtype else col.to(dtype)
    arr = np.asarray(col)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")
    return torch.from_numpy(arr).to(dtype)
