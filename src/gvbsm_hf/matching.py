"""BN and Conv statistic matching of one teacher as ONE fused loss (docs/method.md Eq. 1, 6, 10).

:func:`gvbsm_hf.losses.bn_matching_loss` and :func:`gvbsm_hf.losses.conv_matching_loss` loop over layers
and statistics in Python (a dozen small kernels per term, forward and backward) and turn the ``beta_dr``
draws into Python control flow. Here the statistics targets of a teacher are flattened once into one
buffer (:class:`FlatLayout`: every (layer, statistic) term is a segment), the SDS EMAs live in one
buffer updated in place, the drop is a mask, and one iteration is a fixed handful of kernels whatever
the number of layers: the same value and gradient as the per-layer losses (float tolerance), the
same generator draws in the same order, nothing read back to Python.

Per term ``t`` (elements ``e`` of its segment), with ``keep_t`` the ``beta_dr`` mask (BN terms: 1)::

    new_ema_e = keep_t ? (seen_e ? lerp(ema_e, sg(cur_e), 1 - alpha) : first_e) : ema_e     (Eq. 6 EMA)
    norm_t    = || target_t - (new_ema_t + cur_t - sg(cur_t)) ||_2                          (Eq. 6 / 10)
    L'_BN     = sum_{t in BN} w_t norm_t        L'_Conv = sum_{t in Conv} keep_t w_t norm_t

``first_e`` is ``sg(cur_e)`` (``ema_init="first"``) or ``(1 - alpha) sg(cur_e)`` (``"zero"``), so a term
dropped before its first match starts its EMA when it is first kept, as in the per-layer losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .errors import GVBSMError, StatisticsMismatchError
from .utils import to_device_async

__all__ = ["FlatLayout", "build_layout", "drop_draws", "drop_uniforms", "fused_matching_loss", "keep_mask", "layout_key"]


@dataclass(frozen=True)
class FlatLayout:
    """One teacher's matching terms flattened (forward order of the hooks: BN mean, var per layer, then
    the Conv statistics per layer). ``target (E,)``; ``position (E,)``: each element's slot in a
    ``(terms, width)`` zero-padded matrix (row = term), so the per-term sums are one deterministic
    reduction; ``weights (2, T)``: row 0 the BN layer weights of the BN terms, row 1 the Conv layer
    weights of the Conv terms; ``draw (T,)``: the term's entry in ``[keep-all, draw 0, draw 1, ...]``."""

    bn_layers: tuple[str, ...]
    conv_layers: tuple[tuple[str, tuple[str, ...]], ...]
    sizes: tuple[int, ...]
    target: torch.Tensor
    position: torch.Tensor
    weights: torch.Tensor
    draw: torch.Tensor
    segment: torch.Tensor
    n_draws: int
    width: int

    @property
    def terms(self) -> int:
        return len(self.sizes)

    def key(self) -> tuple:
        return self.bn_layers, self.conv_layers


