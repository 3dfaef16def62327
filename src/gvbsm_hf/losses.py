"""Pure loss functions of G-VBSM (docs/method.md Eq. 1, 4-6, 8, 10, 11), of SRe2L (KL soft labels) and the
total-variation image prior (Eq. 18).

Every function takes tensors on any device, accepts float32 / bf16 / fp16 inputs, computes in
float32 and returns float32. None of them syncs with the host except :func:`check_finite` and
:func:`data_densification_loss` (one ``tolist`` of the class counts, and ``eigvalsh``; the recover engine
uses :func:`gvbsm_hf.densification.class_major_dd_loss` on its class-major jobs, which syncs nowhere).

Statistic matching (Eq. 1, 6, 10) uses the SDS form of the authors' code::

    new_ema = alpha * ema + (1 - alpha) * sg(current)          (new_ema = sg(current) on the first call)
    loss    = || target - (new_ema + current - sg(current)) ||_2     (L2 norm, not squared)

Its value is ``||target - new_ema||_2``; its gradient with respect to ``current`` is
``(new_ema - target) / ||new_ema - target||_2``: the gradient of Eq. 1 evaluated at the EMA instead of
at the current batch (coefficient 1, not ``1 - alpha``). Nothing flows into the EMA or the target.
With ``alpha = 0`` the EMA is the current batch and the loss is exactly Eq. 1, value and gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from .densification import dd_features
from .errors import GVBSMError, NonFiniteLossError, StatisticsMismatchError

__all__ = [
    "sds_matching_loss",
    "bn_matching_loss",
    "conv_matching_loss",
    "first_layer_weights",
    "data_densification_loss",
    "total_variation_loss",
    "ensemble_logits",
    "soft_labels",
    "mse_gt_loss",
    "kl_soft_label_loss",
    "cross_entropy_loss",
    "check_finite",
]


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise GVBSMError(f"{name} must lie in [0, 1], got {value}; set it in the synthesis config (e.g. syn_{name}).")


EMA_INITS = ("zero", "first")


def sds_matching_loss(
    current: torch.Tensor, target: torch.Tensor, ema: torch.Tensor | None, alpha: float, ema_init: str = "first"
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDS-form distance of one statistic to its target (docs/method.md Eq. 6; Eq. 1 when ``alpha = 0``).

    ``new_ema = alpha * ema + (1 - alpha) * sg(current)``. On the first call (``ema`` None) the EMA
    starts at ``sg(current)`` (``ema_init="first"``) or at zero (``"zero"``, the authors' code: the
    first value is then ``(1 - alpha) * sg(current)``). And
    ``loss = ||target - (new_ema + current - sg(current))||_2`` (authors' code; L2 norm, not squared).

    Value: ``||target - new_ema||_2``. Gradient w.r.t. ``current``: ``(new_ema - target) /
    ||new_ema - target||_2`` (zero when they coincide), i.e. the gradient of Eq. 1 taken at the EMA,
    with coefficient 1. No gradient reaches ``ema`` or ``target``.

    Returns ``(loss, new_ema)``; ``new_ema`` is detached float32, to be passed back on the next call.
    """
    if current.shape != target.shape:
        raise StatisticsMismatchError(
            f"statistic of shape {tuple(current.shape)} matched against a target of shape {tuple(target.shape)}; "
            "the target belongs to another teacher, patch size or resolution: record it again."
        )
    dtype = torch.promote_types(current.dtype, torch.float32)  # float32; float64 stays float64 (tests)
    cur = current.to(dtype)
    cur_sg = cur.detach()
    if ema is None:
        if ema_init not in EMA_INITS:
            raise GVBSMError(f"ema_init must be one of {EMA_INITS}, got {ema_init!r} (syn_ema_init).")
        new_ema = cur_sg if ema_init == "first" else (1.0 - alpha) * cur_sg
    else:
        ema = ema.detach().to(dtype)
        if ema.shape != cur.shape:
            raise StatisticsMismatchError(
                f"the EMA buffer has shape {tuple(ema.shape)} but the statistic has shape {tuple(cur.shape)}; "
                "the EMA state belongs to another teacher or resolution: start synthesis afresh (new output dir)."
            )
        new_ema = alpha * ema + (1.0 - alpha) * cur_sg
    diff = target.detach().to(dtype) - (new_ema + (cur - cur_sg))
    return torch.linalg.vector_norm(diff.flatten(), ord=2), new_ema


