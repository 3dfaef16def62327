"""Small shared helpers."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch
from torch import nn


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, shapes, dtypes and bytes), first 16 hex digits.

    Identifies the teacher a statistics file was recorded with (statistics provenance).
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


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