def layout_key(bn_stats: Mapping[str, tuple], conv_stats: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple:
    """The terms of one forward's statistics, as :meth:`FlatLayout.key` names them."""
    return tuple(bn_stats), tuple((name, tuple(stats)) for name, stats in conv_stats.items())


def build_layout(
    bn_stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    conv_stats: Mapping[str, Mapping[str, torch.Tensor]],
    bn_targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    conv_targets: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    bn_weights: Mapping[str, float] | None = None,
    conv_weights: Mapping[str, float] | None = None,
    drop: str = "statistic",
) -> FlatLayout:
    """The :class:`FlatLayout` of the terms of ``bn_stats`` / ``conv_stats`` (one forward's hook statistics,
    in their order) against their targets; shapes are checked here, once (:class:`StatisticsMismatchError`)."""
    if drop not in ("statistic", "layer"):
        raise GVBSMError(f"drop must be 'statistic' or 'layer', got {drop!r}.")
    pieces: list[torch.Tensor] = []
    kinds: list[int] = []
    layer_w: list[float] = []
    draws: list[int] = []
    for name, (mean, var) in bn_stats.items():
        if name not in bn_targets:
            raise StatisticsMismatchError(
                f"no BatchNorm running statistics for layer {name!r}; the hooks and the targets come from "
                "different teachers: build the targets from the same teacher the hooks are attached to.")
        for what, cur, tgt in (("mean", mean, bn_targets[name][0]), ("var", var, bn_targets[name][1])):
            if cur.shape != tgt.shape:
                raise StatisticsMismatchError(
                    f"BatchNorm layer {name!r}: batch {what} has shape {tuple(cur.shape)} but the running {what} "
                    f"has shape {tuple(tgt.shape)}; the targets belong to another teacher.")
            pieces.append(tgt)
            kinds.append(0)
            layer_w.append(float((bn_weights or {}).get(name, 1.0)))
            draws.append(0)
    n_draws = 0
    for name, stats in conv_stats.items():
        if name not in conv_targets:
            raise StatisticsMismatchError(
                f"no recorded convolution statistics for layer {name!r}; the statistics were recorded with "
                "another teacher: record them again for this teacher (stage 'record').")
        layer_draw = n_draws
        if drop == "layer":
            n_draws += 1
        for stat, cur in stats.items():
            if stat not in conv_targets[name]:
                raise StatisticsMismatchError(
                    f"layer {name!r} has no recorded {stat!r}; the statistics file is incomplete or from "
                    "another version: record the statistics again.")
            tgt = conv_targets[name][stat]
            if cur.shape != tgt.shape:
                raise StatisticsMismatchError(
                    f"layer {name!r} {stat}: the synthetic batch gives shape {tuple(cur.shape)} but the "
                    f"recorded statistic has shape {tuple(tgt.shape)}; the statistics were recorded with another "
                    "patch size, teacher or image resolution: record them again with the synthesis settings "
                    "(same teacher, patch size and image size).")
            pieces.append(tgt)
            kinds.append(1)
            layer_w.append(float((conv_weights or {}).get(name, 1.0)))
            if drop == "statistic":
                layer_draw, n_draws = n_draws, n_draws + 1
            draws.append(1 + layer_draw)
    if not pieces:
        raise GVBSMError("build_layout: no statistics to match (no hooked layer fired).")
    device = pieces[0].device
    dtype = torch.promote_types(pieces[0].dtype, torch.float32)
    sizes = tuple(int(p.numel()) for p in pieces)
    width = max(sizes)
    segment = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    starts = torch.tensor([0, *sizes]).cumsum(0)[:-1]
    offset = torch.arange(segment.numel()) - starts[segment]
    weights = torch.zeros(2, len(sizes), dtype=dtype)
    weights[torch.tensor(kinds), torch.arange(len(sizes))] = torch.tensor(layer_w, dtype=dtype)
    return FlatLayout(
        bn_layers=tuple(bn_stats), conv_layers=tuple((n, tuple(s)) for n, s in conv_stats.items()), sizes=sizes,
        target=torch.cat([p.detach().reshape(-1).to(dtype) for p in pieces]).to(device),
        position=(segment * width + offset).to(device), weights=weights.to(device),
        draw=torch.tensor(draws).to(device), segment=segment.to(device), n_draws=n_draws, width=width)


def drop_uniforms(layout: FlatLayout, beta_dr: float, generator: torch.Generator | None) -> torch.Tensor | None:
    """The ``beta_dr`` draws of one step on the CPU: ``torch.rand(n_draws, generator)`` (one per Conv layer or per
    Conv statistic, forward order, as :func:`gvbsm_hf.losses.conv_matching_loss` draws them), only when
    ``0 < beta_dr < 1``; ``None`` otherwise (the generator untouched)."""
    if layout.n_draws == 0 or not 0.0 < beta_dr < 1.0:
        return None
    return torch.rand(layout.n_draws, generator=generator)


def keep_mask(layout: FlatLayout, beta_dr: float, uniforms: torch.Tensor | None) -> torch.Tensor | None:
    """The keep mask of the terms ``(T,)`` from :func:`drop_uniforms`' draws already on the layout's device
    (the comparison runs there, nothing is read back), or ``None`` (keep all)."""
    if layout.n_draws == 0 or beta_dr <= 0.0:
        return None
    device = layout.target.device
    if beta_dr >= 1.0:  # everything dropped without drawing, the BN terms kept
        table = torch.zeros(layout.n_draws + 1, dtype=torch.bool, device=device)
        table[0] = True
    else:
        table = torch.cat([uniforms.new_ones(1), uniforms]) >= beta_dr  # entry 0: BN terms, always kept
    return table[layout.draw]


def drop_draws(layout: FlatLayout, beta_dr: float, generator: torch.Generator | None) -> torch.Tensor | None:
    """The ``beta_dr`` keep mask of the terms ``(T,)`` on the layout's device, or ``None`` (keep all):
    :func:`drop_uniforms` uploaded with a non-blocking copy (pinned on CUDA), then :func:`keep_mask`."""
    u = drop_uniforms(layout, beta_dr, generator)
    return keep_mask(layout, beta_dr, None if u is None else to_device_async(u, layout.target.device))


def _flat_state(layout: FlatLayout, state: dict) -> dict[str, torch.Tensor]:
    """``state["flat"]``: the EMA buffer and its ``seen`` flags (created zero / False on the first call)."""
    flat = state.get("flat")
    if flat is not None and flat["ema"].shape != layout.target.shape:
        raise StatisticsMismatchError(
            f"the EMA buffer holds {flat['ema'].numel()} values but this teacher's statistics {layout.target.numel()}"
            "; the EMA state belongs to another teacher or resolution: start synthesis afresh (new output dir).")
    if flat is None:
        flat = {"ema": torch.zeros_like(layout.target), "seen": torch.zeros_like(layout.target, dtype=torch.bool)}
        _adopt_per_layer_emas(layout, state, flat)
        state["flat"] = flat
    return flat


def _adopt_per_layer_emas(layout: FlatLayout, state: dict, flat: dict[str, torch.Tensor]) -> None:
    """A checkpoint of the per-layer losses (``state["bn"][layer] = (mean, var)``, ``state["conv"][layer][stat]``)
    resumes with its EMAs: copied into the flat buffer (once, at the first call) and marked seen."""
    old_bn, old_conv = state.pop("bn", None) or {}, state.pop("conv", None) or {}
    olds = [(old_bn.get(name) or (None, None))[i] for name in layout.bn_layers for i in (0, 1)]
    olds += [(old_conv.get(name) or {}).get(s) for name, stats in layout.conv_layers for s in stats]
    start = 0
    for size, old in zip(layout.sizes, olds):
        if old is not None:
            flat["ema"][start:start + size] = old.reshape(-1).to(flat["ema"])
            flat["seen"][start:start + size] = True
        start += size


def fused_matching_loss(
    layout: FlatLayout,
    bn_stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    conv_stats: Mapping[str, Mapping[str, torch.Tensor]],
    state: dict,
    *,
    alpha: float,
    keep: torch.Tensor | None = None,
    ema_init: str = "first",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L'_BN, L'_Conv)`` of one forward (docs/method.md Eq. 6 and 10; Eq. 1 when ``alpha = 0``), see the
    module docstring. ``keep``: :func:`drop_draws`' mask (``None``: every term). Updates ``state["flat"]``
    (EMA and seen flags) in place. Computes in float32 (float64 inputs stay float64)."""
    if ema_init not in ("zero", "first"):
        raise GVBSMError(f"ema_init must be one of ('zero', 'first'), got {ema_init!r} (syn_ema_init).")
    pieces = [t for name in layout.bn_layers for t in bn_stats[name]]
    pieces += [conv_stats[name][s] for name, stats in layout.conv_layers for s in stats]
    cur = torch.cat([p if p.ndim == 1 else p.reshape(-1) for p in pieces]).to(layout.target.dtype)
    if cur.shape != layout.target.shape:
        raise StatisticsMismatchError(
            f"the statistics hold {cur.numel()} values but their targets {layout.target.numel()}: the targets "
            "belong to another teacher, patch size or resolution: record them again.")
    flat = _flat_state(layout, state)
    ema, seen = flat["ema"], flat["seen"]
    cur_sg = cur.detach()
    first = cur_sg if ema_init == "first" else (1.0 - alpha) * cur_sg
    new_ema = torch.where(seen, torch.lerp(ema, cur_sg, 1.0 - alpha), first)
    if keep is not None:
        keep_e = keep[layout.segment]
        new_ema = torch.where(keep_e, new_ema, ema)
        seen.logical_or_(keep_e)
    else:
        seen.fill_(True)
    diff = layout.target - (new_ema + (cur - cur_sg))
    padded = diff.new_zeros(layout.terms * layout.width).index_copy(0, layout.position, diff * diff)
    norms = padded.view(layout.terms, layout.width).sum(1).clamp_min(torch.finfo(diff.dtype).tiny).sqrt()
    weights = layout.weights if keep is None else layout.weights * keep
    ema.copy_(new_ema)
    bn, conv = (weights @ norms).unbind(0)
    return bn, conv
