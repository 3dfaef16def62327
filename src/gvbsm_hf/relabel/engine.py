"""Relabel: ensemble soft labels (docs/method.md Eq. 8), on the fly or stored.

* :class:`TeacherEnsemble` runs every teacher on the SAME (augmented) batch and averages the
  logits (optionally with logit normalisation), ``z~ = ensemble_logits([f(x) for f in S])``; the
  soft label is ``softmax(z~ / tau)``.
* :func:`relabel_stored` precomputes, for every synthetic image, ``num_views`` augmented views
  (random resized crop + flip parameters) and the ensemble logits of each view (FKD-style,
  docs/method.md "Where the authors' code differs from the paper"). The student then replays exactly those views
  (:class:`gvbsm_hf.evaluate.trainer.GVBSMTrainer`), so that each soft label matches its view.

View parameters of image ``i`` come from a CPU ``torch.Generator`` seeded with
``derive_seed(seed, i)``: they do not depend on the batch size, on the order of the batches or on
the number of processes. By default every view is a random resized crop (the student's own
augmentation); ``clean_view=True`` makes view 0 the whole unflipped image (useful for inspecting
or publishing one label per image) without changing views ``1..V-1``. With ``cutmix_prob > 0`` a
view is also CutMix-ed with a partner image (:func:`sample_view_cutmix`) and its logits are those
of the MIXED crop, so a student replaying the views sees what the teachers saw (docs/method.md
"Stored views"). Logits are stored in fp16,
optionally only the top-k (missing classes are filled with ``min(kept) - fill_margin`` when
densified, finite so that both the MSE of Eq. 11 and a softmax work).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..utils import derive_seed  # noqa: F401  (re-exported: the package's one seeding scheme)
from ..augment import CropFlipParams, apply_crop_flip, cutmix_boxes, paste_boxes, sample_crop_flip
from ..ensemble import TeacherEnsemble
from ..errors import DataValidationError, GVBSMError

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import pyarrow as pa
    from accelerate import Accelerator

__all__ = [
    "TeacherEnsemble",
    "StoredSoftLabels",
    "relabel_stored",
    "derive_seed",
    "sample_image_views",
    "sample_view_cutmix",
]

STORED_LABELS_FILE = "soft_labels.parquet"
STORED_META_FILE = "soft_labels_meta.json"


def _identity_boxes(n: int, height: int, width: int) -> torch.Tensor:
    """Boxes ``(x1, y1, x2, y2)`` covering the whole image (the augment module's box format)."""
    return torch.tensor([0.0, 0.0, float(width), float(height)]).expand(n, 4).clone()


def sample_image_views(
    image_index: int,
    num_views: int,
    height: int,
    width: int,
    *,
    seed: int = 0,
    crop_scale: Sequence[float] = (0.08, 1.0),
    flip_prob: float = 0.5,
    clean_view: bool = False,
) -> CropFlipParams:
    """The ``num_views`` crop/flip parameters of image ``image_index`` (deterministic).

    Drawn by :func:`gvbsm_hf.augment.sample_crop_flip` from a generator seeded with
    ``derive_seed(seed, image_index)``. With ``clean_view`` view 0 is replaced by the identity
    (whole image, no flip); views ``1..V-1`` are the same with or without it.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, image_index))
    params = sample_crop_flip(
        num_views, height, width, scale=tuple(crop_scale), flip_prob=flip_prob, generator=g
    )
    boxes = params.boxes.detach().to("cpu", torch.float32).clone()
    flip = params.flip.detach().to("cpu").bool().clone()
    if clean_view:
        boxes[0] = _identity_boxes(1, height, width)[0]
        flip[0] = False
    return CropFlipParams(boxes=boxes, flip=flip)


def sample_view_cutmix(
    num_images: int, num_views: int, size: int, *, prob: float, alpha: float = 1.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix of the stored views (docs/method.md "Stored views"): ``(partner, boxes)``.

    ``partner`` ``(N, V)`` int32 is the image whose crop is pasted into view ``v`` of image ``i``
    (``-1``: not mixed); ``boxes`` ``(N, V, 4)`` int16 ``(y1, y2, x1, x2)`` in pixels of the
    ``size x size`` crop (zeros when not mixed). View ``v`` pairs the images by one permutation of
    all ``N`` (each image is pasted once per view, as batch CutMix does inside a batch); each
    ``(i, v)`` is mixed with probability ``prob``; box as :func:`gvbsm_hf.augment.cutmix`
    (``lam0 ~ Beta(alpha, alpha)``, side ``sqrt(1 - lam0)``, uniform centre, clipped). Drawn per view
    from ``derive_seed(seed, "cutmix", v)``: independent of batch size, batch order and processes.
    """
    if not 0.0 <= float(prob) <= 1.0:
        raise GVBSMError(f"cutmix_prob={prob} must be in [0, 1].")
    if alpha <= 0:
        raise GVBSMError(f"cutmix alpha={alpha} must be > 0.")
    partner = torch.full((num_images, num_views), -1, dtype=torch.int32)
    boxes = torch.zeros(num_images, num_views, 4, dtype=torch.int16)
    if prob <= 0 or num_images == 0:
        return partner, boxes
    if size > torch.iinfo(torch.int16).max:
        raise GVBSMError(f"crop size {size} is too large for int16 CutMix boxes.")
    for v in range(num_views):
        rng = np.random.default_rng(derive_seed(seed, "cutmix", v))
        perm = rng.permutation(num_images)
        mixed = rng.random(num_images) < prob
        box = cutmix_boxes(rng.beta(alpha, alpha, num_images), rng.random((num_images, 2)), size)
        partner[:, v] = torch.from_numpy(np.where(mixed, perm, -1).astype(np.int32))
        boxes[:, v] = torch.from_numpy(np.where(mixed[:, None], box, 0).astype(np.int16))
    return partner, boxes


def replay_views(
    images: torch.Tensor,
    params: CropFlipParams,
    out_size: int,
    *,
    partner_images: torch.Tensor | None = None,
    partner_params: CropFlipParams | None = None,
    mix_boxes: torch.Tensor | None = None,
) -> torch.Tensor:
    """The views of stored relabelling: crop + flip of each row, then (with ``mix_boxes``) the
    partner's own crop + flip pasted into the box (an all-zero box: not mixed)."""
    x = apply_crop_flip(images, params.to(images.device), out_size)
    if mix_boxes is None:
        return x
    if partner_images is None or partner_params is None:
        raise GVBSMError("CutMix-ed stored views need the partner images and their view parameters.")
    xp = apply_crop_flip(partner_images.to(images.device), partner_params.to(images.device), out_size)
    return paste_boxes(x, xp, mix_boxes)


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
            (:func:`sample_view_cutmix`), or ``None`` (no view mixed); the logits are those of the
            mixed view. ``cutmix_prob`` / ``cutmix_alpha`` say how they were drawn.
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

    # ---- tables --------------------------------------------------------------------------
    # Storage goes through numpy / Arrow buffers, never per-element Python objects: the
    # ``datasets`` table wraps the tensors' memory (zero-copy for contiguous CPU tensors, see
    # :meth:`to_dataset`) and reading copies Arrow buffers straight into preallocated arrays.
    def metadata(self) -> dict[str, Any]:
        """JSON-able description needed by :meth:`from_rows` (everything but the per-image rows)."""
        return {
            "num_classes": int(self.num_classes),
            "image_size": list(self.image_size),
            "out_size": int(self.out_size),
            "num_views": self.num_views,
            "topk": self.topk,
            "logits_dtype": str(self.logits.dtype if self.logits is not None else self.topk_values.dtype).replace(
                "torch.", ""
            ),
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

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The table's columns as numpy arrays, one row per image (views of the tensors, no copy
        for contiguous CPU tensors).

        ``views_boxes`` float32 ``(N, V, 4)``, ``views_flip`` bool ``(N, V)`` and either
        ``soft_logits`` ``(N, V, K)`` or ``topk_values`` / ``topk_indices`` ``(N, V, k)`` in
        their stored dtypes. :meth:`from_rows` accepts this dict back.
        """
        cols: dict[str, np.ndarray] = {
            "views_boxes": _as_numpy(self.boxes, torch.float32, "boxes"),
            "views_flip": _as_numpy(self.flip, torch.bool, "flip"),
        }
        if self.logits is not None:
            cols["soft_logits"] = _as_numpy(self.logits, None, "logits")
        else:
            cols["topk_values"] = _as_numpy(self.topk_values, None, "topk_values")
            cols["topk_indices"] = _as_numpy(self.topk_indices, None, "topk_indices")
        if self.has_mix:
            cols["views_mix_partner"] = _as_numpy(self.mix_partner, torch.int32, "mix_partner")
            cols["views_mix_boxes"] = _as_numpy(self.mix_boxes, torch.int16, "mix_boxes")
        return cols

    def to_rows(self) -> dict[str, list]:
        """Columns of a ``datasets`` table, one row per image (dict of Python lists).

        ``views_boxes`` ``(V, 4)``, ``views_flip`` ``(V,)`` and either ``soft_logits`` ``(V, K)``
        or ``topk_values`` / ``topk_indices`` ``(V, k)``. Lists of python numbers: exact for
        fp16/float32/int values, JSON-able, but slow and large for big sets: :meth:`to_arrays`,
        :meth:`to_dataset` and :meth:`save` do not go through them. Use :meth:`features` for the
        matching ``datasets.Features``.
        """
        return {name: col.tolist() for name, col in self.to_arrays().items()}

    def features(self) -> "datasets.Features":
        """``datasets.Features`` of the table (fixed-shape arrays, original dtypes)."""
        import datasets

        v = self.num_views
        feats = {
            "views_boxes": datasets.Array2D(shape=(v, 4), dtype="float32"),
            "views_flip": datasets.List(datasets.Value("bool"), length=v),
        }
        if self.logits is not None:
            feats["soft_logits"] = datasets.Array2D(shape=(v, self.num_classes), dtype=_dtype_name(self.logits))
        else:
            k = self.topk
            feats["topk_values"] = datasets.Array2D(shape=(v, k), dtype=_dtype_name(self.topk_values))
            feats["topk_indices"] = datasets.Array2D(shape=(v, k), dtype=_dtype_name(self.topk_indices))
        if self.has_mix:
            feats["views_mix_partner"] = datasets.List(datasets.Value("int32"), length=v)
            feats["views_mix_boxes"] = datasets.Array2D(shape=(v, 4), dtype="int16")
        return datasets.Features(feats)

    def to_arrow(self) -> "pa.Table":
        """The table as a ``pyarrow.Table`` with the schema of :meth:`features` (built from the
        tensors' buffers: no per-element conversion; zero-copy for contiguous CPU tensors)."""
        return self._arrow_table(self.to_arrays())

    def _arrow_table(self, cols: Mapping[str, np.ndarray]) -> "pa.Table":
        import pyarrow as pa

        schema = self.features().arrow_schema
        arrays = [_arrow_fixed_shape(cols[name], schema.field(name).type, name) for name in schema.names]
        return pa.Table.from_arrays(arrays, schema=schema)

    def to_dataset(self) -> "datasets.Dataset":
        """A ``datasets.Dataset`` of the per-image rows (metadata in ``info.description`` as JSON).

        Columns and features are those of :meth:`features`. The table is built from the tensors'
        buffers (see :meth:`to_arrow`): for contiguous CPU tensors it shares their memory, so do
        not modify the tensors in place while the dataset is in use.
        """
        import datasets
        from datasets.table import InMemoryTable

        cols = self.to_arrays()  # first: names an unstorable dtype (bfloat16) before datasets does
        table = self._arrow_table(cols)
        description = json.dumps({"gvbsm_stored_soft_labels": self.metadata()})
        info = datasets.DatasetInfo(description=description, features=self.features())
        # datasets would fingerprint the table by pickling it (a full serialised copy): hash the buffers
        return datasets.Dataset(InMemoryTable(table), info=info, fingerprint=_fingerprint(description, cols))

    @classmethod
    def from_rows(cls, rows: Any, metadata: Mapping[str, Any] | None = None, **overrides: Any) -> "StoredSoftLabels":
        """Inverse of :meth:`to_rows` / :meth:`to_arrays` / :meth:`to_dataset`.

        ``rows``: a ``datasets.Dataset`` (or ``pyarrow.Table``), a dict of columns (numpy arrays,
        tensors or lists) or a list of row dicts. ``metadata``: :meth:`metadata` (read from a
        dataset's ``info.description`` when omitted); keyword ``overrides`` replace single entries
        (e.g. ``out_size=32``). Arrow tables are copied buffer by buffer into new tensors (no
        Python objects per element); the result does not share memory with ``rows``.
        """
        meta: dict[str, Any] = {}
        if metadata is None and hasattr(rows, "info") and getattr(rows.info, "description", None):
            try:
                meta = dict(json.loads(rows.info.description).get("gvbsm_stored_soft_labels", {}))
            except (ValueError, AttributeError):
                meta = {}
        elif metadata is not None:
            meta = dict(metadata)
        meta.update(overrides)

        table = _as_arrow_table(rows)
        if table is not None:
            names = [name for name in _COLUMNS if name in table.column_names]
            cols = _read_arrow_columns(
                ({name: table.column(name).chunks for name in names},), len(table), names, meta
            )
        else:
            cols = {name: _python_column(rows, name) for name in _COLUMNS}
            cols = {name: col for name, col in cols.items() if col is not None}
        return cls._from_columns(cols, meta)

    @classmethod
    def _from_columns(cls, cols: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> "StoredSoftLabels":
        boxes, flip = cols.get("views_boxes"), cols.get("views_flip")
        if boxes is None or flip is None:
            raise DataValidationError(
                "Stored soft-label rows need 'views_boxes' and 'views_flip' columns: build them with "
                "StoredSoftLabels.to_dataset() / to_rows() / relabel_stored()."
            )
        dtype = getattr(torch, meta.get("logits_dtype", "float16"))
        dense = cols.get("soft_logits")
        kwargs: dict[str, Any] = {}
        if dense is not None:
            kwargs["logits"] = _to_tensor(dense, dtype)
            num_classes = int(meta.get("num_classes", dense.shape[-1]))
        else:
            values, indices = cols.get("topk_values"), cols.get("topk_indices")
            if values is None or indices is None:
                raise DataValidationError(
                    "Stored soft-label rows need 'soft_logits' or 'topk_values' + 'topk_indices' columns."
                )
            kwargs["topk_values"] = _to_tensor(values, dtype)
            kwargs["topk_indices"] = _to_tensor(indices, getattr(torch, meta.get("index_dtype") or "int32"))
            if "num_classes" not in meta:
                raise DataValidationError("Top-k stored soft labels need metadata['num_classes'] (see .metadata()).")
            num_classes = int(meta["num_classes"])
        partner, mix_boxes = cols.get("views_mix_partner"), cols.get("views_mix_boxes")
        if (partner is None) != (mix_boxes is None) or (partner is None and meta.get("has_mix")):
            raise DataValidationError(
                "CutMix-ed stored views need both 'views_mix_partner' and 'views_mix_boxes' columns: the table "
                "lost one; export the views again (StoredSoftLabels.to_dataset())."
            )
        if "image_size" not in meta or "out_size" not in meta:
            raise DataValidationError(
                "Stored soft labels need metadata with 'image_size' and 'out_size': pass "
                "metadata=stored.metadata() (saved beside the table by StoredSoftLabels.save)."
            )
        return cls(
            boxes=_to_tensor(boxes, torch.float32),
            flip=_to_tensor(flip, torch.bool),
            num_classes=num_classes,
            image_size=tuple(meta["image_size"]),
            out_size=int(meta["out_size"]),
            seed=int(meta.get("seed", 0)),
            crop_scale=tuple(meta.get("crop_scale", (0.08, 1.0))),
            clean_view=bool(meta.get("clean_view", False)),
            logit_norm=bool(meta.get("logit_norm", False)),
            fill_margin=float(meta.get("fill_margin", 1.0)),
            mix_partner=None if partner is None else _to_tensor(partner, torch.int32),
            mix_boxes=None if mix_boxes is None else _to_tensor(mix_boxes, torch.int16),
            cutmix_prob=float(meta.get("cutmix_prob", 0.0)),
            cutmix_alpha=float(meta.get("cutmix_alpha", 1.0)),
            extra=dict(meta.get("extra", {})),
            **kwargs,
        )

    def save(self, folder: str | Path) -> Path:
        """Write ``soft_labels.parquet`` (``datasets``, row groups of about a million logits) and
        ``soft_labels_meta.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # row groups of about _BATCH_VALUES logits: bounded writer / reader memory
        self.to_dataset().to_parquet(str(folder / STORED_LABELS_FILE), batch_size=self._batch_rows(self.metadata()))
        (folder / STORED_META_FILE).write_text(json.dumps(self.metadata(), indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "StoredSoftLabels":
        """Read what :meth:`save` wrote.

        The parquet file is read batch by batch straight into preallocated arrays: the peak is
        about one copy of the labels plus one row group, and nothing is written to the
        ``datasets`` cache.
        """
        import pyarrow.parquet as pq

        folder = Path(folder)
        meta_path, table_path = folder / STORED_META_FILE, folder / STORED_LABELS_FILE
        if not meta_path.exists() or not table_path.exists():
            raise GVBSMError(
                f"No stored soft labels in {folder} (need {STORED_LABELS_FILE} and {STORED_META_FILE}): "
                "run the relabel stage with relabel_mode='stored' first."
            )
        meta = json.loads(meta_path.read_text())
        # pre_buffer=False: pyarrow would otherwise read ahead the column chunks of the whole file
        with pq.ParquetFile(str(table_path), pre_buffer=False) as pf:
            names = [name for name in _COLUMNS if name in pf.schema_arrow.names]
            batches = (
                {name: [batch.column(name)] for name in names}
                for batch in pf.iter_batches(batch_size=cls._batch_rows(meta), columns=names)
            )
            cols = _read_arrow_columns(batches, pf.metadata.num_rows, names, meta)
        return cls._from_columns(cols, meta)

    @staticmethod
    def _batch_rows(meta: Mapping[str, Any]) -> int:
        """Rows (images) of about ``_BATCH_VALUES`` logits: parquet row groups / read batches."""
        width = meta.get("topk") or meta.get("num_classes") or 1
        return max(1, _BATCH_VALUES // max(1, int(meta.get("num_views") or 1) * int(width)))


# ---- array helpers of StoredSoftLabels -------------------------------------------------------

_COLUMNS = ("views_boxes", "views_flip", "soft_logits", "topk_values", "topk_indices", "views_mix_partner",
            "views_mix_boxes")
_INT32_MAX = 2**31 - 1
_BATCH_VALUES = 1 << 20  # logits per parquet row group / read batch (2 MiB of fp16)


def _fingerprint(description: str, cols: Mapping[str, np.ndarray]) -> str:
    """Content hash of a table (``datasets`` fingerprint): metadata, then each column's dtype,
    shape and raw bytes, read in place."""
    try:
        import xxhash  # a dependency of datasets

        h = xxhash.xxh64()
    except ImportError:  # pragma: no cover
        h = hashlib.blake2b(digest_size=8)
    h.update(description.encode())
    for name, arr in cols.items():
        h.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
        h.update(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
    return h.hexdigest()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _numpy_dtype(dtype: torch.dtype, what: str) -> np.dtype:
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError as err:  # bfloat16 & co: no numpy / Arrow equivalent
        raise GVBSMError(
            f"{what} has dtype {dtype}, which numpy/Arrow cannot store: use float16 or float32 "
            "(relabel_stored(dtype=torch.float16))."
        ) from err


def _as_numpy(t: torch.Tensor, dtype: torch.dtype | None, what: str) -> np.ndarray:
    """C-contiguous numpy view of ``t`` (copied only if it is on a device, strided or of another dtype)."""
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    _numpy_dtype(t.dtype, what)
    return t.cpu().contiguous().numpy()


def _arrow_fixed_shape(arr: np.ndarray, typ: "pa.DataType", name: str) -> "pa.Array":
    """Arrow array of type ``typ`` (nested lists, fixed-size lists or a datasets ArrayND
    extension over nested lists) whose rows are ``arr[i]``; built from ``arr``'s buffer."""
    import pyarrow as pa

    if isinstance(typ, pa.ExtensionType):
        return pa.ExtensionArray.from_storage(typ, _arrow_fixed_shape(arr, typ.storage_type, name))
    n, shape = arr.shape[0], arr.shape[1:]
    level_types, t = [], typ
    for _ in shape:
        if not (pa.types.is_list(t) or pa.types.is_fixed_size_list(t)):
            raise GVBSMError(f"column {name!r}: Arrow type {typ} does not nest {len(shape)} lists.")
        level_types.append(t)
        t = t.value_type
    flat = np.ascontiguousarray(arr).reshape(-1)
    if flat.size > _INT32_MAX:
        raise GVBSMError(
            f"column {name!r} has {flat.size} values, more than an Arrow list column holds (2**31 - 1): "
            "store the top-k logits (relabel_stored(topk=...)) or fewer views."
        )
    out = pa.array(flat, type=t)  # zero-copy for numeric dtypes, bit-packed for bool
    for level in reversed(range(len(shape))):
        d, lt = int(shape[level]), level_types[level]
        rows = n * math.prod(int(s) for s in shape[:level])
        if pa.types.is_fixed_size_list(lt):
            if lt.list_size != d:
                raise GVBSMError(f"column {name!r}: Arrow type {typ} does not match shape {arr.shape}.")
            out = pa.FixedSizeListArray.from_arrays(out, type=lt)
        else:
            offsets = pa.array((np.arange(rows + 1, dtype=np.int64) * d).astype(np.int32))
            out = pa.ListArray.from_arrays(offsets, out, type=lt)
    return out


def _arrow_chunk_numpy(chunk: "pa.Array", ndim: int, name: str) -> np.ndarray:
    """Numpy array ``(len(chunk), d_1, ..., d_ndim)`` of a column chunk of nested (fixed-size)
    lists of equal lengths (a view of the Arrow buffer where Arrow allows it: read-only)."""
    import pyarrow as pa

    a = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
    n, dims = len(a), []
    for _ in range(ndim):
        if a.null_count:
            raise DataValidationError(f"column {name!r} has missing values: every row needs all its views.")
        if pa.types.is_fixed_size_list(a.type):
            dims.append(int(a.type.list_size))
        elif pa.types.is_list(a.type) or pa.types.is_large_list(a.type):
            lengths = np.diff(a.offsets.to_numpy())
            if lengths.size and (lengths != lengths[0]).any():
                raise DataValidationError(
                    f"column {name!r} has rows of different lengths ({int(lengths.min())}..{int(lengths.max())}): "
                    "every image needs the same number of views / classes."
                )
            dims.append(int(lengths[0]) if lengths.size else 0)
        else:
            raise DataValidationError(f"column {name!r} has Arrow type {chunk.type}: expected {ndim} nested lists.")
        a = a.flatten()
    if a.null_count:
        raise DataValidationError(f"column {name!r} has missing values: every row needs all its views.")
    return a.to_numpy(zero_copy_only=False).reshape(n, *dims)


_COLUMN_NDIM = {"views_boxes": 2, "views_flip": 1, "soft_logits": 2, "topk_values": 2, "topk_indices": 2,
                "views_mix_partner": 1, "views_mix_boxes": 2}


def _column_dtype(name: str, meta: Mapping[str, Any]) -> torch.dtype:
    if name == "views_boxes":
        return torch.float32
    if name == "views_flip":
        return torch.bool
    if name == "views_mix_partner":
        return torch.int32
    if name == "views_mix_boxes":
        return torch.int16
    if name == "topk_indices":
        return getattr(torch, meta.get("index_dtype") or "int32")
    return getattr(torch, meta.get("logits_dtype", "float16"))


def _empty_shape(name: str, meta: Mapping[str, Any]) -> tuple[int, ...]:
    v = int(meta.get("num_views", 0))
    last = {"views_boxes": 4, "views_mix_boxes": 4, "soft_logits": meta.get("num_classes"),
            "topk_values": meta.get("topk"), "topk_indices": meta.get("topk")}
    return (0, v) if name in ("views_flip", "views_mix_partner") else (0, v, int(last.get(name) or 0))


def _read_arrow_columns(batches, n: int, names: Sequence[str], meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Copy the chunks of ``batches`` (an iterable of ``{name: [arrow chunks]}``) into one
    preallocated, writable numpy array per column, in the dtype the tensor will have."""
    out: dict[str, np.ndarray] = {}
    pos = dict.fromkeys(names, 0)
    for batch in batches:
        for name in names:
            for chunk in batch[name]:
                if not len(chunk):
                    continue
                a = _arrow_chunk_numpy(chunk, _COLUMN_NDIM[name], name)
                if name not in out:
                    out[name] = np.empty((n, *a.shape[1:]), dtype=_numpy_dtype(_column_dtype(name, meta), name))
                elif a.shape[1:] != out[name].shape[1:]:
                    raise DataValidationError(
                        f"column {name!r} has rows of shape {a.shape[1:]} and {out[name].shape[1:]}: "
                        "every image needs the same number of views / classes."
                    )
                if pos[name] + len(a) > n:
                    raise DataValidationError(f"column {name!r} has more than the table's {n} rows.")
                out[name][pos[name] : pos[name] + len(a)] = a
                pos[name] += len(a)
    for name in names:
        if name not in out:
            out[name] = np.empty(_empty_shape(name, meta), dtype=_numpy_dtype(_column_dtype(name, meta), name))
        elif pos[name] != n:
            raise DataValidationError(f"column {name!r} has {pos[name]} rows for a table of {n}.")
    return out


def _as_arrow_table(rows: Any) -> "pa.Table | None":
    """The rows of a ``datasets.Dataset`` (its selection / order applied) or a ``pyarrow.Table``."""
    import pyarrow as pa

    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, (Mapping, list)):
        return None
    if hasattr(rows, "with_format") and hasattr(rows, "column_names"):
        return rows.with_format("arrow")[:]  # zero-copy slice (a take with an indices mapping)
    raise DataValidationError(
        f"from_rows got a {type(rows).__name__}: pass a datasets.Dataset, a dict of columns or a list of row dicts."
    )


def _python_column(rows: Mapping[str, Any] | list, name: str) -> np.ndarray | None:
    """Column ``name`` of a dict of columns (arrays, tensors or lists) or a list of row dicts."""
    if isinstance(rows, Mapping):
        col = rows.get(name)
    else:
        col = [r[name] for r in rows] if rows and name in rows[0] else None
    if col is None:
        return None
    if isinstance(col, torch.Tensor):
        return col.detach().cpu().numpy()
    try:
        arr = np.asarray(col)
    except ValueError as err:
        raise DataValidationError(
            f"column {name!r} has rows of different shapes: every image needs the same number of views / classes."
        ) from err
    if arr.dtype == object:
        arr = np.stack([np.asarray(c) for c in col])
    return arr


def _to_tensor(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Tensor of ``arr`` in ``dtype`` (no copy when ``arr`` is writable, contiguous and of that dtype)."""
    arr = np.asarray(arr)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")
    return torch.from_numpy(arr).to(dtype)


# --------------------------------------------------------------------------------------------
# relabel_stored
# --------------------------------------------------------------------------------------------


def relabel_stored(
    images: torch.Tensor,
    ensemble: TeacherEnsemble,
    *,
    num_views: int,
    out_size: int,
    crop_scale: Sequence[float] = (0.08, 1.0),
    flip_prob: float = 0.5,
    seed: int = 0,
    batch_size: int = 256,
    topk: int | None = None,
    dtype: torch.dtype = torch.float16,
    clean_view: bool = False,
    fill_margin: float = 1.0,
    cutmix_prob: float = 0.0,
    cutmix_alpha: float = 1.0,
    accelerator: "Accelerator | None" = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> StoredSoftLabels:
    """Ensemble logits (Eq. 8) of ``num_views`` augmented views of every image.

    Args:
        images: normalised float ``(N, C, H, W)`` (CPU or device).
        ensemble: the teachers; they run on the same crops (one forward each per batch).
        num_views: ``V`` views per image, view ``v`` of image ``i`` drawn with
            :func:`sample_image_views` (generator seeded by ``(seed, i)``).
        out_size: crop output side (the student's input side).
        clean_view: make view 0 the whole, unflipped image (default ``False``: every view is a
            random resized crop, like the student's training augmentation).
        topk: keep only the ``k`` largest logits per view (see :meth:`StoredSoftLabels.dense_logits`).
        cutmix_prob / cutmix_alpha: CutMix of the views (:func:`sample_view_cutmix`, the student's
            ``cutmix_prob``); the teachers label the mixed crop.
        batch_size: crops per teacher forward: each batch holds ``max(1, batch_size // V)`` images and
            all their ``V`` views, so memory is bounded by ``batch_size`` crops (at least ``V``), not by
            ``batch_size * V``; results do not depend on it.
        accelerator: shards batches (``batch % num_processes == process_index``) and gathers the
            logits; every process returns the full result.
    """
    if images.ndim != 4:
        raise DataValidationError(f"images must be (N, C, H, W) normalised floats, got shape {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise DataValidationError("images must be normalised floats: call spec.normalize(uint8_images) first.")
    if num_views < 1:
        raise GVBSMError(f"num_views={num_views}: need at least 1 view per image.")
    if batch_size < 1:
        raise GVBSMError(f"batch_size={batch_size} must be >= 1.")
    n, _, h, w = images.shape
    if device is None:
        device = accelerator.device if accelerator is not None else ensemble.device
    device = torch.device(device)
    ensemble.to(device)

    # View parameters: cheap and deterministic, computed for every image on every process.
    is_main = accelerator.is_local_main_process if accelerator is not None else True
    boxes = torch.empty(n, num_views, 4, dtype=torch.float32)
    flip = torch.empty(n, num_views, dtype=torch.bool)
    for i in tqdm(range(n), desc="relabel views", disable=not (show_progress and is_main and n >= 10_000)):
        p = sample_image_views(
            i, num_views, h, w, seed=seed, crop_scale=crop_scale, flip_prob=flip_prob, clean_view=clean_view
        )
        boxes[i], flip[i] = p.boxes, p.flip
    mix_partner, mix_boxes = sample_view_cutmix(n, num_views, int(out_size), prob=cutmix_prob, alpha=cutmix_alpha,
                                                seed=seed)
    mixing = cutmix_prob > 0

    num_procs = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    per_batch = max(1, batch_size // num_views)  # images per forward: their V views are the crops
    num_batches = math.ceil(n / per_batch)
    my_batches = [b for b in range(num_batches) if b % num_procs == rank]

    k = None if topk is None else int(topk)
    out_chunks: list[torch.Tensor] = []
    idx_chunks: list[torch.Tensor] = []
    num_classes: int | None = None
    for b in tqdm(my_batches, desc="relabel", disable=not (show_progress and is_main)):
        lo, hi = b * per_batch, min(n, (b + 1) * per_batch)
        x = images[lo:hi].to(device, non_blocking=True)
        # crops ordered image-major: row j -> image lo + j // V, view j % V
        xr = x.repeat_interleave(num_views, dim=0)
        params = CropFlipParams(boxes=boxes[lo:hi].reshape(-1, 4), flip=flip[lo:hi].reshape(-1))
        if mixing:  # the partner's own view v pasted into view v (what the student replays)
            partner = mix_partner[lo:hi].reshape(-1).long().clamp(min=0)
            view = torch.arange(num_views).repeat(hi - lo)
            views = replay_views(xr, params, out_size, partner_images=images[partner.to(images.device)],
                                 partner_params=CropFlipParams(boxes=boxes[partner, view], flip=flip[partner, view]),
                                 mix_boxes=mix_boxes[lo:hi].reshape(-1, 4))
        else:
            views = replay_views(xr, params, out_size)
        z = ensemble(views).float()
        num_classes = z.shape[-1]
        z = z.reshape(hi - lo, num_views, num_classes)
        if k is not None:
            if not 1 <= k <= num_classes:
                raise GVBSMError(f"topk={k} must be in [1, num_classes={num_classes}].")
            vals, inds = z.topk(k, dim=-1)
            z = torch.cat([vals, inds.float()], dim=-1)  # indices < 2**24: exact in float32
        out_chunks.append(z)
        idx_chunks.append(torch.arange(lo, hi, device=device))

    if accelerator is not None and num_procs > 1:
        # processes without a batch do not know K: agree on it first
        nc = torch.tensor([num_classes if num_classes is not None else -1], device=device)
        num_classes = int(accelerator.gather(nc).max().item())
        num_classes = None if num_classes < 0 else num_classes
    if num_classes is None:
        raise GVBSMError("Cannot tell the number of classes of an empty image set: relabel at least one image.")
    width = (2 * k) if k is not None else num_classes
    local = torch.cat(out_chunks) if out_chunks else torch.empty(0, num_views, width, device=device)
    local_idx = torch.cat(idx_chunks) if idx_chunks else torch.empty(0, dtype=torch.long, device=device)
    if accelerator is not None and num_procs > 1:
        local = accelerator.pad_across_processes(local, dim=0)
        local_idx = accelerator.pad_across_processes(local_idx, dim=0, pad_index=-1)
        local, local_idx = accelerator.gather(local), accelerator.gather(local_idx)
        keep = local_idx >= 0
        local, local_idx = local[keep], local_idx[keep]
    full = torch.empty(n, num_views, width, dtype=torch.float32)
    full[local_idx.cpu()] = local.cpu()

    if k is None:
        kwargs = {"logits": full.to(dtype)}
    else:
        idx_dtype = torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32
        kwargs = {"topk_values": full[..., :k].to(dtype), "topk_indices": full[..., k:].round().to(idx_dtype)}
    return StoredSoftLabels(
        boxes=boxes,
        flip=flip,
        num_classes=int(num_classes),
        image_size=(h, w),
        out_size=int(out_size),
        seed=int(seed),
        crop_scale=tuple(crop_scale),
        clean_view=bool(clean_view),
        logit_norm=bool(ensemble.logit_norm),
        fill_margin=float(fill_margin),
        mix_partner=mix_partner if mixing else None,
        mix_boxes=mix_boxes if mixing else None,
        cutmix_prob=float(cutmix_prob),
        cutmix_alpha=float(cutmix_alpha),
        **kwargs,
    )