def bn_matching_loss(
    stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    emas: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
    *,
    alpha: float,
    layer_weights: Mapping[str, float] | None = None,
    ema_init: str = "first",
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """BatchNorm matching ``L'_BN`` (docs/method.md Eq. 6; plain Eq. 1 when ``alpha = 0``).

    ``sum_l w_l * (sds(mu_l, running_mean_l) + sds(var_l, running_var_l))`` over the layers of
    ``stats`` (batch mean and biased variance of each BN layer's input), with ``w_l`` from
    ``layer_weights`` (1 when absent). BN terms are never dropped (authors' code).

    Returns ``(loss, new_emas)`` with ``new_emas[layer] = (mean_ema, var_ema)`` (detached float32).
    A layer without a target raises :class:`StatisticsMismatchError`.
    """
    _check_unit_interval("alpha", alpha)
    weights = layer_weights or {}
    new_emas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    terms: list[torch.Tensor] = []
    for name, (mean, var) in stats.items():
        if name not in targets:
            raise StatisticsMismatchError(
                f"no BatchNorm running statistics for layer {name!r}; the hooks and the targets come from "
                "different teachers: build the targets from the same teacher the hooks are attached to."
            )
        t_mean, t_var = targets[name]
        for what, cur, tgt in (("mean", mean, t_mean), ("var", var, t_var)):
            if cur.shape != tgt.shape:
                raise StatisticsMismatchError(
                    f"BatchNorm layer {name!r}: batch {what} has shape {tuple(cur.shape)} but the running {what} "
                    f"has shape {tuple(tgt.shape)}; the targets belong to another teacher."
                )
        old = emas.get(name) if emas is not None else None
        l_mean, e_mean = sds_matching_loss(mean, t_mean, None if old is None else old[0], alpha, ema_init)
        l_var, e_var = sds_matching_loss(var, t_var, None if old is None else old[1], alpha, ema_init)
        new_emas[name] = (e_mean, e_var)
        terms.append(float(weights.get(name, 1.0)) * (l_mean + l_var))
    if not terms:
        return torch.zeros(()), new_emas
    return torch.stack(terms).sum(), new_emas


def _zero_like_stats(stats: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """A float32 zero on the statistics' device (CPU when there are none)."""
    for layer in stats.values():
        for value in layer.values():
            return torch.zeros((), device=value.device)
    return torch.zeros(())


def conv_matching_loss(
    stats: Mapping[str, Mapping[str, torch.Tensor]],
    targets: Mapping[str, Mapping[str, torch.Tensor]],
    emas: Mapping[str, Mapping[str, torch.Tensor]] | None,
    *,
    alpha: float,
    beta_dr: float,
    generator: torch.Generator | None = None,
    layer_weights: Mapping[str, float] | None = None,
    drop: Literal["statistic", "layer"] = "statistic",
    ema_init: str = "first",
) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]], int]:
    """Convolution statistic matching ``L'_Conv`` (docs/method.md Eq. 10) with random term dropping.

    ``sum_l w_l * sum_s keep_{l,s} * sds(stat_{l,s}, global_{l,s})`` over the layers of ``stats`` and
    their statistics (``channel_mean``, ``channel_var``, ``patch_mean``, ``patch_var``, Eq. 9).

    Dropping (``beta_dr``): with ``drop="statistic"`` (docs/method.md "beta_dr": each statistic dropped on its own)
    ``u = torch.rand(n_terms, generator=generator)`` is drawn on the CPU, one number per
    (layer, statistic) in the iteration order of ``stats`` and of each ``stats[layer]``, and a term
    is dropped when ``u < beta_dr``. ``drop="layer"`` draws one number per layer and drops all its
    statistics together (the authors' code). ``beta_dr = 0`` keeps everything and ``beta_dr = 1``
    drops everything without drawing (``generator`` untouched).

    A dropped term contributes nothing and its EMA is NOT updated (authors' code: the dropped hook
    returns before its EMA step); its previous EMA, if any, is carried over to ``new_emas``.

    Returns ``(loss, new_emas, kept)``: ``new_emas[layer][statistic]`` detached float32, ``kept``
    the number of (layer, statistic) terms matched. Shape mismatches raise
    :class:`StatisticsMismatchError`.
    """
    _check_unit_interval("alpha", alpha)
    _check_unit_interval("beta_dr", beta_dr)
    if drop not in ("statistic", "layer"):
        raise GVBSMError(f"drop must be 'statistic' or 'layer', got {drop!r}.")
    weights = layer_weights or {}

    layer_names = list(stats)
    n_terms = sum(len(stats[name]) for name in layer_names)
    n_draws = n_terms if drop == "statistic" else len(layer_names)
    if beta_dr <= 0.0:
        keep_draws = [True] * n_draws
    elif beta_dr >= 1.0:
        keep_draws = [False] * n_draws
    else:
        keep_draws = (torch.rand(n_draws, generator=generator) >= beta_dr).tolist()

    new_emas: dict[str, dict[str, torch.Tensor]] = {
        name: dict(value) for name, value in (emas or {}).items()
    }
    terms: list[torch.Tensor] = []
    kept = 0
    draw = 0
    for layer_i, name in enumerate(layer_names):
        if name not in targets:
            raise StatisticsMismatchError(
                f"no recorded convolution statistics for layer {name!r}; the statistics were recorded with "
                "another teacher: record them again for this teacher (stage 'record')."
            )
        layer_stats, layer_targets = stats[name], targets[name]
        old = (emas or {}).get(name, {})
        layer_terms: list[torch.Tensor] = []
        for stat_name, cur in layer_stats.items():
            if drop == "statistic":
                keep, draw = keep_draws[draw], draw + 1
            else:
                keep = keep_draws[layer_i]
            if stat_name not in layer_targets:
                raise StatisticsMismatchError(
                    f"layer {name!r} has no recorded {stat_name!r}; the statistics file is incomplete or from "
                    "another version: record the statistics again."
                )
            tgt = layer_targets[stat_name]
            if cur.shape != tgt.shape:
                raise StatisticsMismatchError(
                    f"layer {name!r} {stat_name}: the synthetic batch gives shape {tuple(cur.shape)} but the "
                    f"recorded statistic has shape {tuple(tgt.shape)}; the statistics were recorded with another "
                    "patch size, teacher or image resolution: record them again with the synthesis settings "
                    "(same teacher, patch size and image size)."
                )
            if not keep:
                continue
            loss, ema = sds_matching_loss(cur, tgt, old.get(stat_name), alpha, ema_init)
            new_emas.setdefault(name, {})[stat_name] = ema
            layer_terms.append(loss)
            kept += 1
        if layer_terms:
            terms.append(float(weights.get(name, 1.0)) * torch.stack(layer_terms).sum())
    if not terms:  # everything dropped: a zero on the statistics' device, so it stacks with other losses
        return _zero_like_stats(stats), new_emas, 0
    return torch.stack(terms).sum(), new_emas, kept


