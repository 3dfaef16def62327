"""Data densification without a host sync (docs/method.md Eq. 4-5): the pooled features of Eq. 4, the
eigenvalues of small batched Gram matrices by a fixed-sweep parallel cyclic Jacobi method (no
``eigvalsh``, whose CUDA kernel checks its status on the host), and ``L_DD`` on the recover engine's
class-major job layout (a reshape instead of sorting and grouping the labels).

Every function here runs a number of kernels fixed by the shapes alone, reads nothing back to
Python and so traces into one graph under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from .errors import GVBSMError

__all__ = ["dd_features", "jacobi_eigh", "symmetric_eigvals", "spectral_kl", "class_major_dd_loss"]


def dd_features(images: torch.Tensor, pool_size: int, pool: str) -> torch.Tensor:
    """Eq. 4: ``images (N, C, H, W)`` average-pooled to ``pool_size`` per side (``pool="always"``, the authors'
    code, upsampling smaller images) or only when larger (``"downsample_only"``), flattened to ``(N, D)`` float32."""
    x = images.float()
    h, w = x.shape[-2:]
    if pool == "always":
        x = F.adaptive_avg_pool2d(x, (pool_size, pool_size))
    elif pool != "downsample_only":
        raise GVBSMError(f"pool must be 'always' or 'downsample_only', got {pool!r} (syn_dd_pool).")
    elif h > pool_size or w > pool_size:
        x = F.adaptive_avg_pool2d(x, (min(h, pool_size), min(w, pool_size)))
    return x.flatten(1)


def jacobi_sweeps(n: int) -> int:
    """Sweeps of :func:`jacobi_eigh` for ``n x n`` matrices: 1 for ``n <= 2`` (one rotation is exact), else
    ``4 + ceil(log2 n)`` (quadratic convergence: float64 round-off is reached well before)."""
    return 1 if n <= 2 else 4 + math.ceil(math.log2(n))


def _rounds(n: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """The round-robin (tournament) pairing of ``n`` (even) indices: ``n - 1`` rounds of ``n / 2`` disjoint
    pairs ``(p, q)``, every pair once per sweep (Brent and Luk's parallel ordering)."""
    order, rounds = list(range(n)), []
    for _ in range(n - 1):
        pairs = [(order[i], order[n - 1 - i]) for i in range(n // 2)]
        rounds.append((tuple(min(a, b) for a, b in pairs), tuple(max(a, b) for a, b in pairs)))
        order = [order[0], order[-1], *order[1:-1]]
    return tuple(rounds)


_ROUND_INDEX: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}


def _round_index(n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per round: flat indices of ``(a_pp, a_qq, a_pq)`` and of the rotation's ``(pp, qq, pq, qp)`` entries
    (built once per size and device; a compiled step reads them as constants)."""
    key = (n, str(device))
    if key in _ROUND_INDEX:
        return _ROUND_INDEX[key]
    out = []
    for p, q in _rounds(n):
        pt, qt = torch.tensor(p), torch.tensor(q)
        read = torch.cat([pt * n + pt, qt * n + qt, pt * n + qt])
        write = torch.cat([pt * n + pt, qt * n + qt, pt * n + qt, qt * n + pt])
        out.append((read.to(device), write.to(device)))
    _ROUND_INDEX[key] = out
    return out


@torch.no_grad()
def jacobi_eigh(a: torch.Tensor, sweeps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a batch of symmetric matrices ``a (..., n, n)`` by parallel cyclic Jacobi.

    Each round rotates ``n / 2`` disjoint index pairs at once (``A <- J^T A J``, ``V <- V J``, batched
    matrix products), ``n - 1`` rounds per sweep, :func:`jacobi_sweeps` sweeps unless given: a fixed
    number of kernels, no data-dependent stopping, hence no host sync. Odd ``n`` is padded with a zero
    row and column (never rotated: its off-diagonal entries stay exactly zero) and cropped off.

    Returns ``(eigenvalues (..., n), eigenvectors (..., n, n))`` (columns; unsorted), in ``a``'s dtype.
    No gradient: :func:`symmetric_eigvals` differentiates through the Rayleigh quotients instead.
    """
    n = a.shape[-1]
    batch = a.shape[:-2]
    work = a.reshape(-1, n, n)
    m = n + (n % 2)
    if m != n:
        work = F.pad(work, (0, 1, 0, 1))
    k = work.shape[0]
    v = torch.eye(m, dtype=a.dtype, device=a.device).expand(k, m, m)
    if n > 1:
        index = _round_index(m, a.device)
        for _ in range(jacobi_sweeps(n) if sweeps is None else int(sweeps)):
            for read, write in index:
                app, aqq, apq = work.reshape(k, m * m)[:, read].view(k, 3, m // 2).unbind(1)
                # tan(2 theta) = 2 a_pq / (a_qq - a_pp) zeroes a_pq; |theta| <= pi/4 (the inner rotation)
                theta = torch.remainder(0.5 * torch.atan2(2.0 * apq, aqq - app) + math.pi / 4, math.pi / 2) - math.pi / 4
                c, s = torch.cos(theta), torch.sin(theta)
                rot = work.new_zeros(k, m * m).scatter_(1, write.expand(k, -1), torch.cat([c, c, s, -s], 1))
                rot = rot.view(k, m, m)
                work = rot.transpose(1, 2) @ work @ rot
                v = v @ rot
    values = torch.diagonal(work, dim1=1, dim2=2)[:, :n]
    return values.reshape(*batch, n), v[:, :n, :n].reshape(*batch, n, n)


def symmetric_eigvals(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of symmetric ``gram (..., n, n)``, ascending, differentiable, without a host sync.

    The eigenvectors ``V`` come from :func:`jacobi_eigh` in float64 (no gradient); the eigenvalues are
    the Rayleigh quotients ``sigma_i = v_i^T G v_i``, so ``d sigma_i / dG = v_i v_i^T``: the gradient of
    ``torch.linalg.eigvalsh`` (docs/method.md Eq. 5), and exact to float64 round-off at convergence.
    Result in ``gram``'s dtype (float32 for float32 input).
    """
    g64 = gram.double()
    _, v = jacobi_eigh(g64.detach())
    sigma = torch.einsum("...ni,...nm,...mi->...i", v, g64, v)
    return torch.sort(sigma, dim=-1).values.to(gram.dtype)


def spectral_kl(x: torch.Tensor, tau: float) -> torch.Tensor:
    """``sum_b KL(sg(softmax(Sigma_b / tau)) || softmax(Sigma_b))`` for ``x (B, n, D)`` (docs/method.md Eq. 5):
    ``Sigma_b`` the eigenvalues of the symmetrised Gram ``x_b x_b^T`` (:func:`symmetric_eigvals`)."""
    gram = x @ x.transpose(1, 2)
    gram = 0.5 * (gram + gram.transpose(1, 2))
    sigma = symmetric_eigvals(gram)
    log_p = torch.log_softmax(sigma.detach() / tau, dim=-1)
    log_q = torch.log_softmax(sigma, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def class_major_dd_loss(images: torch.Tensor, group_size: int, *, tau: float = 4.0, pool_size: int = 32,
                        pool: str = "downsample_only") -> torch.Tensor:
    """``L_DD`` (docs/method.md Eq. 4-5) of a class-major batch: ``images (K * group_size, C, H, W)`` hold
    ``group_size`` images of each of ``K`` classes, class after class (the recover engine's job layout).

    The same value and gradient as :func:`gvbsm_hf.losses.data_densification_loss` with the job's labels
    (float tolerance), computed with a reshape to ``(K, group_size, D)`` and :func:`spectral_kl`: no sort,
    no grouping of labels, no host sync. ``group_size < 2`` gives ``0 * images.sum()`` (keeps the graph).
    """
    if images.ndim != 4:
        raise GVBSMError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}.")
    n = int(group_size)
    if n < 1 or images.shape[0] % n:
        raise GVBSMError(f"a class-major batch of {images.shape[0]} images cannot hold {n} images per class.")
    with torch.autocast(device_type=images.device.type, enabled=False):
        if n < 2:
            return images.float().sum() * 0.0
        x = dd_features(images, pool_size, pool)
        return spectral_kl(x.reshape(-1, n, x.shape[1]), tau)
