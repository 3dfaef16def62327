"""Stored soft labels as a ``datasets`` table: the export's ``views`` config (parquet) and back.

One row per image: ``views_boxes`` ``(V, 4)`` float32, ``views_flip`` ``(V,)`` bool, either
``soft_logits`` ``(V, K)`` or ``topk_values`` / ``topk_indices`` ``(V, k)``, and under CutMix
``views_mix_partner`` ``(V,)`` int32 / ``views_mix_boxes`` ``(V, 4)`` int16. Tables are built from
the tensors' buffers and read back buffer by buffer into preallocated arrays: no per-element
Python objects either way. The run folder keeps the same columns in one safetensors file
(:mod:`gvbsm_hf.relabel.store`); only the export goes through Arrow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
import xxhash  # a dependency of datasets
from datasets.table import InMemoryTable

from ..errors import DataValidationError, GVBSMError

COLUMNS = ("views_boxes", "views_flip", "soft_logits", "topk_values", "topk_indices", "views_mix_partner",
           "views_mix_boxes")
"""Per-image columns, in table order (the safetensors file uses the same names)."""

METADATA_KEY = "gvbsm_stored_soft_labels"
"""Key of the StoredSoftLabels metadata in a dataset's ``info.description`` JSON and in the file header."""

_NDIM = {"views_boxes": 2, "views_flip": 1, "soft_logits": 2, "topk_values": 2, "topk_indices": 2,
         "views_mix_partner": 1, "views_mix_boxes": 2}
_INT32_MAX = 2**31 - 1


def column_dtype(name: str, meta: Mapping[str, Any]) -> torch.dtype:
    """The tensor dtype of column ``name`` (logits / indices as the metadata says)."""
    fixed = {"views_boxes": torch.float32, "views_flip": torch.bool, "views_mix_partner": torch.int32,
             "views_mix_boxes": torch.int16}
    if name in fixed:
        return fixed[name]
    if name == "topk_indices":
        return getattr(torch, meta.get("index_dtype") or "int32")
    return getattr(torch, meta.get("logits_dtype", "float16"))


def numpy_dtype(dtype: torch.dtype, what: str) -> np.dtype:
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError as err:  # bfloat16 & co: no numpy / Arrow equivalent
        raise GVBSMError(
            f"{what} has dtype {dtype}, which numpy/Arrow cannot store: use float16 or float32 "
            "(StoredSoftLabels(logits=logits.half()))."
        ) from err


def as_numpy(t: torch.Tensor, dtype: torch.dtype | None, what: str) -> np.ndarray:
    """C-contiguous numpy view of ``t`` (copied only if it is on a device, strided or of another dtype)."""
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    numpy_dtype(t.dtype, what)
    return t.cpu().contiguous().numpy()


# ---- writing ---------------------------------------------------------------------------------


def features(cols: Mapping[str, np.ndarray]) -> datasets.Features:
    """``datasets.Features`` of the columns ``cols`` (fixed-shape arrays, their dtypes)."""
    v = int(cols["views_boxes"].shape[1])
    feats: dict[str, Any] = {
        "views_boxes": datasets.Array2D(shape=(v, 4), dtype="float32"),
        "views_flip": datasets.List(datasets.Value("bool"), length=v),
    }
    for name in ("soft_logits", "topk_values", "topk_indices"):
        if name in cols:
            feats[name] = datasets.Array2D(shape=(v, int(cols[name].shape[2])), dtype=cols[name].dtype.name)
    if "views_mix_partner" in cols:
        feats["views_mix_partner"] = datasets.List(datasets.Value("int32"), length=v)
        feats["views_mix_boxes"] = datasets.Array2D(shape=(v, 4), dtype="int16")
    return datasets.Features(feats)


def to_arrow(cols: Mapping[str, np.ndarray]) -> pa.Table:
    """A ``pyarrow.Table`` with the schema of :func:`features`, built from the arrays' buffers
    (no per-element conversion; zero-copy for numeric dtypes)."""
    schema = features(cols).arrow_schema
    arrays = [_arrow_fixed_shape(cols[name], schema.field(name).type, name) for name in schema.names]
    return pa.Table.from_arrays(arrays, schema=schema)