def first_layer_weights(layer_names: Sequence[str], multiplier: float) -> dict[str, float]:
    """Per-layer weights: ``multiplier`` for the first layer, 1 for the others (authors' code, x10)."""
    return {name: (float(multiplier) if i == 0 else 1.0) for i, name in enumerate(layer_names)}


def _spectral_kl(x: torch.Tensor, tau: float) -> torch.Tensor:
    """``sum_b KL(sg(softmax(Sigma_b / tau)) || softmax(Sigma_b))`` for a batch ``x`` of shape (B, n, D)."""
    gram = x @ x.transpose(1, 2)
    gram = 0.5 * (gram + gram.transpose(1, 2))
    sigma = torch.linalg.eigvalsh(gram)
    log_p = torch.log_softmax(sigma.detach() / tau, dim=-1)
    log_q = torch.log_softmax(sigma, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def data_densification_loss(
    images: torch.Tensor, labels: torch.Tensor, *, tau: float = 4.0, pool_size: int = 32, pool: str = "downsample_only"
) -> torch.Tensor:
    """Data densification ``L_DD`` (docs/method.md Eq. 4-5).

    Images ``(N, C, H, W)`` are average-pooled with ``adaptive_avg_pool2d``: to ``pool_size`` per side
    always (``pool="always"``, the authors' code: 28 px is upsampled to 32), or only when larger
    (``"downsample_only"``, a no-op at ``<= pool_size``), then flattened. For every class with ``n_y >= 2`` images,
    ``G_y = X_y X_y^T`` and ``Sigma_y = eigvalsh(G_y)``;
    ``L_DD = sum_y KL(sg(softmax(Sigma_y / tau)) || softmax(Sigma_y))`` ("sum" reduction, i.e.
    ``sum_i p_i (log p_i - log q_i)``). Classes with one image are skipped; with no class of two
    images the result is ``0 * images.sum()`` (keeps the graph).

    Everything runs in float32 with autocast disabled. Classes are grouped by their count and each
    group goes through one batched ``eigvalsh``. The authors call ``torch.linalg.eigvals(G).real``;
    for the symmetric PSD Gram it gives the same values, and ``eigvalsh`` has the better backward:
    ``dL/dG = V diag(dL/dSigma) V^T``, with no ``1/(lambda_i - lambda_j)`` factor, so it stays finite
    at (near-)degenerate eigenvalues since this loss is symmetric in them (equal eigenvalues get equal
    ``dL/dSigma``). Precision does degrade there: the eigenvector basis of a degenerate eigenspace is
    arbitrary and float32 rounding of ``G`` shows up in the gradient at the ~1e-6 relative level.

    Scale: the eigenvalues of a Gram of raw normalised pixels are large (~``D``), so ``softmax``
    saturates and the gradient is small unless the spectrum is already spread moderately; that is
    the authors' formulation (tau 4, weight 1), kept as is.
    """
    if images.ndim != 4:
        raise GVBSMError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}.")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise GVBSMError(
            f"labels must be (N,) class indices matching the {images.shape[0]} images, got shape {tuple(labels.shape)}."
        )
    with torch.autocast(device_type=images.device.type, enabled=False):
        x = dd_features(images, pool_size, pool)

        sorted_labels, order = torch.sort(labels.detach().long(), stable=True)
        _, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
        counts_list = counts.tolist()
        starts = torch.cumsum(counts, 0) - counts
        order = order.to(x.device)
        total = None
        for n in sorted(set(counts_list)):
            if n < 2:
                continue
            group = starts[counts == n].to(x.device)
            index = order[group[:, None] + torch.arange(n, device=x.device)]  # (classes, n)
            kl = _spectral_kl(x[index], tau)
            total = kl if total is None else total + kl
        if total is None:
            return images.float().sum() * 0.0
        return total


