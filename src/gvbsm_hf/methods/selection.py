"""Which real-crop candidates a class keeps (``syn_rded_selection``; docs/method.md "Beyond G-VBSM"):
clustering of the ensemble logits, decision-boundary crops, k-center and facility-location coverage
of the teachers' penultimate features (read by forward pre-hooks on the last linear layer)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import GVBSMError

SCORE_BATCH = 256
"""Candidates per teacher forward (fixed, so scores do not depend on the device's memory)."""


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of ``points`` ``(N, D)`` in float64 with k-means++ seeding from ``generator``:
    returns ``(assignment (N,), centres (k, D))``. Deterministic; ties go to the lower centre index; a
    centre that loses all its points stays where it was (its cluster is empty)."""
    x = points.double()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise GVBSMError(f"k-means needs 1 <= k <= {n} points, got k={k}.")
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        if float(d2.sum()) <= 0:  # every point already is a centre: a duplicate centre (an empty cluster)
            idx = first
        else:
            idx = int(torch.multinomial(d2 / d2.sum(), 1, generator=generator))
        centres.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(centres)
    assign = torch.cdist(x, c).argmin(1)
    for _ in range(max_iter):
        for j in range(k):
            members = assign == j
            if members.any():
                c[j] = x[members].mean(0)
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign, c


def by_increasing_ce(kept: Sequence[int], ce: torch.Tensor) -> torch.Tensor:
    """The kept candidate indices as a tensor, ranked by increasing ``ce`` (ties: candidate index)."""
    kept_t = torch.tensor(sorted(kept), dtype=torch.long)
    return kept_t[torch.sort(ce[kept_t], stable=True).indices]


def select_clustered(ce: torch.Tensor, logits: torch.Tensor, k: int, mode: str,
                     generator: torch.Generator) -> torch.Tensor:
    """Indices of the ``k`` kept candidates, best (lowest ``ce``) first: one per k-means cluster of
    ``logits`` (:func:`kmeans`), its lowest-CE member (``cluster_lowest_ce``) or the member nearest the
    centre (``cluster_centroid``); empty clusters filled by the lowest-CE candidates left."""
    if mode not in ("cluster_lowest_ce", "cluster_centroid"):
        raise GVBSMError(f"syn_rded_selection={mode!r} is not one of 'lowest_ce', 'cluster_lowest_ce', "
                         "'cluster_centroid', 'boundary', 'kcenter', 'facility_location': set one of them.")
    assign, centres = kmeans(logits, k, generator)
    dist = torch.cdist(logits.double(), centres)
    kept = []
    for j in range(k):
        members = torch.nonzero(assign == j).flatten()
        if len(members) == 0:
            continue
        key = ce[members].double() if mode == "cluster_lowest_ce" else dist[members, j]
        kept.append(int(members[torch.sort(key, stable=True).indices[0]]))
    if len(kept) < k:
        taken = set(kept)
        kept += [i for i in torch.sort(ce, stable=True).indices.tolist() if i not in taken][:k - len(kept)]
    return by_increasing_ce(kept, ce)


def select_boundary(ce: torch.Tensor, logits: torch.Tensor, label: int, k: int) -> torch.Tensor:
    """Indices of the ``k`` kept candidates of ``boundary`` (module docstring), lowest CE first."""
    order = torch.sort(ce, stable=True).indices.tolist()  # increasing CE, ties by index
    correct = (logits.argmax(1) == int(label)).tolist()
    right = [i for i in order if correct[i]]
    wrong = [i for i in order if not correct[i]]
    kept = sorted(right, key=lambda i: (-float(ce[i]), i))[:k]
    kept += wrong[:k - len(kept)]
    return by_increasing_ce(kept, ce)


def last_linear(model: nn.Module, fix: str = "use another syn_rded_selection",
                reader: str = "syn_rded_selection 'kcenter' / 'facility_location'") -> nn.Linear:
    """The last ``nn.Linear`` of ``model`` in ``modules()`` order (its classifier head); a model without
    one is an error naming ``reader`` (what reads the features) and ``fix``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise GVBSMError(f"{reader} reads features at the input of the model's last nn.Linear, "
                         f"and {type(model).__name__} has none: {fix}.")
    return linears[-1]


class LastLinearInputs:
    """While open, every forward of teacher ``t`` appends the flattened input of its :func:`last_linear`
    (float64, CPU) to ``inputs[t]``: one forward pre-hook per teacher, all removed on exit. Opening it
    checks every teacher has an ``nn.Linear`` before any compute."""

    def __init__(self, teachers: Sequence[nn.Module]) -> None:
        self.teachers = list(teachers)
        self.inputs: list[list[torch.Tensor]] = [[] for _ in self.teachers]

    def __enter__(self) -> "LastLinearInputs":
        heads = [last_linear(t) for t in self.teachers]
        self.handles = [h.register_forward_pre_hook(lambda _m, inp, seen=seen: seen.append(inp[0].flatten(1).double().cpu()))
                        for h, seen in zip(heads, self.inputs)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def features(self) -> list[torch.Tensor]:
        """Per teacher, ``(N, D_t)``: the inputs seen so far, in forward order."""
        return [torch.cat(seen) for seen in self.inputs]


@torch.no_grad()
def teacher_features(teachers: Sequence[nn.Module], views: torch.Tensor) -> list[torch.Tensor]:
    """Per teacher, the flattened input ``(N, D_t)`` (float64, CPU) of its :func:`last_linear` for ``views``,
    in batches of :data:`SCORE_BATCH` (:class:`LastLinearInputs`)."""
    with LastLinearInputs(teachers) as hooks:
        for chunk in views.split(SCORE_BATCH):
            for t in teachers:
                t(chunk)
    return hooks.features()


def combine_features(per_teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """``kcenter``'s feature space: each teacher's features divided by their mean L2 norm, concatenated."""
    return torch.cat([f / f.norm(dim=1).mean().clamp_min(1e-12) for f in per_teacher], dim=1)


def select_kcenter(ce: torch.Tensor, logits: torch.Tensor, features: torch.Tensor, label: int, k: int) -> torch.Tensor:
    """Indices of the ``k`` kept candidates of ``kcenter`` (module docstring), lowest CE first."""
    order = torch.sort(ce, stable=True).indices.tolist()
    correct = (logits.argmax(1) == int(label)).tolist()
    pool = [i for i in order if correct[i]]
    kept: list[int] = []
    if pool:
        x = features[torch.tensor(sorted(pool))].double()
        index = sorted(pool)
        first = index.index(pool[0])  # the lowest-CE correct candidate
        kept.append(index[first])
        d = torch.cdist(x, x[first:first + 1]).flatten()
        d[first] = -1.0  # kept: never picked again, even when every distance is 0 (identical features)
        while len(kept) < min(k, len(index)):
            j = int(torch.argmax(d))  # first maximum: the lowest candidate index among ties
            kept.append(index[j])
            d = torch.minimum(d, torch.cdist(x, x[j:j + 1]).flatten())
            d[j] = -1.0
    kept += [i for i in order if not correct[i]][:k - len(kept)]
    return by_increasing_ce(kept, ce)


def select_facility_location(ce: torch.Tensor, logits: torch.Tensor, features: torch.Tensor, label: int,
                             k: int) -> torch.Tensor:
    """Indices of the ``k`` kept candidates of ``facility_location`` (module docstring, docs/method.md
    "Beyond G-VBSM"), lowest CE first: greedy on ``F(S) = sum_i max_{j in S} (d0 - D_ij)``, ``D`` the
    distances from every candidate ``i`` to the correctly classified pool, float64 (``N x |pool|``: 288 MB for
    the 6000 images of a Fashion-MNIST class, 13.5 MB for 1300 of an ImageNet-1k one)."""
    order = torch.sort(ce, stable=True).indices.tolist()
    correct = (logits.argmax(1) == int(label)).tolist()
    index = [i for i in range(len(correct)) if correct[i]]
    kept: list[int] = []
    if index:
        x = features.double()
        dist = torch.cdist(x, x[torch.tensor(index)])  # (N, |pool|)
        d0 = float(dist.max())
        cover = torch.full((x.shape[0],), d0, dtype=torch.float64)  # d0 - cover_i = current max similarity
        taken = torch.zeros(len(index), dtype=torch.bool)
        while len(kept) < min(k, len(index)):
            gain = (cover.unsqueeze(1) - dist).clamp_min(0).sum(0)
            gain[taken] = -1.0  # kept: never picked again, even when every gain is 0
            j = int(torch.argmax(gain))  # first maximum: the lowest candidate index among ties
            kept.append(index[j])
            taken[j] = True
            cover = torch.minimum(cover, dist[:, j])
    kept += [i for i in order if not correct[i]][:k - len(kept)]
    return by_increasing_ce(kept, ce)


def select_ranked(ce: torch.Tensor, source: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` kept candidates, best first: increasing ``ce`` (stable: ties by index), at
    most one per ``source`` image first, then the other candidates in the same order."""
    order = torch.sort(ce, stable=True).indices.tolist()
    seen: set[int] = set()
    primary, rest = [], []
    for i in order:
        s = int(source[i])
        (rest if s in seen else primary).append(i)
        seen.add(s)
    return torch.tensor((primary + rest)[:k], dtype=torch.long)
