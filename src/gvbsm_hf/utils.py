"""Small shared helpers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import GVBSMError


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: a CPU tensor bound for CUDA goes from pinned memory with a non-blocking copy (a
    pageable copy would wait for the stream, a host sync); anything else is ``t.to(device)``."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derive_seed(*keys: object) -> int:
    """A 63-bit generator seed from a tuple of keys (e.g. ``(seed, job_index)``).

    sha256-based, so nearby keys give unrelated streams and ``(a, b)`` never aliases ``(a', b')``.
    The one seeding scheme of the package: every stage derives its generators through it.
    """
    h = hashlib.sha256(",".join(str(int(k)) if isinstance(k, (int, np.integer)) else str(k) for k in keys).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def seeded_generator(*keys: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``keys``."""
    return torch.Generator().manual_seed(derive_seed(*keys))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Write to a temporary sibling of ``path``, then ``os.replace`` it into place: a reader never
    sees a torn file, whatever byte a kill or a full disk stops the writer at."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | os.PathLike, value: object) -> None:
    """``json.dumps(value)`` written through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2))


def damaged_file_error(path: str | os.PathLike, stage: str, cause: BaseException | str) -> GVBSMError:
    return GVBSMError(
        f"{path} is damaged or incomplete ({cause}); it was probably cut short by a killed run or a full disk. "
        f"Delete it or rerun the same command with `--redo {stage}` to recompute it (earlier stages are kept).")


def load_safetensors(path: str | os.PathLike, stage: str, *, with_metadata: bool = False):
    """``safetensors`` tensors of ``path`` (and its metadata); a torn or foreign file raises an
    error naming the file and the ``--redo`` that recomputes it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors_rust.SafetensorError, OSError on a truncated file
        raise damaged_file_error(path, stage, f"{type(err).__name__}: {err}") from None
    return (tensors, metadata) if with_metadata else tensors


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """``safetensors.torch.save_file`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def runtime_provenance(num_processes: int | None = None) -> dict[str, object]:
    """What makes CPU results bit-identical or not: torch's thread count, the process count, the
    torch version and device. Bit-identity holds only with all of them equal (docs/reliability.md)."""
    info: dict[str, object] = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                               "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if num_processes is not None:
        info["processes"] = int(num_processes)
    return info
