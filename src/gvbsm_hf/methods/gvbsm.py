"""G-VBSM and the SRe2L family as registered methods (docs/method.md "Recover", "Baselines and ablations").

One loss (docs/method.md Eq. 2 extended): ``w_ce CE + r_bn L'_BN (Eq. 6) + r_conv L'_Conv (Eq. 10)
+ w_dd L_DD (Eq. 5)``; the baselines are the same loss with other config defaults, never the
main method's recipe values.

Soft category-aware matching (EDC, docs/method.md "Beyond G-VBSM"), ``w = syn_class_weight``::

    L_BN   -> w L'_BN   + (1 - w) L^class_BN        L_Conv -> w L'_Conv + (1 - w) L^class_Conv

``L^class`` is the same SDS-form distance (same ``alpha``, ``syn_ema_init``, layer weights) per class of
the job: for each class ``c`` in the batch, the statistics of the batch's images of class ``c``
against the per-class statistics recorded from the real images of ``c`` (``stats_per_class``; BN:
recorded per-class BN-input mean / variance, since running statistics are global only), the L2
norm taken per class and averaged over the job's classes. Conv terms of ``L^class`` are dropped
with ``beta_dr`` by their own draws (after the global ones, in the same ``syn_beta_dr_unit``).
``w = 1`` (default) computes no per-class term and is today's loss exactly.

Per-instance statistic matching (docs/method.md Eq. 19, ``syn_r_instance``, off by default)::

    loss -> loss + r_inst L_inst,    L_inst = sum_l w_l || V^syn_l - V^real_l ||_2

``V_{l,c}`` the variance over the images of their spatial channel means of BN layer ``l``'s input (synthetic
batch: :attr:`gvbsm_hf.hooks.StatisticsHooks.bn_instance_stats`; real: recorded with ``stats_instance``),
``w_l`` the BN terms' layer weights; a plain L2 distance as Eq. 1, no EMA. ``syn_r_instance = 0`` computes
nothing and is the loss above exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..densification import class_major_dd_loss
from ..errors import StatisticsMismatchError
from ..losses import data_densification_loss, total_variation_loss
from ..matching import FlatLayout, build_layout, drop_draws, drop_uniforms, fused_matching_loss, keep_mask, layout_key
from ..moments import CONV_STATISTICS
from ..validation import check_range
from .registry import SynthesisConfig, SynthesisStep, register_method


@dataclass
class GVBSMConfig(SynthesisConfig):
    """G-VBSM's defaults (small-dataset settings of the authors' code, docs/method.md)."""

    syn_ce_weight: float = field(default=1.0, metadata={"help": "CE weight (Eq. 2)."})
    syn_r_bn: float = field(default=0.01, metadata={"help": "BN matching weight r_BN (Eq. 6)."})
    syn_r_conv: float = field(default=0.01, metadata={"help": "Conv matching weight r_Conv (Eq. 10; 0 disables GSM)."})
    syn_first_layer_multiplier: float = field(default=10.0, metadata={"help": "Weight of the first layer's terms."})
    syn_alpha: float = field(default=0.8, metadata={"help": "SDS EMA factor alpha (0 = plain Eq. 1)."})
    syn_beta_dr: float = field(default=0.4, metadata={"help": "Drop probability beta_dr of each Conv statistic (Eq. 10)."})
    syn_dd: bool = field(default=True, metadata={"help": "Data densification (Eq. 5)."})
    syn_dd_weight: float = field(default=1.0, metadata={"help": "DD weight."})
    syn_dd_tau: float = field(default=4.0, metadata={"help": "DD temperature tau (Eq. 5)."})
    syn_dd_pool_size: int = field(default=32, metadata={"help": "DD pooling side."})
    syn_class_weight: float = field(
        default=1.0, metadata={"help": "w of soft category-aware matching (EDC): w * global + (1 - w) * per-class "
                               "BN/Conv matching; 1 = global only (needs stats_per_class: true when < 1)."})
    syn_tv_weight: float = field(
        default=0.0, metadata={"help": "Weight of the total-variation image prior on the teacher's input (Eq. 18, "
                               "DeepInversion's smoothness prior, not in G-VBSM); 0 = off (the authors' loss)."})
    syn_r_instance: float = field(
        default=0.0, metadata={"help": "Weight of per-instance statistic matching (Eq. 19, not in G-VBSM): the "
                               "variance over the images of their per-image BN-input channel means against the "
                               "real images'; 0 = off (the authors' loss); > 0 needs stats_instance: true."})

    def validate(self) -> None:
        super().validate()
        for name in ("syn_ce_weight", "syn_r_bn", "syn_r_conv", "syn_first_layer_multiplier", "syn_dd_weight",
                     "syn_tv_weight", "syn_r_instance"):
            check_range(name, getattr(self, name), 0)
        check_range("syn_alpha", self.syn_alpha, 0, 1, high_open=True)
        check_range("syn_beta_dr", self.syn_beta_dr, 0, 1)
        check_range("syn_dd_tau", self.syn_dd_tau, 0, low_open=True)
        check_range("syn_dd_pool_size", self.syn_dd_pool_size, 1)
        check_range("syn_class_weight", self.syn_class_weight, 0, 1)

    def uses_bn(self) -> bool:
        return self.syn_r_bn > 0

    def uses_conv(self) -> bool:
        return self.syn_r_conv > 0

    def uses_class_stats(self) -> bool:
        return self.syn_class_weight < 1.0 and (self.syn_r_bn > 0 or self.syn_r_conv > 0)

    def uses_instance_stats(self) -> bool:
        return self.syn_r_instance > 0


@dataclass
class SRe2LConfig(GVBSMConfig):
    """SRe2L: CE + plain BN matching (Eq. 1), one teacher, no Conv statistics, no DD."""

    syn_r_conv: float = 0.0
    syn_alpha: float = 0.0
    syn_dd: bool = False
    syn_single_teacher: bool = True


@dataclass
class SRe2LDDConfig(SRe2LConfig):
    """SRe2L + data densification (Eq. 5)."""

    syn_dd: bool = True


@dataclass
class SRe2LGBMConfig(SRe2LConfig):
    """SRe2L + every backbone (GBM, Eq. 7)."""

    syn_single_teacher: bool = False


def class_sds_loss(current: torch.Tensor, target: torch.Tensor, ema: torch.Tensor | None, alpha: float,
                   ema_init: str = "first") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gvbsm_hf.losses.sds_matching_loss` row-wise: ``current``, ``target`` ``(K, ...)`` hold one class
    per row; ``new_ema = alpha ema + (1 - alpha) sg(current)`` (first call: ``sg(current)`` or
    ``(1 - alpha) sg(current)`` for ``ema_init="zero"``) and the loss is the MEAN over rows of
    ``||target_k - (new_ema_k + current_k - sg(current_k))||_2``. Returns ``(loss, new_ema)``."""
    if current.shape != target.shape:
        raise StatisticsMismatchError(
            f"per-class statistic of shape {tuple(current.shape)} matched against a target of shape "
            f"{tuple(target.shape)}; the per-class statistics belong to another teacher: record them again.")
    cur = current.float()
    cur_sg = cur.detach()
    if ema is None:
        new_ema = cur_sg if ema_init == "first" else (1.0 - alpha) * cur_sg
    else:
        new_ema = alpha * ema.detach().float() + (1.0 - alpha) * cur_sg
    diff = target.detach().float() - (new_ema + (cur - cur_sg))
    return torch.linalg.vector_norm(diff.flatten(1), ord=2, dim=1).mean(), new_ema