def total_variation_loss(images: torch.Tensor) -> torch.Tensor:
    """Total-variation image prior (docs/method.md Eq. 18): the mean squared difference of vertically and of
    horizontally adjacent pixels, summed over the two directions and averaged over the images,
    ``(1/N) sum_i [mean (x[i, :, 1:, :] - x[i, :, :-1, :])^2 + mean (x[i, :, :, 1:] - x[i, :, :, :-1])^2]``.
    ``images`` ``(N, C, H, W)`` with ``H, W >= 2``; float32 result."""
    if images.ndim != 4 or images.shape[-1] < 2 or images.shape[-2] < 2:
        raise GVBSMError(f"images must be (N, C, H, W) with H, W >= 2, got shape {tuple(images.shape)}.")
    x = images.float()
    return (x[:, :, 1:, :] - x[:, :, :-1, :]).square().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).square().mean()


def ensemble_logits(logits: Sequence[torch.Tensor], *, logit_norm: bool = False) -> torch.Tensor:
    """Ensemble logits ``z~`` of the teachers (docs/method.md Eq. 8), float32.

    Without LN: ``mean_f f(X)``. With LN each teacher's logits are scaled to the mean Frobenius norm
    first: ``(1/|S|) sum_f (mean_g ||g(X)||_F / ||f(X)||_F) f(X)``, the norm taken over the whole
    batch matrix (a teacher whose logits are all zero stays zero).
    """
    if len(logits) == 0:
        raise GVBSMError("ensemble_logits needs the logits of at least one teacher.")
    stacked = torch.stack([z.float() for z in logits])  # (|S|, N, K)
    if logit_norm:
        norms = torch.linalg.vector_norm(stacked.flatten(1), ord=2, dim=1)  # (|S|,)
        scale = norms.mean() / norms.clamp_min(torch.finfo(torch.float32).tiny)
        stacked = stacked * scale.view(-1, *([1] * (stacked.ndim - 1)))
    return stacked.mean(0)


