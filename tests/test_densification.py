"""Data densification without host syncs (docs/method.md Eq. 4-5, issue 32): the batched fixed-sweep
Jacobi eigenvalues agree with ``torch.linalg.eigvalsh`` in float64, and the class-major ``L_DD`` of the
recover engine has the value and gradient of the label-grouping computation."""

from __future__ import annotations

import pytest
import torch

from gvbsm_hf import losses
from gvbsm_hf.densification import class_major_dd_loss, jacobi_eigh, spectral_kl, symmetric_eigvals
from gvbsm_hf.errors import GVBSMError


def _psd(batch: int, n: int, dim: int, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    x = torch.randn(batch, n, dim, generator=generator, dtype=torch.float64) + offset
    return x @ x.transpose(1, 2)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 16, 33])
def test_jacobi_eigenvalues_match_eigvalsh_float64(n):
    g = torch.Generator().manual_seed(n)
    for gram in (_psd(5, n, 40, g), _psd(3, n, 3, g, offset=50.0)):  # full rank; rank-deficient, large mean
        ref = torch.linalg.eigvalsh(gram)
        values, vectors = jacobi_eigh(gram)
        scale = ref.abs().amax(-1, keepdim=True)
        assert torch.allclose(values.sort(-1).values / scale, ref / scale, atol=1e-12, rtol=0)
        assert torch.allclose(symmetric_eigvals(gram) / scale, ref / scale, atol=1e-12, rtol=0)
        # the columns are orthonormal eigenvectors
        eye = torch.eye(n, dtype=torch.float64).expand_as(gram)
        assert torch.allclose(vectors.transpose(1, 2) @ vectors, eye, atol=1e-10)


def test_jacobi_random_symmetric_not_psd_and_leading_batch_dims():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    a = a + a.transpose(-1, -2)
    values, vectors = jacobi_eigh(a)
    assert values.shape == (2, 3, 6) and vectors.shape == (2, 3, 6, 6)
    assert torch.allclose(values.sort(-1).values, torch.linalg.eigvalsh(a), atol=1e-12)


def test_symmetric_eigvals_gradient_matches_eigvalsh_float64():
    g = torch.Generator().manual_seed(1)
    for n in (2, 5, 9):
        gram = _psd(4, n, 30, g).requires_grad_(True)
        weights = torch.randn(4, n, generator=g, dtype=torch.float64)
        ref, = torch.autograd.grad((torch.linalg.eigvalsh(gram) * weights).sum(), gram)
        new, = torch.autograd.grad((symmetric_eigvals(gram) * weights).sum(), gram)
        assert torch.allclose(new, ref, atol=1e-10, rtol=1e-9)


def test_spectral_kl_matches_the_eigvalsh_computation_float64():
    g = torch.Generator().manual_seed(2)
    for n in (2, 3, 6):
        x = torch.randn(4, n, 20, generator=g, dtype=torch.float64, requires_grad=True)
        ref = losses._spectral_kl(x, 4.0)
        new = spectral_kl(x, 4.0)
        (g_ref,), (g_new,) = torch.autograd.grad(ref, x), torch.autograd.grad(new, x)
        assert torch.allclose(new, ref, rtol=1e-10, atol=1e-14)
        assert torch.allclose(g_new, g_ref, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("n,size,pool", [(2, 28, "always"), (5, 32, "downsample_only"), (3, 48, "downsample_only"),
                                         (4, 16, "always")])
def test_class_major_dd_matches_the_label_grouping_loss(n, size, pool):
    g = torch.Generator().manual_seed(n * size)
    images = (0.3 * torch.randn(3 * n, 3, size, size, generator=g)).requires_grad_(True)
    labels = torch.arange(3).repeat_interleave(n)  # the engine's class-major job
    old = losses.data_densification_loss(images, labels, tau=4.0, pool_size=32, pool=pool)
    new = class_major_dd_loss(images, n, tau=4.0, pool_size=32, pool=pool)
    (g_old,), (g_new,) = torch.autograd.grad(old, images), torch.autograd.grad(new, images)
    # float32 eigvalsh of Grams whose eigenvalues are ~D: relative agreement at float32 level of the spectrum
    assert torch.allclose(new, old, rtol=1e-3, atol=1e-6)
    assert torch.allclose(g_new, g_old, rtol=1e-3, atol=1e-3 * g_old.abs().max().item())


def test_class_major_dd_single_image_per_class_and_bad_layout():
    images = torch.randn(4, 1, 8, 8, requires_grad=True)
    zero = class_major_dd_loss(images, 1)
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(GVBSMError):
        class_major_dd_loss(images, 3)