def class_bn_loss(stats, targets, emas, *, alpha: float, layer_weights=None, ema_init: str = "first"):
    """``L^class_BN = sum_l w_l (class_sds(mean_l) + class_sds(var_l))`` over the BN layers of ``stats``
    (``hooks.bn_class_stats``) against ``targets[l] = (mean, var)`` ``(K_job, C)``."""
    weights = layer_weights or {}
    new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    terms = []
    for name, (mean, var) in stats.items():
        t_mean, t_var = targets[name]
        old = (emas or {}).get(name)
        l_m, e_m = class_sds_loss(mean, t_mean, None if old is None else old[0], alpha, ema_init)
        l_v, e_v = class_sds_loss(var, t_var, None if old is None else old[1], alpha, ema_init)
        new[name] = (e_m, e_v)
        terms.append(float(weights.get(name, 1.0)) * (l_m + l_v))
    return (torch.stack(terms).sum() if terms else torch.zeros(())), new


def instance_bn_loss(stats: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                     layer_weights: dict[str, float] | None = None) -> torch.Tensor:
    """``L_inst = sum_l w_l ||V^syn_l - V^real_l||_2`` (docs/method.md Eq. 19) over the BN layers of ``stats``
    (``hooks.bn_instance_stats``, ``(C,)`` each) against the recorded ``targets[l]`` ``(C,)``; float32, no host
    sync. A plain L2 distance (Eq. 1 form), no EMA."""
    weights = layer_weights or {}
    terms = []
    for name, current in stats.items():
        target = targets.get(name)
        if target is None or target.shape != current.shape:
            raise StatisticsMismatchError(
                f"per-instance statistic of BN layer {name!r} ({tuple(current.shape)}) has no recorded target of that "
                f"shape ({None if target is None else tuple(target.shape)}); the statistics belong to another "
                "teacher: record them again (`--redo record`).")
        distance = torch.linalg.vector_norm(target.detach().float() - current.float(), ord=2)
        terms.append(float(weights.get(name, 1.0)) * distance)
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def class_drop_keep(n_layers: int, *, beta_dr: float, drop: str, generator=None) -> list[bool]:
    """The keep flags of :func:`class_conv_loss`'s terms: one per Conv layer (``drop="layer"``) or per layer and
    statistic of Eq. 9 (``"statistic"``); ``torch.rand`` draws on the CPU only when ``0 < beta_dr < 1``."""
    n_draws = n_layers * len(CONV_STATISTICS) if drop == "statistic" else n_layers
    if beta_dr <= 0.0:
        return [True] * n_draws
    if beta_dr >= 1.0:
        return [False] * n_draws
    return (torch.rand(n_draws, generator=generator) >= beta_dr).tolist()