def to_dataset(cols: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> datasets.Dataset:
    """A ``datasets.Dataset`` of the rows (``meta`` as JSON in ``info.description``), sharing the
    arrays' memory."""
    description = json.dumps({METADATA_KEY: dict(meta)})
    info = datasets.DatasetInfo(description=description, features=features(cols))
    # datasets would fingerprint the table by pickling it (a full serialised copy): hash the buffers
    return datasets.Dataset(InMemoryTable(to_arrow(cols)), info=info, fingerprint=_fingerprint(description, cols))


def _fingerprint(description: str, cols: Mapping[str, np.ndarray]) -> str:
    """Content hash of a table: metadata, then each column's dtype, shape and raw bytes, read in place."""
    h = xxhash.xxh64()
    h.update(description.encode())
    for name, arr in cols.items():
        h.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
        h.update(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
    return h.hexdigest()


def _arrow_fixed_shape(arr: np.ndarray, typ: pa.DataType, name: str) -> pa.Array:
    """Arrow array of type ``typ`` (nested lists, fixed-size lists or a datasets ArrayND
    extension over nested lists) whose rows are ``arr[i]``; built from ``arr``'s buffer."""
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
            "store the top-k logits (relabel_topk) or fewer views."
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


# ---- reading ---------------------------------------------------------------------------------


def table_metadata(rows: Any) -> dict[str, Any]:
    """The metadata a :func:`to_dataset` table carries in ``info.description`` (``{}`` if none)."""
    description = getattr(getattr(rows, "info", None), "description", None)
    if not description:
        return {}
    try:
        return dict(json.loads(description).get(METADATA_KEY, {}))
    except (ValueError, AttributeError):
        return {}


def read_columns(rows: Any, meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The columns of ``rows`` as numpy arrays, one row per image: a ``datasets.Dataset`` (its
    selection / order applied) or ``pyarrow.Table`` (copied buffer by buffer into new arrays),
    a dict of columns (arrays, tensors or lists) or a list of row dicts."""
    if isinstance(rows, (Mapping, list)):
        cols = {name: _python_column(rows, name) for name in COLUMNS}
        return {name: col for name, col in cols.items() if col is not None}
    if isinstance(rows, pa.Table):
        table = rows
    elif hasattr(rows, "with_format") and hasattr(rows, "column_names"):
        table = rows.with_format("arrow")[:]  # zero-copy slice (a take with an indices mapping)
    else:
        raise DataValidationError(
            f"from_rows got a {type(rows).__name__}: pass a datasets.Dataset, a dict of columns or a list of row dicts."
        )
    return {name: _read_arrow_column(table.column(name).chunks, len(table), name, meta)
            for name in COLUMNS if name in table.column_names}


def _read_arrow_column(chunks, n: int, name: str, meta: Mapping[str, Any]) -> np.ndarray:
    """One preallocated, writable array ``(n, ...)`` in the column's tensor dtype, filled chunk by chunk."""
    dtype = numpy_dtype(column_dtype(name, meta), name)
    out, pos = None, 0
    for chunk in chunks:
        if not len(chunk):
            continue
        a = _arrow_chunk_numpy(chunk, _NDIM[name], name)
        if out is None:
            out = np.empty((n, *a.shape[1:]), dtype=dtype)
        elif a.shape[1:] != out.shape[1:]:
            raise DataValidationError(f"column {name!r} has rows of shape {a.shape[1:]} and {out.shape[1:]}: "
                                      "every image needs the same number of views / classes.")
        if pos + len(a) > n:
            raise DataValidationError(f"column {name!r} has more than the table's {n} rows.")
        out[pos : pos + len(a)] = a
        pos += len(a)
    if out is None:
        return np.empty(_empty_shape(name, meta), dtype=dtype)
    if pos != n:
        raise DataValidationError(f"column {name!r} has {pos} rows for a table of {n}.")
    return out


def _empty_shape(name: str, meta: Mapping[str, Any]) -> tuple[int, ...]:
    v = int(meta.get("num_views", 0))
    last = {"views_boxes": 4, "views_mix_boxes": 4, "soft_logits": meta.get("num_classes"),
            "topk_values": meta.get("topk"), "topk_indices": meta.get("topk")}
    return (0, v) if name in ("views_flip", "views_mix_partner") else (0, v, int(last.get(name) or 0))


def _arrow_chunk_numpy(chunk: pa.Array, ndim: int, name: str) -> np.ndarray:
    """Numpy array ``(len(chunk), d_1, ..., d_ndim)`` of a column chunk of nested (fixed-size)
    lists of equal lengths (a view of the Arrow buffer where Arrow allows it: read-only)."""
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