def soft_labels(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft labels ``softmax(z~ / tau)`` (docs/method.md Eq. 8), float32."""
    return torch.softmax(logits.float() / temperature, dim=-1)


def cross_entropy_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, mean over the batch; ``labels`` are class indices ``(N,)`` or probabilities ``(N, K)``
    (e.g. CutMix-mixed one-hot targets), in which case it is ``-sum_c y_c log softmax(f)_c``."""
    s = student_logits.float()
    if labels.is_floating_point():
        if labels.shape != s.shape:
            raise GVBSMError(
                f"probability labels must have the logits' shape {tuple(s.shape)}, got {tuple(labels.shape)}; "
                "pass class indices (N,) or one probability row per sample."
            )
        return F.cross_entropy(s, labels.float())
    return F.cross_entropy(s, labels.long())


def mse_gt_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    gamma: float,
    reduction: Literal["mean_elements", "sum_classes"] = "mean_elements",
) -> torch.Tensor:
    """Student loss of G-VBSM (docs/method.md Eq. 11): ``MSE(f_eval(X), z~) + gamma * CE(f_eval(X), y)``.

    ``reduction="mean_elements"`` (default) is the authors' ``nn.MSELoss()``: mean over all
    ``N * K`` elements, i.e. Eq. 11's squared norm divided by ``K``. ``"sum_classes"`` is Eq. 11 literally:
    the per-sample squared norm ``||f - z~||_2^2`` averaged over the batch. The cross-entropy is the
    batch mean (:func:`cross_entropy_loss`; ``labels`` indices or probabilities). ``z~`` is a target:
    no gradient flows into ``teacher_logits``.
    """
    s = student_logits.float()
    z = teacher_logits.detach().float()
    if s.shape != z.shape:
        raise GVBSMError(
            f"student logits {tuple(s.shape)} and teacher logits {tuple(z.shape)} differ; the student must "
            "have as many classes as the teachers."
        )
    if reduction == "mean_elements":
        mse = F.mse_loss(s, z, reduction="mean")
    elif reduction == "sum_classes":
        mse = (s - z).square().sum(-1).mean()
    else:
        raise GVBSMError(f"reduction must be 'mean_elements' or 'sum_classes', got {reduction!r}.")
    return mse + gamma * cross_entropy_loss(s, labels)


def kl_soft_label_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float, scale_by_t2: bool = False
) -> torch.Tensor:
    """SRe2L soft-label loss ``KL(softmax(z~/T) || softmax(f/T))``, ``batchmean`` reduction.

    Not multiplied by ``T^2`` by default: SRe2L's ``train_FKD.py`` has that line commented out;
    ``scale_by_t2=True`` gives the Hinton-style scaling. No gradient flows into ``teacher_logits``.
    """
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    loss = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return loss * temperature**2 if scale_by_t2 else loss


def check_finite(loss: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteLossError` if ``loss`` holds NaN or inf.

    This syncs with the host: call it every N iterations (e.g. at logging time), not every step.
    """
    if not bool(torch.isfinite(loss.detach()).all()):
        value = loss.detach().float().flatten()[:4].tolist()
        raise NonFiniteLossError(
            f"{what} is not finite ({value}). Lower the learning rate, use bf16 or fp32 instead of fp16, "
            "check the inputs for NaN, or resume from the last good checkpoint (it is kept)."
        )