def class_conv_loss(stats, targets, emas, *, alpha: float, beta_dr: float, generator=None, layer_weights=None,
                    drop: str = "layer", ema_init: str = "first", keep: list[bool] | None = None):
    """``L^class_Conv = sum_l w_l sum_s keep_{l,s} class_sds(s_l)`` (the four statistics of Eq. 9 per class),
    dropped as :func:`gvbsm_hf.losses.conv_matching_loss` does (:func:`class_drop_keep`, or ``keep`` drawn
    ahead of the step; a dropped term keeps its EMA)."""
    weights = layer_weights or {}
    names = list(stats)
    if keep is None:
        keep = class_drop_keep(len(names), beta_dr=beta_dr, drop=drop, generator=generator)
    new = {name: dict(v) for name, v in (emas or {}).items()}
    terms, draw = [], 0
    for li, name in enumerate(names):
        old = (emas or {}).get(name, {})
        layer_terms = []
        for stat, cur in stats[name].items():
            if drop == "statistic":
                k, draw = keep[draw], draw + 1
            else:
                k = keep[li]
            if not k:
                continue
            loss, ema = class_sds_loss(cur, targets[name][stat], old.get(stat), alpha, ema_init)
            new.setdefault(name, {})[stat] = ema
            layer_terms.append(loss)
        if layer_terms:
            terms.append(float(weights.get(name, 1.0)) * torch.stack(layer_terms).sum())
    if not terms:
        for layer in stats.values():
            for value in layer.values():
                return torch.zeros((), device=value.device), new
        return torch.zeros(()), new
    return torch.stack(terms).sum(), new


def teacher_layout(teacher, bn_stats, conv_stats, c: GVBSMConfig, bn_multiplier: float) -> FlatLayout:
    """The teacher's :class:`~gvbsm_hf.matching.FlatLayout` for these statistics (built once per teacher and
    set of terms, kept in ``teacher.layouts`` when the teacher has that dict)."""
    cache = getattr(teacher, "layouts", None)
    key = (layout_key(bn_stats, conv_stats), float(bn_multiplier), float(c.syn_first_layer_multiplier),
           c.syn_beta_dr_unit)
    if cache is not None and key in cache:
        return cache[key]
    layout = build_layout(bn_stats, conv_stats, teacher.bn_targets, teacher.conv_targets,
                          bn_weights=teacher.layer_weights("bn", bn_multiplier),
                          conv_weights=teacher.layer_weights("conv", c.syn_first_layer_multiplier),
                          drop=c.syn_beta_dr_unit)
    if cache is not None:
        cache[key] = layout
        cache[("last", *key[1:])] = layout  # what draw_matching predraws for
    return layout


def draw_matching(c: GVBSMConfig, teacher, generator: torch.Generator, **_: object) -> dict | None:
    """The random draws of the next step, made ahead of it (``SynthesisStep.draws``; a whole checkpoint interval
    at once, or before a compiled step), in the loss's own order: the ``beta_dr`` uniforms ``{"u": (n_draws,)}``
    on the CPU (:func:`gvbsm_hf.matching.drop_uniforms`), then with ``syn_class_weight < 1`` the per-class Conv
    terms' keep flags ``"class_keep"`` (:func:`class_drop_keep`); ``{}`` when the step draws nothing. The
    terms' layout comes from the teacher's last step, or from the statistics its hooks hold (a probe forward);
    ``None`` when neither exists yet (nothing drawn)."""
    bn_multiplier = c.syn_first_layer_multiplier if c.syn_first_layer == "first_bn_and_conv" else 1.0
    layout = (getattr(teacher, "layouts", None) or {}).get(
        ("last", float(bn_multiplier), float(c.syn_first_layer_multiplier), c.syn_beta_dr_unit))
    if layout is None and (c.syn_r_bn > 0 or c.syn_r_conv > 0):
        bn_stats = teacher.hooks.bn_stats if c.syn_r_bn > 0 else {}
        conv_stats = teacher.hooks.conv_stats if c.syn_r_conv > 0 else {}
        if not (bn_stats or conv_stats):
            return None
        layout = teacher_layout(teacher, bn_stats, conv_stats, c, bn_multiplier)
    draws: dict = {}
    if layout is not None and layout.conv_layers:
        u = drop_uniforms(layout, c.syn_beta_dr, generator)
        if u is not None:
            draws["u"] = u
    if c.uses_class_stats() and c.syn_r_conv > 0:  # then the per-class Conv terms' drops (a list: no upload)
        draws["class_keep"] = class_drop_keep(len(teacher.class_conv_targets), beta_dr=c.syn_beta_dr,
                                              drop=c.syn_beta_dr_unit, generator=generator)
    return draws


def _not_compilable(c: GVBSMConfig) -> str | None:
    """Why ``syn_compile`` cannot compile this config's step (``None``: it can)."""
    if c.uses_class_stats():
        return "turns the per-class drops (syn_class_weight < 1) into Python control flow"
    return None


def matching_loss(step: SynthesisStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """docs/method.md Eq. 2 extended: CE + BN (Eq. 1/6) + Conv (Eq. 10) + DD (Eq. 5) (+ the TV prior, Eq. 18,
    + per-instance statistic matching, Eq. 19), each on when its weight is.

    The first-layer multiplier goes to the first hooked Conv only (``syn_first_layer="first_conv"``,
    authors) or to the first BN too; ``syn_beta_dr_unit`` drops whole layers or single statistics;
    ``syn_ema_init`` starts the SDS EMAs at zero or at the first statistic (docs/differences.md)."""
    c: GVBSMConfig = step.config  # type: ignore[assignment]
    t = step.teacher
    ce = F.cross_entropy(step.logits.float(), step.labels)
    bn = conv = dd = ce.new_zeros(())
    bn_multiplier = c.syn_first_layer_multiplier if c.syn_first_layer == "first_bn_and_conv" else 1.0
    if c.syn_r_bn > 0 or c.syn_r_conv > 0:  # one fused loss over every BN and Conv term of the teacher
        bn_stats = t.hooks.bn_stats if c.syn_r_bn > 0 else {}
        conv_stats = t.hooks.conv_stats if c.syn_r_conv > 0 else {}
        if bn_stats or conv_stats:  # a teacher without such layers matches nothing (zero terms)
            layout = teacher_layout(t, bn_stats, conv_stats, c, bn_multiplier)
            if step.draws is not None:  # drawn ahead of the step (draw_matching)
                keep = keep_mask(layout, c.syn_beta_dr, step.draws.get("u")) if conv_stats else None
            else:
                keep = drop_draws(layout, c.syn_beta_dr, step.generator) if conv_stats else None
            bn, conv = fused_matching_loss(layout, bn_stats, conv_stats, step.state, alpha=c.syn_alpha, keep=keep,
                                           ema_init=c.syn_ema_init)
    extra: dict[str, torch.Tensor] = {}
    if c.uses_class_stats():  # soft category-aware matching; w = 1 never gets here (exactly today's loss)
        w = float(c.syn_class_weight)
        if c.syn_r_bn > 0:
            bn_class, step.state["bn_class"] = class_bn_loss(
                t.hooks.bn_class_stats, t.class_bn_targets, step.state.get("bn_class"), alpha=c.syn_alpha,
                layer_weights=t.layer_weights("bn", bn_multiplier), ema_init=c.syn_ema_init,
            )
            extra["bn_class"] = bn_class
            bn = w * bn + (1.0 - w) * bn_class
        if c.syn_r_conv > 0:
            conv_class, step.state["conv_class"] = class_conv_loss(
                t.hooks.conv_class_stats, t.class_conv_targets, step.state.get("conv_class"), alpha=c.syn_alpha,
                beta_dr=c.syn_beta_dr, generator=step.generator,
                layer_weights=t.layer_weights("conv", c.syn_first_layer_multiplier), drop=c.syn_beta_dr_unit,
                ema_init=c.syn_ema_init, keep=None if step.draws is None else step.draws["class_keep"],
            )
            extra["conv_class"] = conv_class
            conv = w * conv + (1.0 - w) * conv_class
    if c.syn_dd:
        if step.group_size > 0:  # the engine's class-major job: a reshape, no host sync (Eq. 5)
            dd = class_major_dd_loss(step.x, step.group_size, tau=c.syn_dd_tau, pool_size=c.syn_dd_pool_size,
                                     pool=c.syn_dd_pool)
        else:
            dd = data_densification_loss(step.x.float(), step.labels, tau=c.syn_dd_tau,
                                         pool_size=c.syn_dd_pool_size, pool=c.syn_dd_pool)
    loss = c.syn_ce_weight * ce + c.syn_r_bn * bn + c.syn_r_conv * conv + c.syn_dd_weight * dd
    if c.syn_r_instance > 0:  # per-instance BN statistics (Eq. 19); off by default: the authors' loss unchanged
        extra["inst"] = instance_bn_loss(t.hooks.bn_instance_stats, t.instance_bn_targets,
                                         t.layer_weights("bn", bn_multiplier))
        loss = loss + c.syn_r_instance * extra["inst"]
    if c.syn_tv_weight > 0:  # the image prior (Eq. 18); off by default, so the authors' loss is unchanged
        extra["tv"] = total_variation_loss(step.x)
        loss = loss + c.syn_tv_weight * extra["tv"]
    return loss, {"ce": ce, "bn": bn, "conv": conv, "dd": dd, **extra}


matching_loss.draw = draw_matching  # type: ignore[attr-defined]
matching_loss.not_compilable = _not_compilable  # type: ignore[attr-defined]

register_method("gvbsm", config=GVBSMConfig, description="G-VBSM: GBM + BN/Conv matching in SDS form + DD")(matching_loss)
register_method("sre2l", config=SRe2LConfig, description="SRe2L: CE + BN matching, one teacher")(matching_loss)
register_method("sre2l+dd", config=SRe2LDDConfig, description="SRe2L + data densification")(matching_loss)
register_method("sre2l+gbm", config=SRe2LGBMConfig, description="SRe2L + every backbone (GBM)")(matching_loss)
